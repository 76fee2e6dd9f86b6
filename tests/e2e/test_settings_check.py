"""A test that passes is not a saving: the settings' test and connection check, and the
profiles' test, against a real ``postier serve`` and a real relay requiring AUTH.

What an administrator must notice: a test run with settings that are not saved says so
(on the page, in the API's report and in the test e-mail); leaving a form with unsaved
changes asks first; "Vérifier la connexion" goes as far as the authentication and sends
nothing; the SMTP conversation is there for the help desk, its password masked.
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

import pytest
from playwright.sync_api import expect

from support.fixtures import AUTH_USERS
from support.relay import FaultRelay
from support.server import PostierServer

if TYPE_CHECKING:
    from support.browser import Web

pytest_plugins = ["support.browser"]

pytestmark = pytest.mark.in_process

USER, PASSWORD = next(iter(AUTH_USERS.items()))
SECRETS = (PASSWORD, base64.b64encode(PASSWORD.encode()).decode(),
           base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode())
ADMIN_EMAIL = "direction@ac-lyon.fr"


def _field(name: str) -> str:
    return "#f-" + name.replace(".", "\\.")


def _with_auth(server: PostierServer, relay: FaultRelay) -> None:
    server.configure_relay(relay, relay={
        "host": relay.host, "port": relay.port, "security": "none", "auth": "password",
        "username": USER, "password": PASSWORD, "timeout": 5})


def _no_secret_in(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"the conversation shows a secret ({secret!r})"


def _leave(page: Any) -> list[str]:
    """Click the page's home link, staying if asked; return the questions asked (the
    click returns once a question, if any, is answered)."""
    asked: list[str] = []
    page.once("dialog", lambda d: (asked.append(d.type), d.dismiss()))
    page.click("a.brand", no_wait_after=True)
    return asked


def _settings_test(server: PostierServer, **body: Any) -> dict[str, Any]:
    with server.client(**{"Accept-Language": "fr"}) as c:
        r = c.post("/api/v1/settings/test", json={"to": "verif@example.org", **body})
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_api_check_reaches_auth_sends_nothing_and_says_when_settings_are_unsaved(
    web_server: PostierServer, auth_relay: FaultRelay
) -> None:
    _with_auth(web_server, auth_relay)

    report = _settings_test(web_server, send=False)
    steps = [s["step"] for s in report["steps"]]
    assert report["ok"] is True, report
    assert steps[-2:] == ["auth", "quit"], f"the check stops after AUTH, then QUIT: {steps}"
    assert not {"mail_from", "rcpt_to", "data"} & set(steps), steps
    assert report["sent"] is False
    assert report["unsaved"] is False, "the saved settings were tested"
    conversation = "\n".join(report["conversation"])
    assert "S: 235" in conversation, conversation  # authenticated
    assert "C: QUIT" in conversation and "MAIL FROM" not in conversation
    assert "********" in conversation
    _no_secret_in(conversation)
    assert auth_relay.messages == [], "a connection check must not send an e-mail"

    # The same check with a changed timeout: it works, but is not saved.
    report = _settings_test(web_server, send=False, settings={"relay": {"timeout": 7}})
    assert report["ok"] is True and report["unsaved"] is True
    assert report["unsaved_message"] == (
        "Ces paramètres fonctionnent mais ne sont pas encore enregistrés : cliquez sur "
        "Enregistrer.")
    with web_server.client() as c:
        assert c.get("/api/v1/settings").json()["relay"]["timeout"] == 5, "nothing saved"

    # Sent with unsaved settings, the test e-mail says so too.
    report = _settings_test(web_server, settings={"relay": {"timeout": 7}})
    assert report["ok"] is True and report["sent"] is True and report["unsaved"] is True
    (got,) = auth_relay.wait_for(1)
    body = got.message.get_content()
    assert "pas encore enregistrés" in body, body
    # Sent with the saved settings (the same values given again): nothing to save.
    auth_relay.clear()
    report = _settings_test(web_server, settings={"relay": {"timeout": 5}})
    assert report["ok"] is True and report["unsaved"] is False
    (got,) = auth_relay.wait_for(1)
    assert "pas encore enregistrés" not in got.message.get_content()


def test_settings_page_says_not_saved_and_warns_before_leaving(
    web: Web, web_server: PostierServer, auth_relay: FaultRelay
) -> None:
    _with_auth(web_server, auth_relay)
    page = web.sign_in("admin")
    page.goto("/settings")
    page.click(_field("relay.timeout"))
    page.fill(_field("relay.timeout"), "8")

    page.click("button:has-text(\"Tester l'envoi d'e-mails\")")
    result = page.locator("#test-result")
    page.wait_for_selector(".report.ok .outcome:not(.hidden)", timeout=15_000)
    expect(result.locator("[data-unsaved-notice]")).to_contain_text(
        "Ces paramètres fonctionnent mais ne sont pas encore enregistrés : cliquez sur "
        "Enregistrer.")
    expect(page.locator("[data-test-status]")).to_contain_text("pas encore enregistrés")
    (got,) = auth_relay.wait_for(1)
    assert "pas encore enregistrés" in got.message.get_content()

    # Leaving now asks first; staying keeps the page and what was typed.
    assert _leave(page) == ["beforeunload"], "leaving with unsaved changes must ask"
    assert page.url.endswith("/settings")
    assert page.input_value(_field("relay.timeout")) == "8"

    # Saved: the same test says nothing about saving, and leaving asks nothing.
    page.click("form.settings .actions button:has-text('Enregistrer')")
    page.wait_for_url("**/settings?ok=settings_saved")
    asked_again: list[Any] = []
    page.on("dialog", lambda d: (asked_again.append(d.type), d.dismiss()))
    auth_relay.clear()
    page.click("button:has-text(\"Tester l'envoi d'e-mails\")")
    page.wait_for_selector(".report.ok .outcome:not(.hidden)", timeout=15_000)
    expect(result.locator("[data-unsaved-notice]")).to_have_count(0)
    auth_relay.wait_for(1)
    page.click("a.brand")
    page.wait_for_url(lambda url: "/settings" not in url)
    assert asked_again == [], "nothing to lose after a save: no question"


def test_check_the_connection_button_shows_the_masked_conversation(
    web: Web, web_server: PostierServer, auth_relay: FaultRelay
) -> None:
    _with_auth(web_server, auth_relay)
    page = web.sign_in("admin")
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.goto("/settings")
    check = page.get_by_role("button", name="Vérifier la connexion")
    check.focus()
    page.keyboard.press("Enter")  # reachable and usable from the keyboard
    page.wait_for_selector(".report.ok .outcome:not(.hidden)", timeout=15_000)
    result = page.locator("#test-result")
    expect(result.locator(".report-title")).to_have_text("Vérification de la connexion réussie")
    names = result.locator("[data-step] .name").all_inner_texts()
    assert names[-2:] == ["authentification", "QUIT"], names
    expect(result.locator(".outcome")).to_contain_text("Aucun e-mail n'a été envoyé")
    expect(result.locator("[data-unsaved-notice]")).to_have_count(0)
    assert auth_relay.messages == []

    conversation = result.locator("#smtp-conversation")
    expect(conversation).to_be_hidden()
    result.locator("details.conversation summary").click()
    expect(conversation).to_contain_text("S: 235")
    text = conversation.inner_text()
    assert "AUTH" in text and "********" in text, text
    _no_secret_in(text)
    result.get_by_role("button", name="Copier").click()
    expect(result.get_by_role("button", name="Copié")).to_be_visible()
    copied = page.evaluate("navigator.clipboard.readText()")
    assert "C: QUIT" in copied
    _no_secret_in(copied)
    web.screenshot(page, "settings-check")


def _profile(server: PostierServer, relay: FaultRelay) -> int:
    with server.client() as c:
        r = c.post("/api/v1/profiles", json={
            "label": "Relais de test", "host": relay.host, "port": relay.port,
            "security": "none", "auth": "password", "username": USER, "password": PASSWORD,
            "timeout": 5})
        assert r.status_code == 201, r.text
        return int(r.json()["id"])


def test_profiles_page_checks_and_tests_a_profile(
    web: Web, web_server: PostierServer, auth_relay: FaultRelay
) -> None:
    profile_id = _profile(web_server, auth_relay)
    page = web.sign_in("admin")
    page.goto(f"/profiles/{profile_id}")

    page.get_by_role("button", name="Vérifier la connexion").click()
    page.wait_for_selector(".report.ok .outcome:not(.hidden)", timeout=15_000)
    result = page.locator("#test-result")
    names = result.locator("[data-step] .name").all_inner_texts()
    assert names[-2:] == ["authentification", "QUIT"], names
    expect(result.locator("[data-unsaved-notice]")).to_have_count(0)
    assert auth_relay.messages == []

    # A label being edited: the test e-mail goes out, and the page says it is not saved.
    page.click(_field("label"))
    page.fill(_field("label"), "Relais de test (nouveau)")
    page.get_by_role("button", name="Envoyer un e-mail de test").click()
    page.wait_for_selector(".report.ok .outcome:not(.hidden)", timeout=15_000)
    expect(result.locator(".report-title")).to_have_text("Test réussi")
    expect(result.locator("[data-unsaved-notice]")).to_contain_text("pas encore enregistrés")
    (got,) = auth_relay.wait_for(1)
    assert got.rcpt_tos == [ADMIN_EMAIL]
    assert "Relais de test (nouveau)" in got.message.get_content()

    # Leaving the profile with its unsaved label asks first.
    assert _leave(page) == ["beforeunload"], "leaving with unsaved changes must ask"
    assert page.url.endswith(f"/profiles/{profile_id}")


@pytest.mark.parametrize("user", ["alice"])
def test_only_administrators_test_a_profile(
    web_server: PostierServer, auth_relay: FaultRelay, user: str
) -> None:
    profile_id = _profile(web_server, auth_relay)
    with web_server.client(user) as c:
        r = c.post(f"/api/v1/profiles/{profile_id}/test", json={"send": False})
    assert r.status_code == 403, r.text
    with web_server.client() as c:
        r = c.post(f"/api/v1/profiles/{profile_id + 1000}/test", json={"send": False})
    assert r.status_code == 404, r.text
    assert auth_relay.sessions == 0 and auth_relay.connections == 0
