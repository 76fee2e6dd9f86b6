"""Sender address verification on the real server with a real relay: the code travels by
e-mail through the establishment's relay, is read from what the relay received and typed
back; until then the user's address is treated as outside the allowed domains."""

from __future__ import annotations

import re
import smtplib
import sqlite3
import ssl
import time
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from support.relay import FaultRelay, Received
from support.server import PostierServer

if TYPE_CHECKING:
    from support.browser import Web

pytest_plugins = ["support.browser"]

pytestmark = pytest.mark.in_process

ALICE = "alice.martin@ac-lyon.fr"
SCHOOL = "ne-pas-repondre@ac-lyon.fr"
BASE = "/api/v1/account/sender-addresses"


@pytest.fixture
def verifying(server: PostierServer, relay: FaultRelay) -> PostierServer:
    """The server with verification of sender addresses turned on."""
    server.configure_relay(relay, verify_sender_addresses=True)
    return server


def send(c: httpx.Client, subject: str, **extra: Any) -> dict[str, Any]:
    r = c.post("/api/v1/messages", json={"to": ["parent@example.org"], "subject": subject,
                                         "text": "Bonjour", **extra})
    assert r.status_code == 202, r.text
    return dict(r.json())


def delivered(relay: FaultRelay, subject: str, timeout: float = 15) -> Received:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for m in relay.messages:
            if m.message["Subject"] == subject:
                return m
        time.sleep(0.05)
    raise AssertionError(f"no e-mail {subject!r} reached the relay: {relay.messages}")


def code_mail(relay: FaultRelay, address: str, nth: int = 1, timeout: float = 15) -> Received:
    deadline = time.monotonic() + timeout
    found: list[Received] = []
    while time.monotonic() < deadline:
        found = [m for m in relay.messages
                 if m.message["X-Postier-Notice"] == "sender-verification"
                 and m.rcpt_tos == [address]]
        if len(found) >= nth:
            return found[nth - 1]
        time.sleep(0.05)
    raise AssertionError(f"no verification code for {address} reached the relay: {found}")


def code_in(mail: Received) -> str:
    body = mail.message.get_body(("plain",))
    assert body is not None
    found = re.findall(r"\b(\d{6})\b", body.get_content())
    assert found, "the e-mail must show the code"
    return str(found[0])


def test_verify_then_send_as_oneself(verifying: PostierServer, relay: FaultRelay) -> None:
    with verifying.client("alice") as alice:
        # Not verified yet: the e-mail still leaves, under the school's sender, and the
        # answer says why, in the reader's language.
        accepted = send(alice, "Avant")
        assert "not verified" in accepted["sender_note"]
        assert "My account" in accepted["sender_note"]
        got = delivered(relay, "Avant")
        assert got.mail_from == SCHOOL
        assert ALICE in got.message["Reply-To"]
        record = alice.get(f"/api/v1/messages/{accepted['id']}",
                           headers={"Accept-Language": "fr"}).json()
        assert "non vérifiée" in record["sender_note"]
        assert "Mon compte" in record["sender_note"]

        r = alice.post(BASE, json={"address": ALICE}, headers={"Accept-Language": "fr"})
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "pending"
        assert r.json()["attempts_left"] == 5
        mail = code_mail(relay, ALICE)
        text = mail.message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
        # Who asked, and what to do if it was not them; French first for a French reader.
        assert text.index("Alice Martin (alice") < text.index("-- English --")
        assert "Si vous n'êtes pas à l'origine de cette demande" in text
        assert "If you did not ask for this" in text
        assert mail.mail_from == SCHOOL
        code = code_in(mail)
        assert alice.get(BASE).json()[0]["status"] == "pending"

        wrong = "000000" if code != "000000" else "111111"
        r = alice.post(f"{BASE}/{ALICE}/confirm", json={"code": wrong})
        assert r.status_code == 422
        assert r.json()["error"]["code"] == "wrong_code"
        assert "4 attempts left" in r.json()["error"]["message"]

        r = alice.post(f"{BASE}/{ALICE}/confirm", json={"code": code})
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "verified"
        assert [a["status"] for a in alice.get(BASE).json()] == ["verified"]

        accepted = send(alice, "Après")
        assert accepted["sender_note"] is None
        got = delivered(relay, "Après")
        assert got.mail_from == ALICE
        assert ALICE in got.message["From"]
        preview = alice.post("/api/v1/settings/preview", json={}).json()
        assert preview["rule"] == "inside_allowed"

        # Removed: it must be verified again before it is the From again.
        assert alice.delete(f"{BASE}/{ALICE}").status_code == 204
        assert alice.get(BASE).json() == []
        assert alice.delete(f"{BASE}/{ALICE}").status_code == 404
        accepted = send(alice, "Retirée")
        assert accepted["sender_note"] is not None
        assert delivered(relay, "Retirée").mail_from == SCHOOL


