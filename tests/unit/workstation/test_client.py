"""The SDK without a server: a mock transport stands in for the HTTP API (the real server
is exercised in tests/e2e/test_workstation.py)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from postier import errors
from postier.workstation.client import Client, ServerUnreachable


def _client(handler: Any) -> Client:
    return Client("http://postier.test", "pst_t", lang="fr", transport=httpx.MockTransport(handler))


def test_submit_sends_the_documented_json_and_returns_the_id(tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["path"] = request.url.path
        seen["auth"] = request.headers["authorization"]
        seen["lang"] = request.headers["accept-language"]
        seen["body"] = json.loads(request.content)
        return httpx.Response(202, json={"id": "abc", "status": "queued", "duplicate": False})

    f = tmp_path / "emploi.pdf"
    f.write_bytes(b"%PDF")
    with _client(handler) as c:
        sub = c.submit(["p@example.org"], "Objet", "Texte", cc=["c@example.org"],
                       attachments=[f], idempotency_key="k1", priority="bulk")
    assert sub.id == "abc" and sub.status == "queued"
    assert seen["path"] == "/api/v1/messages"
    assert seen["auth"] == "Bearer pst_t" and seen["lang"] == "fr"
    body = seen["body"]
    assert body["to"] == ["p@example.org"] and body["cc"] == ["c@example.org"]
    assert body["idempotency_key"] == "k1" and body["priority"] == "bulk"
    att = body["attachments"][0]
    assert att["filename"] == "emploi.pdf" and att["content_type"] == "application/pdf"
    assert base64.b64decode(att["content"]) == b"%PDF"
    assert "bcc" not in body and "from" not in body


@pytest.mark.parametrize(
    ("status", "cls"),
    [(401, errors.AuthenticationRequired), (403, errors.Forbidden), (404, errors.NotFound),
     (409, errors.Conflict), (422, errors.InvalidInput), (507, errors.StoreUnavailable)],
)
def test_errors_keep_the_servers_explanation(status: int, cls: type) -> None:
    body = {"error": {"code": "x_code", "message": "Le message {brut}", "hint": "Faites ceci.",
                      "field": "to.0"}}
    with _client(lambda r: httpx.Response(status, json=body)) as c, pytest.raises(cls) as info:
        c.status("m1")
    err = info.value
    assert err.code == "x_code" and err.field == "to.0"
    assert err.message() == "Le message {brut}" and err.hint() == "Faites ceci."
    assert err.transient is (status == 507)


def test_unreachable_server_is_a_transient_error_naming_the_url() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    with _client(handler) as c, pytest.raises(ServerUnreachable) as info:
        c.me()
    assert info.value.transient and "http://postier.test" in info.value.message()
    assert info.value.hint()


def test_retrieve_profile_by_label_and_unknown_label_lists_the_choices() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(f"{request.method} {request.url.path}")
        if request.url.path == "/api/v1/profiles":
            return httpx.Response(200, json=[{"id": 7, "label": "Académie"}])
        return httpx.Response(200, json={"id": 7, "label": "Académie", "host": "smtp.x.fr",
                                         "password": "s"})
    with _client(handler) as c:
        assert c.retrieve_profile("Académie")["password"] == "s"
        assert "POST /api/v1/profiles/7/retrieve" in calls
        with pytest.raises(errors.NotFound) as info:
            c.retrieve_profile("Autre")
    assert "Académie" in info.value.message()


def test_status_is_typed() -> None:
    doc = {"id": "m", "status": "deferred", "subject": "S", "attempts": 2,
           "created_at": "2026-01-01T00:00:00Z", "next_attempt_at": "2026-01-01T00:05:00Z",
           "last_error": {"code": "refused", "message": "…"},
           "recipients": [{"address": "a@x.fr", "status": "deferred", "code": None,
                           "reply": "refused"}]}
    with _client(lambda r: httpx.Response(200, json=doc)) as c:
        st = c.status("m")
    assert st.status == "deferred" and st.attempts == 2
    assert st.recipients[0].address == "a@x.fr" and st.last_error["code"] == "refused"


@pytest.mark.parametrize(("status", "transient"),
                         [(429, True), (500, True), (502, True), (503, True), (403, False),
                          (413, False), (422, False)])
def test_not_now_is_transient_and_a_refusal_is_not(status: int, transient: bool) -> None:
    # A workstation keeps an e-mail in its outbox only after a transient error.
    body = {"error": {"code": "x", "message": "m"}}
    with _client(lambda r: httpx.Response(status, json=body)) as c, pytest.raises(
            errors.PostierError) as info:
        c.submit(["p@example.org"], "s", "t")
    assert info.value.transient is transient


@pytest.mark.parametrize(("raised", "french"), [
    (httpx.ConnectError("[Errno 111] Connection refused"), "connexion refusée"),
    (httpx.ConnectTimeout("timed out"), "délai dépassé"),
    (httpx.RemoteProtocolError("Server disconnected without sending a response."),
     "la connexion s'est fermée avant sa réponse"),
])
def test_why_the_server_cannot_be_reached_is_said_in_french(
    raised: Exception, french: str
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise raised

    with _client(handler) as c, pytest.raises(ServerUnreachable) as info:
        c.submit(["p@example.org"], "s", "t")
    assert info.value.message("fr").endswith(f"injoignable : {french}.")
