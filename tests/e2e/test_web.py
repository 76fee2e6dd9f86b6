"""The web interface in a real headless Chromium, against a real ``postier serve``.

Each test signs in as a person would, clicks and types, and checks what that person sees
(in French unless said otherwise) and what the server then holds. The main pages are kept
as pictures in docs/screenshots/ for the user guide.
"""

from __future__ import annotations

import ast
import json
import os
import re
import string
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from playwright.sync_api import expect

import postier
from postier import i18n

from support.relay import FaultRelay
from support.server import PostierServer

if TYPE_CHECKING:
    from support.browser import Web

pytest_plugins = ["support.browser"]

pytestmark = pytest.mark.in_process

FR = {"Accept-Language": "fr-FR,fr;q=0.9"}


def _settings(server: PostierServer) -> dict[str, Any]:
    with server.client() as c:
        return dict(c.get("/api/v1/settings").json())


def _fill_relay(page: Any, host: str, port: int, timeout: int = 5) -> None:
    page.fill("#f-relay\\.host", host)
    page.fill("#f-relay\\.port", str(port))
    page.select_option("#f-relay\\.security", "none")
    page.select_option("#f-relay\\.auth", "none")
    page.fill("#f-relay\\.timeout", str(timeout))


# -- signing in ------------------------------------------------------------------------------


def test_sign_in_wrong_password_then_throttled(web: Web, web_server: PostierServer) -> None:
    page = web.page()
    page.goto("/settings")
    assert page.url.endswith("/login?next=/settings"), "a page needs a session"
    assert page.locator("h1").inner_text() == "Se connecter"

    page.fill("#f-username", "admin")
    page.fill("#f-password", "pas-le-bon")
    page.click("button:has-text('Se connecter')")
    assert page.locator("[role=alert]").inner_text() == "Identifiant ou mot de passe incorrect."
    assert page.input_value("#f-username") == "admin", "the username stays typed"
    assert page.get_attribute("#f-password", "aria-describedby") == "login-error"

    for _ in range(4):
        page.fill("#f-password", "encore-faux")
        page.click("button:has-text('Se connecter')")
    # Six failures in a row: even the right password must wait, and the reader is told why.
    page.fill("#f-password", "motdepasse-admin")
    page.click("button:has-text('Se connecter')")
    message = page.locator("[role=alert]").inner_text()
    assert "Trop de tentatives" in message and "attendez" in message, message
    assert "/login" in page.url

    # Another person, by e-mail address, is not held back; the session cookie is guarded.
    alice = web.page()
    alice.goto("/login")
    alice.fill("#f-username", "alice.martin@ac-lyon.fr")
    alice.fill("#f-password", "motdepasse-alice")
    alice.click("button:has-text('Se connecter')")
    alice.wait_for_url("**/mine")
    assert alice.locator("h1").inner_text() == "Mes e-mails"
    (cookie,) = [c for c in alice.context.cookies() if c["name"] == "postier_session"]
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Lax"
    assert "motdepasse" not in cookie["value"] and "alice" not in cookie["value"]

    alice.click("button:has-text('Se déconnecter')")
    alice.wait_for_url("**/login?ok=signed_out")
    alice.goto("/mine")
    assert "/login" in alice.url, "signed out means signed out"


# -- Paramètres d'envoi des e-mails -----------------------------------------------------------


