"""``hosted_fairness``: one establishment's flood on a platform relay shared by others.

A hosted installation: establishments 2-6 each send one e-mail every 0.4 s through the
platform relay (a real aiosmtpd relay taking 5 ms an e-mail), establishment 7 sends as
often through its own relay, which accepts connections and never answers, and
establishment 1 queues 6,000 e-mails at once (a term's reports). ``bench/hosted_probe.py``
runs Postier's delivery worker and relay pool as ``postier serve`` builds them, on SQLite
and on PostgreSQL. Measured: the time of the others' e-mails from their acceptance (the
store's commit, when the API answers 202) to the relay, p50 and p99, and the flood's rate,
shared and alone.
"""

from __future__ import annotations

import json
import os

from harness import (
    BENCH_DIR,
    PYTHON,
    BenchError,
    Measurement,
    Process,
    Ratio,
    Scenario,
    System,
    pg_create,
    pg_drop,
)

ORDER = 60
PROBE = BENCH_DIR / "hosted_probe.py"
# The targets: the others' p99 while the flood drains, and the flood's rate shared / alone.
OTHERS_P99_S = 2.0
FLOOD_SHARE = 0.90


def run_probe(scenario: Scenario, label: str, args: list[str],
              database: str | None, timeout: float) -> dict[str, float]:
    """``hosted_probe.py args`` in a process of its own (on a fresh PostgreSQL database
    named ``database`` if given); its JSON summary, and the CPU it used."""
    url = None
    if database is not None:
        url = pg_create(database)
    log_path = scenario.ctx.workdir / f"{label}.log"
    argv = [PYTHON, str(PROBE), *args, *(["--database-url", url] if url else [])]
    proc = Process(argv, log_path).start()
    try:
        assert proc.proc is not None
        try:
            proc.proc.wait(timeout)
        except Exception as exc:
            raise BenchError(f"{label} took over {timeout:.0f} s\n{proc.log_tail(10)}") from exc
        if proc.proc.returncode != 0:
            raise BenchError(f"{label} failed\n{proc.log_tail(10)}")
    finally:
        proc.stop()
        if database is not None:
            pg_drop(database)
    lines = [x for x in log_path.read_text().splitlines() if x.startswith("{")]
    if not lines:
        raise BenchError(f"{label} printed no summary\n{proc.log_tail(10)}")
    out: dict[str, float] = json.loads(lines[-1])
    return out


class HostedFairness(Scenario):
    name = "hosted_fairness"
    description = ("one establishment's 6,000-e-mail flood on a platform relay shared "
                   "with 5 trickling establishments and one whose relay is dead")

    def prepare(self) -> None:
        flood = 1500 if self.ctx.quick else 6000
        self.params = {"flood": flood, "senders": 5, "interval_s": 0.4, "relay_delay_s":
                       0.005, "dead_relays": 1, "relay_connections": 4,
                       "targets": {"others_p99_s": OTHERS_P99_S, "flood_share": FLOOD_SHARE}}
        self._prefix = f"postier_bench_{os.getpid()}_{self.name}"

    def _measure(self, r: int, mode: str, pg: bool) -> Measurement:
        label = f"{self.name}-{mode}-{'pg' if pg else 'sqlite'}-r{r}"
        out = run_probe(self, label, [
            "--mode", mode, "--messages", str(self.params["flood"]),
            "--senders", str(self.params["senders"]),
            "--interval", str(self.params["interval_s"]),
            "--relay-delay", str(self.params["relay_delay_s"])],
            f"{self._prefix}_{r}" if pg else None, timeout=600)
        m = Measurement(throughput=out["flood_rate"], seconds=out["flood_seconds"],
                        count=int(out["flood"]))
        for key in ("others", "others_p50_s", "others_p99_s", "others_max_s", "dead_sent"):
            if key in out:
                m.extra[key] = out[key]
        if mode == "shared" and out.get("others_p99_s", 0.0) > OTHERS_P99_S:
            m.notes.append(f"others' p99 {out['others_p99_s']:.2f} s over the target")
        return m

    def systems(self) -> list[System]:
        return [
            System("shared-sqlite", "postier", lambda r: self._measure(r, "shared", False),
                   "SQLite: the flood with the others sending; the others' p50/p99 in extra"),
            System("alone-sqlite", "baseline", lambda r: self._measure(r, "alone", False),
                   "SQLite: the flood alone"),
            System("shared-pg", "postier", lambda r: self._measure(r, "shared", True),
                   "PostgreSQL: the flood with the others sending"),
            System("alone-pg", "baseline", lambda r: self._measure(r, "alone", True),
                   "PostgreSQL: the flood alone"),
        ]

    def ratios(self) -> list[Ratio]:
        return [Ratio("flood rate shared / alone (SQLite)", "shared-sqlite", "alone-sqlite",
                      target=FLOOD_SHARE),
                Ratio("flood rate shared / alone (PostgreSQL)", "shared-pg", "alone-pg",
                      target=FLOOD_SHARE)]


SCENARIO = HostedFairness
