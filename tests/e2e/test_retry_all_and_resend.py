"""After a relay outage, everything waiting is tried again at once; an administrator sends
a sent e-mail again. On the real server and a real relay that is told to fail, then to
accept."""

from __future__ import annotations

from typing import Any

import pytest

from support.relay import FaultRelay
from support.server import PostierServer

pytestmark = pytest.mark.in_process

SLOW_RETRIES = {"retry": {"first_delay": 3600, "max_delay": 3600, "max_age": 86400}}


def _submit(server: PostierServer, user: str, subject: str) -> str:
    with server.client(user) as c:
        r = c.post("/api/v1/messages", json={"to": [f"parent-{subject}@example.org"],
                                             "subject": subject, "text": "Bonjour"})
        assert r.status_code == 202, r.text
        return str(r.json()["id"])


def _status(server: PostierServer, message_id: str) -> str:
    with server.client() as c:
        return str(c.get(f"/api/v1/messages/{message_id}").json()["status"])


def _outage(server: PostierServer, relay: FaultRelay) -> dict[str, str]:
    """Alice's two e-mails and Bob's one, deferred by a relay that refuses everything;
    the next automatic retry is an hour away."""
    server.configure_relay(relay, **SLOW_RETRIES)
    relay.mail_reply = "421 4.3.2 Service not available, try again later"
    ids = {name: _submit(server, user, name)
           for user, name in (("alice", "a1"), ("alice", "a2"), ("bob", "b1"))}
    for message_id in ids.values():
        server.wait_status(message_id, "deferred")
    relay.reset_faults()
    return ids


def _subjects(relay: FaultRelay, n: int) -> list[str]:
    return sorted(str(m.message["Subject"]) for m in relay.wait_for(n))


def test_retry_all_after_an_outage_delivers_and_counts(
    server: PostierServer, relay: FaultRelay
) -> None:
    ids = _outage(server, relay)
    with server.client("alice") as c:
        r = c.post("/api/v1/messages/retry", json={"status": "deferred"})
    assert r.status_code == 200, r.text
    assert r.json() == {"retried": 2}, "alice retries her own two e-mails, not bob's"
    server.wait_status(ids["a1"], "sent")
    server.wait_status(ids["a2"], "sent")
    assert _subjects(relay, 2) == ["a1", "a2"]
    assert _status(server, ids["b1"]) == "deferred", "bob's e-mail was touched by alice"

    # The administrator's retry reaches the whole establishment: bob's is left.
    with server.client() as c:
        r = c.post("/api/v1/messages/retry", json={})
        assert r.json() == {"retried": 1}
        audit = c.get("/api/v1/audit").json()
    server.wait_status(ids["b1"], "sent")
    assert _subjects(relay, 3) == ["a1", "a2", "b1"]
    assert any(e["action"] == "messages.retry_all" and e["actor"] == "admin"
               for e in _entries(audit))


def test_retry_all_refuses_a_status_that_cannot_be_retried(server: PostierServer) -> None:
    with server.client("alice", **{"Accept-Language": "fr"}) as c:
        r = c.post("/api/v1/messages/retry", json={"status": "sent"})
    assert r.status_code == 422, r.text


def test_a_user_retry_all_never_touches_another_users_e_mails(
    server: PostierServer, relay: FaultRelay
) -> None:
    ids = _outage(server, relay)
    with server.client("bob") as c:
        assert c.post("/api/v1/messages/retry", json={}).json() == {"retried": 1}
    server.wait_status(ids["b1"], "sent")
    assert _status(server, ids["a1"]) == "deferred"
    assert _status(server, ids["a2"]) == "deferred"
    assert [str(m.message["Subject"]) for m in relay.messages] == ["b1"]


def test_an_administrator_resends_a_sent_e_mail_as_a_new_one(
    server: PostierServer, relay: FaultRelay
) -> None:
    server.configure_relay(relay)
    with server.client("alice") as c:
        r = c.post("/api/v1/messages", json={
            "to": ["parent@example.org"], "bcc": ["archives@ac-lyon.fr"],
            "subject": "Réunion parents-professeurs", "text": "Jeudi à 18 h"})
    first = r.json()["id"]
    server.wait_status(first, "sent")
    (original,) = relay.wait_for(1)

    with server.client("alice") as c:
        refused = c.post(f"/api/v1/messages/{first}/resend")
    assert refused.status_code == 403, "a user resent an e-mail"
    with server.client() as c:
        r = c.post(f"/api/v1/messages/{first}/resend")
        assert r.status_code == 202, r.text
        copy = r.json()["id"]
        assert copy != first
        server.wait_status(copy, "sent")
        audit = _entries(c.get("/api/v1/audit").json())
        view = c.get(f"/api/v1/messages/{copy}").json()
    second = relay.wait_for(2)[1]
    assert sorted(second.rcpt_tos) == sorted(original.rcpt_tos) == [
        "archives@ac-lyon.fr", "parent@example.org"]
    assert second.message["Subject"] == "Réunion parents-professeurs"
    assert second.message["From"] == original.message["From"]
    assert second.message.get_content().strip() == "Jeudi à 18 h"
    assert second.message["Message-ID"] != original.message["Message-ID"], (
        "the copy has the old Message-ID: receiving servers drop it as a duplicate")
    assert view["message_id"] == second.message["Message-ID"]
    assert any(e["action"] == "message.resend" and e["target"] == first for e in audit)
    # The copy is still alice's e-mail: she sees it in her list.
    with server.client("alice") as c:
        assert copy in {m["id"] for m in c.get("/api/v1/messages").json()}


def test_only_a_sent_e_mail_is_resent(server: PostierServer, relay: FaultRelay) -> None:
    server.configure_relay(relay, **SLOW_RETRIES)
    relay.mail_reply = "421 4.3.2 try again later"
    waiting = _submit(server, "alice", "attente")
    server.wait_status(waiting, "deferred")
    with server.client() as c:
        r = c.post(f"/api/v1/messages/{waiting}/resend")
    assert r.status_code == 409, r.text


def _entries(audit: Any) -> list[dict[str, Any]]:
    return list(audit)
