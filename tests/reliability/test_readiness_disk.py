"""Readiness tells the truth on a full disk: while a submission would get 507, a load
balancer or an orchestrator asking ``/api/v1/ready`` hears 503 and why."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
from test_store_faults import BIG, fill, small_disk

from support.relay import FaultRelay
from support.server import ServerProcess

MAX_SIZE = 1 << 20  # the largest e-mail this server accepts: the floor is twice that


def ready(server: ServerProcess) -> httpx.Response:
    return httpx.get(server.url + "/api/v1/ready", timeout=10)


def test_ready_answers_503_while_the_disk_cannot_take_a_submission(
    server_factory: Any, relay: FaultRelay, tmp_path: Path
) -> None:
    with small_disk(tmp_path / "disk", "16m") as disk:
        server: ServerProcess = server_factory(
            disk / "data", POSTIER_MAX_MESSAGE_SIZE=str(MAX_SIZE))
        server.log_path = tmp_path / "server.log"
        server.start()
        server.configure_relay(relay)
        r = ready(server)
        assert r.status_code == 200 and r.json()["store"] == "ok", r.text

        filler = fill(disk)
        with server.client("alice") as c:
            refused = c.post("/api/v1/messages", json={
                "to": ["plein@example.org"], "subject": "plein", "text": BIG})
            assert refused.status_code == 507, refused.text
            r = ready(server)
            assert r.status_code == 503, f"a submission gets 507, readiness said {r.text}"
            body = r.json()
            assert body["status"] == "not_ready" and body["store"] == "unavailable"
            assert any(p.startswith("store: disk full") for p in body["problems"]), body
            assert str(server.data_dir) not in r.text  # nothing about the installation

            # Some room again, but less than the largest e-mail needs: still not ready.
            os.truncate(filler, filler.stat().st_size - MAX_SIZE)
            r = ready(server)
            assert r.status_code == 503 and "disk full" in r.text, r.text

            filler.unlink()
            r = ready(server)
            assert r.status_code == 200 and r.json()["status"] == "ready", r.text
            accepted = c.post("/api/v1/messages", json={
                "to": ["apres@example.org"], "subject": "apres", "text": BIG})
            assert accepted.status_code == 202, accepted.text
