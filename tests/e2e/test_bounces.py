"""Bounces that come back later, on the real server, a real relay and the bounce SMTP door:
each e-mail leaves with its own return address; a bounce to it marks the recipient
``bounced`` and puts the address on the suppression list; a later e-mail to that address
is accepted but not sent to it, and the sender is told why."""

from __future__ import annotations

from typing import Any

import pytest

from support.bounces import bounce_by_smtp, dsn, out_of_office
from support.relay import FaultRelay
from support.running import free_port
from support.server import PostierServer

pytestmark = pytest.mark.in_process

BOUNCES = {"bounces": {"address": "retours@ac-lyon.fr"}}


@pytest.fixture
def door(server_factory: Any) -> tuple[PostierServer, int]:
    port = free_port()
    server: PostierServer = server_factory(
        POSTIER_BOUNCE_SMTP=f"127.0.0.1:{port}").start()
    return server, port


def _send(server: PostierServer, to: list[str], subject: str = "Sortie scolaire",
          user: str = "alice") -> dict[str, Any]:
    with server.client(user) as c:
        r = c.post("/api/v1/messages", json={"to": to, "subject": subject,
                                             "text": "Bonjour"})
        assert r.status_code == 202, r.text
        return dict(r.json())


def _message(server: PostierServer, message_id: str) -> dict[str, Any]:
    with server.client() as c:
        return dict(c.get(f"/api/v1/messages/{message_id}").json())


def _recipient(message: dict[str, Any], address: str) -> dict[str, Any]:
    return next(r for r in message["recipients"] if r["address"] == address)


def _sent(server: PostierServer, relay: FaultRelay, to: list[str]) -> tuple[str, str]:
    """An e-mail of alice's delivered to ``to``: its id and its return address."""
    message_id = str(_send(server, to)["id"])
    server.wait_status(message_id, "sent")
    (received,) = [m for m in relay.wait_for(1) if message_id in m.mail_from]
    return message_id, received.mail_from


def test_each_e_mail_leaves_with_its_own_return_address(
    server: PostierServer, relay: FaultRelay
) -> None:
    server.configure_relay(relay, **BOUNCES)
    first = _send(server, ["parent1@example.org"])["id"]
    second = _send(server, ["parent2@example.org"])["id"]
    got = {m.rcpt_tos[0]: m for m in relay.wait_for(2)}
    one, two = got["parent1@example.org"], got["parent2@example.org"]
    assert one.mail_from.startswith(f"retours+{first}-"), one.mail_from
    assert one.mail_from.endswith("@ac-lyon.fr")
    assert two.mail_from.startswith(f"retours+{second}-"), "each e-mail has its own"
    # From and Reply-To are unchanged: only the envelope carries the return address.
    assert b"retours+" not in one.data


def test_a_retry_keeps_the_return_address(server: PostierServer, relay: FaultRelay) -> None:
    server.configure_relay(relay, **BOUNCES)
    relay.data_reply = "451 4.3.0 Try again later"
    message_id = _send(server, ["parent@example.org"])["id"]
    server.wait_status(message_id, "deferred")
    relay.reset_faults()
    with server.client() as c:
        assert c.post(f"/api/v1/messages/{message_id}/retry").status_code == 200
    server.wait_status(message_id, "sent")
    (received,) = relay.wait_for(1)
    assert received.mail_from.startswith(f"retours+{message_id}-")
    assert _message(server, message_id)["envelope_from"] == received.mail_from