def test_the_test_send_leaves_as_the_administrators_e_mails_would(
    verifying: PostierServer, relay: FaultRelay
) -> None:
    # The administrator's address is not verified: their e-mails leave under the
    # establishment's sender, and so does the test e-mail (a relay that accepts only the
    # establishment's address must not fail the test and pass the real e-mails, or the
    # other way round).
    with verifying.client() as admin:
        report = admin.post("/api/v1/settings/test", json={"to": "verif@example.org"}).json()
        assert report["ok"], report
        assert admin.post("/api/v1/settings/preview", json={}).json()["rule"] == (
            "unverified_sender")
    (got,) = relay.wait_for(1)
    assert got.mail_from == SCHOOL
    assert "direction@ac-lyon.fr" not in got.message["From"]


def test_five_wrong_codes_lock_the_code(verifying: PostierServer, relay: FaultRelay) -> None:
    with verifying.client("alice") as alice:
        assert alice.post(BASE, json={"address": ALICE}).status_code == 200
        code = code_in(code_mail(relay, ALICE))
        wrong = "000000" if code != "000000" else "111111"
        answers = [alice.post(f"{BASE}/{ALICE}/confirm", json={"code": wrong})
                   for _ in range(5)]
        assert [r.status_code for r in answers] == [422, 422, 422, 422, 409]
        assert answers[-1].json()["error"]["code"] == "code_locked"
        # Even the right code is refused now: a new one is needed.
        r = alice.post(f"{BASE}/{ALICE}/confirm", json={"code": code})
        assert r.status_code == 409
        assert r.json()["error"]["code"] == "code_locked"
        assert "new code" in r.json()["error"]["hint"]
        assert alice.get(BASE).json()[0]["status"] == "locked"
        # A code that is not six digits is not an attempt at all.
        r = alice.post(f"{BASE}/{ALICE}/confirm", json={"code": "12ab"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "code"
        # And a new code cannot be asked for at once either (one a minute).
        r = alice.post(BASE, json={"address": ALICE}, headers={"Accept-Language": "fr"})
        assert r.status_code == 429
        assert r.json()["error"]["code"] == "too_many_codes"
        assert "secondes" in r.json()["error"]["message"]
        accepted = send(alice, "Toujours pas")
        assert accepted["sender_note"] is not None


def test_expired_code_is_refused(verifying: PostierServer, relay: FaultRelay) -> None:
    with verifying.client("alice") as alice:
        assert alice.post(BASE, json={"address": ALICE}).status_code == 200
        code = code_in(code_mail(relay, ALICE))
        # Half an hour passes (written as the clock would have made it).
        with sqlite3.connect(verifying.data_dir / "postier.db", timeout=10) as db:
            db.execute("UPDATE sender_addresses SET code_expires_at = ?", (time.time() - 1,))
        assert alice.get(BASE).json()[0]["status"] == "expired"
        r = alice.post(f"{BASE}/{ALICE}/confirm", json={"code": code})
        assert r.status_code == 409
        assert r.json()["error"]["code"] == "code_expired"
        assert "30 minutes" in r.json()["error"]["message"]


def test_another_user_can_neither_confirm_nor_see(
    verifying: PostierServer, relay: FaultRelay
) -> None:
    with verifying.client("alice") as alice, verifying.client("bob") as bob:
        assert alice.post(BASE, json={"address": ALICE}).status_code == 200
        code = code_in(code_mail(relay, ALICE))
        # Bob may not send as alice: he may neither ask for her code nor use it.
        r = bob.post(BASE, json={"address": ALICE})
        assert r.status_code == 403 and r.json()["error"]["field"] == "address"
        r = bob.post(f"{BASE}/{ALICE}/confirm", json={"code": code})
        assert r.status_code == 403
        assert alice.post(f"{BASE}/{ALICE}/confirm", json={"code": code}).json()[
            "status"] == "verified"
        assert ALICE not in bob.get(BASE).text
        assert bob.delete(f"{BASE}/{ALICE}").status_code == 404
        assert alice.get(BASE).json()[0]["status"] == "verified"

    # A shared address granted to both: alice's verification is hers, and nothing bob
    # sees says it was verified by somebody.
    with verifying.client("admin") as admin:
        assert admin.put("/api/v1/users/bob", json={"granted_senders": [ALICE]}
                         ).status_code == 200
    time.sleep(2.1)  # the token cache keeps bob's former grants that long
    with verifying.client("bob") as bob:
        assert bob.get(BASE).json() == []
        accepted = send(bob, "Bob en Alice", **{"from": ALICE})
        assert accepted["sender_note"] is not None
        assert delivered(relay, "Bob en Alice").mail_from == SCHOOL
        r = bob.post(BASE, json={"address": ALICE})
        assert r.status_code == 200 and r.json()["status"] == "pending"
        assert len(code_mail(relay, ALICE, nth=2).rcpt_tos) == 1


def test_resending_is_limited(verifying: PostierServer, relay: FaultRelay) -> None:
    extra = [f"secretariat{n}@ac-lyon.fr" for n in range(5)]
    with verifying.client("admin") as admin:
        assert admin.put("/api/v1/users/alice", json={"granted_senders": extra}
                         ).status_code == 200
    time.sleep(2.1)
    with verifying.client("alice") as alice:
        assert alice.post(BASE, json={"address": ALICE}).status_code == 200
        again = alice.post(BASE, json={"address": ALICE})
        assert again.status_code == 429
        assert "less than a minute ago" in again.json()["error"]["message"]
        answers = [alice.post(BASE, json={"address": a}).status_code for a in extra]
        # Five codes a day: the sixth address waits until tomorrow.
        assert answers == [200, 200, 200, 200, 429]
        r = alice.post(BASE, json={"address": extra[-1]})
        assert "5 codes in the last 24 hours" in r.json()["error"]["message"]
        assert len({m.rcpt_tos[0] for m in relay.wait_for(5)}) == 5


def test_outside_allowed_domains_stays_rewritten_even_verified(
    verifying: PostierServer, relay: FaultRelay
) -> None:
    bob_address = "bob.durand@gmail.com"
    with verifying.client("bob") as bob:
        assert bob.post(BASE, json={"address": bob_address}).status_code == 200
        code = code_in(code_mail(relay, bob_address))
        assert bob.post(f"{BASE}/{bob_address}/confirm", json={"code": code}
                        ).json()["status"] == "verified"
        accepted = send(bob, "Gmail")
        # Not a verification matter: no note, the allowed domains decide.
        assert accepted["sender_note"] is None
        got = delivered(relay, "Gmail")
        assert got.mail_from == SCHOOL
        assert bob_address in got.message["Reply-To"]


def test_verification_off_changes_nothing(server: PostierServer, relay: FaultRelay) -> None:
    server.configure_relay(relay)
    with server.client("alice") as alice:
        accepted = send(alice, "Sans vérification")
        assert accepted["sender_note"] is None
        assert delivered(relay, "Sans vérification").mail_from == ALICE


def test_smtp_submission_follows_the_same_rule(
    server_factory: Any, relay: FaultRelay
) -> None:
    s: PostierServer = server_factory()
    s.start()
    s.configure_relay(relay, verify_sender_addresses=True)
    message = (f"From: Alice Martin <{ALICE}>\r\nTo: parent@example.org\r\n"
               "Subject: Par SMTP\r\n\r\nBonjour\r\n")
    ctx = ssl.create_default_context(cafile=str(s.data_dir / "smtp-cert.pem"))
    with smtplib.SMTP("127.0.0.1", s.smtp_port, timeout=10) as c:
        c.starttls(context=ctx)
        c.login("alice", "motdepasse-alice")
        c.mail(ALICE)
        c.rcpt("parent@example.org")
        code, reply = c.data(message.encode())
    assert code == 250
    assert b"sender address not verified" in reply
    got = delivered(relay, "Par SMTP")
    assert got.mail_from == SCHOOL
    assert ALICE in got.message["Reply-To"]


# -- the workstation's command and the SDK ----------------------------------------------------


def test_cli_and_sdk(verifying: PostierServer, relay: FaultRelay, tmp_path: Any) -> None:
    import os
    import subprocess
    import sys

    from postier.errors import PostierError
    from postier.workstation.client import Client

    env = {**os.environ, "POSTIER_CONFIG": str(tmp_path / "poste.toml"),
           "POSTIER_OUTBOX": str(tmp_path / "outbox"), "LANG": "C", "COLUMNS": "200"}
    for var in ("LANGUAGE", "LC_ALL", "POSTIER_DATA_DIR"):
        env.pop(var, None)

    def postier(*args: str, lang: str = "C") -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "postier", *args], capture_output=True,
                              text=True, env={**env, "LANG": lang}, timeout=60)

    for key, value in (("mode", "server"), ("server.url", verifying.url),
                       ("server.token", verifying.tokens["alice"])):
        assert postier("config", "set", key, value).returncode == 0
    r = postier("send", "--to", "p@example.org", "--subject", "CLI", "--text", "x",
                lang="fr_FR.UTF-8")
    assert r.returncode == 0, r.stderr
    assert "Adresse d'expéditeur non vérifiée" in r.stderr, "the user is told why"

    r = postier("account", "verify-sender", ALICE)
    assert r.returncode == 0, r.stderr
    assert f"postier account confirm {ALICE} CODE" in r.stdout
    code = code_in(code_mail(relay, ALICE))
    r = postier("account", "confirm", ALICE, "000000" if code != "000000" else "111111")
    assert r.returncode == 1 and "not the right code" in r.stderr
    r = postier("account", "confirm", ALICE, code)
    assert r.returncode == 0 and "is verified" in r.stdout, r.stderr
    assert "verified" in postier("account", "senders").stdout

    with Client(verifying.url, verifying.tokens["alice"], lang="en") as sdk:
        assert [a["status"] for a in sdk.sender_addresses()] == ["verified"]
        assert sdk.submit(["p@example.org"], "SDK", "x").sender_note is None
        sdk.remove_sender(ALICE)
        assert sdk.sender_addresses() == []
        assert "not verified" in (sdk.submit(["p@example.org"], "SDK 2", "x").sender_note
                                  or "")
        # A new code so soon is refused with the wait, as a PostierError the caller can read.
        with pytest.raises(PostierError) as exc:
            sdk.verify_sender(ALICE)
        assert exc.value.code == "too_many_codes"
        assert "seconds" in exc.value.message("en")


