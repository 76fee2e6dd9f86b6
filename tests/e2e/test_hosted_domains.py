"""In an installation hosting several establishments, a domain belongs to one of them: the
others cannot take it by any door, only an operator moves it, and ``postier doctor`` shows
the overlaps an older installation already has. On the real server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from postier.core.service import Postier
from postier.core.settings import DeliverySettings
from postier.server.config import ServerConfig

from support.relay import FaultRelay
from support.server import PostierServer

pytestmark = pytest.mark.in_process

PLATFORM = "ecoles.hebergeur.fr"
B = "lycee-du-parc"


async def _schools(data_dir: Path, relay: FaultRelay, overlap: bool) -> dict[str, str]:
    """School A (the first establishment: ac-lyon.fr, with a DKIM key) and the hosted
    school B (lyceeduparc.fr; with ``overlap``, also ac-lyon.fr, as an installation made
    before domains had one owner could have it)."""
    core = Postier(ServerConfig(data_dir=data_dir))
    await core.open()
    try:
        admin_a = await core.find_user("admin", 1)
        await core.put_settings(admin_a, {
            "sender": {"name": "Collège Jean Moulin", "address": "ne-pas-repondre@ac-lyon.fr"},
            "allowed_domains": ["ac-lyon.fr"],
            "relay": {"host": relay.host, "port": relay.port, "security": "none"}})
        await core.dkim_generate(admin_a, "ac-lyon.fr")
        est = await core.add_establishment(B, "Lycée du Parc", hosted=True)
        tokens = {}
        for username, email, role, est_id in [
            ("admin", "proviseur@lyceeduparc.fr", "admin", est.id),
            ("prof", "prof.durand@ac-lyon.fr", "user", est.id),
            ("ops", "ops@hebergeur.fr", "operator", 1),
        ]:
            user = await core.add_user(username, email, role=role, password="mdp-" + username,
                                       establishment_id=est_id)
            tokens[username], _ = await core.create_token(user)
        domains = ["lyceeduparc.fr", *(["ac-lyon.fr"] if overlap else [])]
        await core.store.save_settings(est.id, DeliverySettings(
            allowed_domains=domains).model_dump(mode="json"))
        return tokens
    finally:
        await core.close()


def _hosting(server_factory: Any, relay: FaultRelay, overlap: bool
             ) -> tuple[PostierServer, dict[str, str]]:
    s: PostierServer = server_factory(
        POSTIER_PLATFORM_RELAY=json.dumps({"host": relay.host, "port": relay.port,
                                           "security": "none", "timeout": 5}),
        POSTIER_PLATFORM_SENDER_DOMAIN=PLATFORM)
    tokens = asyncio.run(_schools(s.data_dir, relay, overlap))
    s.start()
    return s, tokens


def _as(server: PostierServer, token: str, **headers: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=10,
                        headers={"Authorization": f"Bearer {token}", **headers})


def _refused(r: httpx.Response, code: str, domain: str,
             others: tuple[str, ...] = ("Default", "default")) -> dict[str, Any]:
    assert r.status_code == 409, (r.status_code, r.text)
    body: dict[str, Any] = r.json()["error"]
    assert body["code"] == code and domain in body["message"], body
    for name in others:  # never who holds the domain
        assert name not in r.text, r.text
    return body


def _postier(server: PostierServer, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**server.env, "LANG": "C", "COLUMNS": "250"}
    env.pop("LANGUAGE", None)
    env.pop("LC_ALL", None)
    return subprocess.run([sys.executable, "-m", "postier", *args, "--data-dir",
                           str(server.data_dir)], capture_output=True, text=True, env=env,
                          timeout=60)


def _domains_check(server: PostierServer) -> dict[str, Any]:
    r = _postier(server, "doctor", "--json")
    assert r.stdout, r.stderr
    checks = {c["key"]: c for c in json.loads(r.stdout)["checks"]}
    return dict(checks["domains"])


def _eventually(read: Callable[[], Any], what: str, timeout: float = 10) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if value or time.monotonic() > deadline:
            assert value, f"{what} not seen within {timeout} s"
            return value
        time.sleep(0.1)


def test_a_domain_of_another_establishment_is_refused_at_every_door(
    server_factory: Any, relay: FaultRelay
) -> None:
    server, tokens = _hosting(server_factory, relay, overlap=False)
    with _as(server, tokens["admin"]) as admin_b:
        for domains in (["lyceeduparc.fr", "ac-lyon.fr"], ["lyceeduparc.fr", "*.ac-lyon.fr"],
                        ["lyceeduparc.fr", "CLG.AC-Lyon.fr"]):
            body = _refused(admin_b.put("/api/v1/settings", json={"allowed_domains": domains}),
                            "domain_taken", domains[1].lower())
            assert body["field"] == "allowed_domains.1" and "operator" in body["hint"], body
        fr = _refused(admin_b.put("/api/v1/settings", json={"allowed_domains": ["ac-lyon.fr"]},
                                  headers={"Accept-Language": "fr"}), "domain_taken", "ac-lyon.fr")
        assert "appartient déjà" in fr["message"] and "opérateur" in fr["hint"], fr
        # Nobody takes a whole top-level domain first, keeping the others out of it.
        for pattern in ("fr", "*.fr"):
            r = admin_b.put("/api/v1/settings", json={"allowed_domains": [pattern]})
            assert r.status_code == 422, r.text
            assert "top-level" in r.json()["error"]["message"], r.text
        body = _refused(admin_b.put("/api/v1/settings", json={
            "sender": {"address": "secretariat@ac-lyon.fr"}}), "domain_taken", "ac-lyon.fr")
        assert body["field"] == "sender.address"
        # The platform's domain: another school's platform address, or the whole domain.
        body = _refused(admin_b.put("/api/v1/settings", json={
            "sender": {"address": f"clg-voisin@{PLATFORM}"}}), "platform_domain", PLATFORM)
        assert f"{B}@{PLATFORM}" in body["message"]
        _refused(admin_b.put("/api/v1/settings", json={"allowed_domains": [PLATFORM]}),
                 "platform_domain", PLATFORM)
        r = admin_b.put("/api/v1/settings", json={"sender": {"address": f"{B}@{PLATFORM}"}})
        assert r.status_code == 200, r.text
        body = _refused(admin_b.put("/api/v1/users/prof", json={
            "granted_senders": ["direction@ac-lyon.fr"]}), "domain_taken", "ac-lyon.fr")
        assert body["field"] == "granted_senders.0"
        assert admin_b.get("/api/v1/settings").json()["allowed_domains"] == ["lyceeduparc.fr"]
        assert admin_b.get("/api/v1/users").json()[0]["granted_senders"] == []
    with _as(server, tokens["prof"]) as prof:
        _refused(prof.post("/api/v1/account/sender-addresses",
                           json={"address": "prof.durand@ac-lyon.fr"}), "domain_taken",
                 "ac-lyon.fr")
        assert prof.get("/api/v1/account/sender-addresses").json() == []
    with server.client() as admin_a:
        # The holder keeps using its domain; the other school's is refused to it as well.
        r = admin_a.put("/api/v1/settings", json={"allowed_domains": ["ac-lyon.fr",
                                                                      "*.ac-lyon.fr"]})
        assert r.status_code == 200, r.text
        r = admin_a.put("/api/v1/settings", json={"allowed_domains": ["lyceeduparc.fr"]})
        _refused(r, "domain_taken", "lyceeduparc.fr", others=("Lycée du Parc", B))


def test_an_operator_moves_a_domain_and_doctor_shows_overlaps(
    server_factory: Any, relay: FaultRelay
) -> None:
    server, tokens = _hosting(server_factory, relay, overlap=True)
    check = _domains_check(server)
    assert check["level"] == "warn" and f"ac-lyon.fr: default, {B}" in check["result"], check
    assert "postier domains move" in check["remedy"]
    with _as(server, tokens["admin"]) as admin_b:
        # An overlap from before does not stop unrelated changes, but nobody builds on it.
        assert admin_b.put("/api/v1/settings", json={"retry": {"first_delay": 30}}
                           ).status_code == 200
        _refused(admin_b.post("/api/v1/dkim", json={"domain": "ac-lyon.fr"}), "domain_taken",
                 "ac-lyon.fr")
        assert admin_b.post("/api/v1/domains/ac-lyon.fr/move", json={"to": B}
                            ).status_code == 403
    with _as(server, tokens["ops"]) as ops:
        r = ops.post("/api/v1/domains/ac-lyon.fr/move", json={"to": B})
        assert r.status_code == 200, r.text
        assert r.json() == {"domain": "ac-lyon.fr", "to": B, "from": ["default"],
                            "allowed_domains": ["ac-lyon.fr"], "dkim": ["ac-lyon.fr"],
                            "sender_cleared": ["default"], "grants_removed": 0}
        assert ops.post("/api/v1/domains/ac-lyon.fr/move", json={"to": "nowhere"}
                        ).status_code == 404
    with server.client() as admin_a:
        doc = admin_a.get("/api/v1/settings").json()
        assert doc["allowed_domains"] == [] and doc["sender"]["address"] == "", doc
        assert admin_a.get("/api/v1/dkim").json() == []
        (out,) = [e for e in admin_a.get("/api/v1/audit").json()
                  if e["action"] == "domain.move_out"]
        assert out["target"] == "ac-lyon.fr" and out["actor"] == "ops"
        assert B not in json.dumps(out)
        _refused(admin_a.put("/api/v1/settings", json={"allowed_domains": ["ac-lyon.fr"]}),
                 "domain_taken", "ac-lyon.fr")
    with _as(server, tokens["admin"]) as admin_b:
        assert [k["domain"] for k in admin_b.get("/api/v1/dkim").json()] == ["ac-lyon.fr"]
        assert [e["target"] for e in admin_b.get("/api/v1/audit").json()
                if e["action"] == "domain.move_in"] == ["ac-lyon.fr"]
        r = admin_b.put("/api/v1/users/prof", json={"granted_senders": ["direction@ac-lyon.fr"]})
        assert r.status_code == 200, r.text
    assert _domains_check(server)["level"] == "ok"
    # From the console: back to the first establishment, the grant with it.
    r = _postier(server, "domains", "move", "ac-lyon.fr", "--to", "default")
    assert r.returncode == 0, r.stderr
    assert "ac-lyon.fr now belongs to default (taken from: lycee-du-parc)" in r.stdout
    with server.client() as admin_a:
        _eventually(lambda: admin_a.get("/api/v1/settings").json()["allowed_domains"]
                    == ["ac-lyon.fr"], "the domain back in the first establishment")
    with _as(server, tokens["admin"]) as admin_b:
        _eventually(lambda: all(u["granted_senders"] == []
                                for u in admin_b.get("/api/v1/users").json()),
                    "the grant at the moved domain removed")
