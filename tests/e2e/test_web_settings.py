"""The whole "Paramètres d'envoi des e-mails" page in a real headless Chromium, against a
real ``postier serve``: OAuth2, relay presets and sending limits, the backup relay and its
test-send, DKIM keys and their DNS records, retention and the delay warning.

Each test does what an administrator would (in French unless said otherwise) and checks
what they see and what the server then holds through its API.
"""

from __future__ import annotations

import datetime as dt
import html
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


def _settings(server: PostierServer) -> dict[str, Any]:
    with server.client() as c:
        return dict(c.get("/api/v1/settings").json())


def _save(page: Any) -> None:
    page.click("form.settings .actions button:has-text('Enregistrer')")
    page.wait_for_url("**/settings?ok=settings_saved")


def _field(name: str) -> str:
    return "#f-" + name.replace(".", "\\.")


def _unfold(page: Any, fold: str) -> None:
    """Open a folded part of the page (its heading is a <summary>)."""
    if not page.locator(f"#{fold}").evaluate("d => d.open"):
        page.click(f"#{fold} > summary")


def test_oauth2_relay_from_a_preset_is_saved_and_its_secrets_never_come_back(
    web: Web, web_server: PostierServer
) -> None:
    page = web.sign_in("admin")
    page.goto("/settings")
    # The OAuth2 part shows only for the OAuth2 method.
    expect(page.locator(_field("relay.oauth2_client_id"))).to_be_hidden()

    # A preset fills the server and the provider's limits; everything stays editable.
    _unfold(page, "fold-relay-presets")
    page.select_option(_field("relay.preset"), "microsoft365")
    assert page.input_value(_field("relay.host")) == "smtp.office365.com"
    assert page.input_value(_field("relay.port")) == "587"
    assert page.input_value(_field("relay.security")) == "starttls"
    expect(page.locator(_field("relay.max_per_minute"))).to_be_visible()
    assert page.input_value(_field("relay.max_per_minute")) == "30"
    expect(page.locator("[data-preset-status]").first).to_contain_text("vérifiez")
    page.fill(_field("relay.max_per_minute"), "25")  # the administrator has the last word

    page.select_option(_field("relay.auth"), "oauth2")
    expect(page.locator(_field("relay.oauth2_client_id"))).to_be_visible()
    expect(page.locator(_field("relay.password"))).to_be_hidden()
    # Google needs a refresh token, Microsoft a tenant: each shows its own.
    page.select_option(_field("relay.oauth2_provider"), "google")
    expect(page.locator(_field("relay.oauth2_refresh_token"))).to_be_visible()
    expect(page.locator(_field("relay.oauth2_tenant"))).to_be_hidden()
    page.select_option(_field("relay.oauth2_provider"), "microsoft")
    expect(page.locator(_field("relay.oauth2_tenant"))).to_be_visible()
    expect(page.locator(_field("relay.oauth2_refresh_token"))).to_be_hidden()

    soon = (dt.date.today() + dt.timedelta(days=10)).isoformat()
    page.fill(_field("relay.username"), "ne-pas-repondre@ac-lyon.fr")
    page.fill(_field("relay.oauth2_tenant"), "6f1c2d3e-tenant")
    page.fill(_field("relay.oauth2_client_id"), "a1b2c3-client")
    page.fill(_field("relay.oauth2_client_secret"), "Secret-Client-Entra-42")
    page.fill(_field("relay.oauth2_secret_expires"), soon)
    page.click("fieldset:has(#f-relay\\.host) details.advanced summary:has-text('Réglages "
               "avancés')")
    page.fill(_field("relay.oauth2_token_url"), "https://login.example.org/token/")
    _save(page)

    relay = _settings(web_server)["relay"]
    assert relay["auth"] == "oauth2" and relay["oauth2_provider"] == "microsoft"
    assert relay["host"] == "smtp.office365.com" and relay["max_per_minute"] == 25
    assert relay["oauth2_tenant"] == "6f1c2d3e-tenant"
    assert relay["oauth2_client_id"] == "a1b2c3-client"
    assert relay["oauth2_client_secret_set"] is True
    assert relay["oauth2_secret_expires"] == soon
    assert relay["oauth2_token_url"] == "https://login.example.org/token"
    # The page shows that a secret is saved, never the secret.
    assert "Secret-Client-Entra-42" not in page.content()
    assert page.input_value(_field("relay.oauth2_client_secret")) == ""
    expect(page.locator("#h-relay\\.oauth2_client_secret")).to_contain_text(
        "Un secret client est enregistré")
    # ...and warns that it expires soon.
    warning = page.locator(".problem.warning").first
    expect(warning).to_contain_text(soon)
    expect(warning).to_contain_text("expire")
    web.screenshot(page, "settings-oauth2")

    # Left blank, the secret stays; the box removes it.
    _save(page)
    assert _settings(web_server)["relay"]["oauth2_client_secret_set"] is True
    page.check(_field("relay.remove_oauth2_client_secret"))
    _save(page)
    relay = _settings(web_server)["relay"]
    assert relay["oauth2_client_secret_set"] is False
    assert relay["oauth2_client_id"] == "a1b2c3-client", "only the secret is removed"


