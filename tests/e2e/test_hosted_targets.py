"""A hosted establishment's administrator cannot point the platform at its own loopback or
private networks (relays, OAuth2 token URL, webhook, test-send), unless the operator allows
a network; a school's own establishment keeps them. On the real server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from postier.core.service import Postier
from postier.server.config import ServerConfig

from support.relay import FaultRelay
from support.server import PostierServer

pytestmark = pytest.mark.in_process

B = "lycee-du-parc"


async def _hosted_admin(data_dir: Path) -> str:
    core = Postier(ServerConfig(data_dir=data_dir))
    await core.open()
    try:
        est = await core.add_establishment(B, "Lycée du Parc", hosted=True)
        admin = await core.add_user("admin", "proviseur@lyceeduparc.fr", role="admin",
                                    establishment_id=est.id)
        token, _ = await core.create_token(admin)
        return token
    finally:
        await core.close()


def _platform(server_factory: Any, relay: FaultRelay, **env: str
              ) -> tuple[PostierServer, httpx.Client]:
    s: PostierServer = server_factory(
        POSTIER_PLATFORM_RELAY=json.dumps({"host": relay.host, "port": relay.port,
                                           "security": "none", "timeout": 5}),
        POSTIER_PLATFORM_SENDER_DOMAIN="ecoles.hebergeur.fr", **env)
    token = asyncio.run(_hosted_admin(s.data_dir))
    s.start()
    return s, httpx.Client(base_url=s.url, timeout=20,
                           headers={"Authorization": f"Bearer {token}"})


_WEBHOOK = {"webhook_secret": "0123456789abcdef"}
INTERNAL = [
    ({"backup_relay": {"host": "127.0.0.1", "port": 25}}, "backup_relay.host", "127.0.0.1"),
    ({"backup_relay": {"host": "localhost", "port": 25}}, "backup_relay.host", "127.0.0.1"),
    ({"relay": {"host": "10.1.2.3"}}, "relay.host", "10.1.2.3"),
    ({"relay": {"kind": "postier", "url": "http://[::1]:8025", "password": "pst_x"}},
     "relay.url", "::1"),
    ({"relay": {"host": "52.98.0.1", "auth": "oauth2", "oauth2_client_id": "c",
                "oauth2_client_secret": "s",
                "oauth2_token_url": "http://169.254.169.254/token"}},
     "relay.oauth2_token_url", "169.254.169.254"),
    ({"alerts": {"webhook_url": "http://192.168.1.10/hook", **_WEBHOOK}},
     "alerts.webhook_url", "192.168.1.10"),
    ({"alerts": {"webhook_url": "http://0.0.0.0:9000/", **_WEBHOOK}},
     "alerts.webhook_url", "0.0.0.0"),
]


def test_a_hosted_establishment_cannot_target_the_platforms_networks(
    server_factory: Any, relay: FaultRelay
) -> None:
    server, admin_b = _platform(server_factory, relay)
    with admin_b:
        before = admin_b.get("/api/v1/settings").json()
        for change, field, address in INTERNAL:
            r = admin_b.put("/api/v1/settings", json=change)
            assert r.status_code == 422, (change, r.status_code, r.text)
            error = r.json()["error"]
            assert error["code"] == "target_not_allowed" and error["field"] == field, error
            assert address in error["message"] and "operator" in error["hint"], error
        assert admin_b.get("/api/v1/settings").json() == before, "nothing was saved"
        r = admin_b.put("/api/v1/settings", json={"backup_relay": {"host": "127.0.0.1"}},
                        headers={"Accept-Language": "fr"})
        error = r.json()["error"]
        assert "boucle locale" in error["message"] and "opérateur" in error["hint"], error
        r = admin_b.put("/api/v1/settings",
                        json={"backup_relay": {"host": "nowhere.invalid"}})
        assert r.json()["error"]["code"] == "target_not_allowed", r.text
        # The test-send is no way round: the candidate relay is checked before any
        # connection (here the platform's own machine, under another name).
        r = admin_b.post("/api/v1/settings/test", json={
            "to": "proviseur@lyceeduparc.fr",
            "settings": {"relay": {"host": "localhost", "port": relay.port,
                                   "security": "none"}}})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["field"] == "relay.host"
        assert relay.messages == [], "the platform's network was reached"
        # The operator's platform relay itself is tested as before.
        r = admin_b.post("/api/v1/settings/test", json={"to": "proviseur@lyceeduparc.fr"})
        assert r.status_code == 200 and r.json()["ok"], r.text
    # The school's own (not hosted) establishment keeps its relay on its own network.
    server.configure_relay(relay, backup_relay={"host": "127.0.0.1", "port": relay.port,
                                                "security": "none"})


def test_the_operator_allows_a_network(server_factory: Any, relay: FaultRelay) -> None:
    _, admin_b = _platform(server_factory, relay,
                           POSTIER_HOSTED_ALLOWED_NETWORKS="127.0.0.0/8")
    with admin_b:
        r = admin_b.put("/api/v1/settings", json={"backup_relay": {
            "host": "127.0.0.1", "port": relay.port, "security": "none"}})
        assert r.status_code == 200, r.text
        r = admin_b.put("/api/v1/settings", json={"relay": {"host": "10.1.2.3"}})
        assert r.json()["error"]["code"] == "target_not_allowed", r.text
