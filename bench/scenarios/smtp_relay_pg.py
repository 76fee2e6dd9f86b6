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
import time
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
        self._database = name
        self._stats_before = self._database_stats(name)
        return url

    # What the database did for each e-mail: transactions and rows touched (PostgreSQL's
    # own counters; its backends report them when they end, so read after the stop).
    STATS = ("xact_commit", "xact_rollback", "tup_inserted", "tup_updated", "tup_deleted",
             "tup_returned", "blks_hit")

    def _database_stats(self, name: str) -> list[int]:
        rows = pg_query(pg_url("postgres"), f"SELECT {', '.join(self.STATS)} FROM "
                        f"pg_stat_database WHERE datname = '{name}'")
        return [int(v or 0) for v in rows[0].split("|")] if rows else [0] * len(self.STATS)

    def measure_postier(self, r: int, workers: int = 0,
                        delivery_processes: int | None = None) -> Measurement:
        m = super().measure_postier(r, workers, delivery_processes)
        time.sleep(1.0)  # ended backends' counters reach the shared statistics
        after = self._database_stats(self._database)
        count = self.params["messages"]
        for stat, a, b in zip(self.STATS, self._stats_before, after, strict=True):
            m.extra[f"pg_{stat}_per_msg"] = (b - a) / count
        # Rows read per e-mail, by index (or by sequential scan of a table): where the
        # database's work goes.
        for row in pg_query(pg_url(self._database),
                            "SELECT relname || '.' || indexrelname, idx_tup_read FROM "
                            "pg_stat_user_indexes UNION ALL SELECT relname || '.seq', "
                            "seq_tup_read FROM pg_stat_user_tables"):
            where, rows = row.rsplit("|", 1)
            if int(rows) >= count / 10:
                m.extra[f"pg_read_{where}_per_msg"] = int(rows) / count
        # Statements per e-mail, by table: how often each is touched.
        for row in pg_query(pg_url(self._database),
                            "SELECT relname, coalesce(seq_scan, 0) + coalesce(idx_scan, 0) "
                            "FROM pg_stat_user_tables"):
            where, scans = row.rsplit("|", 1)
            if int(scans) >= count / 100:
                m.extra[f"pg_scans_{where}_per_msg"] = int(scans) / count
        return m

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
