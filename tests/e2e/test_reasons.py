"""Why an e-mail waits or failed, as its sender and its administrator read it, in a real
headless Chromium against a real ``postier serve`` and a real relay told to misbehave.

A teacher reads what happens and whether anything is asked of them, in French, never the
administrator's remedy nor an English or Python text; an administrator reads what to
change. « Réponse du serveur » shows only what a relay replied.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import pytest

from support.relay import FaultRelay
from support.server import PostierServer

if TYPE_CHECKING:
    from support.browser import Web

pytest_plugins = ["support.browser"]

pytestmark = pytest.mark.in_process

FR = {"Accept-Language": "fr-FR,fr;q=0.9"}
NOTHING_TO_DO = "Le serveur d'envoi de l'établissement ne répond pas ; Postier réessaie. " \
    "Vous n'avez rien à faire."
# What only an administrator can do, and what only a program should see.
ADMIN_ONLY = ("Vérifiez le numéro de port", "Augmentez le délai", "Pour les administrateurs",
              "Que faire")
NEVER = ("Errno", "Connect call failed", "Nothing answers", "Timed out", "connection refused",
         "TimeoutError", "Réponse du serveur")


def _submit(server: PostierServer, subject: str, to: str) -> str:
    with server.client("alice") as c:
        r = c.post("/api/v1/messages", json={"to": [to], "subject": subject, "text": "t"})
        assert r.status_code == 202, r.text
        return str(r.json()["id"])


def _wait_reason(server: PostierServer, message_id: str, code: str,
                 timeout: float = 20.0) -> dict[str, Any]:
    """The e-mail as alice reads it through the API once its last attempt says ``code``."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    with server.client("alice", **FR) as c:
        while time.monotonic() < deadline:
            last = c.get(f"/api/v1/messages/{message_id}").json()
            history = last.get("history") or []
            done = last.get("status") in ("deferred", "failed")
            if done and history and (history[-1].get("reason") or {}).get("code") == code:
                return last
            time.sleep(0.1)
    raise AssertionError(f"no attempt of {message_id} ended with {code} in {timeout} s: {last}")


def _absent(text: str, words: tuple[str, ...], who: str) -> None:
    shown = [w for w in words if w in text]
    assert not shown, f"{who} is shown {shown}:\n{text}"


def _basics_hold(page: Any) -> None:
    """The page's accessibility basics: one h1, its sections titled, headed columns."""
    assert page.locator("h1").count() == 1
    assert page.locator("h2").all_inner_texts()[:2] == ["Destinataires", "Tentatives"]
    headers = page.locator("main th")
    assert all(headers.nth(i).get_attribute("scope") == "col" for i in range(headers.count()))
    assert page.locator("label:has(input[data-live-toggle])").count() == 1


