"""A background loop that dies is named by readiness and started again."""

from __future__ import annotations

import asyncio

import pytest

from postier.core import supervision
from postier.core.supervision import Supervisor


def test_a_loop_that_dies_is_named_then_started_again(monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    monkeypatch.setattr(supervision, "FIRST_PAUSE", 0.05)

    async def scenario() -> None:
        runs = 0
        again = asyncio.Event()

        async def claims() -> None:
            nonlocal runs
            runs += 1
            if runs == 1:
                raise RuntimeError("a bug nobody foresaw")
            again.set()
            await asyncio.Event().wait()  # runs until stopped

        sup = Supervisor()
        task = sup.start("claims", claims)
        await asyncio.wait_for(again.wait(), 5)
        assert sup.problems() == ["claims"], "readiness names the loop that failed"
        assert not task.done(), "the loop runs again"
        await sup.stop()

    asyncio.run(scenario())
