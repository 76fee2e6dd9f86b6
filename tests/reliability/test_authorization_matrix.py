"""Every endpoint of /openapi.json x every kind of caller, with the answer each must get,
on the real server: anonymous, a user (alice, who owns the e-mail and token under test), a
peer (bob, same school), the school's administrator, another school's administrator (on
her own, and naming this school in X-Postier-Establishment), and the hosting operator
acting in this school. A new endpoint without a row here fails the test; so does any 2xx
answer that shows another user's or another school's data."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from reliability_kit import record_figures

from postier.core.service import Postier
from postier.server.config import ServerConfig

from support.relay import FaultRelay, closed_port
from support.server import ServerProcess

ROLES = ("anonymous", "user", "peer", "admin", "other_admin", "operator")
A_PROFILE = "Relais-du-college-A"
_n = itertools.count()


@dataclass
class World:
    server: ServerProcess
    tokens: dict[str, str]  # role -> token
    alice_message: str
    alice_token_name: str


def headers(world: World, role: str) -> dict[str, str]:
    h: dict[str, str] = {}
    if role == "anonymous":
        return h
    token_role = "other_admin" if role == "other_admin_naming_a" else role
    h["Authorization"] = f"Bearer {world.tokens[token_role]}"
    if role in ("operator", "other_admin_naming_a"):
        h["X-Postier-Establishment"] = "default"
    return h


def admin_a(world: World) -> httpx.Client:
    return httpx.Client(base_url=world.server.url, timeout=30,
                        headers={"Authorization": f"Bearer {world.tokens['admin']}"})


# -- fresh things to act on (some endpoints change or remove what they are given) ------------


def fresh_message(world: World) -> dict[str, str]:
    with httpx.Client(base_url=world.server.url, timeout=30,
                      headers={"Authorization": f"Bearer {world.tokens['user']}"}) as c:
        r = c.post("/api/v1/messages", json={"to": ["p@example.org"], "subject": "frais"})
        return {"message_id": r.json()["id"]}


def fresh_sent_message(world: World) -> dict[str, str]:
    """One of alice's e-mails, marked sent in the store (the server does not deliver)."""
    made = fresh_message(world)
    with sqlite3.connect(world.server.data_dir / "postier.db", timeout=10) as db:
        db.execute("UPDATE messages SET status = 'sent' WHERE id = ?", (made["message_id"],))
    return made


def alice_message(world: World) -> dict[str, str]:
    return {"message_id": world.alice_message}


def fresh_profile(world: World) -> dict[str, str]:
    with admin_a(world) as c:
        r = c.post("/api/v1/profiles", json={"label": f"Profil {next(_n)}",
                                             "host": "smtp.example.org", "password": "pw"})
        return {"profile_id": str(r.json()["id"])}


def fresh_user(world: World) -> dict[str, str]:
    name = f"u{next(_n)}"
    with admin_a(world) as c:
        assert c.post("/api/v1/users", json={"username": name, "email": f"{name}@ac-lyon.fr"}
                      ).status_code == 201
    return {"username": name}


def alice(world: World) -> dict[str, str]:
    return {"username": "alice"}


def fresh_alice_token(world: World) -> dict[str, str]:
    with admin_a(world) as c:
        r = c.post("/api/v1/tokens", json={"name": f"t{next(_n)}", "user": "alice"})
        return {"token_id": str(r.json()["id"])}


def fresh_dkim_key(world: World) -> dict[str, str]:
    with admin_a(world) as c:
        assert c.post("/api/v1/dkim", json={"domain": "ac-lyon.fr"}).status_code == 201
    return {"domain": "ac-lyon.fr"}


def alice_pending_code(world: World) -> dict[str, str]:
    """Alice's own address, with a code waiting (written to the store directly: the resend
    limits would refuse a code per call, and they are not the point here)."""
    with sqlite3.connect(world.server.data_dir / "postier.db", timeout=10) as db:
        db.execute("DELETE FROM sender_addresses")
        db.execute("DELETE FROM sender_code_sends")
        db.execute(
            "INSERT INTO sender_addresses (establishment_id, user_id, address, address_key, "
            "code_hash, code_expires_at, failed_attempts, created_at) "
            "SELECT establishment_id, id, email, lower(email), 'x', ?, 0, ? FROM users "
            "WHERE username = 'alice' AND establishment_id = 1",
            (time.time() + 1800, time.time()))
    return {"address": "alice.martin@ac-lyon.fr"}


def fresh_suppression(world: World) -> dict[str, str]:
    address = f"bloque{next(_n)}@example.org"
    with admin_a(world) as c:
        assert c.post("/api/v1/suppressions", json={"address": address}).status_code == 201
    return {"address": address}


