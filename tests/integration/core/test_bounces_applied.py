"""What a bounce does, on each storage backend (SQLite and PostgreSQL), and bounces read
from a real IMAP mailbox (Dovecot): a permanent failure marks the recipient and lists the
address; temporary ones on three different days count as permanent; a complaint lists the
address without marking the recipient; a report never touches anybody who was not a
recipient, nor another establishment's e-mails."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from postier.core.bounce_reports import BouncedRecipient, BounceReport
from postier.core.message import MessageIn
from postier.core.service import Postier
from postier.ops.bounces import BounceMailboxTask, receive
from postier.ops.doctor import diagnose
from postier.ops.metrics import Collector, render
from postier.server.config import ServerConfig
from postier.store.base import AttemptRecord, Outcome, RecipientState, User

from support.bounces import dsn, out_of_office

DAY = 86400.0
SETTINGS = {"sender": {"name": "Collège", "address": "ne-pas-repondre@ac-lyon.fr"},
            "allowed_domains": ["ac-lyon.fr"], "bounces": {"address": "retours@ac-lyon.fr"}}


async def _core(tmp_path: Path, store_url: str | None = None) -> tuple[Postier, User]:
    core = Postier(ServerConfig(data_dir=tmp_path, database_url=store_url))
    await core.open()
    admin = await core.add_user("admin", "direction@ac-lyon.fr", role="admin")
    await core.put_settings(admin, SETTINGS)
    return core, admin


async def _delivered(core: Postier, user: User, to: list[str]) -> str:
    """An e-mail of ``user``'s, accepted then recorded as sent to every recipient."""
    (result,) = await core.submit(user, [MessageIn.model_validate(
        {"to": to, "subject": "Sortie", "text": "Bonjour"})])
    (claimed,) = await core.store.claim("test", 1, lease_seconds=60, now=time.time() + 1)
    now = time.time()
    await core.store.record_outcomes("test", [Outcome(
        claimed.id, "sent", 1, now, None,
        [RecipientState(r.position, r.address, "sent", 250, "2.0.0 OK")
         for r in claimed.recipients],
        AttemptRecord(now, 5, "relay", "sent", 250, None, None))])
    return result.id


def _report(address: str, *, status: str = "5.1.1", action: str = "failed",
            kind: str = "dsn") -> BounceReport:
    code = int(status[0]) * 100 + 50 if status else 0
    return BounceReport(kind, "rfc3464", (BouncedRecipient(
        address, action, status, code, f"{code} {status} mailbox unavailable"),), None, ())


async def _statuses(core: Postier, message_id: str) -> dict[str, str]:
    record = await core.store.get_message(message_id)
    assert record is not None
    return {r.address: r.status for r in record.recipients}


async def test_a_permanent_failure_marks_and_lists_on_each_backend(
    store_url: str, tmp_path: Path
) -> None:
    core, admin = await _core(tmp_path, store_url)
    try:
        message_id = await _delivered(core, admin, ["a@example.org", "b@example.org"])
        record = await core.store.get_message(message_id)
        assert record is not None
        assert record.envelope_from.startswith(f"retours+{message_id}-")
        assert core.bounces.read_return_address(record.envelope_from) == message_id

        applied = await core.bounces.apply(record, _report("A@Example.org"))
        assert [(a.address, a.kind, a.marked, a.suppressed) for a in applied] == [
            ("a@example.org", "hard", True, True)]
        assert await _statuses(core, message_id) == {"a@example.org": "bounced",
                                                     "b@example.org": "sent"}
        # The same report again changes nothing more.
        again = await core.bounces.apply(record, _report("a@example.org"))
        assert [(a.marked, a.suppressed) for a in again] == [(False, False)]
        entries, total = await core.suppressions(admin)
        assert total == 1 and entries[0].reason == "bounce" and entries[0].code == 550
        # Somebody who was not a recipient of the e-mail is never touched.
        assert await core.bounces.apply(record, _report("c@example.org")) == []
        assert (await core.suppressions(admin))[1] == 1
    finally:
        await core.close()


