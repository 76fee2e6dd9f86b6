"""A password that would travel to an SMTP server without encryption (security: none) is
warned about, not refused: in the settings API's answers, the test-send report, the
settings page and a sending profile's answer, in French and English."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from support.relay import FaultRelay
from support.server import PostierServer

pytestmark = pytest.mark.in_process

CLEAR = {"security": "none", "auth": "password", "username": "college", "password": "s3cret"}


def _cleartext(warnings: list[str]) -> list[str]:
    return [w for w in warnings if "STARTTLS" in w and "SSL/TLS" in w]


def test_a_password_sent_in_clear_is_warned_about(server: PostierServer,
                                                  relay: FaultRelay) -> None:
    with server.client() as admin:
        relay_settings = {"host": relay.host, "port": relay.port, "timeout": 5}
        r = admin.put("/api/v1/settings", json={
            "sender": {"name": "Collège", "address": "ne-pas-repondre@ac-lyon.fr"},
            "relay": {**relay_settings, **CLEAR}})
        assert r.status_code == 200, r.text
        (warning,) = _cleartext(r.json()["warnings"])
        assert "security: none" in warning and "password" in warning
        fr = admin.get("/api/v1/settings", headers={"Accept-Language": "fr"}).json()
        (warning,) = _cleartext(fr["warnings"])
        assert "sans chiffrement" in warning and "Choisissez STARTTLS" in warning
        report = admin.post("/api/v1/settings/test", json={"to": "direction@ac-lyon.fr"})
        assert report.status_code == 200, report.text
        assert _cleartext(report.json()["warnings"]), report.json()
        # The backup relay too, said as such; STARTTLS on both: nothing to say.
        r = admin.put("/api/v1/settings", json={
            "relay": {"security": "starttls"}, "backup_relay": {**relay_settings, **CLEAR}})
        (warning,) = _cleartext(r.json()["warnings"])
        assert warning.startswith("Backup relay:"), warning
        r = admin.put("/api/v1/settings", json={"backup_relay": {"security": "tls"}})
        assert _cleartext(r.json()["warnings"]) == []
        report = admin.post("/api/v1/settings/test", json={
            "to": "direction@ac-lyon.fr", "settings": {"relay": CLEAR}})
        assert _cleartext(report.json()["warnings"]), "unsaved settings are warned about too"
        # A sending profile: workstations would send its password in clear.
        r = admin.post("/api/v1/profiles", json={"label": "Relais", "host": "smtp.a.fr",
                                                 "port": 25, **CLEAR})
        assert r.status_code == 201 and _cleartext(r.json()["warnings"]), r.text
        pid = r.json()["id"]
        r = admin.put(f"/api/v1/profiles/{pid}", json={"label": "Relais", "host": "smtp.a.fr",
                                                       "security": "starttls",
                                                       "auth": "password"})
        assert r.status_code == 200 and r.json()["warnings"] == [], r.text


def test_the_settings_page_warns_about_a_password_in_clear(server: PostierServer,
                                                           relay: FaultRelay) -> None:
    server.configure_relay(relay, relay={"host": relay.host, "port": relay.port, **CLEAR})
    with httpx.Client(base_url=server.url, timeout=10) as web:
        csrf = web.get("/login").cookies["postier_login_csrf"]
        r = web.post("/login", data={"username": "admin", "password": "motdepasse-admin",
                                     "csrf": csrf})
        assert r.status_code == 303, r.text[:300]
        page = web.get("/settings", headers={"Accept-Language": "fr"})
        assert page.status_code == 200
        assert "sans chiffrement" in page.text and "Choisissez STARTTLS ou SSL/TLS" in page.text
        assert "sans chiffrement" not in _settings_page_after(server, web)


def _settings_page_after(server: PostierServer, web: httpx.Client) -> Any:
    """The settings page once the relay uses STARTTLS."""
    with server.client() as admin:
        assert admin.put("/api/v1/settings", json={"relay": {"security": "starttls"}}
                         ).status_code == 200
    return web.get("/settings", headers={"Accept-Language": "fr"}).text
