"""The store in trouble, under the real server: the disk full, the database locked by
another process, rows damaged by hand or by a broken disk, and clocks that jump.

Promise 1 here reads: an e-mail is acknowledged (202) only once it is on disk; when it
cannot be stored the door says so (503/507) and nothing is half-kept; a damaged e-mail
fails alone and the queue goes on."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from reliability_kit import database, quick_retry, record_figures, statuses, subjects, wait_until

from support.relay import FaultRelay
from support.server import ServerProcess

BIG = "x" * 300_000  # each refused submission would need this much room


@contextlib.contextmanager
def small_disk(path: Path, size: str = "8m") -> Iterator[Path]:
    """A real, small file system (tmpfs) that can fill up: ENOSPC, as on a full disk."""
    path.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                            str(path)], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        pytest.skip("no mount command to make a small file system")
    if r.returncode != 0:
        pytest.skip(f"mounting a small tmpfs needs root here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> Path:
    """Fill the file system holding ``path`` to the last byte."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (1 << 16, 1 << 10, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return filler


def test_disk_full_refuses_new_e_mails_and_keeps_the_accepted(
    server_factory: Any, relay: FaultRelay, tmp_path: Path
) -> None:
    with small_disk(tmp_path / "disk") as disk:
        # A delivery whose result cannot be written while the disk is full waits for its
        # lease (see the next test); a short one keeps this test quick.
        server: ServerProcess = server_factory(disk / "data", POSTIER_LEASE_SECONDS="3")
        server.log_path = tmp_path / "server.log"  # the log lives elsewhere, as with journald
        server.start()
        quick_retry(server, relay)
        relay.down()  # what is accepted stays in the queue for the whole test
        with server.client("alice") as c:
            before = [c.post("/api/v1/messages", json={"to": [f"avant{i}@example.org"],
                                                       "subject": f"avant{i}", "text": "a"})
                      for i in range(5)]
            assert [r.status_code for r in before] == [202] * 5
            filler = fill(disk)
            answers = []
            for i in range(5):
                r = c.post("/api/v1/messages", json={"to": [f"plein{i}@example.org"],
                                                     "subject": f"plein{i}", "text": BIG})
                answers.append(r)
            r = c.post("/api/v1/messages/batch", json={"messages": [
                {"to": [f"lot{i}@example.org"], "subject": f"lot{i}", "text": BIG}
                for i in range(3)]})
            answers.append(r)
            codes = [a.status_code for a in answers]
            assert all(code in (503, 507) for code in codes), [a.text for a in answers]
            assert 507 in codes, "a full disk is named as such"
            body = answers[0].json()["error"]
            assert body["code"] == "store_unavailable" and "nothing was accepted" in \
                body["message"]
            # Reading still works, and the process is alive.
            assert c.get("/api/v1/messages").status_code == 200
            assert server.proc is not None and server.proc.poll() is None
            filler.unlink()
            after = c.post("/api/v1/messages", json={"to": ["apres@example.org"],
                                                     "subject": "apres", "text": BIG})
            assert after.status_code == 202, after.text
        relay.up()
        wanted = {f"avant{i}" for i in range(5)} | {"apres"}
        wait_until(lambda: wanted <= set(subjects(relay.messages)), timeout=30,
                   what="the acknowledged e-mails delivered")
        time.sleep(1)
        got = subjects(relay.messages)
        assert set(got) == wanted, "nothing refused was delivered, nothing accepted lost"
        assert max(got.values()) == 1
        record_figures("disk full", acknowledged_before=5, refused_while_full=len(answers),
                       refusal_codes=codes, acknowledged_after=1, delivered=len(got), lost=0,
                       duplicates=0)