# -- My account, in a real Chromium (last: the browser's event loop stays open for the
# rest of the module, and the servers of the tests above provision with asyncio.run) ----


def test_verify_an_address_from_my_account(
    web: Web, web_server: PostierServer, relay: FaultRelay
) -> None:
    web_server.configure_relay(relay)
    # The administrator turns verification on in Paramètres d'envoi des e-mails.
    admin = web.sign_in("admin")
    admin.goto("/settings")
    admin.click("#fold-verification > summary")  # a folded part of the page
    assert not admin.is_checked("#f-verify_sender_addresses")
    admin.check("#f-verify_sender_addresses")
    admin.click("button:has-text('Enregistrer')")
    admin.wait_for_url("**/settings?ok=settings_saved")
    assert admin.is_checked("#f-verify_sender_addresses"), "the box shows what is saved"
    with web_server.client() as c:
        assert c.get("/api/v1/settings").json()["verify_sender_addresses"] is True

    page = web.sign_in("alice")
    with web_server.client("alice") as alice:
        first = alice.post("/api/v1/messages", json={"to": ["p@example.org"],
                                                     "subject": "Avant"}).json()["id"]
    page.goto(f"/messages/{first}")
    assert "Adresse d'expéditeur non vérifiée" in page.locator(".sender-note").inner_text()
    page.goto("/account")
    section = page.locator("#sender-addresses")
    assert "Votre établissement vous demande de vérifier" in section.inner_text()
    assert page.input_value("#f-sender_address") == ALICE, "her own address is proposed"
    page.click("button:has-text('M\\'envoyer un code')")
    assert f"Un code a été envoyé à {ALICE}" in page.locator("#sender-message").inner_text()
    row = page.locator(f"tr[data-address='{ALICE}']")
    assert "Code envoyé" in row.locator(".sender-state").inner_text()

    code = code_in(code_mail(relay, ALICE))
    row.locator("input[name=code]").fill("000000" if code != "000000" else "111111")
    row.locator("button:has-text('Vérifier')").click()
    assert "Ce n'est pas le bon code : il reste 4 essais." in page.locator(
        "#e-sender_code").inner_text()

    page.locator(f"tr[data-address='{ALICE}'] input[name=code]").fill(code)
    page.locator(f"tr[data-address='{ALICE}'] button:has-text('Vérifier')").click()
    assert f"{ALICE} est vérifiée" in page.locator("#sender-message").inner_text()
    assert "Vérifiée" in page.locator(
        f"tr[data-address='{ALICE}'] .sender-state").inner_text()
    web.screenshot(page, "account-sender-addresses")

    with web_server.client("alice") as alice:
        r = alice.post("/api/v1/messages", json={"to": ["p@example.org"], "subject": "Web"})
        assert r.json()["sender_note"] is None

    # Someone else's address is refused with the reason, the address kept in the field.
    page.fill("#f-sender_address", "bob.durand@gmail.com")
    page.click("button:has-text('M\\'envoyer un code')")
    error = page.locator("#e-sender_address").inner_text()
    assert "Vous ne pouvez vérifier qu'une adresse" in error
    assert page.input_value("#f-sender_address") == "bob.durand@gmail.com"
