"""``api_single``: one e-mail per request, from 50 concurrent clients.

Only acceptance is measured (the server runs with ``--no-delivery``): authentication,
validation, sender policy, rendering to RFC 5322 bytes and the durable group commit, up to
the 202. The baselines are the same HTTP load against a FastAPI/uvicorn app that answers
202 without looking at the e-mail (the HTTP ceiling) and one that INSERTs and COMMITs each
e-mail synchronously (the naive durable design).
"""

from __future__ import annotations

import json

from harness import Measurement, Ratio, Scenario, System, make_template, message_json, text_body
from loadgen import build_request
from targets import Load, measure_baseline, measure_postier

ORDER = 10
PATH = "/api/v1/messages"


class ApiSingle(Scenario):
    name = "api_single"
    description = "POST /api/v1/messages, one 2 KiB e-mail per request, 50 clients"

    def prepare(self) -> None:
        quick = self.ctx.quick
        self.params = {"messages": 500 if quick else 5000, "warmup": 100 if quick else 300,
                       "concurrency": 50, "body_bytes": 2048}
        self.template, token = make_template(self.ctx, self.name)
        body = text_body(self.params["body_bytes"])
        n, w = self.params["messages"], self.params["warmup"]
        reqs = [build_request("http://127.0.0.1", PATH,
                              json.dumps(message_json(i, body)).encode(), token)
                for i in range(n + w)]
        self.load = Load(PATH, reqs[:w], reqs[w:], self.params["concurrency"])
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
                   "FastAPI/uvicorn (uvloop, httptools) answering 202, nothing else"),
            System("ceiling-asyncio", "baseline",
                   lambda r: measure_baseline(self.ctx, "ceiling", "ceiling-asyncio", self.load,
                                              loop="asyncio"),
                   "the same ceiling app on the standard asyncio loop, as Postier runs"),
            System("naive-sqlite", "baseline",
                   lambda r: measure_baseline(self.ctx, "sqlite", "naive", self.load),
                   "FastAPI/uvicorn, json.loads + INSERT + COMMIT per request"),
        ]

    def ratios(self) -> list[Ratio]:
        return [Ratio("Postier / HTTP ceiling", "postier", "ceiling"),
                Ratio("Postier / naive SQLite", "postier", "naive-sqlite"),
                Ratio("Postier, 2 HTTP processes / naive SQLite", "postier-2http",
                      "naive-sqlite")]


SCENARIO = ApiSingle
