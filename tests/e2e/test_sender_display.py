"""sender.display on the real server: with "user_via", an e-mail that leaves under the
establishment's address still names its writer, on the relay's copy and in the sender
preview; switching takes effect at once in a process that already decided for that user."""

from __future__ import annotations

import pytest

from support.relay import FaultRelay
from support.server import PostierServer

pytestmark = pytest.mark.in_process


def _send_as_bob(server: PostierServer, subject: str) -> None:
    with server.client("bob") as c:
        r = c.post("/api/v1/messages", json={"to": ["parent@example.org"],
                                             "subject": subject, "text": "Bonjour"})
        assert r.status_code == 202, r.text
    server.wait_status(r.json()["id"], "sent")


def test_user_via_names_the_teacher_on_the_relays_copy_and_in_the_preview(
    server: PostierServer, relay: FaultRelay
) -> None:
    server.configure_relay(relay)
    _send_as_bob(server, "avant")  # today's behaviour, and a decision now in the cache
    with server.client() as c:
        assert c.get("/api/v1/settings").json()["sender"]["display"] == "establishment"
        r = c.put("/api/v1/settings", json={"sender": {"display": "user_via"}})
        assert r.status_code == 200, r.text
        assert r.json()["sender"] == {"name": "Collège Jean Moulin",
                                      "address": "ne-pas-repondre@ac-lyon.fr",
                                      "display": "user_via"}
        preview = c.post("/api/v1/settings/preview", json={"user": "bob"}).json()
        alice = c.post("/api/v1/settings/preview", json={"user": "alice"}).json()
    _send_as_bob(server, "apres")

    before, after = (m.message["From"] for m in relay.wait_for(2))
    assert before.addresses[0].display_name == "Collège Jean Moulin"
    assert after.addresses[0].display_name == "Bob Durand via Collège Jean Moulin", (
        "the cached decision of the old setting was used")
    assert after.addresses[0].addr_spec == "ne-pas-repondre@ac-lyon.fr"
    assert preview["from"] == "Bob Durand via Collège Jean Moulin <ne-pas-repondre@ac-lyon.fr>"
    # Alice's address is in the allowed domains: her own From, whatever the setting.
    assert alice["from"] == "Alice Martin <alice.martin@ac-lyon.fr>"


def test_an_unknown_display_is_refused(server: PostierServer) -> None:
    with server.client() as c:
        r = c.put("/api/v1/settings", json={"sender": {"display": "teacher"}})
    assert r.status_code == 422, r.text
