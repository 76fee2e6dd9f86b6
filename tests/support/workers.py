"""``postier worker`` processes on a shared PostgreSQL queue, and the queue they drain."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from postier.config import ServerConfig
from postier.message import MessageIn
from postier.service import Postier

from support.relay import FaultRelay


async def fill_queue(url: str, data_dir: Path, relay: FaultRelay, count: int,
                     **relay_limits: int) -> None:
    """An establishment whose relay is ``relay`` (quick retries), and ``count`` e-mails
    queued for it, subjects ``n0`` … ``n{count-1}``."""
    core = Postier(ServerConfig(data_dir=data_dir, database_url=url, hostname="ac-lyon.fr"))
    await core.open()
    try:
        admin = await core.add_user("admin", "direction@ac-lyon.fr", role="admin")
        await core.put_settings(admin, {
            "allowed_domains": ["ac-lyon.fr"],
            "relay": {"host": relay.host, "port": relay.port, "security": "none",
                      "timeout": 10, **relay_limits},
            "retry": {"first_delay": 1, "max_delay": 2},
        })
        for start in range(0, count, 1000):
            await core.submit(admin, [
                MessageIn.model_validate({"to": [f"eleve{i}@example.org"],
                                          "subject": f"n{i}", "text": "Bonjour"})
                for i in range(start, min(count, start + 1000))
            ])
    finally:
        await core.close()


def start_worker(url: str, data_dir: Path, name: str, env: dict[str, str]
                 ) -> tuple[subprocess.Popen[bytes], Path]:
    """A ``postier worker`` polling every 0.2 s, its output in ``data_dir/name.log``."""
    log = data_dir / f"{name}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "postier", "worker", "--database-url", url,
         "--data-dir", str(data_dir / name)],
        env={**os.environ, "POSTIER_POLL_INTERVAL": "0.2", **env},
        stdout=log.open("wb"), stderr=subprocess.STDOUT)
    return proc, log


def stop_workers(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
