"""``/docs`` (Swagger UI) and ``/redoc`` load only this server's own files: nothing from a
CDN, whose script would run with the page's rights, unchecked."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import httpx
import pytest

from support.server import PostierServer

if TYPE_CHECKING:
    from support.browser import Web

pytest_plugins = ["support.browser"]

pytestmark = pytest.mark.in_process


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_api_pages_use_only_same_origin_assets(web_server: PostierServer,
                                                   page: str) -> None:
    server = web_server
    html = httpx.get(server.url + page, timeout=10)
    assert html.status_code == 200, html.text[:300]
    urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']|(?:url|Url)\s*:\s*["']([^"']+)["']""",
                      html.text)
    found = [a or b for a, b in urls]
    assert any(u.endswith(".js") for u in found), f"no script found in {page}: {html.text}"
    for url in found:
        assert url.startswith("/") and not url.startswith("//"), \
            f"{page} loads {url} from another site"
        asset = httpx.get(server.url + url, timeout=10)
        assert asset.status_code == 200 and asset.content, f"{url} answered {asset.status_code}"
    assert "http://" not in html.text and "https://" not in html.text, html.text


def test_swagger_ui_draws_the_api_from_this_server_alone(web: Web,
                                                        web_server: PostierServer) -> None:
    page = web.page()
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto("/docs")
    # Swagger UI 5 reads the OpenAPI 3.1 description and draws each operation.
    page.wait_for_selector('.opblock-summary-path[data-path="/api/v1/messages/batch"]')
    elsewhere = [u for u in requested if not u.startswith(web_server.url)]
    assert not elsewhere, f"/docs reached other sites: {elsewhere}"
