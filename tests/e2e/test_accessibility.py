"""axe-core (bundled with axe-playwright-python, nothing fetched) finds no WCAG 2.1 A or AA
violation on the pages a school uses, in French and in English."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from axe_playwright_python.sync_playwright import Axe

if TYPE_CHECKING:
    from support.browser import Web
    from support.relay import FaultRelay
    from support.server import PostierServer

pytest_plugins = ["support.browser"]

pytestmark = pytest.mark.in_process

WCAG = {"runOnly": {"type": "tag", "values": ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]}}
ADMIN_PAGES = ("/queue", "/mine", "/settings", "/profiles", "/users", "/users/alice",
               "/suppressions", "/account")


def _violations(page: Any) -> list[str]:
    results = Axe().run(page, options=WCAG)
    assert results.response["passes"], f"axe checked nothing on {page.url}"
    return [f"{page.url}: {v['id']} ({v['impact']}): {v['help']} — "
            f"{[n['target'] for n in v['nodes']][:3]}"
            for v in results.response["violations"]]


@pytest.mark.parametrize("lang", ["fr-FR", "en-GB"])
def test_no_wcag_violation_on_the_pages(
    web: Web, web_server: PostierServer, relay: FaultRelay, lang: str
) -> None:
    web_server.configure_relay(relay)
    with web_server.client("alice") as alice:
        sent = alice.post("/api/v1/messages", json={
            "to": ["parent@example.org"], "subject": "Réunion", "text": "x"})
        message_id = sent.json()["id"]
    with web_server.client() as admin_api:  # the blocked addresses' list is not empty
        assert admin_api.post("/api/v1/suppressions", json={
            "address": "ancien@example.org", "note": "a quitté le collège"}).status_code == 201
    found: list[str] = []
    anonymous = web.page(lang)
    anonymous.goto("/login")
    found += _violations(anonymous)
    admin = web.sign_in("admin", lang)
    for path in (*ADMIN_PAGES, f"/messages/{message_id}"):
        admin.goto(path)
        found += _violations(admin)
    teacher = web.sign_in("alice", lang)
    for path in ("/mine", f"/messages/{message_id}", "/account"):
        teacher.goto(path)
        found += _violations(teacher)
    assert not found, "\n".join(found)
