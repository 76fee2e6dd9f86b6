"""The layout of "Paramètres d'envoi des e-mails" in a real headless Chromium: what the
original product's dialog has (sender, SMTP server, timeout, test button) is shown at once,
the rest waits in named folded parts; durations are typed with a unit and kept in seconds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from playwright.sync_api import expect

from support.server import PostierServer

if TYPE_CHECKING:
    from support.browser import Web

pytest_plugins = ["support.browser"]

pytestmark = pytest.mark.in_process

SEED_FIELDS = ("sender.name", "sender.address", "relay.host", "relay.port", "relay.security",
               "relay.auth", "relay.username", "relay.password", "relay.timeout", "test_to")
FOLDS = ("fold-relay-presets", "fold-relay-limits", "fold-relay-connection", "fold-display",
         "fold-verification", "fold-backup", "fold-retry", "fold-retention", "fold-alerts",
         "dkim")


def _field(name: str) -> str:
    return "#f-" + name.replace(".", "\\.")


def _settings(server: PostierServer) -> dict[str, Any]:
    with server.client() as c:
        return dict(c.get("/api/v1/settings").json())


def _open_folds(page: Any) -> list[str]:
    return list(page.evaluate(
        "Array.from(document.querySelectorAll('details[data-fold][open]')).map(d => d.id)"))


def test_the_dialogs_fields_are_shown_and_the_rest_is_folded(
    shared_web: Web, shared_server: PostierServer
) -> None:
    page = shared_web.sign_in("admin")
    page.goto("/settings")
    for name in SEED_FIELDS:
        expect(page.locator(_field(name))).to_be_visible()
    expect(page.locator("button:has-text(\"Tester l'envoi d'e-mails\")")).to_be_visible()
    assert _open_folds(page) == []
    for fold in FOLDS:
        expect(page.locator(f"#{fold} > summary")).to_be_visible()
    expect(page.locator(_field("retry.max_age"))).to_be_hidden()
    expect(page.locator(_field("backup_relay"))).to_be_hidden()
    # Each part is named by a heading, for those who move from heading to heading.
    expect(page.get_by_role("heading", name="Quand le serveur SMTP ne répond pas")).to_be_visible()
    height = page.evaluate("document.documentElement.scrollHeight")
    assert height < 3000, f"the page is {height} px high"

    # Opened and closed from the keyboard.
    page.focus("#fold-retry > summary")
    page.keyboard.press("Enter")
    expect(page.locator(_field("retry.max_age"))).to_be_visible()
    page.keyboard.press("Space")
    expect(page.locator(_field("retry.max_age"))).to_be_hidden()


def test_an_error_inside_a_folded_part_opens_it_and_the_summary_has_the_focus(
    shared_web: Web, shared_server: PostierServer
) -> None:
    before = _settings(shared_server)
    page = shared_web.sign_in("admin")
    # Not the script's memory of the changed parts: the server opens the part itself.
    page.context.add_init_script("window.sessionStorage.clear()")
    page.goto("/settings")
    page.click("#fold-retry > summary")
    page.fill(_field("retry.max_age"), "31")
    page.select_option(_field("retry.max_age.unit"), "days")
    page.click("form.settings .actions button:has-text('Enregistrer')")

    expect(page.locator("#e-retry\\.max_age")).to_have_text(
        "Saisissez une durée d'au plus 30 jours.")
    expect(page.locator(_field("retry.max_age"))).to_be_visible()
    assert _open_folds(page) == ["fold-retry"]
    summary = page.locator(".error-summary")
    expect(summary).to_be_focused()
    expect(summary).to_contain_text("Abandon après")
    # What was typed comes back to be corrected, in its unit.
    assert page.input_value(_field("retry.max_age")) == "31"
    assert page.input_value(_field("retry.max_age.unit")) == "days"
    assert _settings(shared_server) == before, "an invalid form saves nothing"


def test_durations_are_typed_in_days_and_hours_and_kept_in_seconds(
    shared_web: Web, shared_server: PostierServer
) -> None:
    page = shared_web.sign_in("admin")
    page.goto("/settings")
    page.click("#fold-retry > summary")
    # The defaults, in the largest unit that divides them.
    assert page.input_value(_field("retry.max_age")) == "5"
    assert page.input_value(_field("retry.max_age.unit")) == "days"
    assert page.input_value(_field("retry.max_delay")) == "1"
    assert page.input_value(_field("retry.max_delay.unit")) == "hours"

    page.fill(_field("retry.max_age"), "3")
    page.select_option(_field("retry.max_age.unit"), "days")
    page.fill(_field("retry.first_delay"), "1,5")
    page.select_option(_field("retry.first_delay.unit"), "hours")
    page.click("form.settings .actions button:has-text('Enregistrer')")
    page.wait_for_url("**/settings?ok=settings_saved")

    retry = _settings(shared_server)["retry"]
    assert retry["max_age"] == 259200
    assert retry["first_delay"] == 5400
    # The part the save changed is open again; the others stay folded.
    assert _open_folds(page) == ["fold-retry"]
    assert page.input_value(_field("retry.max_age")) == "3"
    expect(page.locator(_field("retry.max_age.unit") + " option:checked")).to_have_text("jours")
    assert page.input_value(_field("retry.first_delay")) == "90"
    expect(page.locator(_field("retry.first_delay.unit") + " option:checked")).to_have_text(
        "minutes")

    # A fresh visit starts folded again: nothing about the parts is kept by the server.
    fresh = shared_web.sign_in("admin")
    fresh.goto("/settings")
    assert _open_folds(fresh) == []
    assert fresh.input_value(_field("retry.max_age")) == "3"