def test_settings_are_saved_and_a_bad_port_is_shown_next_to_its_field(
    web: Web, web_server: PostierServer
) -> None:
    page = web.sign_in("admin")
    page.click("nav >> text=Paramètres d'envoi")
    assert page.locator("h1").inner_text() == "Paramètres d'envoi des e-mails"
    assert page.is_visible("text=Déléguer l'envoi de tous les e-mails au serveur")
    assert page.is_visible("text=hors des domaines autorisés")  # the original doc's help

    page.fill("#f-sender\\.name", "Collège Jean Moulin")
    page.fill("#f-sender\\.address", "ne-pas-repondre@ac-lyon.fr")
    page.fill("#f-relay\\.host", "smtp.ac-lyon.fr")
    page.fill("#f-relay\\.port", "587")
    page.select_option("#f-relay\\.security", "starttls")
    page.select_option("#f-relay\\.auth", "password")
    page.fill("#f-relay\\.username", "college")
    page.fill("#f-relay\\.password", "Secret-Du-Relais-42")
    page.fill("#f-relay\\.timeout", "45")
    page.fill("#f-allowed_domains", "ac-lyon.fr\n*.AC-Lyon.fr\n")
    page.click("button:has-text('Enregistrer')")
    page.wait_for_url("**/settings?ok=settings_saved")
    assert page.locator("[role=status]").first.inner_text() == "Les paramètres sont enregistrés."

    saved = _settings(web_server)
    assert saved["sender"] == {"name": "Collège Jean Moulin",
                               "address": "ne-pas-repondre@ac-lyon.fr",
                               "display": "establishment"}
    assert saved["relay"]["host"] == "smtp.ac-lyon.fr" and saved["relay"]["timeout"] == 45
    assert saved["relay"]["password_set"] is True
    assert saved["allowed_domains"] == ["ac-lyon.fr", "*.ac-lyon.fr"]
    # The form shows what is saved, never the password.
    assert page.input_value("#f-relay\\.timeout") == "45"
    assert page.input_value("#f-relay\\.password") == ""
    assert "Secret-Du-Relais-42" not in page.content()
    assert page.is_visible("text=Un mot de passe est enregistré")
    web.screenshot(page, "settings")

    # A port out of range: said next to the port, linked to it, and nothing is saved.
    page.fill("#f-relay\\.port", "70000")
    page.fill("#f-sender\\.name", "Nom qui ne doit pas être enregistré")
    page.click("button:has-text('Enregistrer')")
    error = page.locator("#e-relay\\.port")
    assert error.is_visible()
    assert error.inner_text() == "Saisissez un nombre inférieur ou égal à 65535."
    assert page.get_attribute("#f-relay\\.port", "aria-invalid") == "true"
    assert "e-relay.port" in (page.get_attribute("#f-relay\\.port", "aria-describedby") or "")
    assert page.locator(".error-summary").is_visible()
    assert page.input_value("#f-sender\\.name") == "Nom qui ne doit pas être enregistré"
    assert _settings(web_server) == saved, "an invalid form saves nothing"

    # Blank password keeps it; the box removes it.
    page.fill("#f-relay\\.port", "587")
    page.click("button:has-text('Enregistrer')")
    page.wait_for_url("**/settings?ok=settings_saved")
    assert _settings(web_server)["relay"]["password_set"] is True
    page.check("#f-relay\\.remove_password")
    page.click("button:has-text('Enregistrer')")
    page.wait_for_url("**/settings?ok=settings_saved")
    assert _settings(web_server)["relay"]["password_set"] is False


# -- Tester l'envoi d'e-mails ----------------------------------------------------------------


def test_failing_test_send_says_timed_out_and_what_to_do(
    web: Web, web_server: PostierServer, relay: FaultRelay, blackhole: int
) -> None:
    web_server.configure_relay(relay)
    before = _settings(web_server)
    page = web.sign_in("admin")
    page.goto("/settings")
    _fill_relay(page, "127.0.0.1", blackhole, timeout=2)
    page.fill("#f-test_to", "verif@example.org")
    page.click("button:has-text(\"Tester l'envoi d'e-mails\")")
    assert page.locator("[data-test-status]").inner_text().startswith("Test en cours")
    page.wait_for_selector(".report.failed .outcome:not(.hidden)", timeout=15_000)

    result = page.locator("#test-result")
    text = result.inner_text()
    assert "Échec du test" in text
    assert "Délai dépassé" in text
    assert "augmentez le délai d'attente du serveur" in text.lower()
    assert "Que faire :" in text
    steps = page.locator("#test-result li.step")
    assert steps.count() >= 2
    names = page.locator("#test-result li.step .name").all_inner_texts()
    assert names[:2] == ["résolution du nom", "connexion"], names
    assert re.fullmatch(r"\d+ ms", page.locator("#test-result li.step .ms").first.inner_text())
    assert "fail" in (steps.last.get_attribute("class") or "")
    assert _settings(web_server) == before, "testing unsaved values saves nothing"
    web.screenshot(page, "test-result-failed")


