"""The live pages say when they were refreshed as a person would: « Mis à jour à 14:05:12 »,
the time alone, in the page's language."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from support.browser import Web

pytest_plugins = ["support.browser"]


pytestmark = pytest.mark.in_process


def test_live_pages_say_the_time_of_their_refresh(shared_web: Web) -> None:
    page = shared_web.sign_in("admin", "fr-FR")
    for path in ("/queue", "/mine"):
        page.goto(path)
        said = page.locator("[data-live-updated]").inner_text()
        assert re.fullmatch(r"Mis à jour à \d{2}:\d{2}:\d{2}", said), (path, said)
    english = shared_web.sign_in("admin", "en-GB")
    english.goto("/queue")
    said = english.locator("[data-live-updated]").inner_text()
    assert re.fullmatch(r"Updated at \d{1,2}:\d{2}:\d{2}\s?[AP]M", said), said