def nothing(world: World) -> dict[str, str]:
    return {}


def unique(body: dict[str, Any]) -> Callable[[], dict[str, Any]]:
    def make() -> dict[str, Any]:
        n = next(_n)
        return {k: (v.format(n=n) if isinstance(v, str) else v) for k, v in body.items()}
    return make


@dataclass
class Row:
    expect: tuple[int, int, int, int, int, int]  # in the order of ROLES
    setup: Callable[[World], dict[str, str]] = nothing
    body: Callable[[], Any] | None = None
    query: str = ""
    authenticated: bool = True


RAW = {"envelope_from": "alice.martin@ac-lyon.fr", "recipients": ["p@example.org"],
       "data": "RnJvbTogYWxpY2UubWFydGluQGFjLWx5b24uZnINClN1YmplY3Q6IHJhdw0KDQp0ZXh0DQo="}

#            anonymous user peer admin other_admin operator
TABLE: dict[tuple[str, str], Row] = {
    ("POST", "/api/v1/messages"): Row(
        (401, 202, 202, 202, 202, 202), body=lambda: {"to": ["p@example.org"]}),
    ("GET", "/api/v1/messages"): Row((401, 200, 200, 200, 200, 200)),
    ("POST", "/api/v1/messages/batch"): Row(
        (401, 202, 202, 202, 202, 202), body=lambda: {"messages": [{"to": ["p@example.org"]}]}),
    # Only alice may hand on an e-mail written as alice.
    ("POST", "/api/v1/messages/raw"): Row((401, 202, 403, 403, 403, 403), body=lambda: RAW),
    ("GET", "/api/v1/messages/{message_id}"): Row(
        (401, 200, 404, 200, 404, 200), setup=alice_message),
    ("POST", "/api/v1/messages/{message_id}/retry"): Row(
        (401, 200, 404, 200, 404, 200), setup=fresh_message),
    ("POST", "/api/v1/messages/{message_id}/cancel"): Row(
        (401, 200, 404, 200, 404, 200), setup=fresh_message),
    # Everyone retries what their own list shows (test_retry_all checks whose).
    ("POST", "/api/v1/messages/retry"): Row(
        (401, 200, 200, 200, 200, 200), body=lambda: {"status": "queued"}),
    # Only an administrator of the e-mail's school resends it.
    ("POST", "/api/v1/messages/{message_id}/resend"): Row(
        (401, 403, 403, 202, 404, 202), setup=fresh_sent_message),
    ("GET", "/api/v1/settings"): Row((401, 403, 403, 200, 200, 200)),
    ("PUT", "/api/v1/settings"): Row(
        (401, 403, 403, 200, 200, 200), body=lambda: {"sender": {"name": "Nom"}}),
    ("POST", "/api/v1/settings/preview"): Row(
        (401, 200, 403, 200, 404, 200), body=lambda: {"user": "alice"}),
    ("POST", "/api/v1/settings/test"): Row(
        (401, 403, 403, 200, 200, 200), body=lambda: {"to": "p@example.org"}),
    ("GET", "/api/v1/profiles"): Row((401, 200, 200, 200, 200, 200)),
    ("POST", "/api/v1/profiles"): Row(
        (401, 403, 403, 201, 201, 201), body=unique({"label": "P{n}", "host": "smtp.x.fr"})),
    ("GET", "/api/v1/profiles/{profile_id}"): Row(
        (401, 200, 200, 200, 404, 200), setup=fresh_profile),
    ("PUT", "/api/v1/profiles/{profile_id}"): Row(
        (401, 403, 403, 200, 404, 200), setup=fresh_profile,
        body=unique({"label": "Q{n}", "host": "smtp.y.fr"})),
    ("DELETE", "/api/v1/profiles/{profile_id}"): Row(
        (401, 403, 403, 204, 404, 204), setup=fresh_profile),
    ("POST", "/api/v1/profiles/{profile_id}/retrieve"): Row(
        (401, 200, 200, 200, 404, 200), setup=fresh_profile),
    # A connection check to a port of this machine where nothing listens: nothing sent.
    ("POST", "/api/v1/profiles/{profile_id}/test"): Row(
        (401, 403, 403, 200, 404, 200), setup=fresh_profile,
        body=lambda: {"send": False, "profile": {"host": "127.0.0.1", "port": closed_port(),
                                                 "auth": "none", "timeout": 2}}),
    ("GET", "/api/v1/me"): Row((401, 200, 200, 200, 200, 200)),
    ("POST", "/api/v1/me/password"): Row(
        (401, 422, 422, 422, 422, 422),
        body=lambda: {"current": "pas-le-bon", "new": "un-nouveau-mot-de-passe"}),
    # Sender addresses are each user's own: alice's address is hers alone to verify,
    # confirm or remove; nobody else (not even an administrator) acts on it for her.
    ("GET", "/api/v1/account/sender-addresses"): Row((401, 200, 200, 200, 200, 200)),
    ("POST", "/api/v1/account/sender-addresses"): Row(
        (401, 200, 403, 403, 403, 403), setup=alice_pending_code,
        body=lambda: {"address": "alice.martin@ac-lyon.fr"}),
    ("POST", "/api/v1/account/sender-addresses/{address}/confirm"): Row(
        (401, 422, 403, 403, 403, 403), setup=alice_pending_code,
        body=lambda: {"code": "12345"}),
    ("DELETE", "/api/v1/account/sender-addresses/{address}"): Row(
        (401, 204, 404, 404, 404, 404), setup=alice_pending_code),
    ("GET", "/api/v1/users"): Row((401, 403, 403, 200, 200, 200)),
    ("POST", "/api/v1/users"): Row(
        (401, 403, 403, 201, 201, 201),
        body=unique({"username": "n{n}", "email": "n{n}@ac-lyon.fr"})),
    ("PUT", "/api/v1/users/{username}"): Row(
        (401, 403, 403, 200, 404, 200), setup=fresh_user, body=lambda: {"name": "Nouveau"}),
    ("DELETE", "/api/v1/users/{username}"): Row(
        (401, 403, 403, 200, 404, 200), setup=fresh_user),
    ("GET", "/api/v1/tokens"): Row((401, 200, 403, 200, 404, 200), query="?username=alice"),
    ("POST", "/api/v1/tokens"): Row(
        (401, 201, 403, 201, 404, 201), body=lambda: {"name": "t", "user": "alice"}),
    ("DELETE", "/api/v1/tokens/{token_id}"): Row(
        (401, 204, 403, 204, 404, 204), setup=fresh_alice_token, query="?username=alice"),
    ("GET", "/api/v1/audit"): Row((401, 403, 403, 200, 200, 200)),
    ("GET", "/api/v1/ready"): Row((200,) * 6, authenticated=False),  # type: ignore[arg-type]
    # Readable from this machine by design (POSTIER_METRICS_ALLOW); aggregate numbers only.
    ("GET", "/metrics"): Row((200,) * 6, authenticated=False),  # type: ignore[arg-type]
    ("GET", "/api/v1/me/data"): Row((401, 200, 200, 200, 200, 200)),
    ("GET", "/api/v1/users/{username}/data"): Row(
        (401, 403, 403, 200, 404, 200), setup=alice),
    ("GET", "/api/v1/health"): Row((200,) * 6, authenticated=False),  # type: ignore[arg-type]
    ("GET", "/api/v1/dkim"): Row((401, 403, 403, 200, 200, 200)),
    # Another school's administrator may not sign for this school's domain.
    ("POST", "/api/v1/dkim"): Row(
        (401, 403, 403, 201, 422, 201), body=lambda: {"domain": "ac-lyon.fr"}),
    ("DELETE", "/api/v1/dkim/{domain}"): Row(
        (401, 403, 403, 204, 404, 204), setup=fresh_dkim_key),
    ("GET", "/api/v1/relay-presets"): Row((401, 200, 200, 200, 200, 200)),
    # Only an operator moves a domain between establishments (one nobody holds here, so
    # that the other rows keep theirs).
    ("POST", "/api/v1/domains/{domain}/move"): Row(
        (401, 403, 403, 403, 403, 200), setup=lambda world: {"domain": "ecole-libre.fr"},
        body=lambda: {"to": "lycee-du-parc"}),
    # Each administrator sees their own school's incidents (test_alerts checks which).
    ("GET", "/api/v1/alerts"): Row((401, 403, 403, 200, 200, 200)),
    # Each school's suppression list is its administrators' (and the operator's in it):
    # another school's administrator lists and adds in hers, and finds no entry of this
    # school to lift.
    ("GET", "/api/v1/suppressions"): Row((401, 403, 403, 200, 200, 200),
                                         setup=fresh_suppression),
    ("POST", "/api/v1/suppressions"): Row(
        (401, 403, 403, 201, 201, 201), body=unique({"address": "n{n}@example.org"})),
    ("DELETE", "/api/v1/suppressions/{address}"): Row(
        (401, 403, 403, 204, 404, 204), setup=fresh_suppression),
    # The DNS server is a closed port of this machine: each item says the DNS was not asked.
    ("POST", "/api/v1/domains/check"): Row(
        (401, 403, 403, 200, 200, 200), body=lambda: {"domain": "ac-lyon.fr"}),
    # A mailbox on a closed port of this machine: the check says the connection was refused.
    ("POST", "/api/v1/bounces/mailbox/check"): Row(
        (401, 403, 403, 200, 200, 200),
        body=lambda: {"imap": {"host": "127.0.0.1", "port": closed_port(), "security": "none",
                               "username": "retours", "password": "mot-de-passe"}}),
}