def test_passing_test_send_reaches_the_relay(
    web: Web, web_server: PostierServer, relay: FaultRelay
) -> None:
    page = web.sign_in("admin")
    page.goto("/settings")
    page.fill("#f-sender\\.address", "ne-pas-repondre@ac-lyon.fr")
    _fill_relay(page, relay.host, relay.port)
    page.fill("#f-test_to", "verif@example.org")
    page.click("button:has-text(\"Tester l'envoi d'e-mails\")")
    page.wait_for_selector(".report.ok .outcome:not(.hidden)", timeout=15_000)
    text = page.locator("#test-result").inner_text()
    assert "Test réussi" in text and "Le serveur a accepté l'e-mail de test" in text
    names = page.locator("#test-result li.step .name").all_inner_texts()
    assert len(names) >= 6 and all("fail" not in (c or "") for c in
                                   page.locator("#test-result li.step").evaluate_all(
                                       "els => els.map(e => e.className)"))
    (got,) = relay.wait_for(1)
    assert got.rcpt_tos == ["verif@example.org"]
    web.screenshot(page, "test-result")


# -- Profils d'envoi d'e-mails ----------------------------------------------------------------


def test_profile_created_from_the_creation_line_then_retrieved_by_a_user(
    web: Web, web_server: PostierServer, tmp_path: Path
) -> None:
    secret = "Mot-De-Passe-Partagé"
    admin = web.sign_in("admin")
    admin.goto("/profiles")
    admin.click(".create-line")  # the creation line...
    admin.keyboard.type("Messagerie académique")  # ...a label...
    admin.keyboard.press("Enter")  # ...and Enter.
    admin.wait_for_url(re.compile(r"/profiles/\d+\?ok=profile_created"))
    assert admin.locator(".pick-list li.selected").inner_text().startswith(
        "Messagerie académique")
    # On the right, the SMTP server, ready to be typed in.
    assert admin.evaluate("document.activeElement.id") == "f-host"
    admin.fill("#f-host", "smtp.ac-lyon.fr")
    admin.fill("#f-port", "587")
    admin.select_option("#f-security", "starttls")
    admin.select_option("#f-auth", "password")
    admin.fill("#f-password", secret)
    admin.click("button:has-text('Enregistrer le profil')")
    admin.wait_for_url(re.compile(r"\?ok=profile_saved"))
    assert secret not in admin.content()
    web.screenshot(admin, "profiles")

    # A second profile with the same label is refused at the creation line.
    admin.fill("#f-new_label", "Messagerie académique")
    admin.keyboard.press("Enter")
    expect(admin.locator("#e-new_label")).to_be_visible()
    assert admin.get_attribute("#f-new_label", "aria-invalid") == "true"

    alice = web.sign_in("alice")
    alice.click("nav >> text=Profils d'envoi")
    alice.click("text=Messagerie académique")
    assert alice.locator(".create-line").count() == 0, "users do not create profiles"
    assert alice.locator("button:has-text('Enregistrer le profil')").count() == 0
    facts = alice.locator(".retrieve .facts").inner_text()
    assert "smtp.ac-lyon.fr" in facts and "587" in facts and "STARTTLS" in facts
    assert secret not in alice.content()
    with alice.expect_download() as info:
        alice.click("button:has-text(\"Récupérer un profil d'envoi d'e-mails\")")
    download = info.value
    assert download.suggested_filename == "profil-messagerie-academique.json"
    path = tmp_path / download.suggested_filename
    download.save_as(path)
    profile = json.loads(path.read_text(encoding="utf-8"))
    assert {"id", "label", "host", "port", "security", "auth", "username", "password",
            "timeout"} <= set(profile)
    assert profile["host"] == "smtp.ac-lyon.fr" and profile["password"] == secret

    # The file is what `postier config import` takes on a workstation.
    env = {**os.environ, "POSTIER_CONFIG": str(tmp_path / "poste.toml"),
           "POSTIER_OUTBOX": str(tmp_path / "outbox")}
    r = subprocess.run([sys.executable, "-m", "postier", "config", "import", str(path)],
                       capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Messagerie académique" in r.stdout


# -- the queue and My e-mails ----------------------------------------------------------------


def test_my_emails_and_the_queue_show_what_became_of_each_e_mail(
    web: Web, web_server: PostierServer, relay: FaultRelay
) -> None:
    web_server.configure_relay(relay)
    relay.rcpt_replies["inconnu@example.org"] = "550 5.1.1 No such user"
    with web_server.client("alice") as c:
        ok = c.post("/api/v1/messages", json={"to": ["parent@example.org"],
                                              "subject": "Conseil de classe", "text": "t"})
        bad = c.post("/api/v1/messages", json={"to": ["inconnu@example.org"],
                                               "subject": "Convocation", "text": "t"})
    web_server.wait_status(ok.json()["id"], "sent")
    web_server.wait_status(bad.json()["id"], "failed")
    # Alice is told about the failure by a notice the establishment sends (not one of
    # her e-mails, but one more sent e-mail in the queue).
    notice = next(m for m in relay.wait_for(2) if m.message["X-Postier-Notice"])
    assert notice.rcpt_tos == ["alice.martin@ac-lyon.fr"]

    alice = web.sign_in("alice")
    rows = alice.locator("#mine-rows tr")
    assert rows.count() == 2
    sent = alice.locator("#mine-rows tr", has_text="Conseil de classe")
    assert "Envoyé" in sent.inner_text() and "parent@example.org" in sent.inner_text()
    failed = alice.locator("#mine-rows tr", has_text="Convocation").inner_text()
    assert "Échec" in failed and "Vérifiez l'adresse" in failed, failed
    web.screenshot(alice, "my-emails")

    # The queue, live: a new e-mail appears in the counts without reloading the page.
    admin = web.sign_in("admin")
    assert "/queue" in admin.url
    count_sent = admin.locator(".count.s-sent .n")
    expect(count_sent).to_have_text("2", timeout=12_000)  # the e-mail and the notice
    assert admin.locator(".count.s-failed .n").inner_text() == "1"
    assert admin.locator(".chart svg rect.bar").count() >= 2
    with web_server.client("alice") as c:
        third = c.post("/api/v1/messages", json={"to": ["autre@example.org"],
                                                 "subject": "Sortie scolaire", "text": "t"})
    web_server.wait_status(third.json()["id"], "sent")
    expect(count_sent).to_have_text("3", timeout=12_000)
    assert admin.locator("#queue-rows tr", has_text="Sortie scolaire").count() == 1
    web.screenshot(admin, "queue")

    # Filters, then the detail of an e-mail with its attempts and the relay's replies.
    admin.fill("#f-recipient", "inconnu@")
    admin.click("button:has-text('Filtrer')")
    assert admin.locator("#queue-rows tr").count() == 1
    admin.click("#queue-rows >> text=Convocation")
    detail = admin.locator("main").inner_text()
    assert "550" in detail and "No such user" in detail
    admin.click("button:has-text('Réessayer maintenant')")
    admin.wait_for_url(re.compile(r"\?ok=retried"))


# -- language, roles, CSRF -------------------------------------------------------------------


def test_language_switch_is_on_every_page_and_remembered(shared_web: Web) -> None:
    page = shared_web.sign_in("admin")
    page.goto("/settings")
    assert page.locator("h1").inner_text() == "Paramètres d'envoi des e-mails"
    assert page.get_attribute("html", "lang") == "fr"
    page.click("a.lang:has-text('English')")
    page.wait_for_url("**/settings")
    assert page.locator("h1").inner_text() == "E-mail sending settings"
    assert page.get_attribute("html", "lang") == "en"
    page.goto("/profiles")
    assert page.locator("h1").inner_text() == "E-mail sending profiles"
    page.click("a.lang:has-text('Français')")
    assert page.locator("h1").inner_text() == "Profils d'envoi d'e-mails"
    # An English browser gets English until it chooses.
    english = shared_web.page(lang="en-GB")
    english.goto("/login")
    assert english.locator("h1").inner_text() == "Sign in"


def test_a_user_gets_403_on_administrators_pages(shared_web: Web) -> None:
    alice = shared_web.sign_in("alice")
    for path in ("/settings", "/queue", "/users", "/users/bob", "/queue/live.json"):
        response = alice.goto(path)
        assert response is not None and response.status == 403, path
    alice.goto("/settings")
    assert alice.locator("h1").inner_text() == "Accès refusé"
    assert "administrateurs" in alice.locator("main").inner_text()


def test_posts_without_the_csrf_token_are_refused(
    shared_web: Web, shared_server: PostierServer
) -> None:
    page = shared_web.sign_in("admin")
    before = _settings(shared_server)
    form = {"sender.name": "Pirate", "relay.host": "evil.example", "relay.port": "25",
            "relay.timeout": "30", "retry.first_delay": "60", "retry.max_delay": "60",
            "retry.max_age": "3600"}
    r = page.request.post("/settings", form=form)
    assert r.status == 403
    assert "This form has expired or did not come from this site." in r.text()
    r = page.request.post("/settings", form={**form, "csrf": "faux-jeton"})
    assert r.status == 403
    token = page.get_attribute("meta[name=csrf-token]", "content")
    r = page.request.post("/settings", form={**form, "csrf": token},
                          headers={"Origin": "https://evil.example"})
    assert r.status == 403
    assert _settings(shared_server) == before
    # The session cookie alone is not enough either for a script's POST.
    r = page.request.post("/users", form={"username": "intrus", "email": "i@example.org"})
    assert r.status == 403
    # Sign-in itself is protected: a form posted without the sign-in token is refused.
    r = httpx.post(shared_server.url + "/login", data={"username": "admin",
                                                "password": "motdepasse-admin"}, headers=FR)
    assert r.status_code == 403 and "postier_session" not in r.cookies


def test_users_are_added_and_a_new_token_is_shown_once(
    shared_web: Web, shared_server: PostierServer
) -> None:
    page = shared_web.sign_in("admin")
    page.click("nav >> text=Utilisateurs")
    page.fill("#f-username", "claire")
    page.fill("#f-email", "claire.petit@ac-lyon.fr")
    page.fill("#f-name", "Claire Petit")
    page.fill("#f-password", "court")
    page.click("button:has-text(\"Ajouter l'utilisateur\")")
    assert page.locator("#e-password").inner_text() == i18n.translate(
        "fr", "A password has at least 8 characters.")
    page.fill("#f-password", "un-bon-mot-de-passe")
    page.click("button:has-text(\"Ajouter l'utilisateur\")")
    page.wait_for_url("**/users/claire?ok=user_created")
    page.fill("#f-token-name", "poste secrétariat")
    page.click("button:has-text('Créer un jeton')")
    token = page.locator("#new-token").inner_text()
    assert token.startswith("pst_")
    me = httpx.get(shared_server.url + "/api/v1/me", headers={"Authorization": f"Bearer {token}"})
    assert me.json()["username"] == "claire"
    page.goto("/users/claire")
    assert token not in page.content(), "a token is shown once"
    page.check("#f-disabled")
    page.click("form[action='/users/claire'] button:has-text('Enregistrer')")
    page.wait_for_url("**/users/claire?ok=user_saved")
    me = httpx.get(shared_server.url + "/api/v1/me", headers={"Authorization": f"Bearer {token}"})
    assert me.status_code == 401, "a disabled user's tokens stop at once"


# -- every page string has its French twin ---------------------------------------------------

_TEMPLATE_STRING = re.compile(r'\b_\(\s*"((?:[^"\\]|\\.)*)"')
_TEMPLATES = Path(postier.__file__).parent / "server" / "web" / "templates"


def _template_strings() -> dict[str, str]:
    found: dict[str, str] = {}
    for path in sorted(_TEMPLATES.glob("*.html")):
        text = path.read_text(encoding="utf-8")
        for m in _TEMPLATE_STRING.finditer(text):
            msgid = ast.literal_eval('"' + m.group(1) + '"')
            found.setdefault(msgid, f"{path.name}:{text.count(chr(10), 0, m.start()) + 1}")
    return found


def _fields(template: str) -> set[str]:
    return {f.split("!")[0] for _, f, _, _ in string.Formatter().parse(template) if f}


def test_every_template_string_has_a_french_translation() -> None:
    strings = _template_strings()
    assert len(strings) > 150, "the scan must see the pages' strings"
    assert "Test the sending of e-mails" in strings
    catalog = i18n._catalog("fr")
    missing = [f"{where}: {s!r}" for s, where in strings.items() if s not in catalog]
    assert not missing, "no French translation for:\n" + "\n".join(missing)
    wrong = [s for s in strings if _fields(catalog[s]) != _fields(s)]
    assert not wrong, f"placeholders differ in: {wrong}"
    assert catalog["Test the sending of e-mails"] == "Tester l'envoi d'e-mails"
    assert catalog["Delegate the sending of all e-mails to the server"] == (
        "Déléguer l'envoi de tous les e-mails au serveur")
