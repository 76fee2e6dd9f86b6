"""The server gives its own e-mails idempotency keys that start with ``notice:`` or
``alert:``, and an e-mail whose key starts with ``notice:`` gets no failure notice and no
webhook event. A user who submitted such a key would silence their own notices: every
submission door refuses it (422, French and English), and nothing of a batch is stored."""

from __future__ import annotations

import base64

import pytest

from postier import errors
from postier.core.message import RESERVED_KEY_PREFIXES
from postier.core.notices import NOTICE_PREFIX
from postier.workstation.client import Client

from support.relay import FaultRelay
from support.server import PostierServer

pytestmark = pytest.mark.in_process

ALICE = "alice.martin@ac-lyon.fr"


def _message(key: str | None = None, subject: str = "Conseil de classe") -> dict[str, object]:
    doc: dict[str, object] = {"to": ["parent@example.org"], "subject": subject,
                              "text": "Bonjour"}
    if key is not None:
        doc["idempotency_key"] = key
    return doc


def _raw(key: str) -> dict[str, object]:
    data = (f"From: {ALICE}\r\nTo: parent@example.org\r\nSubject: Brut\r\n\r\nBonjour\r\n")
    return {"envelope_from": ALICE, "recipients": ["parent@example.org"],
            "data": base64.b64encode(data.encode()).decode(), "idempotency_key": key}


def test_the_servers_own_prefixes_are_the_reserved_ones() -> None:
    assert NOTICE_PREFIX in RESERVED_KEY_PREFIXES


@pytest.mark.parametrize("key", ["notice:failure:1", "Notice:x", "alert:3:opened"])
def test_a_reserved_key_is_refused_on_every_door(server: PostierServer, relay: FaultRelay,
                                                 key: str) -> None:
    server.configure_relay(relay)
    with server.client("alice", **{"Accept-Language": "fr"}) as c:
        single = c.post("/api/v1/messages", json=_message(key))
        batch = c.post("/api/v1/messages/batch",
                       json={"messages": [_message(subject="Premier"), _message(key)]})
        raw = c.post("/api/v1/messages/raw", json=_raw(key))
        stored = c.get("/api/v1/messages").json()
    for r, field in ((single, "idempotency_key"), (batch, "messages.1.idempotency_key"),
                     (raw, "idempotency_key")):
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["field"] == field, error
        assert "réserve" in error["message"] and repr(key[:key.index(":") + 1]) in \
            error["message"], error
        assert error["hint"], error
    assert stored == [], "nothing of the refused submissions may be stored"


def test_ordinary_keys_still_work_and_the_sdk_says_why(server: PostierServer,
                                                       relay: FaultRelay) -> None:
    server.configure_relay(relay)
    client = Client(server.url, server.tokens["alice"], lang="en")
    for key in ("relay:abc", "mon-logiciel:notice:1", "notices-1"):
        assert client.submit(["parent@example.org"], "Sujet", "Bonjour",
                             idempotency_key=key).status == "queued"
    with pytest.raises(errors.InvalidInput) as caught:
        client.submit(["parent@example.org"], "Sujet", "Bonjour",
                      idempotency_key="notice:delay:1")
    assert "may not start with 'notice:'" in caught.value.message(), caught.value