def test_a_bounce_marks_the_recipient_and_suppresses_the_address(
    door: tuple[PostierServer, int], relay: FaultRelay
) -> None:
    server, port = door
    server.configure_relay(relay, **BOUNCES)
    message_id, return_path = _sent(server, relay, ["eleve.parti@example.org",
                                                    "parent@example.org"])
    code, reply = bounce_by_smtp(port, return_path, dsn(
        return_path, "eleve.parti@example.org", diagnostic="Mailbox does not exist"))
    assert code == 250, reply

    message = _message(server, message_id)
    gone = _recipient(message, "eleve.parti@example.org")
    assert gone["status"] == "bounced"
    assert gone["code"] == 550 and "Mailbox does not exist" in gone["reply"]
    assert _recipient(message, "parent@example.org")["status"] == "sent", \
        "the other recipient is not touched"
    with server.client(**{"Accept-Language": "fr"}) as c:
        listed = c.get("/api/v1/suppressions").json()
    assert [(e["address"], e["reason"], e["status"]) for e in listed["items"]] == [
        ("eleve.parti@example.org", "bounce", "5.1.1")]
    # The sender is told once, in French and English.
    notices = [m for m in relay.wait_for(2) if m.rcpt_tos == ["alice.martin@ac-lyon.fr"]]
    assert len(notices) == 1
    assert "eleve.parti@example.org" in notices[0].data.decode()
    assert "Retour" in notices[0].data.decode() or "signal" in notices[0].data.decode()

    # The next e-mail to that address is accepted, but not sent to it.
    later = _send(server, ["eleve.parti@example.org", "parent@example.org"],
                  subject="Réunion")
    server.wait_status(later["id"], "sent")
    again = _message(server, later["id"])
    held = _recipient(again, "eleve.parti@example.org")
    assert held["status"] == "suppressed"
    assert "Mailbox does not exist" in held["reply"]
    delivered = [m for m in relay.wait_for(3) if "Réunion" in m.data.decode(errors="replace")
                 or later["id"] in m.mail_from]
    assert [m.rcpt_tos for m in delivered if later["id"] in m.mail_from] == [
        ["parent@example.org"]], "a suppressed address is never attempted"


def test_an_e_mail_only_to_suppressed_addresses_fails_at_once_without_an_attempt(
    server: PostierServer, relay: FaultRelay
) -> None:
    server.configure_relay(relay, **BOUNCES)
    with server.client() as c:
        r = c.post("/api/v1/suppressions", json={"address": "Ancien@Example.org",
                                                 "note": "a quitté l'établissement"})
        assert r.status_code == 201, r.text
    accepted = _send(server, ["ancien@example.org"])
    assert accepted["status"] == "failed"
    message = _message(server, accepted["id"])
    assert message["status"] == "failed" and message["attempts"] == 0
    assert _recipient(message, "ancien@example.org")["status"] == "suppressed"
    # Only the sender's notice reaches the relay.
    (notice,) = relay.wait_for(1)
    assert notice.rcpt_tos == ["alice.martin@ac-lyon.fr"]
    assert "ancien@example.org" in notice.data.decode()


def test_the_door_refuses_made_up_return_addresses_and_ignores_auto_replies(
    door: tuple[PostierServer, int], relay: FaultRelay
) -> None:
    server, port = door
    server.configure_relay(relay, **BOUNCES)
    message_id, return_path = _sent(server, relay, ["parent@example.org"])
    forged = return_path.replace(return_path.split("-")[1][:4], "0000", 1)
    for address in (forged, "retours@ac-lyon.fr", f"retours+{message_id}@ac-lyon.fr",
                    "postmaster@ac-lyon.fr"):
        code, _ = bounce_by_smtp(port, address, dsn(address, "parent@example.org"))
        assert code == 550, f"{address} was accepted"
    code, reply = bounce_by_smtp(port, return_path, out_of_office(return_path))
    assert code == 250, reply
    # A report about somebody who was not a recipient of that e-mail changes nothing.
    code, _ = bounce_by_smtp(port, return_path, dsn(return_path, "autre@example.org"))
    assert code == 250
    code, _ = bounce_by_smtp(port, return_path, b"\x00garbage\r\n\r\n" * 1000)
    assert code == 250
    assert _recipient(_message(server, message_id), "parent@example.org")["status"] == "sent"
    with server.client() as c:
        assert c.get("/api/v1/suppressions").json()["total"] == 0


def test_the_door_refuses_a_bounce_over_its_size_limit(
    door: tuple[PostierServer, int], relay: FaultRelay
) -> None:
    server, port = door
    server.configure_relay(relay, **BOUNCES)
    _message_id, return_path = _sent(server, relay, ["parent@example.org"])
    huge = dsn(return_path, "parent@example.org") + b"\r\n" + (b"x" * 998 + b"\r\n") * 11000
    code, _ = bounce_by_smtp(port, return_path, huge)
    assert code == 552
    with server.client() as c:
        assert c.get("/api/v1/suppressions").json()["total"] == 0