async def _other_schools(data_dir: Path) -> dict[str, str]:
    core = Postier(ServerConfig(data_dir=data_dir))
    await core.open()
    try:
        b = await core.add_establishment("lycee-du-parc", "Lycée du Parc")
        tokens = {}
        for role, username, email, est in (
                ("other_admin", "admin", "proviseur@lyceeduparc.fr", b.id),
                ("operator", "ops", "ops@hebergeur.fr", 1)):
            user = await core.add_user(username, email, password="mot-de-passe-" + username,
                                       role="admin" if role == "other_admin" else "operator",
                                       establishment_id=est)
            tokens[role], _ = await core.create_token(user)
        return tokens
    finally:
        await core.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, relay_cert: tuple[Path, Path]
          ) -> Iterator[World]:
    relay = FaultRelay(cert=relay_cert).start()
    server = ServerProcess(tmp_path_factory.mktemp("authz"),
                           {"POSTIER_DNS_SERVERS": f"127.0.0.1:{closed_port()}"})
    server.args = ["--no-delivery"]  # e-mails stay queued: retry and cancel always apply
    server.provision()
    tokens = {"user": server.tokens["alice"], "peer": server.tokens["bob"],
              "admin": server.tokens["admin"], **asyncio.run(_other_schools(server.data_dir))}
    server.start()
    server.configure_relay(relay)
    with httpx.Client(base_url=server.url, timeout=30,
                      headers={"Authorization": f"Bearer {tokens['other_admin']}"}) as b:
        assert b.put("/api/v1/settings", json={
            "delegation": True, "allowed_domains": ["lyceeduparc.fr"],
            "sender": {"name": "Lycée", "address": "ne-pas-repondre@lyceeduparc.fr"},
            "relay": {"host": relay.host, "port": relay.port, "security": "none"}}
        ).status_code == 200
    w = World(server, tokens, "", "jeton-d-alice")
    w.alice_message = fresh_message(w)["message_id"]
    with admin_a(w) as c:
        c.post("/api/v1/profiles", json={"label": A_PROFILE, "host": "smtp.ac-lyon.fr"})
    yield w
    server.kill()
    relay.stop()