def test_result_of_a_delivery_written_once_the_disk_has_room(
    server_factory: Any, relay: FaultRelay, tmp_path: Path
) -> None:
    with small_disk(tmp_path / "disk") as disk:
        server: ServerProcess = server_factory(disk / "data")
        server.log_path = tmp_path / "server.log"
        server.start()
        quick_retry(server, relay)
        relay.stall = ("after_data", 2.0)  # the relay takes its time to say 250
        with server.client("alice") as c:
            mid = c.post("/api/v1/messages", json={"to": ["p@example.org"],
                                                   "subject": "pendant"}).json()["id"]
            wait_until(lambda: statuses(server.data_dir).get("sending"), timeout=10,
                       what="the delivery under way")
            filler = fill(disk)  # the disk fills while the relay takes the e-mail
            relay.wait_for(1, timeout=10)
            time.sleep(0.5)
            filler.unlink()
            relay.reset_faults()
            status = wait_until(
                lambda: (c.get(f"/api/v1/messages/{mid}").json()["status"] == "sent") or None,
                timeout=5, what="the delivery recorded")
            assert status
        assert len(relay.messages) == 1


def test_database_locked_refuses_with_503_and_stores_nothing(
    server_factory: Any, relay: FaultRelay, sqlite_busy_fast: dict[str, str]
) -> None:
    server: ServerProcess = server_factory(**sqlite_busy_fast).start()
    quick_retry(server, relay)
    keyed = {"to": ["p@example.org"], "subject": "cle", "text": "t",
             "idempotency_key": "convocation-42"}
    with database(server.data_dir, timeout=1) as db, server.client("alice") as c:
        db.execute("BEGIN EXCLUSIVE")
        try:
            single = c.post("/api/v1/messages", json=keyed)
            batch = c.post("/api/v1/messages/batch", json={"messages": [
                {"to": [f"b{i}@example.org"], "subject": f"b{i}"} for i in range(10)]})
        finally:
            db.execute("ROLLBACK")
        for r in (single, batch):
            assert r.status_code == 503, r.text
            err = r.json()["error"]
            assert err["code"] == "store_unavailable" and "locked" in err["message"]
        # Nothing was stored: the same key is a new e-mail now, and only once.
        first = c.post("/api/v1/messages", json=keyed).json()
        again = c.post("/api/v1/messages", json=keyed).json()
        assert first["duplicate"] is False
        assert again["id"] == first["id"] and again["duplicate"] is True
    (got,) = relay.wait_for(1)
    time.sleep(0.5)
    assert len(relay.messages) == 1 and got.message["Subject"] == "cle"


def _ids_by_subject(server: ServerProcess) -> dict[str, str]:
    with database(server.data_dir) as db:
        return dict(db.execute("SELECT subject, id FROM messages"))


def test_damaged_rows_fail_alone_and_the_queue_goes_on(
    server_factory: Any, relay: FaultRelay
) -> None:
    server: ServerProcess = server_factory().start()
    quick_retry(server, relay)
    relay.down()
    names = ["no-body", "garbage-body", "no-recipients", "bad-recipient", "bad-error",
             "bad-error-shape", "bad-status", "ok1", "ok2", "ok3"]
    with server.client("alice") as c:
        for name in names:
            assert c.post("/api/v1/messages", json={"to": [f"{name}@example.org"],
                                                    "subject": name, "text": name}
                          ).status_code == 202
    server.stop()
    ids = _ids_by_subject(server)
    garbage = os.urandom(3000) + b"\n.\nMAIL FROM:<x@y>\r\n" + b"z" * 5000 + b"\r\n"
    with database(server.data_dir) as db:
        db.execute("DELETE FROM message_bodies WHERE message_id = ?", (ids["no-body"],))
        db.execute("UPDATE message_bodies SET data = ? WHERE message_id = ?",
                   (garbage, ids["garbage-body"]))
        db.execute("DELETE FROM recipients WHERE message_id = ?", (ids["no-recipients"],))
        db.execute("UPDATE recipients SET address = 'not an address>' WHERE message_id = ?",
                   (ids["bad-recipient"],))
        db.execute("UPDATE messages SET last_error = '[1, 2' WHERE id = ?", (ids["bad-error"],))
        # JSON, but not an error's shape (status 'failed' so no attempt rewrites it).
        db.execute("UPDATE messages SET status = 'failed', last_error = '[1]' WHERE id = ?",
                   (ids["bad-error-shape"],))
        db.execute("UPDATE messages SET status = 'zzz' WHERE id = ?", (ids["bad-status"],))
    relay.up()
    server.start()
    wanted = {"ok1", "ok2", "ok3"}
    wait_until(lambda: wanted <= set(subjects(relay.messages)), timeout=20,
               what="the sound e-mails delivered")
    with server.client("admin") as c:
        listing = c.get("/api/v1/messages")
        assert listing.status_code == 200, listing.text
        for name in names:
            r = c.get(f"/api/v1/messages/{ids[name]}")
            assert r.status_code == 200, (name, r.text)
        no_body = c.get(f"/api/v1/messages/{ids['no-body']}").json()
        assert no_body["status"] == "failed" and no_body["last_error"]["message"]
        assert c.get(f"/api/v1/messages/{ids['no-recipients']}").json()["status"] == "failed"
    wait_until(lambda: not ({"queued", "sending"} & set(statuses(server.data_dir))),
               timeout=20, what="nothing left queued or sending")
    got = subjects(relay.messages)
    assert max(got.values()) == 1
    record_figures("damaged rows", damaged=7, sound=3, sound_delivered=len(wanted & set(got)),
                   final_statuses=statuses(server.data_dir))


