"""Bounces in the web interface, in a real headless Chromium against the real server: the
"Adresses bloquées" page (block, search, page through, unblock), and the bounce part of the
"Paramètres d'envoi des e-mails" page (bounce address and mailbox, "Tester la boîte"
against a real Dovecot, "Vérifier le domaine" against a real DNS server).

Each test does what an administrator (or a teacher) would, in French, and checks what they
see and what the server then holds through its API.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import pytest
from axe_playwright_python.sync_playwright import Axe
from playwright.sync_api import expect

from support.bounces import bounce_by_smtp, dsn, out_of_office
from support.running import free_port

if TYPE_CHECKING:
    from support.browser import Web
    from support.dns_server import LocalDns
    from support.dovecot import Dovecot
    from support.relay import FaultRelay
    from support.server import PostierServer

pytest_plugins = ["support.browser"]

pytestmark = pytest.mark.in_process

WCAG = {"runOnly": {"type": "tag", "values": ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]}}


@pytest.fixture
def bounce_port() -> int:
    return free_port()


@pytest.fixture
def web_server(server_factory: Any, dns_server: LocalDns, bounce_port: int) -> PostierServer:
    """The server the browsers use (``support.browser``'s ``web``), with its bounce door
    open and asking the test's DNS server, as a school's server with bounces runs."""
    server: PostierServer = server_factory(
        POSTIER_BOUNCE_SMTP=f"127.0.0.1:{bounce_port}",
        POSTIER_DNS_SERVERS=f"127.0.0.1:{dns_server.port}").start()
    return server


def _field(name: str) -> str:
    return "#f-" + name.replace(".", "\\.")


def _unfold(page: Any, fold: str) -> None:
    if not page.locator(f"#{fold}").evaluate("d => d.open"):
        page.click(f"#{fold} > summary")


def _bounces(server: PostierServer) -> dict[str, Any]:
    with server.client() as c:
        return dict(c.get("/api/v1/settings").json()["bounces"])


def _listed(server: PostierServer) -> list[str]:
    with server.client() as c:
        return [e["address"] for e in c.get("/api/v1/suppressions").json()["items"]]


def _no_violation(page: Any) -> None:
    results = Axe().run(page, options=WCAG)
    found = [f"{v['id']}: {v['help']} — {[n['target'] for n in v['nodes']][:3]}"
             for v in results.response["violations"]]
    assert not found, f"axe on {page.url}:\n" + "\n".join(found)


# -- Adresses bloquées ------------------------------------------------------------------------


def test_an_administrator_blocks_an_address_finds_it_and_unblocks_it(
    web: Web, web_server: PostierServer
) -> None:
    page = web.sign_in("admin")
    page.click("nav.main-nav a:has-text('Adresses bloquées')")
    page.wait_for_url("**/suppressions")
    expect(page.locator("h1")).to_have_text("Adresses bloquées")
    expect(page.locator(".empty")).to_contain_text("Aucune adresse n'est bloquée")

    # What is not an address is refused next to its field, in French, and kept as typed.
    page.fill("#f-address", "pas une adresse")
    page.click("button:has-text(\"Bloquer l'adresse\")")
    expect(page.locator("#e-address")).to_be_visible()
    expect(page.locator(".error-summary")).to_contain_text("Adresse e-mail")
    assert page.input_value("#f-address") == "pas une adresse"
    assert _listed(web_server) == []

    page.fill("#f-address", "Ancien.Eleve@Example.org")
    page.fill("#f-note", "a quitté le collège en juin")
    page.click("button:has-text(\"Bloquer l'adresse\")")
    page.wait_for_url(re.compile(r"/suppressions\?ok=added"))
    expect(page.locator("[data-confirmation]")).to_contain_text(
        "Ancien.Eleve@example.org est bloquée")
    row = page.locator("tr[data-address='Ancien.Eleve@example.org']")
    expect(row).to_contain_text("Ajoutée par un administrateur")
    expect(row).to_contain_text("a quitté le collège en juin")
    expect(row).to_contain_text("admin")
    assert _listed(web_server) == ["Ancien.Eleve@example.org"]

    # More addresses (through the API, as the school software would); search by a part.
    with web_server.client() as c:
        for address in ("parent1@example.net", "parent2@example.net", "prof@ac-lyon.fr"):
            assert c.post("/api/v1/suppressions", json={"address": address}).status_code == 201
    page.goto("/suppressions")
    assert page.locator("tbody tr").count() == 4
    # Newest first.
    expect(page.locator("tbody tr").first).to_have_attribute("data-address", "prof@ac-lyon.fr")
    page.fill("#f-search", "EXAMPLE.NET")
    page.click("form[role=search] button:has-text('Rechercher')")
    page.wait_for_url("**/suppressions?search=EXAMPLE.NET")
    addresses = page.locator("tbody tr").evaluate_all(
        "rows => rows.map(r => r.dataset.address)")
    assert addresses == ["parent2@example.net", "parent1@example.net"]
    expect(page.locator("[data-count]")).to_contain_text("Adresses 1 à 2 sur 2")

    # Unblocked from the search's results: the list comes back with the same search.
    page.click("tr[data-address='parent1@example.net'] button:has-text('Débloquer')")
    page.wait_for_url(re.compile(r"/suppressions\?search=EXAMPLE.NET&ok=lifted"))
    expect(page.locator("[data-confirmation]")).to_contain_text(
        "parent1@example.net n'est plus bloquée")
    expect(page.locator("tr[data-address='parent1@example.net']")).to_have_count(0)
    assert page.input_value("#f-search") == "EXAMPLE.NET"
    assert sorted(_listed(web_server)) == ["Ancien.Eleve@example.org",
                                           "parent2@example.net", "prof@ac-lyon.fr"]
    page.fill("#f-search", "personne")
    page.click("form[role=search] button:has-text('Rechercher')")
    expect(page.locator(".empty")).to_contain_text("Aucune adresse bloquée ne contient")

    # Unblocking one already unblocked elsewhere says so, in French.
    page.goto("/suppressions")
    with web_server.client() as c:
        assert c.delete("/api/v1/suppressions/prof@ac-lyon.fr").status_code == 204
    page.click("tr[data-address='prof@ac-lyon.fr'] button:has-text('Débloquer')")
    expect(page.locator(".problem[role=alert]")).to_contain_text(
        "n'est pas dans la liste des adresses bloquées")
    expect(page.locator("tr[data-address='prof@ac-lyon.fr']")).to_have_count(0)
    web.screenshot(page, "suppressions")

    # A form without the page's CSRF token (another site's) changes nothing.
    refused = page.request.post("/suppressions/lift",
                                form={"address": "parent2@example.net"})
    assert refused.status == 403
    assert "parent2@example.net" in _listed(web_server)
    # A confirmation in a made-up link does not say what is not true.
    page.goto("/suppressions?ok=lifted&address=parent2@example.net")
    expect(page.locator("[data-confirmation]")).to_have_count(0)


def test_the_list_is_paged_and_a_teacher_never_sees_it(
    web: Web, web_server: PostierServer
) -> None:
    with web_server.client() as c:
        for n in range(52):
            r = c.post("/api/v1/suppressions", json={"address": f"eleve{n:02d}@example.org"})
            assert r.status_code == 201, r.text
    page = web.sign_in("admin")
    page.goto("/suppressions")
    expect(page.locator("[data-count]")).to_contain_text("Adresses 1 à 50 sur 52")
    assert page.locator("tbody tr").count() == 50
    expect(page.locator("tbody tr").first).to_have_attribute("data-address",
                                                           "eleve51@example.org")
    page.click("nav.pager a:has-text('Page suivante')")
    page.wait_for_url("**/suppressions?page=2")
    expect(page.locator("[data-count]")).to_contain_text("Adresses 51 à 52 sur 52")
    expect(page.locator("nav.pager")).to_contain_text("Page 2 sur 2")
    # Unblocking the last two entries of page 2 leads back to the last page there is.
    page.click("tr[data-address='eleve01@example.org'] button:has-text('Débloquer')")
    page.wait_for_url(re.compile(r"page=2&ok=lifted"))
    page.click("tr[data-address='eleve00@example.org'] button:has-text('Débloquer')")
    page.wait_for_url(re.compile(r"page=2&ok=lifted"))
    expect(page.locator("[data-confirmation]")).to_contain_text("eleve00@example.org")
    expect(page.locator("[data-count]")).to_contain_text("Adresses 1 à 50 sur 50")

    teacher = web.sign_in("alice")
    expect(teacher.locator("nav.main-nav")).to_be_visible()
    expect(teacher.locator("nav.main-nav a[href='/suppressions']")).to_have_count(0)
    answer = teacher.goto("/suppressions")
    assert answer is not None and answer.status == 403
    expect(teacher.locator("main")).to_contain_text("administrateurs")
    refused = teacher.request.post("/suppressions", form={"address": "x@example.org"})
    assert refused.status == 403
    assert len(_listed(web_server)) == 50


def test_a_bounced_address_shows_the_servers_words_and_its_e_mail(
    web: Web, web_server: PostierServer, bounce_port: int, relay: FaultRelay
) -> None:
    server = web_server
    server.configure_relay(relay, bounces={"address": "retours@ac-lyon.fr"})
    with server.client("alice") as c:
        sent = c.post("/api/v1/messages", json={"to": ["eleve.parti@example.org"],
                                                "subject": "Sortie scolaire", "text": "Bonjour"})
        assert sent.status_code == 202, sent.text
    message_id = sent.json()["id"]
    server.wait_status(message_id, "sent")
    (received,) = [m for m in relay.wait_for(1) if message_id in m.mail_from]
    code, reply = bounce_by_smtp(bounce_port, received.mail_from, dsn(
        received.mail_from, "eleve.parti@example.org", diagnostic="Mailbox does not exist"))
    assert code == 250, reply

    page = web.sign_in("admin")
    page.goto("/suppressions")
    row = page.locator("tr[data-address='eleve.parti@example.org']")
    expect(row).to_contain_text("Retour : le serveur du destinataire a refusé l'adresse")
    # The server's own words, its code and status said once.
    expect(row.locator("code")).to_have_text(
        "550 5.1.1 <eleve.parti@example.org>: Mailbox does not exist")
    expect(row).to_contain_text("Postier, à la réception du retour")
    _no_violation(page)
    row.locator("a:has-text(\"Voir l'e-mail\")").click()
    page.wait_for_url(f"**/messages/{message_id}")
    expect(page.locator("h1")).to_have_text("Sortie scolaire")


# -- the settings page: bounce address and mailbox -----------------------------------------


def test_the_bounce_settings_are_saved_and_the_password_never_comes_back(
    web: Web, web_server: PostierServer, relay: FaultRelay
) -> None:
    web_server.configure_relay(relay)  # sender ne-pas-repondre@ac-lyon.fr, ac-lyon.fr allowed
    page = web.sign_in("admin")
    page.goto("/settings")
    expect(page.locator("#fold-bounces > summary")).to_contain_text(
        "Retours (e-mails non distribués)")
    _unfold(page, "fold-bounces")

    # An address outside the establishment's domains is refused next to its field.
    page.fill(_field("bounces.address"), "retours@gmail.com")
    page.click("form.settings .actions button:has-text('Enregistrer')")
    error = page.locator("#e-bounces\\.address")
    expect(error).to_contain_text("doit appartenir à l'un des domaines de l'établissement")
    expect(page.locator(".error-summary")).to_contain_text("Adresse de retour")
    assert page.input_value(_field("bounces.address")) == "retours@gmail.com"
    assert _bounces(web_server)["address"] == "", "nothing is saved"

    page.fill(_field("bounces.address"), "retours@ac-lyon.fr")
    page.fill(_field("bounces.imap.host"), "imap.ac-lyon.fr")
    page.fill(_field("bounces.imap.port"), "993")
    page.select_option(_field("bounces.imap.security"), "tls")
    page.fill(_field("bounces.imap.username"), "retours")
    page.fill(_field("bounces.imap.password"), "Mot-De-Passe-Retours")
    page.fill(_field("bounces.imap.folder"), "Retours")
    page.fill(_field("bounces.imap.interval"), "10")
    page.select_option(_field("bounces.imap.interval.unit"), "minutes")
    page.click("form.settings .actions button:has-text('Enregistrer')")
    page.wait_for_url("**/settings?ok=settings_saved")

    saved = _bounces(web_server)
    assert saved["address"] == "retours@ac-lyon.fr"
    imap = saved["imap"]
    assert (imap["host"], imap["port"], imap["security"], imap["username"], imap["folder"],
            imap["interval"], imap["verify_tls"]) == (
        "imap.ac-lyon.fr", 993, "tls", "retours", "Retours", 600, True)
    assert imap["password_set"] is True and "password" not in imap
    # The page shows that a password is saved, never the password.
    assert "Mot-De-Passe-Retours" not in page.content()
    assert page.input_value(_field("bounces.imap.password")) == ""
    expect(page.locator("#h-bounces\\.imap\\.password")).to_contain_text(
        "Un mot de passe est enregistré")
    _unfold(page, "fold-bounces")
    assert page.input_value(_field("bounces.imap.interval")) == "10"
    assert page.input_value(_field("bounces.imap.interval.unit")) == "minutes"

    # Saved again with the field blank: the password stays; the box removes it.
    page.click("form.settings .actions button:has-text('Enregistrer')")
    page.wait_for_url("**/settings?ok=settings_saved")
    assert _bounces(web_server)["imap"]["password_set"] is True
    _unfold(page, "fold-bounces")
    page.check(_field("bounces.imap.remove_password"))
    page.click("form.settings .actions button:has-text('Enregistrer')")
    page.wait_for_url("**/settings?ok=settings_saved")
    imap = _bounces(web_server)["imap"]
    assert imap["password_set"] is False and imap["host"] == "imap.ac-lyon.fr"

    # No server: no mailbox.
    _unfold(page, "fold-bounces")
    page.fill(_field("bounces.imap.host"), "")
    page.click("form.settings .actions button:has-text('Enregistrer')")
    page.wait_for_url("**/settings?ok=settings_saved")
    assert _bounces(web_server) == {"address": "retours@ac-lyon.fr", "imap": None}


def test_the_mailbox_test_reads_the_typed_mailbox_and_says_what_fails(
    web: Web, web_server: PostierServer, dovecot: Dovecot
) -> None:
    dovecot.deliver(out_of_office("retours@ac-lyon.fr"))
    box = dovecot.mailbox("none")
    page = web.sign_in("admin")
    page.goto("/settings")
    _unfold(page, "fold-bounces")
    page.fill(_field("bounces.imap.host"), box.host)
    page.fill(_field("bounces.imap.port"), str(box.port))
    page.select_option(_field("bounces.imap.security"), "none")
    page.fill(_field("bounces.imap.username"), box.username)
    page.fill(_field("bounces.imap.password"), box.password or "")
    page.click("button:has-text('Tester la boîte')")
    result = page.locator("#mailbox-result")
    expect(result.locator(".success")).to_contain_text("Messages non lus dans le dossier : 1")
    # The values stay as typed, the password is not sent back, and nothing is saved.
    assert page.input_value(_field("bounces.imap.host")) == box.host
    assert page.input_value(_field("bounces.imap.password")) == ""
    assert box.password and box.password not in page.content()
    assert _bounces(web_server)["imap"] is None
    assert dovecot.unseen() == 1, "a test changes nothing in the mailbox"

    page.fill(_field("bounces.imap.password"), "pas-le-bon")
    page.click("button:has-text('Tester la boîte')")
    problem = page.locator("#mailbox-result .problem")
    expect(problem.locator(".message")).to_contain_text(
        "Le serveur IMAP a refusé la connexion à la boîte aux lettres des retours")
    expect(problem.locator(".hint")).to_contain_text("Que faire")
    assert "pas-le-bon" not in page.content()
    _no_violation(page)

    # Without a server there is nothing to test: said next to the server's field.
    page.fill(_field("bounces.imap.host"), "")
    page.click("button:has-text('Tester la boîte')")
    expect(page.locator("#e-bounces\\.imap\\.host")).to_be_visible()
    expect(page.locator("#mailbox-result .success, #mailbox-result .problem")).to_have_count(0)


# -- the settings page: the domain check ----------------------------------------------------


def test_the_domain_check_shows_spf_dkim_and_dmarc(
    web: Web, web_server: PostierServer, dns_server: LocalDns, relay: FaultRelay
) -> None:
    server = web_server
    server.configure_relay(relay)  # relay on 127.0.0.1, sender ne-pas-repondre@ac-lyon.fr
    with server.client() as c:
        made = c.post("/api/v1/dkim", json={"domain": "ac-lyon.fr", "selector": "postier"})
        assert made.status_code == 201, made.text
    dns_server.add("ac-lyon.fr", "TXT", "v=spf1 ip4:192.0.2.10 ~all")
    dns_server.add("_dmarc.ac-lyon.fr", "TXT", "v=DMARC1; p=quarantine")
    # No DKIM record published yet.

    page = web.sign_in("admin")
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.goto("/settings")
    _unfold(page, "domain-check")
    assert page.input_value("#f-check_domain") == "ac-lyon.fr", "the sender's domain"
    page.click("button:has-text('Vérifier le domaine')")
    result = page.locator("#domain-result")
    expect(result.locator("h3")).to_have_text("Résultat pour ac-lyon.fr")
    items = result.locator("[data-check]")
    assert items.evaluate_all("xs => xs.map(x => x.dataset.check)") == ["spf", "dkim", "dmarc"]

    spf = result.locator("[data-check=spf]")
    expect(spf).to_have_class(re.compile(r"\bok\b"))
    expect(spf.locator("[data-found] code")).to_have_text("v=spf1 ip4:192.0.2.10 ~all")
    expect(spf.locator("h4 .badge")).to_have_text("✓ correct")

    dkim = result.locator("[data-check=dkim]")
    expect(dkim).to_have_class(re.compile(r"\bfail\b"))
    expect(dkim.locator("h4 .badge")).to_have_text("✗ à corriger")
    expect(dkim.locator("[data-found]")).to_contain_text("rien")
    expect(dkim.locator(".hint")).to_contain_text("postier._domainkey.ac-lyon.fr")
    expected = dkim.locator("[data-expected] code")
    expect(dkim.locator("dt").nth(1)).to_have_text("Attendu")
    expect(expected).to_contain_text("v=DKIM1; k=rsa; p=")
    assert expected.evaluate("c => getComputedStyle(c).fontFamily").lower().find("mono") >= 0
    dkim.locator("[data-expected] button:has-text('Copier')").click()
    expect(dkim.locator("[data-expected] button")).to_have_text("Copié")
    copied = page.evaluate("navigator.clipboard.readText()")
    assert copied.startswith("v=DKIM1; k=rsa; p=") and copied == expected.inner_text().strip()

    dmarc = result.locator("[data-check=dmarc]")
    expect(dmarc).to_have_class(re.compile(r"\bok\b"))
    expect(dmarc.locator("[data-found] code")).to_have_text("v=DMARC1; p=quarantine")
    expect(dmarc.locator(".hint")).to_contain_text("p=quarantine")
    _no_violation(page)

    # What is not a domain is refused next to the field, in French.
    page.fill("#f-check_domain", "pas un domaine")
    page.click("button:has-text('Vérifier le domaine')")
    expect(page.locator("#e-check_domain")).to_contain_text("n'est pas un nom de domaine")
    expect(page.locator("#domain-result")).to_have_count(0)
    assert page.input_value("#f-check_domain") == "pas un domaine"