def test_backup_relay_is_saved_tested_then_removed(
    web: Web, web_server: PostierServer, relay: FaultRelay, blackhole: int
) -> None:
    # The main relay does not answer; the backup relay is the test relay.
    web_server.configure_relay(relay)
    with web_server.client() as c:
        r = c.put("/api/v1/settings", json={"relay": {"host": "127.0.0.1", "port": blackhole,
                                                      "timeout": 2}})
        assert r.status_code == 200, r.text
    page = web.sign_in("admin")
    page.goto("/settings")
    expect(page.locator(_field("backup_relay.host"))).to_be_hidden()
    expect(page.locator(_field("test_relay"))).to_be_hidden()
    _unfold(page, "fold-backup")
    page.check(_field("backup_relay"))
    page.fill(_field("backup_relay.host"), relay.host)
    page.fill(_field("backup_relay.port"), str(relay.port))
    page.select_option(_field("backup_relay.security"), "none")
    page.select_option(_field("backup_relay.auth"), "password")
    page.fill(_field("backup_relay.username"), "secours")
    page.fill(_field("backup_relay.password"), "Mot-De-Passe-Secours")
    page.fill(_field("backup_relay.timeout"), "5")
    page.fill(_field("failover_after"), "2")
    page.select_option(_field("failover_after.unit"), "minutes")
    _save(page)

    saved = _settings(web_server)
    backup = saved["backup_relay"]
    assert backup is not None, "ticking the box and saving sets the backup relay"
    assert (backup["host"], backup["port"], backup["username"]) == (relay.host, relay.port,
                                                                    "secours")
    assert backup["password_set"] is True and "password" not in backup
    assert saved["failover_after"] == 120
    assert saved["relay"]["port"] == blackhole, "the main relay is left as it was"
    assert "Mot-De-Passe-Secours" not in page.content()
    expect(page.locator(_field("backup_relay"))).to_be_checked()
    expect(page.locator("#h-backup_relay\\.password")).to_contain_text(
        "Un mot de passe est enregistré")

    # Test-send through the backup relay (the password makes no difference to this relay:
    # it offers no authentication, so switch it off for the test).
    page.select_option(_field("backup_relay.auth"), "none")
    page.select_option(_field("test_relay"), "backup")
    page.fill(_field("test_to"), "verif@example.org")
    page.click("button:has-text(\"Tester l'envoi d'e-mails\")")
    page.wait_for_selector(".report.ok .outcome:not(.hidden)", timeout=15_000)
    assert "Test réussi" in page.locator("#test-result").inner_text()
    (got,) = relay.wait_for(1)
    assert got.rcpt_tos == ["verif@example.org"]
    assert _settings(web_server)["backup_relay"]["auth"] == "password", "a test saves nothing"
    web.screenshot(page, "settings-backup-relay")

    # Unticked and saved: no backup relay any more.
    page.reload()
    _unfold(page, "fold-backup")
    page.uncheck(_field("backup_relay"))
    expect(page.locator(_field("backup_relay.host"))).to_be_hidden()
    _save(page)
    assert _settings(web_server)["backup_relay"] is None