def test_clock_jumps_neither_lose_nor_block(server_factory: Any, relay: FaultRelay) -> None:
    server: ServerProcess = server_factory().start()
    quick_retry(server, relay)
    relay.down()
    names = ["far-future", "far-past", "accepted-in-future", "leased-far-ahead", "expired",
             "normal"]
    with server.client("alice") as c:
        for name in names:
            assert c.post("/api/v1/messages", json={"to": [f"{name}@example.org"],
                                                    "subject": name}).status_code == 202
    server.stop()
    ids = _ids_by_subject(server)
    now = time.time()
    century = 100 * 365 * 86400
    with database(server.data_dir) as db:
        # Deferred while the clock was a century ahead (or behind).
        db.execute("UPDATE messages SET status='deferred', next_attempt_at=? WHERE id=?",
                   (now + century, ids["far-future"]))
        db.execute("UPDATE messages SET status='deferred', next_attempt_at=0 WHERE id=?",
                   (ids["far-past"],))
        db.execute("UPDATE messages SET created_at=? WHERE id=?",
                   (now + 86400, ids["accepted-in-future"]))
        # Claimed by a process whose clock was a century ahead, which then died.
        db.execute("UPDATE messages SET status='sending', lease_owner='w-dead', "
                   "lease_expires_at=? WHERE id=?", (now + century, ids["leased-far-ahead"]))
        # Accepted ten days ago by the clock's reckoning: past its maximum age (1 hour).
        db.execute("UPDATE messages SET created_at=? WHERE id=?",
                   (now - 10 * 86400, ids["expired"]))
    relay.up()
    relay.rcpt_replies["expired@example.org"] = "451 4.3.0 Try later"
    server.start()
    prompt = {"far-past", "accepted-in-future", "leased-far-ahead", "normal"}
    wait_until(lambda: prompt <= set(subjects(relay.messages)), timeout=20,
               what="the e-mails due now delivered")
    with server.client("admin") as c:
        expired = server.wait_status(ids["expired"], "failed")
        assert expired["last_error"]["code"] == "expired"
        waiting = c.get(f"/api/v1/messages/{ids['far-future']}").json()
        assert waiting["status"] == "deferred", "not lost: visible, and waiting"
        # The administrator's "retry now" brings it back from the far future.
        assert c.post(f"/api/v1/messages/{ids['far-future']}/retry").status_code == 200
    server.wait_status(ids["far-future"], "sent")
    time.sleep(0.5)
    got = {s: n for s, n in subjects(relay.messages).items() if s in names}
    assert set(got) == prompt | {"far-future"} and max(got.values()) == 1