def test_the_suppression_list_is_the_administrators_and_their_establishments(
    server: PostierServer,
) -> None:
    with server.client(**{"Accept-Language": "fr"}) as c:
        assert c.post("/api/v1/suppressions", json={"address": "x@example.org"}
                      ).status_code == 201
        again = c.post("/api/v1/suppressions", json={"address": "X@example.org"})
        assert again.status_code == 201 and again.json()["created_by"] == "admin"
        assert c.get("/api/v1/suppressions").json()["total"] == 1
        bad = c.post("/api/v1/suppressions", json={"address": "pas une adresse"})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "address"
        missing = c.delete("/api/v1/suppressions/personne@example.org")
        assert missing.status_code == 404
        assert "liste des adresses bloquées" in missing.json()["error"]["message"]
    with server.client("alice") as c:
        assert c.get("/api/v1/suppressions").status_code == 403
        assert c.delete("/api/v1/suppressions/x@example.org").status_code == 403
    with server.client() as c:
        assert c.delete("/api/v1/suppressions/x@example.org").status_code == 204
        assert c.get("/api/v1/suppressions").json()["total"] == 0
        actions = [e["action"] for e in c.get("/api/v1/audit").json()]
    assert "suppression.add" in actions and "suppression.remove" in actions


def test_the_bounce_address_must_be_in_the_establishments_domains(
    server: PostierServer, relay: FaultRelay
) -> None:
    server.configure_relay(relay)
    with server.client(**{"Accept-Language": "fr"}) as c:
        r = c.put("/api/v1/settings", json={"bounces": {"address": "retours@gmail.com"}})
        assert r.status_code == 422, r.text
        assert "domaines de l'établissement" in r.json()["error"]["message"]
        r = c.put("/api/v1/settings", json={"bounces": {"address": "re+tours@ac-lyon.fr"}})
        assert r.status_code == 422
        r = c.put("/api/v1/settings", json={"bounces": {
            "address": "retours@ac-lyon.fr",
            "imap": {"host": "imap.ac-lyon.fr", "username": "retours", "password": "s3cret"}}})
        assert r.status_code == 200, r.text
        shown = c.get("/api/v1/settings").json()["bounces"]
    assert shown["address"] == "retours@ac-lyon.fr"
    assert shown["imap"]["password_set"] is True and "password" not in shown["imap"]


def test_an_administrator_checks_the_domain_against_the_dns(
    server_factory: Any, relay: FaultRelay, dns_server: Any
) -> None:
    servers = ",".join(f"{h}:{p}" for h, p in dns_server.servers)
    server: PostierServer = server_factory(POSTIER_DNS_SERVERS=servers).start()
    server.configure_relay(relay)
    dns_server.add("ac-lyon.fr", "TXT", "v=spf1 ip4:127.0.0.1 -all")
    dns_server.add("_dmarc.ac-lyon.fr", "TXT", "v=DMARC1; p=quarantine")
    with server.client(**{"Accept-Language": "fr"}) as c:
        r = c.post("/api/v1/domains/check", json={"domain": "ac-lyon.fr"})
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["domain"] == "ac-lyon.fr"
        assert set(got) >= {"spf", "dkim", "dmarc"}
        assert got["dmarc"]["found"] == "v=DMARC1; p=quarantine"
        assert got["dkim"]["ok"] is False and "dkim" in got["dkim"]["hint"].lower()
        bad = c.post("/api/v1/domains/check", json={"domain": "pas un domaine"})
        assert bad.status_code == 422
    with server.client("alice") as c:
        assert c.post("/api/v1/domains/check", json={"domain": "ac-lyon.fr"}
                      ).status_code == 403


def test_an_administrator_checks_the_bounce_mailbox(server: PostierServer,
                                                    dovecot: Any) -> None:
    dovecot.deliver(out_of_office("retours@ac-lyon.fr"))
    imap = dovecot.mailbox("none").model_dump(mode="json")
    with server.client(**{"Accept-Language": "fr"}) as c:
        none_yet = c.post("/api/v1/bounces/mailbox/check", json={})
        assert none_yet.status_code == 422
        r = c.post("/api/v1/bounces/mailbox/check", json={"imap": imap})
        assert r.status_code == 200, r.text
        assert r.json() == {"ok": True, "unread": 1, "error": None}
        wrong = c.post("/api/v1/bounces/mailbox/check",
                       json={"imap": imap | {"password": "pas-le-bon"}})
        assert wrong.status_code == 200
        assert wrong.json()["ok"] is False
        assert wrong.json()["error"]["code"] == "bounce_mailbox"
        assert "a refusé la connexion" in wrong.json()["error"]["message"]
        assert "pas-le-bon" not in wrong.text
    assert dovecot.unseen() == 1, "a check changes nothing in the mailbox"