def _leaks(world: World, role: str, text: str) -> list[str]:
    """What a 2xx answer to ``role`` must never contain."""
    forbidden = {
        "peer": [world.alice_message],
        "other_admin": [world.alice_message, A_PROFILE, "alice.martin", "bob.durand"],
    }.get(role, [])
    return [f for f in forbidden if f in text]


def test_every_endpoint_has_a_row(world: World) -> None:
    spec = httpx.get(world.server.url + "/openapi.json", timeout=10).json()
    described = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    assert described - set(TABLE) == set(), "endpoints without an authorisation row"
    assert set(TABLE) - described == set(), "rows for endpoints that no longer exist"
    for (method, path), row in TABLE.items():
        security = spec["paths"][path][method.lower()].get("security")
        assert bool(security) == row.authenticated, (method, path, security)


def test_authorisation_matrix(world: World) -> None:
    wrong: list[str] = []
    calls = 0
    roles = (*ROLES, "other_admin_naming_a")
    for (method, path), row in TABLE.items():
        for role in roles:
            if role == "other_admin_naming_a":
                expected = 404 if row.authenticated else row.expect[0]
            else:
                expected = row.expect[ROLES.index(role)]
            params = row.setup(world)
            url = path.format(**params) + row.query
            body = row.body() if row.body else None
            r = httpx.request(method, world.server.url + url, json=body, timeout=30,
                              headers=headers(world, role))
            calls += 1
            if r.status_code != expected:
                wrong.append(f"{role:22} {method:6} {url}: {r.status_code} (expected "
                             f"{expected}) {r.text[:150]}")
            elif 200 <= r.status_code < 300 and _leaks(world, role, r.text):
                wrong.append(f"{role:22} {method:6} {url}: shows {_leaks(world, role, r.text)}")
            if r.status_code >= 500:
                wrong.append(f"{role:22} {method:6} {url}: server error")
    record_figures("authorisation matrix", endpoints=len(TABLE), callers=len(roles),
                   requests=calls, wrong=len(wrong))
    assert not wrong, "\n".join(wrong)
