"""A Postier server handing its e-mails on to another Postier server (the original
product's shared base): acknowledged by the upstream's durable commit, final status
flowing back so the sender sees "sent" or "failed" end to end."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from postier.core.service import Postier
from postier.server.config import ServerConfig

from support.relay import FaultRelay
from support.server import PostierServer

pytestmark = pytest.mark.in_process

async def _relay_account(data_dir: Path) -> str:
    core = Postier(ServerConfig(data_dir=data_dir))
    await core.open()
    try:
        user = await core.add_user("serveur-edt", "serveur-edt@ac-lyon.fr", role="relay")
        token, _ = await core.create_token(user, "downstream server")
        return token
    finally:
        await core.close()


def _pair(server_factory: Any, relay: FaultRelay) -> tuple[PostierServer, PostierServer]:
    upstream: PostierServer = server_factory()
    token = asyncio.run(_relay_account(upstream.data_dir))
    upstream.start()
    upstream.configure_relay(relay)
    downstream: PostierServer = server_factory()
    downstream.start()
    downstream.configure_relay(relay, relay={"kind": "postier", "url": upstream.url,
                                             "password": token, "timeout": 5})
    return upstream, downstream


def test_e_mail_handed_on_and_its_result_flows_back(
    server_factory: Any, relay: FaultRelay
) -> None:
    upstream, downstream = _pair(server_factory, relay)
    relay.rcpt_replies = {"inconnu@example.org": "550 5.1.1 No such user"}
    with downstream.client("alice") as alice:
        r = alice.post("/api/v1/messages", json={
            "to": ["parent@example.org", "inconnu@example.org"],
            "subject": "Via le serveur PRONOTE", "text": "Bonjour"})
        assert r.status_code == 202
        mid = r.json()["id"]
    (got,) = relay.wait_for(1)
    assert got.mail_from == "alice.martin@ac-lyon.fr"
    assert got.message["Subject"] == "Via le serveur PRONOTE"
    final = downstream.wait_status(mid, "sent", user="alice", timeout=20)
    by = {x["address"]: x for x in final["recipients"]}
    assert by["parent@example.org"]["status"] == "sent"
    assert by["inconnu@example.org"]["status"] == "failed"
    assert "No such user" in by["inconnu@example.org"]["reply"]
    relay.wait_for(2, timeout=20)  # the notice travels the same way, a little later
    handed_on = [m for m in relay.messages if m.message["X-Postier-Notice"] is None]
    assert len(handed_on) == 1, "handed on once, whatever the follow-ups"
    # The sender is told by her own server about the recipient that failed, once.
    notices = [m for m in relay.messages if m.message["X-Postier-Notice"] == "failure"]
    assert [n.rcpt_tos for n in notices] == [["alice.martin@ac-lyon.fr"]]
    with upstream.client() as admin:
        subjects = [m["subject"] for m in admin.get("/api/v1/messages").json()]
        assert subjects.count("Via le serveur PRONOTE") == 1


def test_upstream_down_then_up_delivers_once(server_factory: Any, relay: FaultRelay) -> None:
    upstream, downstream = _pair(server_factory, relay)
    upstream.stop()
    with downstream.client("alice") as alice:
        mid = alice.post("/api/v1/messages", json={"to": ["p@example.org"], "text": "x"}
                         ).json()["id"]
    state = downstream.wait_status(mid, "deferred", user="alice")
    assert state["last_error"]["code"] == "upstream_unreachable"
    upstream.start()
    relay.wait_for(1, timeout=20)
    downstream.wait_status(mid, "sent", user="alice", timeout=20)
    assert len(relay.messages) == 1