def test_dkim_key_is_made_and_its_dns_record_shown_with_a_copy_button(
    web: Web, web_server: PostierServer
) -> None:
    page = web.sign_in("admin")
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.goto("/settings")
    page.fill(_field("sender.address"), "ne-pas-repondre@clg-moulin.fr")
    page.fill(_field("allowed_domains"), "ac-lyon.fr\n*.ac-lyon.fr")
    _save(page)
    _unfold(page, "dkim")
    dkim = page.locator("#dkim")
    expect(dkim).to_contain_text("Aucun domaine n'a encore de clé DKIM")
    # The exact domains can be signed for; a *. pattern names no domain to publish in.
    options = page.locator("#f-dkim\\.domain option").all_inner_texts()
    assert options == ["clg-moulin.fr", "ac-lyon.fr"], options

    # A selector with forbidden characters is refused next to its field, in French.
    page.select_option(_field("dkim.domain"), "ac-lyon.fr")
    page.fill(_field("dkim.selector"), "mauvais sélecteur!")
    page.click("button:has-text('Créer la clé DKIM')")
    expect(page.locator("#e-dkim\\.selector")).to_have_text(
        "Un sélecteur se compose de lettres, de chiffres et de tirets.")
    with web_server.client() as c:
        assert c.get("/api/v1/dkim").json() == []

    page.fill(_field("dkim.selector"), "2026")
    page.click("button:has-text('Créer la clé DKIM')")
    page.wait_for_url(re.compile(r"/settings\?ok=dkim_generated.*#dkim"))
    expect(dkim.locator(".flash")).to_contain_text("ac-lyon.fr")
    with web_server.client() as c:
        (key,) = c.get("/api/v1/dkim").json()
    row = dkim.locator("tr[data-dkim-domain='ac-lyon.fr']")
    name = row.locator("code").nth(0)
    value = row.locator("code").nth(1)
    expect(name).to_have_text("2026._domainkey.ac-lyon.fr")
    assert value.inner_text() == key["record_value"]
    assert re.fullmatch(r"v=DKIM1; k=rsa; p=[A-Za-z0-9+/]{300,}={0,2}", value.inner_text())
    assert "PRIVATE" not in page.content()

    copy = row.locator("button[data-copy^='dkim-value']")
    expect(copy).to_contain_text("Copier")
    copy.click()
    expect(copy).to_have_text(re.compile("^Copié"))
    assert page.evaluate("navigator.clipboard.readText()") == key["record_value"]
    web.screenshot(page, "settings-dkim")

    # The confirmation names only a domain that has a key, whatever the address says.
    page.goto("/settings?ok=dkim_generated&domain=banque-en-ligne.example#dkim")
    assert dkim.locator(".flash").count() == 0

    # Removed from the page, after a question that says what it means.
    page.goto("/settings#dkim")
    questions: list[str] = []

    def answer(dialog: Any) -> None:
        questions.append(dialog.message)
        dialog.dismiss() if len(questions) == 1 else dialog.accept()

    page.on("dialog", answer)
    remove = row.locator("button:has-text('Supprimer la clé')")
    remove.click()  # dismissed: nothing happens
    expect(row).to_be_visible()
    with web_server.client() as c:
        assert len(c.get("/api/v1/dkim").json()) == 1
    remove.click()
    page.wait_for_url(re.compile(r"/settings\?ok=dkim_removed.*#dkim"))
    assert questions[0] == ("Ne plus signer les e-mails de ac-lyon.fr ? Sa clé est "
                            "supprimée : une nouvelle clé demanderait un nouvel "
                            "enregistrement DNS.")
    expect(dkim.locator(".flash")).to_have_text(
        "Les e-mails de ac-lyon.fr ne sont plus signés. Laissez son enregistrement DNS "
        "encore quelques jours : les destinataires peuvent encore vérifier les e-mails "
        "déjà envoyés.")
    expect(dkim).to_contain_text("Aucun domaine n'a encore de clé DKIM")
    with web_server.client() as c:
        assert c.get("/api/v1/dkim").json() == []
    # Removed meanwhile elsewhere (another tab, the console): said, nothing else changes.
    token = page.get_attribute("meta[name=csrf-token]", "content")
    r = page.request.post("/settings/dkim/remove", form={"domain": "ac-lyon.fr",
                                                         "csrf": token},
                          headers={"Accept-Language": "fr-FR"})
    assert r.status == 404
    assert "Il n'y a pas de clé DKIM pour ac-lyon.fr" in html.unescape(r.text())


