"""The settings cache reloads once for all concurrent readers, and a change made while a
reload is under way is not hidden by that older answer."""

from __future__ import annotations

import asyncio

from postier.core.cache import TTLCache


def test_concurrent_readers_share_one_reload() -> None:
    loads = 0

    async def load() -> str:
        nonlocal loads
        loads += 1
        await asyncio.sleep(0.01)
        return "settings"

    async def main() -> list[str]:
        cache: TTLCache[int, str] = TTLCache(60)
        return await asyncio.gather(*(cache.get(1, load) for _ in range(200)))

    assert asyncio.run(main()) == ["settings"] * 200
    assert loads == 1, f"{loads} reloads for 200 concurrent readers"


def test_expired_value_is_read_again() -> None:
    values = iter(["old", "new"])

    async def load() -> str:
        return next(values)

    async def main() -> tuple[str, str]:
        cache: TTLCache[int, str] = TTLCache(0.01)
        first = await cache.get(1, load)
        await asyncio.sleep(0.02)
        return first, await cache.get(1, load)

    assert asyncio.run(main()) == ("old", "new")


def test_a_change_during_a_reload_is_not_hidden_by_the_older_answer() -> None:
    stored = {"relay": "old"}
    release = asyncio.Event()
    started = asyncio.Event()

    async def slow_load() -> str:
        value = stored["relay"]  # read before the change...
        started.set()
        await release.wait()  # ...returned after it
        return value

    async def load() -> str:
        return stored["relay"]

    async def main() -> str:
        cache: TTLCache[int, str] = TTLCache(60)
        reader = asyncio.create_task(cache.get(1, slow_load))
        await started.wait()
        stored["relay"] = "new"
        cache.forget(1)  # what saving the settings does
        release.set()
        assert await reader == "old"  # that reader asked before the change
        return await cache.get(1, load)

    assert asyncio.run(main()) == "new"


def test_a_failed_reload_is_not_kept() -> None:
    calls = 0

    async def load() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("database unavailable")
        return "settings"

    async def main() -> str:
        cache: TTLCache[int, str] = TTLCache(60)
        try:
            await cache.get(1, load)
        except OSError:
            pass
        return await cache.get(1, load)

    assert asyncio.run(main()) == "settings"
