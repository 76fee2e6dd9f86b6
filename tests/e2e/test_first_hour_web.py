"""In a real Chromium: the queue's "retry all" button after a relay outage, the e-mail
page's "send again" button, and the settings page's choice of the sender's name."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import pytest
from playwright.sync_api import expect

from support.relay import FaultRelay
from support.server import PostierServer

if TYPE_CHECKING:
    from support.browser import Web

pytest_plugins = ["support.browser"]


pytestmark = pytest.mark.in_process


def _submit(server: PostierServer, user: str, subject: str) -> str:
    with server.client(user) as c:
        r = c.post("/api/v1/messages", json={"to": ["parent@example.org"],
                                             "subject": subject, "text": "Bonjour"})
        assert r.status_code == 202, r.text
        return str(r.json()["id"])


def test_the_queues_button_retries_what_the_filters_show(
    web: Web, web_server: PostierServer, relay: FaultRelay
) -> None:
    web_server.configure_relay(relay, retry={"first_delay": 3600, "max_delay": 3600,
                                             "max_age": 86400})
    relay.rcpt_replies["parent@example.org"] = "451 4.3.0 Mailbox busy, try later"
    ids = [_submit(web_server, user, subject) for user, subject in
           (("alice", "Conseil de classe"), ("bob", "Sortie scolaire"))]
    for message_id in ids:
        web_server.wait_status(message_id, "deferred")
    relay.reset_faults()

    admin = web.sign_in("admin")
    admin.goto("/queue?status=deferred&sender=alice")
    dialogs: list[str] = []

    def accept(dialog: Any) -> None:
        dialogs.append(dialog.message)
        dialog.accept()

    admin.on("dialog", accept)
    admin.click("button:has-text('Réessayer tous ces e-mails maintenant')")
    admin.wait_for_url(re.compile(r"ok=retried_all"))
    assert dialogs and "Réessayer maintenant" in dialogs[0]
    expect(admin.locator("[data-retried]")).to_have_text(
        "E-mails réessayés maintenant : 1.")
    # The filters stay as they were.
    assert admin.input_value("#f-sender") == "alice"
    web_server.wait_status(ids[0], "sent")
    (got,) = relay.wait_for(1)
    assert got.message["Subject"] == "Conseil de classe"
    with web_server.client() as c:
        assert c.get(f"/api/v1/messages/{ids[1]}").json()["status"] == "deferred", (
            "the button retried an e-mail the filters did not show")


def test_an_administrator_sends_a_sent_e_mail_again_from_its_page(
    web: Web, web_server: PostierServer, relay: FaultRelay
) -> None:
    web_server.configure_relay(relay)
    first = _submit(web_server, "alice", "Réunion")
    web_server.wait_status(first, "sent")
    alice = web.sign_in("alice")
    alice.goto(f"/messages/{first}")
    assert alice.locator("button:has-text('Renvoyer')").count() == 0

    admin = web.sign_in("admin")
    admin.goto(f"/messages/{first}")
    admin.on("dialog", lambda dialog: dialog.accept())
    admin.click("button:has-text('Renvoyer')")
    admin.wait_for_url(re.compile(r"/messages/(?!" + first + r")\w+\?ok=resent"))
    copy = admin.url.split("/messages/")[1].split("?")[0]
    web_server.wait_status(copy, "sent")
    assert [m.message["Subject"] for m in relay.wait_for(2)] == ["Réunion", "Réunion"]


def test_the_sender_name_choice_on_the_settings_page(
    web: Web, web_server: PostierServer, relay: FaultRelay
) -> None:
    web_server.configure_relay(relay)
    page = web.sign_in("admin")
    page.goto("/settings")
    assert page.is_checked("input[name='sender.display'][value='establishment']")
    page.click("#fold-display > summary")  # a folded part of the page
    example = page.locator("code[data-example='user_via']").inner_text()
    assert example == "Bob Durand via Collège Jean Moulin <ne-pas-repondre@ac-lyon.fr>"
    page.check("input[name='sender.display'][value='user_via']")
    page.click("button:has-text('Enregistrer')")
    page.wait_for_url("**/settings?ok=settings_saved")
    assert page.is_checked("input[name='sender.display'][value='user_via']")
    with web_server.client() as c:
        assert c.get("/api/v1/settings").json()["sender"]["display"] == "user_via"

    page.goto("/preview?user=bob")
    assert "Bob Durand via Collège Jean Moulin" in page.locator("dl.facts").inner_text()
    _submit(web_server, "bob", "Via")
    (got,) = relay.wait_for(1)
    assert got.message["From"].addresses[0].display_name == (
        "Bob Durand via Collège Jean Moulin")