def test_bad_values_are_said_in_french_next_to_their_fields_and_nothing_is_saved(
    web: Web, web_server: PostierServer, relay: FaultRelay
) -> None:
    web_server.configure_relay(relay)
    page = web.sign_in("admin")
    page.goto("/settings")
    before = _settings(web_server)
    assert before["retention"] == {"body_days": 30, "metadata_days": 365}
    assert page.input_value(_field("retry.delay_warning")) == "4"
    assert page.input_value(_field("retry.delay_warning.unit")) == "hours"
    _unfold(page, "fold-retention")
    page.click("summary:has-text('Pour le délégué à la protection des données')")
    expect(page.locator("details.dpo")).to_contain_text("registre des activités de "
                                                       "traitement")

    page.fill(_field("sender.name"), "Nom qui ne doit pas être enregistré")
    page.fill(_field("retention.body_days"), "400")
    page.fill(_field("retention.metadata_days"), "365")
    _unfold(page, "fold-backup")
    page.check(_field("backup_relay"))
    page.fill(_field("backup_relay.host"), "secours.ac-lyon.fr")
    page.fill(_field("backup_relay.port"), "70000")
    page.click("form.settings .actions button:has-text('Enregistrer')")

    expect(page.locator("#e-retention\\.body_days")).to_have_text(
        "Le contenu d'un e-mail ne peut pas être gardé plus longtemps que sa trace : "
        "saisissez au plus le nombre de jours de conservation des traces.")
    assert page.get_attribute(_field("retention.body_days"), "aria-invalid") == "true"
    expect(page.locator("#e-backup_relay\\.port")).to_have_text(
        "Saisissez un nombre inférieur ou égal à 65535.")
    summary = page.locator(".error-summary")
    expect(summary).to_contain_text("Rien n'a été enregistré")
    expect(summary).to_contain_text("Relais de secours – Port")
    # The typed values are still there to be corrected, the backup part still open.
    assert page.input_value(_field("sender.name")) == "Nom qui ne doit pas être enregistré"
    expect(page.locator(_field("backup_relay.port"))).to_be_visible()
    assert page.input_value(_field("backup_relay.port")) == "70000"
    assert _settings(web_server) == before, "an invalid form saves nothing"

    # Corrected, everything is saved at once.
    page.fill(_field("retention.body_days"), "7")
    page.fill(_field("backup_relay.port"), "587")
    _unfold(page, "fold-retry")
    page.fill(_field("retry.delay_warning"), "0")
    assert before["relay"]["pipelining"] is True
    _unfold(page, "fold-relay-connection")
    page.uncheck(_field("relay.pipelining"))
    _save(page)
    saved = _settings(web_server)
    assert saved["relay"]["pipelining"] is False
    assert saved["backup_relay"]["pipelining"] is True
    assert saved["retention"] == {"body_days": 7, "metadata_days": 365}
    assert saved["retry"]["delay_warning"] == 0
    assert saved["backup_relay"]["host"] == "secours.ac-lyon.fr"
    assert saved["sender"]["name"] == "Nom qui ne doit pas être enregistré"

    # The same mistake read in English.
    english = web.sign_in("admin", lang="en-GB")
    english.goto("/settings")
    _unfold(english, "fold-retention")
    english.fill(_field("retention.body_days"), "400")
    english.click("form.settings .actions button:has-text('Save')")
    expect(english.locator("#e-retention\\.body_days")).to_contain_text(
        "cannot be kept longer than its record")


