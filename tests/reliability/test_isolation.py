"""One establishment's relay stalls (accepts the connection, then says nothing in time):
the other establishment's e-mails must go on leaving, on the real server."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
from reliability_kit import record_figures, subjects, wait_until

from postier.core.service import Postier
from postier.server.config import ServerConfig

from support.relay import FaultRelay
from support.server import ServerProcess

RELAY_TIMEOUT = 10  # seconds: what an administrator would leave (the default is 30)


async def _two_schools(data_dir: Path, stalled: FaultRelay, healthy: FaultRelay
                       ) -> dict[str, str]:
    core = Postier(ServerConfig(data_dir=data_dir))
    await core.open()
    tokens = {}
    try:
        for slug, relay in (("college-a", stalled), ("lycee-b", healthy)):
            est = await core.add_establishment(slug, slug)
            admin = await core.add_user("admin", f"admin@{slug}.fr", role="admin",
                                        establishment_id=est.id)
            tokens[slug], _ = await core.create_token(admin)
            await core.put_settings(admin, {
                "delegation": True, "allowed_domains": [f"{slug}.fr"],
                "sender": {"name": slug, "address": f"noreply@{slug}.fr"},
                "relay": {"host": relay.host, "port": relay.port, "security": "none",
                          "timeout": RELAY_TIMEOUT},
                "retry": {"first_delay": 60, "max_delay": 60, "max_age": 3600}})
    finally:
        await core.close()
    return tokens


def _send(server: ServerProcess, token: str, prefix: str, n: int) -> None:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"},
                      timeout=30) as c:
        r = c.post("/api/v1/messages/batch", json={"messages": [
            {"to": [f"{prefix}{i}@example.org"], "subject": f"{prefix}{i}",
             "priority": "normal"} for i in range(n)]})
        assert r.status_code == 202, r.text


def _scenario(server_factory: Any, relay_cert: tuple[Path, Path], stalled_count: int
              ) -> float:
    with FaultRelay(cert=relay_cert) as stalled, FaultRelay(cert=relay_cert) as healthy:
        server: ServerProcess = server_factory(provision=False)
        tokens = asyncio.run(_two_schools(server.data_dir, stalled, healthy))
        server.start()
        stalled.stall = ("data", 60)  # takes the connection, never answers DATA in time
        _send(server, tokens["college-a"], "a", stalled_count)
        time.sleep(1.0)  # school A's e-mails are all in the hands of the stalled relay
        t0 = time.monotonic()
        _send(server, tokens["lycee-b"], "b", 3)
        wait_until(lambda: {"b0", "b1", "b2"} <= set(subjects(healthy.messages)),
                   timeout=5, what="school B's e-mails delivered")
        took = time.monotonic() - t0
        record_figures(f"stalled relay of A, {stalled_count} e-mails waiting",
                       b_delivered_in_seconds=round(took, 2))
        stalled.reset_faults()
        server.kill()
        return took


def test_a_stalled_relay_does_not_hold_back_another_school(
    server_factory: Any, relay_cert: tuple[Path, Path]
) -> None:
    assert _scenario(server_factory, relay_cert, 20) < 5


def test_a_stalled_relay_with_a_big_mailing_does_not_hold_back_another_school(
    server_factory: Any, relay_cert: tuple[Path, Path]
) -> None:
    assert _scenario(server_factory, relay_cert, 300) < 5
