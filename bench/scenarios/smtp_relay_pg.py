"""``smtp_relay_pg``: the ``smtp_relay`` scenario with the queue on PostgreSQL.

The same load (``smtp-source``, 10 sessions reusing their connections) into
``postier serve --no-delivery --database-url postgresql://…`` with 1 and then 3 ``postier
worker`` processes delivering to the sink, against the same private Postfix relay. Each
measurement gets a fresh database, copied from a provisioned template database
(``CREATE DATABASE … TEMPLATE``) and dropped at the end. Each ``250`` is answered once
the message's transaction is committed (PostgreSQL's defaults: ``synchronous_commit =
on``, ``fsync = on`` — whatever the server at ``POSTIER_BENCH_PG`` is configured with,
recorded in the results).
"""

from __future__ import annotations

import os
from pathlib import Path

from harness import Measurement, Ratio, System, make_template, pg_create, pg_drop, pg_query, pg_url

from scenarios.smtp_relay import SmtpRelay

ORDER = 50


def pg_settings() -> dict[str, str]:
    """The PostgreSQL settings that decide what a commit costs."""
    rows = pg_query(pg_url("postgres"), "SELECT name, setting FROM pg_settings WHERE name IN "
                    "('synchronous_commit', 'fsync', 'wal_sync_method', 'server_version')")
    return dict(row.split("|", 1) for row in rows)


class SmtpRelayPg(SmtpRelay):
    name = "smtp_relay_pg"
    description = "smtp_relay on PostgreSQL: serve --no-delivery + 1 or 3 postier worker"
    database = "postgresql"

    def prepare(self) -> None:
        self._prefix = f"postier_bench_{os.getpid()}_{self.name}"
        super().prepare()
        self.params["postgresql"] = pg_settings()

    def _template(self) -> tuple[Path, str]:
        name = f"{self._prefix}_tpl"
        self.template_url = pg_create(name)
        self.on_close(lambda: pg_drop(name))
        return make_template(self.ctx, self.name, self.sink.port,
                             database_url=self.template_url)

    def _where(self, data_dir: Path) -> list[str]:
        return ["--data-dir", str(data_dir), "--database-url", self.template_url]

    def database_for(self, label: str) -> str:
        name = f"{self._prefix}_{label.rsplit('-', 2)[-2]}_{label.rsplit('-', 1)[-1]}"
        url = pg_create(name, template=f"{self._prefix}_tpl")
        self.on_close(lambda: pg_drop(name))
        return url

    def systems(self) -> list[System]:
        def with_workers(n: int) -> System:
            def measure(r: int) -> Measurement:
                return self.measure_postier(r, workers=n)

            return System(f"postier-pg-{n}w", "postier", measure,
                          f"postier serve --no-delivery --smtp on PostgreSQL + {n} "
                          "postier worker")

        return [with_workers(1), with_workers(3),
                System("postfix", "baseline", self.measure_postfix,
                       "Postfix 3 (Debian) as a relay to the same sink, defaults")]

    def ratios(self) -> list[Ratio]:
        return [Ratio("Postier (PostgreSQL, 1 worker) / Postfix", "postier-pg-1w", "postfix",
                      target=2.0),
                Ratio("Postier (PostgreSQL, 3 workers) / Postfix", "postier-pg-3w",
                      "postfix", target=2.0)]


SCENARIO = SmtpRelayPg
