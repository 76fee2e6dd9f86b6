"""Time the store's claims on an existing (stopped) Postier data directory or database.

``python bench/claim_probe.py --data-dir DIR [--database-url URL] --claims 50 --limit 64``
opens the store as ``postier serve`` does, takes ``--claims`` batches of ``--limit`` due
messages under a lease (``SQLStore.claim``, the query every delivery worker runs), gives
them all back (``release_worker``) so that the queue is as before, and prints a JSON
summary: the time of each claim, and how many messages were claimed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

from postier.core.service import Postier
from postier.server.config import ServerConfig


async def probe(data_dir: Path, url: str | None, claims: int, limit: int) -> dict[str, float]:
    core = Postier(ServerConfig(data_dir=data_dir, database_url=url, hostname="bench"))
    await core.open()
    worker = f"claim-probe-{time.time_ns()}"
    took: list[float] = []
    claimed = 0
    try:
        for _ in range(claims):
            t0 = time.perf_counter()
            got = await core.store.claim(worker, limit, 600.0, time.time())
            took.append(time.perf_counter() - t0)
            claimed += len(got)
            if not got:
                break
        released = await core.store.release_worker(worker)
    finally:
        await core.close()
    took.sort()
    return {"claims": len(took), "claimed": claimed, "released": released,
            "median_ms": statistics.median(took) * 1000,
            "p90_ms": took[int(len(took) * 0.9)] * 1000, "total_s": sum(took)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--database-url")
    p.add_argument("--claims", type=int, default=50)
    p.add_argument("--limit", type=int, default=64)
    a = p.parse_args()
    print(json.dumps(asyncio.run(probe(a.data_dir, a.database_url, a.claims, a.limit))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
