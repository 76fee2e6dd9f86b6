"""Failed sign-ins are counted in the store, so two servers (or two processes of one
server, ``--http-processes``) on the same database throttle the same guesser: the web
pages' five tries per username and SMTP AUTH's five per address or username hold in all,
not per process. Both backends."""

from __future__ import annotations

import time
from pathlib import Path

from postier.config import ServerConfig
from postier.service import Postier
from postier.smtp_server import SubmissionConfig, _Limiter
from postier.store.base import web_name_key as name_key
from postier.web.session import LoginThrottle


async def _two_servers(store_url: str, tmp_path: Path) -> tuple[Postier, Postier]:
    a = Postier(ServerConfig(data_dir=tmp_path, database_url=store_url))
    await a.open()
    b = Postier(ServerConfig(data_dir=tmp_path, database_url=store_url))
    await b.open()
    return a, b


async def test_web_sign_in_failures_count_across_servers(
    store_url: str, tmp_path: Path
) -> None:
    a, b = await _two_servers(store_url, tmp_path)
    try:
        on_a, on_b = LoginThrottle(a.store), LoginThrottle(b.store)
        now = time.time()
        for i in range(LoginThrottle.USER_LIMIT - 1):
            # Alternating, as connections spread over processes.
            await (on_a if i % 2 else on_b).failed(name_key("Alice"), "10.0.0.7", now=now + i)
            assert await on_a.wait_for(name_key("alice"), "10.0.0.8", now=now + i) == 0
        await on_b.failed(name_key("ALICE"), "10.0.0.9", now=now + 4)
        # The fifth failure, wherever it happened, makes every process wait 30 s.
        assert await on_a.wait_for(name_key("alice"), "10.0.0.8", now=now + 5) == 29.0
        assert await on_b.wait_for(name_key("alice"), "10.0.0.8", now=now + 5) == 29.0
        # Another username from those addresses is not held back (20 per address).
        assert await on_a.wait_for(name_key("bob"), "10.0.0.7", now=now + 5) == 0
        # Failures older than the window no longer count.
        later = now + LoginThrottle.WINDOW + 10
        assert await on_a.wait_for(name_key("alice"), "10.0.0.8", now=later) == 0
        # A success clears the username's count for every process; not the address's.
        for _ in range(LoginThrottle.USER_LIMIT):
            await on_a.failed(name_key("carol"), "10.0.0.7", now=now + 6)
        assert await on_b.wait_for(name_key("carol"), "10.0.0.1", now=now + 7) > 0
        await on_b.succeeded(name_key("carol"))
        assert await on_a.wait_for(name_key("carol"), "10.0.0.1", now=now + 7) == 0
        recent = await a.store.recent_failures(["w:a:10.0.0.7"], now - 1)
        assert len(recent["w:a:10.0.0.7"]) == 2 * LoginThrottle.USER_LIMIT - 1
    finally:
        await a.close()
        await b.close()


async def test_smtp_auth_failures_count_across_servers(store_url: str, tmp_path: Path) -> None:
    a, b = await _two_servers(store_url, tmp_path)
    try:
        config = SubmissionConfig(auth_failures=5, auth_penalty=300.0)
        on_a, on_b = _Limiter(config, a.store), _Limiter(config, b.store)
        for i in range(4):
            await (on_a if i % 2 else on_b).failed("192.0.2.5", "scanner")
        assert await on_a.blocked_for("192.0.2.5", "other") == 0
        await on_a.failed("192.0.2.5", "SCANNER")  # another case is the same name
        wait = await on_b.blocked_for("192.0.2.5", "other")  # the address is held back
        assert 295 < wait <= 300
        assert 295 < await on_b.blocked_for("198.51.100.1", "scanner") <= 300
        assert await on_b.blocked_for("198.51.100.1", "someone") == 0
        # An SMTP failure forgets SMTP failures older than its 5 minutes, not the web
        # pages' failures of the last 15.
        web = LoginThrottle(a.store)
        for _ in range(LoginThrottle.USER_LIMIT):
            await web.failed(name_key("dave"), "10.0.0.3", now=time.time() - 600)
        await on_a.failed("192.0.2.7", "dave")
        assert await web.wait_for(name_key("dave"), "10.0.0.4") == 0  # the 30 s wait is over...
        recent = await a.store.recent_failures(["w:u:dave"], time.time() - 900)
        assert len(recent["w:u:dave"]) == LoginThrottle.USER_LIMIT  # ...but they count
        await web.failed(name_key("dave"), "10.0.0.3")
        assert await web.wait_for(name_key("dave"), "10.0.0.4") > 30  # the sixth: a doubled wait
        # A username of any length is counted, not refused by the database.
        await on_a.failed("192.0.2.6", "x" * 2000)
        assert await on_b.blocked_for("192.0.2.6", "x" * 2000) == 0
        assert await b.store.recent_failures(["s:u:" + "x" * 2000], 0)
    finally:
        await a.close()
        await b.close()
