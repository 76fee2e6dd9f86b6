"""``hosted_scale``: the cost of an e-mail with 1 and with 1,000 establishments.

The same 6,000 e-mails queued by one establishment, then spread over 1,000, drained by
Postier's delivery worker (``bench/hosted_probe.py --mode scale``, as ``postier serve``
builds it) into an instant relay, on SQLite and on PostgreSQL: the drain's rate, the
CPU per e-mail, the claims' time per e-mail and the growth of the process's memory. The
claim goes round the establishments with e-mails waiting a bounded number at a time, so
its cost per e-mail should not grow with their number.
"""

from __future__ import annotations

import os

from harness import Measurement, Ratio, Scenario, System

from scenarios.hosted_fairness import run_probe

ORDER = 61


class HostedScale(Scenario):
    name = "hosted_scale"
    description = "6,000 e-mails from 1 or from 1,000 establishments: cost per e-mail"

    def prepare(self) -> None:
        self.params = {"messages": 2000 if self.ctx.quick else 6000,
                       "establishments": [1, 1000], "relay_delay_s": 0.0}
        self._prefix = f"postier_bench_{os.getpid()}_{self.name}"

    def _measure(self, r: int, establishments: int, pg: bool) -> Measurement:
        label = f"{self.name}-{establishments}-{'pg' if pg else 'sqlite'}-r{r}"
        out = run_probe(self, label, [
            "--mode", "scale", "--messages", str(self.params["messages"]),
            "--establishments", str(establishments), "--relay-delay", "0"],
            f"{self._prefix}_{r}" if pg else None, timeout=600)
        m = Measurement(throughput=out["rate"], seconds=out["seconds"],
                        count=int(out["messages"]))
        for key in ("cpu_us_per_msg", "db_cpu_us_per_msg", "total_cpu_us_per_msg", "claims",
                    "claim_ms", "claim_us_per_msg", "maxrss_growth_kib"):
            m.extra[key] = out[key]
        return m

    def systems(self) -> list[System]:
        out = []
        for pg in (False, True):
            backend = "pg" if pg else "sqlite"
            for n in self.params["establishments"]:
                out.append(System(
                    f"{n}-est-{backend}", "postier" if n > 1 else "baseline",
                    lambda r, n=n, pg=pg: self._measure(r, n, pg),
                    f"{'PostgreSQL' if pg else 'SQLite'}: the e-mails spread over {n} "
                    "establishment(s)"))
        return out

    def ratios(self) -> list[Ratio]:
        return [Ratio("rate with 1,000 establishments / with 1 (SQLite)", "1000-est-sqlite",
                      "1-est-sqlite", target=0.90),
                Ratio("rate with 1,000 establishments / with 1 (PostgreSQL)", "1000-est-pg",
                      "1-est-pg", target=0.90)]


SCENARIO = HostedScale