def test_without_script_every_field_is_there_and_a_preset_fills_the_form(
    shared_web: Web, shared_server: PostierServer
) -> None:
    before = _settings(shared_server)
    context = shared_web.browser.new_context(base_url=shared_web.url, locale="fr-FR",
                                             java_script_enabled=False)
    shared_web.contexts.append(context)
    page = context.new_page()
    page.goto("/login")
    page.fill("#f-username", "admin")
    page.fill("#f-password", "motdepasse-admin")
    page.click("button:has-text('Se connecter')")
    page.goto("/settings")
    # The folded parts open without script too (they are <details>).
    for fold in ("fold-relay-oauth2", "fold-backup", "fold-relay-presets"):
        page.click(f"#{fold} > summary")
    for name in ("relay.oauth2_client_id", "relay.oauth2_client_secret",
                 "relay.oauth2_tenant", "relay.oauth2_refresh_token", "backup_relay.host",
                 "test_relay"):
        expect(page.locator(_field(name))).to_be_visible()

    page.select_option(_field("relay.preset"), "google-workspace")
    page.click("fieldset:has(#f-relay\\.host) button:has-text('Remplir')")
    expect(page.locator(".flash")).to_contain_text("Vérifiez-les")
    assert page.input_value(_field("relay.host")) == "smtp.gmail.com"
    assert page.input_value(_field("relay.port")) == "587"
    assert _settings(shared_server) == before, "filling from a preset saves nothing"


def test_only_administrators_reach_the_settings_forms(
    shared_web: Web, shared_server: PostierServer
) -> None:
    with shared_server.client() as c:
        before = c.get("/api/v1/dkim").json()
    alice = shared_web.sign_in("alice")
    token = alice.get_attribute("meta[name=csrf-token]", "content")
    for path, form in (("/settings/dkim", {"dkim.domain": "ac-lyon.fr"}),
                       ("/settings/dkim/remove", {"domain": "ac-lyon.fr"}),
                       ("/settings/preset", {"relay.preset": "microsoft365"}),
                       ("/settings", {"backup_relay": "on", "backup_relay.host": "x"})):
        r = alice.request.post(path, form={**form, "csrf": token},
                               headers={"Accept-Language": "fr-FR"})
        assert r.status == 403, path
        assert "administrateurs" in r.text()
    admin = shared_web.sign_in("admin")
    r = admin.request.post("/settings/dkim", form={"dkim.domain": "ac-lyon.fr"})
    assert r.status == 403, "no CSRF token, no key"
    with shared_server.client() as c:
        assert c.get("/api/v1/dkim").json() == before