async def test_temporary_failures_on_three_days_count_as_permanent(tmp_path: Path) -> None:
    core, admin = await _core(tmp_path)
    try:
        start = time.time()
        results = []
        for day in range(3):
            message_id = await _delivered(core, admin, ["plein@example.org"])
            record = await core.store.get_message(message_id)
            assert record is not None
            results.append(await core.bounces.apply(
                record, _report("plein@example.org", status="4.2.2", action="delayed"),
                now=start + day * DAY))
        assert [[a.kind for a in r] for r in results] == [["soft"], ["soft"], ["repeated"]]
        assert results[2][0].marked and results[2][0].suppressed
        (entry,), _ = await core.suppressions(admin)
        assert (entry.address, entry.reason, entry.status) == (
            "plein@example.org", "repeated", "4.2.2")
    finally:
        await core.close()


async def test_a_complaint_lists_the_address_and_an_auto_reply_does_nothing(
    tmp_path: Path,
) -> None:
    core, admin = await _core(tmp_path)
    try:
        message_id = await _delivered(core, admin, ["fache@example.org"])
        record = await core.store.get_message(message_id)
        assert record is not None
        await core.bounces.apply(record, _report("fache@example.org", kind="complaint",
                                                 status="", action="failed"))
        assert await _statuses(core, message_id) == {"fache@example.org": "sent"}
        (entry,), _ = await core.suppressions(admin)
        assert entry.reason == "complaint"

        other = await _delivered(core, admin, ["absent@example.org"])
        record = await core.store.get_message(other)
        assert record is not None
        got = await receive(core, out_of_office(record.envelope_from))
        assert got.kind == "autoreply" and got.applied == []
        assert await _statuses(core, other) == {"absent@example.org": "sent"}
    finally:
        await core.close()


async def test_a_mailbox_applies_only_its_own_establishments_bounces(
    tmp_path: Path, dovecot: Any
) -> None:
    core, admin = await _core(tmp_path)
    try:
        other_school = await core.add_establishment("lycee", "Lycée")
        other_admin = await core.add_user("admin2", "direction@lycee.example",
                                          role="admin", establishment_id=other_school.id)
        await core.put_settings(other_admin, {
            "sender": {"address": "ne-pas-repondre@lycee.example"},
            "bounces": {"address": "retours@lycee.example"}})
        mine = await _delivered(core, admin, ["parti@example.org"])
        theirs = await _delivered(core, other_admin, ["autre@example.org"])
        for message_id, address in ((mine, "parti@example.org"),
                                    (theirs, "autre@example.org")):
            record = await core.store.get_message(message_id)
            assert record is not None
            dovecot.deliver(dsn(record.envelope_from, address))
        dovecot.deliver(b"Subject: hello\r\n\r\nnot a bounce\r\n")
        mailbox = dovecot.mailbox("none")
        await core.put_settings(admin, {"bounces": {"imap": mailbox.model_dump()}})

        task = BounceMailboxTask(core)
        assert await task.round() == 3, "every message of the mailbox is read"
        assert dovecot.unseen() == 0, "and marked as read"
        assert await _statuses(core, mine) == {"parti@example.org": "bounced"}
        assert await _statuses(core, theirs) == {"autre@example.org": "sent"}, \
            "a school's mailbox never acts on another school's e-mails"
        assert await task.round() == 0, "the mailbox is not due again before its interval"
    finally:
        await core.close()


@pytest.mark.parametrize("password", ["wrong-password"])
async def test_a_mailbox_that_cannot_be_read_is_said_once_and_read_later(
    tmp_path: Path, dovecot: Any, password: str, caplog: pytest.LogCaptureFixture
) -> None:
    core, admin = await _core(tmp_path)
    try:
        mailbox = dovecot.mailbox("none").model_copy(update={"password": password})
        await core.put_settings(admin, {"bounces": {"imap": mailbox.model_dump()}})
        task = BounceMailboxTask(core)
        assert await task.round() == 0
        assert await task.round(now=time.time() + 3600) == 0
        said = [r for r in caplog.records if "bounce mailbox" in r.getMessage()]
        assert len(said) == 1 and password not in said[0].getMessage()
    finally:
        await core.close()


