"""Sender address verification on each storage backend (SQLite and PostgreSQL): the code
e-mail is queued, its code confirms the address once, wrong codes are counted in one
transaction each, and the sender rule is kept with each e-mail."""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from postier.core.message import MessageIn
from postier.core.sender_verification import MAX_FAILURES
from postier.core.service import Postier
from postier.errors import PostierError
from postier.server.config import ServerConfig
from postier.store import schema

ADDRESS = "alice@ac-lyon.fr"


async def _code(core: Postier) -> str:
    claimed, mail = None, None
    for c in await core.store.claim("test", 10, lease_seconds=60, now=time.time() + 1):
        parsed = email.message_from_bytes(c.data, policy=email.policy.default)
        if parsed["X-Postier-Notice"] == "sender-verification":
            claimed, mail = c, parsed
    assert claimed is not None and mail is not None, "the code e-mail is queued"
    assert [r.address for r in claimed.recipients] == [ADDRESS]
    body = mail.get_body(("plain",))
    assert body is not None
    return str(re.findall(r"\b\d{6}\b", body.get_content())[0])


async def test_verification_on_each_backend(store_url: str, tmp_path: Path) -> None:
    core = Postier(ServerConfig(data_dir=tmp_path, database_url=store_url))
    await core.open()
    try:
        await core.put_settings(
            (await core.add_user("admin", "direction@ac-lyon.fr", role="admin")),
            {"sender": {"name": "Collège", "address": "ne-pas-repondre@ac-lyon.fr"},
             "allowed_domains": ["ac-lyon.fr"], "verify_sender_addresses": True})
        alice = await core.add_user("alice", ADDRESS, display_name="Alice")
        msg = MessageIn.model_validate({"to": ["p@example.org"], "subject": "x"})
        (before,) = await core.submit(alice, [msg])
        assert before.sender_rule == "unverified_sender"
        record = await core.store.get_message(before.id)
        assert record is not None and record.sender_rule == "unverified_sender"
        assert record.envelope_from == "ne-pas-repondre@ac-lyon.fr"

        state = await core.senders.request(alice, ADDRESS.upper(), "fr")
        assert state.status == "pending"
        code = await _code(core)
        wrong = "000000" if code != "000000" else "111111"
        # Concurrent wrong codes are each counted: exactly one of five sees the lock.
        outcomes = await asyncio.gather(
            *(core.senders.confirm(alice, ADDRESS, wrong) for _ in range(MAX_FAILURES)),
            return_exceptions=True)
        codes = sorted(e.code for e in outcomes if isinstance(e, PostierError))
        assert codes == ["code_locked"] + ["wrong_code"] * (MAX_FAILURES - 1)
        with pytest.raises(PostierError) as exc:
            await core.senders.confirm(alice, ADDRESS, code)
        assert exc.value.code == "code_locked"

        # A minute later (written as the clock would have made it), a new code works once.
        sends = schema.sender_code_sends

        async def a_minute_ago(conn: Any) -> None:
            await conn.execute(update(sends).values(at=sends.c.at - 120))

        await core.store.write(a_minute_ago)
        await core.senders.request(alice, ADDRESS, "en")
        code = await _code(core)
        assert (await core.senders.confirm(alice, ADDRESS, code)).status == "verified"
        assert [s.status for s in await core.senders.listing(alice)] == ["verified"]
        (after,) = await core.submit(alice, [msg])
        assert after.sender_rule == "inside_allowed"
        record = await core.store.get_message(after.id)
        assert record is not None and record.envelope_from == ADDRESS
    finally:
        await core.close()
