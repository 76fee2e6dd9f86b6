"""The submission pace's counters in the store, on both backends: two processes (two
installations' objects on one database) spending concurrently never let more than a
limit through, and lose at most one and a half reserved shares to each other; a busy
account's next share is reserved before the one it holds runs out; a new minute starts
from zero; recipients given back are spent again without asking the store."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from postier.core.pace import Pace, PaceExceeded, PaceLimits
from postier.core.service import Postier
from postier.server.config import ServerConfig

MINUTE = 60 * 29_000_000  # a clock minute's start, far from any real one


class Clock:
    def __init__(self) -> None:
        self.now = MINUTE + 10.0

    def __call__(self) -> float:
        return self.now


async def _two_processes(store_url: str, tmp_path: Path) -> tuple[Postier, Postier]:
    a = Postier(ServerConfig(data_dir=tmp_path, database_url=store_url))
    await a.open()
    b = Postier(ServerConfig(data_dir=tmp_path, database_url=store_url))
    await b.open()
    return a, b


async def test_two_processes_never_pass_the_limit_together(store_url: str,
                                                           tmp_path: Path) -> None:
    a, b = await _two_processes(store_url, tmp_path)
    try:
        alice = await a.add_user("alice", "alice.martin@ac-lyon.fr")
        clock = Clock()
        limits = PaceLimits(account_per_minute=100, account_per_day=0,
                            establishment_per_minute=1000, establishment_per_day=0)
        paces = [Pace(a.store, limits, clock), Pace(b.store, limits, clock)]
        waits: list[int] = []

        async def one(i: int) -> int:
            try:
                await paces[i % 2].take(alice, 7)
                return 7
            except PaceExceeded as exc:
                waits.append(exc.retry_after)
                return 0

        admitted = sum(await asyncio.gather(*(one(i) for i in range(40))))
        # 100 at most; at most one and a half shares (100 / 20 each) held back unspent by
        # the other, which reserves its next share once half of one is spent.
        assert 100 - 8 - 7 < admitted <= 100, admitted
        assert waits and all(50 <= w <= 51 for w in waits), waits
        # The next minute starts from zero, for either process.
        clock.now += 60
        await paces[1].take(alice, 100)
        with pytest.raises(PaceExceeded):
            await paces[0].take(alice, 1)
        # Given back (a refused or duplicate submission): spent again, no store needed.
        paces[1].give_back(alice, 30)
        await paces[1].take(alice, 30)
        with pytest.raises(PaceExceeded):
            await paces[1].take(alice, 1)
    finally:
        await a.close()
        await b.close()


async def test_a_refusal_counts_nothing_on_any_counter(store_url: str,
                                                      tmp_path: Path) -> None:
    a, b = await _two_processes(store_url, tmp_path)
    try:
        alice = await a.add_user("alice", "alice.martin@ac-lyon.fr")
        bob = await a.add_user("bob", "bob.durand@gmail.com")
        clock = Clock()
        limits = PaceLimits(account_per_minute=50, account_per_day=0,
                            establishment_per_minute=60, establishment_per_day=0)
        await Pace(a.store, limits, clock).take(alice, 50)
        # Bob's 20 do not fit the establishment's 60 (50 taken): refused whole, and his
        # own counter did not keep them, so 10 still pass.
        with pytest.raises(PaceExceeded) as caught:
            await Pace(b.store, limits, clock).take(bob, 20)
        assert "establishment" in caught.value.message(), caught.value
        await Pace(b.store, limits, clock).take(bob, 10)
    finally:
        await a.close()
        await b.close()


async def test_a_busy_account_does_not_wait_for_the_store_when_its_share_runs_out(
    store_url: str, tmp_path: Path
) -> None:
    # The next share is reserved once half of the one held is spent, in the background:
    # when the first share is spent, the next request spends from the second at once
    # instead of waiting, with every request of the account behind it, for a commit.
    core = Postier(ServerConfig(data_dir=tmp_path, database_url=store_url))
    await core.open()
    try:
        alice = await core.add_user("alice", "alice.martin@ac-lyon.fr")
        pace = Pace(core.store, PaceLimits(account_per_minute=400, account_per_day=0,
                                           establishment_per_minute=0,
                                           establishment_per_day=0), Clock())
        asked: list[int] = []
        reserve = core.store.reserve_pace

        async def counted(asks: Any) -> Any:
            asked.append(len(asks))
            return await reserve(asks)

        core.store.reserve_pace = counted  # type: ignore[method-assign]
        for _ in range(20):  # a share is 400 / 20 = 20 recipients
            await pace.take(alice, 1)
        # The reservation made ahead, once half the share was spent, has finished.
        while refills := getattr(pace, "_refills", set()):
            await asyncio.gather(*refills)
        before = len(asked)
        await pace.take(alice, 1)
        assert len(asked) == before, (
            "the 21st recipient should be spent from a share reserved ahead, not wait for "
            f"the store ({len(asked) - before} reservation(s) made while it waited)")
        assert before == 2, f"one share first, one ahead: {before} reservations"
    finally:
        await core.close()
