"""The HTTP API fuzzed from its own OpenAPI description (schemathesis) against the real
server process, with an administrator's token: no input gives a 5xx.

The server runs with ``--no-delivery`` and the test-send endpoints are left out, so that no
generated relay host is ever contacted: the fuzzing stays on 127.0.0.1."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from reliability_kit import record_figures

from support.server import ServerProcess

EXAMPLES = int(os.environ.get("POSTIER_SCHEMATHESIS_EXAMPLES", "12"))


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp_path_factory.mktemp("fuzz"))
    server.args = ["--no-delivery"]
    server.provision()
    server.start()
    with server.client() as c:
        # Something to find behind the ids: a message, a profile, a second token.
        c.post("/api/v1/messages", json={"to": ["p@example.org"], "subject": "s"})
        c.post("/api/v1/profiles", json={"label": "Relais", "host": "smtp.example.org"})
        server.tokens["fuzz"] = c.post("/api/v1/tokens", json={"name": "fuzz"}).json()["token"]
        server.fuzz_token_id = c.get("/api/v1/tokens").json()[-1]["id"]  # type: ignore[attr-defined]
    yield server
    server.kill()


def test_no_server_error_for_any_input(fuzz_server: ServerProcess) -> None:
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    token_id = getattr(fuzz_server, "fuzz_token_id", None)
    headers = {"Authorization": f"Bearer {fuzz_server.tokens['fuzz']}"}
    failures: list[str] = []
    known: list[str] = []
    calls = 0
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) >= 30, "the whole API is described"

    for operation in operations:
        if operation.path in ("/api/v1/settings/test", "/api/v1/profiles/{profile_id}/test",
                              "/api/v1/bounces/mailbox/check", "/api/v1/domains/check"):
            continue  # would contact generated hosts (relay, mailbox, DNS): tested on
            # 127.0.0.1 elsewhere

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        def check(case: Any) -> None:
            nonlocal calls
            if (case.path_parameters or {}).get("token_id") == token_id:
                return  # revoking the fuzzer's own token would only end the run early
            calls += 1
            r = case.call(base_url=fuzz_server.url, headers=headers, timeout=30)
            if r.status_code >= 500 and any(
                isinstance(v, int) and abs(v) >= 2**63
                for v in (case.path_parameters or {}).values()
            ):
                known.append(case.formatted_path)  # test_ids_beyond_64_bits_are_not_a_500
                return
            if r.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path} -> {r.status_code}: "
                                f"{r.text[:300]}\n{case.as_curl_command()}")

        check()
    record_figures("schemathesis", operations=len(operations) - 1, requests=calls,
                   server_errors=len(failures), known_bug_64_bit_ids=len(known))
    assert not failures, "\n\n".join(failures[:10])
