"""The queue's date filters are written as the page's language writes dates (07/12/2026 on
a French page, whatever the browser's own language), and they filter."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from support.browser import Web
    from support.relay import FaultRelay
    from support.server import PostierServer

pytest_plugins = ["support.browser"]


pytestmark = pytest.mark.in_process


def test_date_filters_follow_the_pages_language(
    web: Web, web_server: PostierServer, relay: FaultRelay
) -> None:
    web_server.configure_relay(relay)
    with web_server.client("alice") as alice:
        subject = "Sortie au musée"
        assert alice.post("/api/v1/messages", json={
            "to": ["parent@example.org"], "subject": subject, "text": "x"}).status_code == 202
    today = dt.date.today()
    tomorrow = today + dt.timedelta(days=1)
    # A browser in English, the page in French (the person chose it).
    page = web.sign_in("admin", "en-US")
    page.goto("/lang/fr?next=/queue")
    assert page.get_attribute("#f-since", "placeholder") == today.strftime("%d/%m/%Y")
    page.fill("#f-since", today.strftime("%d/%m/%Y"))
    page.click("form >> button:has-text('Filtrer')")
    page.wait_for_url(f"**/queue?*since={today.strftime('%d')}*")
    assert page.input_value("#f-since") == today.strftime("%d/%m/%Y")
    assert page.locator("tbody", has_text=subject).count() == 1, "today's e-mail is listed"
    page.fill("#f-since", tomorrow.strftime("%d/%m/%Y"))
    page.click("form >> button:has-text('Filtrer')")
    page.wait_for_url(f"**since={tomorrow.strftime('%d')}*")
    assert page.locator("tbody", has_text=subject).count() == 0, "the filter applies"