async def test_a_bounce_tells_the_sender_once_the_webhook_and_the_metrics(
    tmp_path: Path,
) -> None:
    core, admin = await _core(tmp_path)
    try:
        await core.put_settings(admin, {"alerts": {
            "webhook_url": "http://127.0.0.1:9/hook", "webhook_secret": "s" * 20}})
        alice = await core.add_user("alice", "alice@ac-lyon.fr")
        message_id = await _delivered(core, alice, ["parti@example.org"])
        record = await core.store.get_message(message_id)
        assert record is not None
        for _ in range(2):  # the same bounce twice: one notice, one event
            got = await receive(core, dsn(record.envelope_from, "parti@example.org"))
        assert got.kind == "dsn" and got.message_id == message_id

        notices = [c for c in await core.store.claim("t", 10, lease_seconds=60,
                                                     now=time.time() + 1)
                   if b"X-Postier-Notice: bounce" in c.data]
        assert [[r.address for r in n.recipients] for n in notices] == [["alice@ac-lyon.fr"]]
        assert b"parti@example.org" in notices[0].data

        events = await core.store.take_due_events(time.time() + 1, 60)
        bounced = [json.loads(e.payload) for e in events if e.event == "message.bounced"]
        assert len(bounced) == 1
        (rcpt,) = bounced[0]["data"]["message"]["recipients"]
        assert (rcpt["address"], rcpt["status"], rcpt["code"]) == (
            "parti@example.org", "bounced", 550)

        text = render(await Collector(core.store).snapshot())
        assert 'postier_suppressed_addresses{establishment="default"} 1' in text
        assert 'postier_bounces{establishment="default",kind="hard"} 2' in text
    finally:
        await core.close()


async def test_doctor_checks_the_sending_domains_dns(tmp_path: Path, dns_server: Any) -> None:
    core, admin = await _core(tmp_path)
    await core.put_settings(admin, {"bounces": {"imap": {
        "host": "imap.ac-lyon.fr", "username": "retours", "password": "s3cret"}}})
    await core.close()
    dns_server.add("ac-lyon.fr", "TXT", "v=spf1 -all")
    servers = ",".join(f"{h}:{p}" for h, p in dns_server.servers)
    checks = await diagnose(ServerConfig(data_dir=tmp_path, dns_servers=servers), "fr",
                            dns=True)
    assert not [c for c in checks if c.key == "relay" and c.level == "fail"], \
        "settings with a bounce mailbox's password are read like the others"
    (dns,) = [c for c in checks if c.key == "dns"]
    assert dns.level == "warn" and "ac-lyon.fr" in dns.label
    assert "DMARC" in dns.result and "DKIM" in dns.result
    without = await diagnose(ServerConfig(data_dir=tmp_path, dns_servers=servers), "fr")
    assert not [c for c in without if c.key == "dns"], "only asked with --dns"


async def test_a_mass_mailing_to_blocked_addresses_gives_one_notice(tmp_path: Path) -> None:
    core, admin = await _core(tmp_path)
    try:
        for address in ("ancien1@example.org", "ancien2@example.org"):
            await core.suppress(admin, address)
        alice = await core.add_user("alice", "alice@ac-lyon.fr")
        results = await core.submit(alice, [MessageIn.model_validate(
            {"to": [to], "subject": "Réunion de rentrée", "text": "Bonjour"})
            for to in ("ancien1@example.org", "parent@example.org", "ancien2@example.org")])
        assert [r.status for r in results] == ["failed", "queued", "failed"]
        claimed = await core.store.claim("t", 10, lease_seconds=60, now=time.time() + 1)
        notices = [c for c in claimed if b"X-Postier-Notice: suppressed" in c.data]
        assert len(notices) == 1, "one notice for the whole mailing"
        text = notices[0].data.decode()
        assert "ancien1@example.org" in text and "ancien2@example.org" in text
        assert [[r.address for r in c.recipients] for c in claimed
                if c.id == results[1].id] == [["parent@example.org"]]
    finally:
        await core.close()


async def test_an_address_is_lifted_whatever_form_it_is_written_in(tmp_path: Path) -> None:
    core, admin = await _core(tmp_path)
    try:
        await core.suppress(admin, "Parent@École.example")
        (entry,), _ = await core.suppressions(admin)
        assert entry.address == "Parent@école.example"
        lifted = await core.lift_suppression(admin, "parent@xn--cole-9oa.example")
        assert lifted.address == "Parent@école.example"
        assert (await core.suppressions(admin))[1] == 0
    finally:
        await core.close()
