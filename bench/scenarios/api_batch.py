"""``api_batch``: batches of 1,000 e-mails per request (``POST /api/v1/messages/batch``).

What an integrator's mass mailing looks like. Eight clients send their batches back to back,
so that the server always has a batch to parse while the previous one commits, and so
that ``--http-processes 2`` has connections for both of its processes. Baselines: the same
batches against a FastAPI/uvicorn app that parses the JSON and answers 1,000 ids (the
ceiling), and one that also INSERTs the batch in one transaction (naive SQLite).
"""

from __future__ import annotations

import json

from harness import Measurement, Ratio, Scenario, System, make_template, message_json, text_body
from loadgen import build_request
from targets import Load, measure_baseline, measure_postier

ORDER = 20
PATH = "/api/v1/messages/batch"


class ApiBatch(Scenario):
    name = "api_batch"
    description = "POST /api/v1/messages/batch, 1,000 e-mails of 2 KiB per request, 8 clients"

    def prepare(self) -> None:
        quick = self.ctx.quick
        # 60 batches: about three seconds of load, so that one slow second weighs less.
        self.params = {"batches": 4 if quick else 60, "batch_size": 1000, "warmup_batches": 1,
                       "concurrency": 8, "body_bytes": 2048}
        self.template, token = make_template(self.ctx, self.name)
        body = text_body(self.params["body_bytes"])
        size = self.params["batch_size"]
        total = self.params["batches"] + self.params["warmup_batches"]
        reqs = []
        for b in range(total):
            messages = [message_json(b * size + i, body) for i in range(size)]
            reqs.append(build_request("http://127.0.0.1", PATH,
                                      json.dumps({"messages": messages}).encode(), token))
        w = self.params["warmup_batches"]
        self.load = Load(PATH, reqs[:w], reqs[w:], self.params["concurrency"],
                         messages_per_request=size, timeout=120.0)
        self.params["request_bytes"] = len(reqs[0])

    def systems(self) -> list[System]:
        def postier(r: int) -> Measurement:
            profile = f"{self.name}-postier" if r == 0 else None
            return measure_postier(self.ctx, self.template, f"{self.name}-r{r}", self.load,
                                   profile)

        def postier_2http(r: int) -> Measurement:
            return measure_postier(self.ctx, self.template, f"{self.name}-2http-r{r}",
                                   self.load, None, http_processes=2)

        return [
            System("postier", "postier", postier,
                   "postier serve --no-delivery (SQLite, group commit)"),
            System("postier-2http", "postier", postier_2http,
                   "the same with --http-processes 2 (two processes share the port)"),
            System("ceiling", "baseline",
                   lambda r: measure_baseline(self.ctx, "ceiling", "ceiling", self.load),
                   "FastAPI/uvicorn: json.loads, answer 1,000 ids"),
            System("naive-sqlite", "baseline",
                   lambda r: measure_baseline(self.ctx, "sqlite", "naive", self.load),
                   "FastAPI/uvicorn: json.loads, INSERT 1,000 rows, one COMMIT"),
        ]

    def ratios(self) -> list[Ratio]:
        return [Ratio("Postier / ceiling (JSON parse only)", "postier", "ceiling"),
                Ratio("Postier / naive SQLite", "postier", "naive-sqlite"),
                Ratio("Postier, 2 HTTP processes / naive SQLite", "postier-2http",
                      "naive-sqlite")]


SCENARIO = ApiBatch
