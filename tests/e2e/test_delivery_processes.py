"""``postier serve --delivery-processes N`` on the embedded store: acceptance in the server,
delivery in child ``postier worker`` processes, as a two-core machine runs it by default.
Every e-mail goes out once; a child killed with SIGKILL comes back and its e-mails leave;
the children end with the server."""

from __future__ import annotations

import collections
import os
import signal
import time
from typing import Any

import httpx

from support.relay import FaultRelay
from support.server import ServerProcess, alive, child_processes


def _children(pid: int) -> list[int]:
    return child_processes(pid, b"worker")


def _send(server: ServerProcess, prefix: str, n: int) -> None:
    with server.client("alice") as c:
        r = c.post("/api/v1/messages/batch", json={"messages": [
            {"to": [f"{prefix}{i}@example.org"], "subject": f"{prefix}{i}", "text": "Bonjour"}
            for i in range(n)]})
        assert r.status_code == 202, r.text


def _wait_delivered(relay: FaultRelay, n: int, timeout: float = 30) -> collections.Counter[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = collections.Counter(str(m.message["Subject"]) for m in relay.messages)
        if len(got) >= n:
            return got
        time.sleep(0.1)
    raise AssertionError(f"{len(relay.messages)} e-mails delivered of {n} after {timeout} s")


def test_children_deliver_once_come_back_after_a_kill_and_end_with_the_server(
    server_factory: Any, relay: FaultRelay
) -> None:
    server: ServerProcess = server_factory(POSTIER_DELIVERY_PROCESSES="2").start()
    server.configure_relay(relay)
    children = _children(server.proc.pid)  # type: ignore[union-attr]
    assert len(children) == 2, f"expected two delivery processes, found {children}"
    ready = httpx.get(server.url + "/api/v1/ready").json()
    assert ready["status"] == "ready", ready

    _send(server, "a", 300)
    got = _wait_delivered(relay, 300)
    assert set(got.values()) == {1}, "an e-mail was delivered twice"

    os.kill(children[0], signal.SIGKILL)
    _send(server, "b", 200)  # while one child is dead or coming back
    got = _wait_delivered(relay, 500)
    assert max(got.values()) == 1, [s for s, n in got.items() if n > 1]
    deadline = time.monotonic() + 10
    while len(_children(server.proc.pid)) < 2 and time.monotonic() < deadline:  # type: ignore[union-attr]
        time.sleep(0.1)
    now = _children(server.proc.pid)  # type: ignore[union-attr]
    assert len(now) == 2 and children[0] not in now, (children, now)
    assert "ended with status" in server.log(), "the restart is not logged"

    assert server.stop() == 0
    assert _alive(now) == [], "delivery processes left running after the server stopped"


def _alive(pids: list[int]) -> list[int]:
    return [pid for pid in pids if alive(pid)]


def test_a_ctrl_c_is_the_servers_to_answer(server_factory: Any) -> None:
    # A terminal's Ctrl-C sends SIGINT to its foreground process group. The children have
    # their own session: they are stopped by the server, not by the Ctrl-C on their own,
    # in which case the server could take them for dead and start them again.
    server: ServerProcess = server_factory(POSTIER_DELIVERY_PROCESSES="2")
    server.new_session = True
    server.start()
    pid = server.proc.pid  # type: ignore[union-attr]
    deadline = time.monotonic() + 20
    while server.log().count(" running on ") < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    children = _children(pid)
    assert len(children) == 2
    assert all(os.getpgid(c) != os.getpgid(pid) for c in children)
    for child in children:  # a SIGINT that reaches them all the same changes nothing
        os.kill(child, signal.SIGINT)
    time.sleep(1)
    assert _alive(children) == children, "a delivery process stopped on a SIGINT"
    os.killpg(pid, signal.SIGINT)  # the Ctrl-C
    assert server.proc.wait(20) == 0  # type: ignore[union-attr]
    assert _alive(children) == [], "delivery processes outlived the server"
    assert "starting it again" not in server.log()


def test_children_end_when_the_server_is_killed(server_factory: Any) -> None:
    server: ServerProcess = server_factory(POSTIER_DELIVERY_PROCESSES="2").start()
    children = _children(server.proc.pid)  # type: ignore[union-attr]
    assert len(children) == 2
    server.kill()  # SIGKILL: no chance to stop them
    deadline = time.monotonic() + 10
    while _alive(children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _alive(children) == [], "delivery processes outlived a killed server"


def test_by_default_two_cores_deliver_in_one_child_and_one_core_in_the_server(
    server_factory: Any, relay: FaultRelay
) -> None:
    cores = sorted(os.sched_getaffinity(0))
    for cpus, expected in (({cores[0]}, 0), (set(cores), 1 if len(cores) >= 2 else 0)):
        server: ServerProcess = server_factory()
        server.env.pop("POSTIER_DELIVERY_PROCESSES", None)
        server.cpus = cpus
        server.start()
        server.configure_relay(relay)
        children = _children(server.proc.pid)  # type: ignore[union-attr]
        assert len(children) == expected, (cpus, children, server.log()[-2000:])
        before = len(relay.messages)
        _send(server, f"c{len(cpus)}-", 20)
        got = _wait_delivered(relay, before + 20)
        assert max(got.values()) == 1, "an e-mail was delivered twice"
        assert server.stop() == 0
        assert _alive(children) == []
