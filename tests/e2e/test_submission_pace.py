"""The submission pace on a real server: one account cannot flood the queue (429 with
Retry-After, a batch refused whole), the establishment's ceiling holds its other accounts
back, another establishment is unaffected, the HTTP processes of one server count
together, and SMTP submission spends from the same counters.

The limits here are per UTC day (the minute limits off), so that a test running across a
clock minute does not see its counters start again; the minute windows are tested in
tests/integration/test_pace_store.py on a clock of the test's own."""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from pathlib import Path
from typing import Any

import httpx
import pytest

from postier.core.service import Postier
from postier.server.config import ServerConfig

from support.relay import FaultRelay
from support.server import PostierServer

LIMITS = {
    "POSTIER_PACE_ACCOUNT_PER_MINUTE": "0",
    "POSTIER_PACE_ACCOUNT_PER_DAY": "30",
    "POSTIER_PACE_ESTABLISHMENT_PER_MINUTE": "0",
    "POSTIER_PACE_ESTABLISHMENT_PER_DAY": "50",
}


def _batch(n: int, subject: str = "Réunion") -> dict[str, Any]:
    return {"messages": [{"to": [f"parent{i}@example.org"], "subject": f"{subject} {i}",
                          "text": "Bonjour"} for i in range(n)]}


def _other_establishment(data_dir: Path) -> str:
    """An establishment of its own with an administrator; their API token."""
    async def make() -> str:
        core = Postier(ServerConfig(data_dir=data_dir))
        await core.open()
        try:
            other = await core.add_establishment("lycee-du-parc", "Lycée du Parc")
            admin = await core.add_user("proviseur", "proviseur@lyceeduparc.fr",
                                        role="admin", establishment_id=other.id)
            token, _ = await core.create_token(admin)
            return token
        finally:
            await core.close()

    return asyncio.run(make())


def _paced_server(server_factory: Any, relay: FaultRelay, **env: str) -> PostierServer:
    server: PostierServer = server_factory(**{**LIMITS, **env})
    server.tokens["proviseur"] = _other_establishment(server.data_dir)
    server.start()
    server.configure_relay(relay)
    with server.client("proviseur") as c:
        r = c.put("/api/v1/settings", json={
            "delegation": True, "allowed_domains": ["lyceeduparc.fr"],
            "sender": {"name": "Lycée du Parc", "address": "ne-pas-repondre@lyceeduparc.fr"},
            "relay": {"host": relay.host, "port": relay.port, "security": "none",
                      "auth": "none"}})
        assert r.status_code == 200, r.text
    return server


def _mine(server: PostierServer, user: str) -> int:
    with server.client(user) as c:
        return len(c.get("/api/v1/messages", params={"mine": "true"}).json())


@pytest.mark.in_process
def test_an_account_over_its_limit_gets_429_and_a_batch_is_refused_whole(
    server_factory: Any, relay: FaultRelay
) -> None:
    server = _paced_server(server_factory, relay)
    with server.client("alice", **{"Accept-Language": "fr"}) as c:
        assert c.post("/api/v1/messages/batch", json=_batch(20)).status_code == 202
        over = c.post("/api/v1/messages/batch", json=_batch(11, "Trop"))
        assert over.status_code == 429, over.text
        wait = int(over.headers["Retry-After"])
        assert 0 < wait <= 86400, over.headers
        error = over.json()["error"]
        assert error["code"] == "submission_limit", error
        assert "limite par jour de votre compte" in error["message"], error
        assert "11" in error["message"] and "30" in error["message"], error
        assert "POSTIER_PACE_ACCOUNT_PER_DAY" in error["hint"], error
        assert _mine(server, "alice") == 20, "nothing of a refused batch may be queued"
        # What is left is still there: up to the limit exactly.
        assert c.post("/api/v1/messages/batch", json=_batch(10, "Fin")).status_code == 202
        single = c.post("/api/v1/messages", json={"to": ["p@example.org"], "subject": "x",
                                                  "text": "y"})
        assert single.status_code == 429 and "Retry-After" in single.headers, single.text
    # A submission larger than the limit itself can never pass: said at once.
    with server.client("bob") as c:
        too_big = c.post("/api/v1/messages/batch", json=_batch(31))
    assert too_big.status_code == 422, too_big.text
    assert too_big.json()["error"]["code"] == "submission_too_large", too_big.text
    assert "parts of at most 30" in too_big.json()["error"]["message"], too_big.text


@pytest.mark.in_process
def test_the_establishment_ceiling_holds_its_other_accounts_not_other_establishments(
    server_factory: Any, relay: FaultRelay
) -> None:
    server = _paced_server(server_factory, relay)
    with server.client("alice") as c:
        assert c.post("/api/v1/messages/batch", json=_batch(30)).status_code == 202
    with server.client("bob") as c:
        assert c.post("/api/v1/messages/batch", json=_batch(20)).status_code == 202
        over = c.post("/api/v1/messages/batch", json=_batch(1, "Encore"))
    # Bob is far under his own 30, but the establishment has queued its 50.
    assert over.status_code == 429, over.text
    assert "establishment's limit per day" in over.json()["error"]["message"], over.text
    with server.client("proviseur") as c:
        other = c.post("/api/v1/messages/batch", json=_batch(30, "Parc"))
    assert other.status_code == 202, other.text


def test_two_http_processes_count_together(server_factory: Any, relay: FaultRelay) -> None:
    server = _paced_server(server_factory, relay, POSTIER_HTTP_PROCESSES="2")
    answers: list[int] = []
    for i in range(60):
        # A new connection each time: the kernel spreads them over both processes.
        r = httpx.post(server.url + "/api/v1/messages", timeout=10,
                       headers={"Authorization": f"Bearer {server.tokens['alice']}"},
                       json={"to": [f"p{i}@example.org"], "subject": f"n{i}", "text": "x"})
        answers.append(r.status_code)
    assert set(answers) == {202, 429}, answers
    accepted = answers.count(202)
    # Never more than the limit; at most one reserved share (1 recipient at this limit)
    # held unspent by the other process.
    assert 29 <= accepted <= 30, answers
    assert _mine(server, "alice") == accepted


@pytest.mark.in_process
def test_smtp_submission_spends_from_the_same_counters(
    server_factory: Any, relay: FaultRelay
) -> None:
    server = _paced_server(server_factory, relay)
    with server.client("alice") as c:
        assert c.post("/api/v1/messages/batch", json=_batch(29)).status_code == 202
    ctx = ssl.create_default_context(cafile=str(server.data_dir / "smtp-cert.pem"))
    data = ("From: alice.martin@ac-lyon.fr\r\nTo: a@example.org\r\nSubject: SMTP\r\n\r\n"
            "Bonjour\r\n")
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as smtp:
        smtp.starttls(context=ctx)
        smtp.login("alice", "motdepasse-alice")
        try:
            smtp.sendmail("alice.martin@ac-lyon.fr", ["a@example.org", "b@example.org"],
                          data)
            raise AssertionError("two recipients over the account's last one were accepted")
        except smtplib.SMTPDataError as exc:
            assert exc.smtp_code == 451, exc
            assert b"Sending limit reached" in exc.smtp_error, exc
        # The one recipient left passes.
        assert smtp.sendmail("alice.martin@ac-lyon.fr", ["a@example.org"], data) == {}
    assert _mine(server, "alice") == 30