def test_alerts_and_their_webhook_are_set_and_the_secret_is_write_only(
    shared_web: Web, shared_server: PostierServer
) -> None:
    page = shared_web.sign_in("admin")
    page.goto("/settings")
    _unfold(page, "fold-alerts")
    expect(page.locator(_field("alerts.email"))).to_be_checked()
    page.uncheck(_field("alerts.email"))
    page.fill(_field("alerts.relay_failing_after"), "30")
    page.select_option(_field("alerts.relay_failing_after.unit"), "minutes")
    page.fill(_field("alerts.oldest_deferred_after"), "2")
    page.select_option(_field("alerts.oldest_deferred_after.unit"), "hours")
    page.fill(_field("alerts.credential_expiry_days"), "21")
    page.click("summary:has-text('Webhook pour les intégrateurs')")
    page.fill(_field("alerts.webhook_url"), "https://ent.ac-lyon.fr/postier/events")
    page.check("#f-alerts\\.webhook_events-sent")
    before = _settings(shared_server)

    # An address without its secret, then a secret too short: said next to the secret.
    page.click("form.settings .actions button:has-text('Enregistrer')")
    expect(page.locator("#e-alerts\\.webhook_secret")).to_contain_text("au moins 16 caractères")
    assert _settings(shared_server) == before
    page.fill(_field("alerts.webhook_secret"), "court")
    page.click("form.settings .actions button:has-text('Enregistrer')")
    expect(page.locator("#e-alerts\\.webhook_secret")).to_have_text(
        "Saisissez au moins 16 caractères.")
    assert _settings(shared_server) == before

    page.fill(_field("alerts.webhook_secret"), "Secret-Du-Webhook-2026")
    _save(page)
    alerts = _settings(shared_server)["alerts"]
    assert alerts["email"] is False
    assert (alerts["relay_failing_after"], alerts["oldest_deferred_after"],
            alerts["credential_expiry_days"]) == (1800, 7200, 21)
    assert alerts["webhook_url"] == "https://ent.ac-lyon.fr/postier/events"
    assert alerts["webhook_secret_set"] is True and "webhook_secret" not in alerts
    assert set(alerts["webhook_events"]) == {"alerts", "failures", "delays", "sent", "bounces"}
    assert "Secret-Du-Webhook-2026" not in page.content()
    expect(page.locator("#h-alerts\\.webhook_secret")).to_contain_text(
        "Un secret de webhook est enregistré")

    # Blank keeps it; with the address removed, the secret can go too.
    page.fill(_field("alerts.webhook_url"), "")
    page.check(_field("alerts.remove_webhook_secret"))
    _save(page)
    alerts = _settings(shared_server)["alerts"]
    assert alerts["webhook_url"] == "" and alerts["webhook_secret_set"] is False


def _microsoft_oauth2(page: Any) -> None:
    page.fill(_field("relay.host"), "smtp.office365.com")
    page.select_option(_field("relay.auth"), "oauth2")
    page.select_option(_field("relay.oauth2_provider"), "microsoft")
    page.fill(_field("relay.oauth2_tenant"), "6f1c2d3e-tenant")
    page.fill(_field("relay.oauth2_client_id"), "a1b2c3-client")


def test_oauth2_certificate_pasted_is_saved_checked_and_never_shown_again(
    web: Web, web_server: PostierServer
) -> None:
    from support.oauth import make_certificate

    key_pem, cert_pem = make_certificate("Postier Collège")
    other_key, _ = make_certificate("Another")
    page = web.sign_in("admin")
    page.goto("/settings")
    _microsoft_oauth2(page)

    # A key that is not the certificate's: refused on its field, nothing saved.
    page.fill(_field("relay.oauth2_certificate"), cert_pem)
    page.fill(_field("relay.oauth2_private_key"), other_key)
    page.click("form.settings .actions button:has-text('Enregistrer')")
    error = page.locator("#e-relay\\.oauth2_private_key")
    expect(error).to_be_visible()
    expect(error).to_contain_text("certificat")
    assert _settings(web_server)["relay"]["oauth2_certificate_set"] is False

    # The pair: saved, and the page shows that it is, never the key.
    page.goto("/settings")
    _microsoft_oauth2(page)
    page.fill(_field("relay.oauth2_certificate"), cert_pem)
    page.fill(_field("relay.oauth2_private_key"), key_pem)
    _save(page)
    relay = _settings(web_server)["relay"]
    assert relay["oauth2_certificate_set"] is True and relay["oauth2_private_key_set"] is True
    body = page.content()
    assert "PRIVATE KEY" not in body and key_pem.splitlines()[1] not in body
    assert page.input_value(_field("relay.oauth2_private_key")) == ""
    expect(page.locator("#h-relay\\.oauth2_private_key")).to_contain_text("enregistrée")