def test_a_relay_that_does_not_answer_is_said_to_each_reader(
    web: Web, web_server: PostierServer, relay: FaultRelay
) -> None:
    # One attempt at a time: the next waits a minute, unless asked for now.
    web_server.configure_relay(relay, retry={"first_delay": 60, "max_delay": 60,
                                             "max_age": 3600})
    relay.down()
    message_id = _submit(web_server, "Réunion parents-professeurs", "parent@example.org")
    doc = _wait_reason(web_server, message_id, "refused")

    # The API: the code and its parameters, no Python exception's text.
    reason = doc["history"][-1]["reason"]
    assert reason["params"]["port"] == relay.port and reason["params"]["host"] == relay.host
    assert reason["reply"] is None and "reply" not in reason["params"]
    assert doc["reason"]["code"] == "refused" and doc["reason"]["sender"] == NOTHING_TO_DO
    _absent(json.dumps(doc["reason"]) + json.dumps(reason), ("Errno", "Connect call"), "the API")

    alice = web.sign_in("alice")
    row = alice.locator("#mine-rows tr", has_text="Réunion parents-professeurs").inner_text()
    assert NOTHING_TO_DO in row, row
    _absent(row, ADMIN_ONLY + NEVER, "the teacher's list")
    alice.click("#mine-rows >> text=Réunion parents-professeurs")
    alice.wait_for_url(f"**/messages/{message_id}")
    text = alice.locator("main").inner_text()
    assert NOTHING_TO_DO in text, text
    _absent(text, ADMIN_ONLY + NEVER, "the teacher's e-mail page")
    _basics_hold(alice)

    admin = web.sign_in("admin")
    admin.goto(f"/messages/{message_id}")
    text = admin.locator("main").inner_text()
    assert "Vérifiez le numéro de port et que le serveur SMTP est en service." in text, text
    assert NOTHING_TO_DO in text, "the administrator also reads what the sender is told"
    _absent(text, NEVER, "the administrator's e-mail page")
    _basics_hold(admin)

    # Now the relay accepts connections but says nothing: the attempts time out.
    relay.stall = ("connect", 30)
    relay.up()
    web_server.configure_relay(relay, retry={"first_delay": 60, "max_delay": 60,
                                             "max_age": 3600}, relay={
        "host": relay.host, "port": relay.port, "security": "none", "auth": "none",
        "timeout": 1})
    with web_server.client("alice") as c:
        assert c.post(f"/api/v1/messages/{message_id}/retry").status_code == 200
    _wait_reason(web_server, message_id, "timeout")
    alice.goto("/mine")
    row = alice.locator("#mine-rows tr", has_text="Réunion parents-professeurs").inner_text()
    assert NOTHING_TO_DO in row, row
    _absent(row, ADMIN_ONLY + NEVER, "the teacher's list")
    admin.goto("/mine")  # the administrator's own list reads the remedy too
    admin.goto(f"/messages/{message_id}")
    text = admin.locator("main").inner_text()
    assert "Augmentez le délai d'attente du serveur (actuellement 1 s)" in text, text
    _absent(text, NEVER, "the administrator's e-mail page")


def test_a_refused_recipient_shows_the_relays_reply_and_asks_to_check_the_address(
    web: Web, web_server: PostierServer, relay: FaultRelay
) -> None:
    web_server.configure_relay(relay)
    relay.rcpt_replies["inconnu@example.org"] = "550 5.1.1 No such user"
    message_id = _submit(web_server, "Convocation", "inconnu@example.org")
    web_server.wait_status(message_id, "failed", user="alice")
    doc = _wait_reason(web_server, message_id, "recipient_refused")
    reason = doc["history"][-1]["reason"]
    assert reason["params"]["reply_code"] == 550 and reason["transient"] is False
    assert reason["reply"] == "550 5.1.1 No such user"
    assert reason["sender"].startswith("L'adresse d'un destinataire a été refusée")
    with web_server.client("alice") as c:  # an English reader reads English
        english = c.get(f"/api/v1/messages/{message_id}").json()["reason"]
    assert english["sender"].startswith("A recipient's address was refused")

    alice = web.sign_in("alice")
    alice.goto(f"/messages/{message_id}")
    text = alice.locator("main").inner_text()
    assert "Vérifiez l'adresse, puis envoyez l'e-mail à nouveau." in text, text
    assert "Réponse du serveur" in text and "550 5.1.1 No such user" in text, text
    _absent(text, (*ADMIN_ONLY, "The SMTP server", "Check the"), "the teacher's e-mail page")
    _basics_hold(alice)

    # The notice e-mail tells alice the same, not the administrator's remedy.
    notice = next(m for m in relay.wait_for(1) if m.message["X-Postier-Notice"])
    body = notice.message.get_body(("plain",))
    assert body is not None
    content = body.get_content()
    assert "Vérifiez l'adresse, puis envoyez l'e-mail à nouveau." in content, content
    assert "inconnu@example.org : 550 5.1.1 No such user" in content, content
