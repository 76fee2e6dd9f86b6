"""Many establishments in one installation: nothing crosses between them; an operator
serves them all; a hosted establishment sends with no setup at all."""

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

async def _second_establishment(data_dir: Path, hosted: bool = False) -> dict[str, str]:
    core = Postier(ServerConfig(data_dir=data_dir))
    await core.open()
    try:
        est = await core.add_establishment("lycee-du-parc", "Lycée du Parc", hosted=hosted)
        tokens = {}
        for username, email, role in [("admin", "proviseur@lyceeduparc.fr", "admin"),
                                      ("zoe", "zoe@lyceeduparc.fr", "user"),
                                      ("ops", "ops@hebergeur.fr", "operator")]:
            user = await core.add_user(username, email, role=role, password="mdp-" + username,
                                       establishment_id=est.id if role != "operator" else 1)
            tokens[username], _ = await core.create_token(user)
        return tokens
    finally:
        await core.close()


@pytest.fixture
def two(server_factory: Any, relay: FaultRelay) -> tuple[PostierServer, dict[str, str]]:
    s: PostierServer = server_factory()
    other = asyncio.run(_second_establishment(s.data_dir))
    s.start()
    s.configure_relay(relay)
    with _as(s, other["admin"]) as admin_b:
        r = admin_b.put("/api/v1/settings", json={
            "sender": {"name": "Lycée du Parc", "address": "ne-pas-repondre@lyceeduparc.fr"},
            "allowed_domains": ["lyceeduparc.fr"],
            "relay": {"host": relay.host, "port": relay.port, "security": "none"}})
        assert r.status_code == 200, r.text
    return s, other


def _as(server: PostierServer, token: str, **headers: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=10,
                        headers={"Authorization": f"Bearer {token}", **headers})


def test_nothing_crosses_between_establishments(
    two: tuple[PostierServer, dict[str, str]]
) -> None:
    server, other = two
    with server.client() as admin_a, server.client("alice") as alice:
        sent = alice.post("/api/v1/messages", json={"to": ["p@example.org"], "text": "a"})
        mid = sent.json()["id"]
        pid = admin_a.post("/api/v1/profiles", json={"label": "Relais A", "host": "smtp.a.fr"}
                           ).json()["id"]
        settings_a = admin_a.get("/api/v1/settings").json()
    with _as(server, other["admin"]) as admin_b:
        # Every door to A's things is closed for B's administrator: they do not exist.
        table: list[tuple[str, str, dict[str, Any] | None, int]] = [
            ("GET", f"/api/v1/messages/{mid}", None, 404),
            ("POST", f"/api/v1/messages/{mid}/retry", None, 404),
            ("POST", f"/api/v1/messages/{mid}/cancel", None, 404),
            ("GET", f"/api/v1/profiles/{pid}", None, 404),
            ("PUT", f"/api/v1/profiles/{pid}", {"label": "x", "host": "h.fr"}, 404),
            ("DELETE", f"/api/v1/profiles/{pid}", None, 404),
            ("POST", f"/api/v1/profiles/{pid}/retrieve", None, 404),
            ("PUT", "/api/v1/users/alice", {"name": "x"}, 404),
            ("DELETE", "/api/v1/users/alice", None, 404),
            ("GET", "/api/v1/tokens?username=alice", None, 404),
            ("POST", "/api/v1/tokens", {"user": "alice"}, 404),
            ("POST", "/api/v1/settings/preview", {"user": "alice"}, 404),
        ]
        for method, path, body, expected in table:
            r = admin_b.request(method, path, json=body)
            assert r.status_code == expected, (method, path, r.status_code, r.text)
        assert admin_b.get("/api/v1/messages").json() == []
        assert admin_b.get("/api/v1/profiles").json() == []
        assert {u["username"] for u in admin_b.get("/api/v1/users").json()} == {"admin", "zoe"}
        assert admin_b.get("/api/v1/settings").json() != settings_a
        assert all(e["actor"] == "admin" and "Relais A" not in json.dumps(e)
                   for e in admin_b.get("/api/v1/audit").json())
        # Naming A's establishment does not help an administrator of B.
        r = admin_b.get("/api/v1/messages", headers={"X-Postier-Establishment": "default"})
        assert r.status_code == 404
        # Nor can B's administrator make themselves an operator.
        r = admin_b.post("/api/v1/users", json={"username": "x", "email": "x@lyceeduparc.fr",
                                                 "role": "operator"})
        assert r.status_code == 403
    with server.client("admin") as admin_a:
        assert admin_a.put(f"/api/v1/profiles/{pid}", json={"label": "A2", "host": "smtp.a.fr"}
                           ).status_code == 200


def test_operator_serves_every_establishment(two: tuple[PostierServer, dict[str, str]]) -> None:
    server, other = two
    with _as(server, other["zoe"]) as zoe:
        zoe_mid = zoe.post("/api/v1/messages", json={"to": ["p@example.org"], "text": "z"})
    with _as(server, other["ops"], **{"X-Postier-Establishment": "lycee-du-parc"}) as ops:
        ids = [m["id"] for m in ops.get("/api/v1/messages").json()]
        assert ids == [zoe_mid.json()["id"]]
        assert {u["username"] for u in ops.get("/api/v1/users").json()} == {"admin", "zoe"}
    with _as(server, other["ops"], **{"X-Postier-Establishment": "nowhere"}) as ops:
        assert ops.get("/api/v1/messages").status_code == 404


def test_hosted_establishment_sends_with_no_setup(
    server_factory: Any, relay: FaultRelay
) -> None:
    s: PostierServer = server_factory(
        POSTIER_PLATFORM_RELAY=json.dumps({"host": relay.host, "port": relay.port,
                                           "security": "none", "timeout": 5}),
        POSTIER_PLATFORM_SENDER_DOMAIN="ecoles.hebergeur.fr",
    )
    other = asyncio.run(_second_establishment(s.data_dir, hosted=True))
    s.start()
    with _as(s, other["zoe"]) as zoe:
        r = zoe.post("/api/v1/messages", json={"to": ["p@example.org"], "text": "Bonjour"})
        assert r.status_code == 202, r.text
    (got,) = relay.wait_for(1)
    # Outside any allowed domain: the establishment's platform identity, replies to zoe.
    assert got.mail_from == "lycee-du-parc@ecoles.hebergeur.fr"
    assert "Lycée du Parc" in str(got.message["From"])
    assert got.message["Reply-To"] == "zoe@lyceeduparc.fr"
    with _as(s, other["admin"]) as admin:
        doc = admin.get("/api/v1/settings").json()
        assert doc["hosted"] is True and doc["relay"]["host"] == ""


def test_disabled_establishment_can_no_longer_send(
    two: tuple[PostierServer, dict[str, str]]
) -> None:
    server, other = two
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "postier", "establishments", "disable",
                        "lycee-du-parc", "--data-dir", str(server.data_dir)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    with _as(server, other["zoe"]) as zoe:
        assert zoe.post("/api/v1/messages", json={"to": ["p@example.org"]}).status_code == 401
    listing = subprocess.run([sys.executable, "-m", "postier", "establishments", "list",
                              "--data-dir", str(server.data_dir)],
                             capture_output=True, text=True, timeout=30).stdout
    assert "lycee-du-parc" in listing and "disabled" in listing
