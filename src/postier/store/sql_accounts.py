"""The SQL of the accounts: establishments, users, API tokens, sender addresses, failed
sign-ins and ended sign-in sessions (:class:`postier.store.accounts.AccountStore`)."""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from postier.errors import Conflict
from postier.i18n import N_
from postier.store import schema as t
from postier.store.records import FAILURES_KEPT, Establishment, SenderAddress, TokenInfo, User
from postier.store.sql_base import SQLBase


def _keys(keys: Sequence[str]) -> list[str]:
    """Throttling keys as stored: a username given over SMTP can be any length."""
    return [k[:400] for k in keys]


def _user(row: Any) -> User:
    return User(
        id=row.id,
        establishment_id=row.establishment_id,
        username=row.username,
        email=row.email,
        display_name=row.display_name,
        role=row.role,
        disabled=bool(row.disabled),
        granted_senders=tuple(json.loads(row.granted_senders or "[]")),
        password_hash=row.password_hash,
    )


def _token(row: Any) -> TokenInfo:
    return TokenInfo(
        id=row.id,
        user_id=row.user_id,
        name=row.name,
        created_at=row.created_at,
        last_used_at=row.last_used_at,
        revoked_at=row.revoked_at,
    )



class SQLAccounts(SQLBase):
    """Establishments, users and their credentials, in SQL."""

    # -- establishments, users, tokens ---------------------------------------------------
    async def get_establishment(self, slug_or_id: str | int) -> Establishment | None:
        col = t.establishments.c.id if isinstance(slug_or_id, int) else t.establishments.c.slug
        rows = await self._read(select(t.establishments).where(col == slug_or_id))
        if not rows:
            return None
        r = rows[0]
        return Establishment(r.id, r.slug, r.name, bool(r.hosted), bool(r.disabled))

    async def create_establishment(self, slug: str, name: str, hosted: bool) -> Establishment:
        async def job(conn: AsyncConnection) -> int:
            res = await conn.execute(
                insert(t.establishments).values(
                    slug=slug, name=name, hosted=hosted, disabled=False, created_at=time.time()
                )
            )
            return int(res.inserted_primary_key[0])  # type: ignore[index]

        try:
            est_id = await self.write(job)
        except Conflict as exc:
            raise Conflict(N_("An establishment {slug} already exists."), slug=slug) from exc
        return Establishment(est_id, slug, name, hosted, False)

    async def list_establishments(self) -> list[Establishment]:
        rows = await self._read(select(t.establishments).order_by(t.establishments.c.slug))
        return [Establishment(r.id, r.slug, r.name, bool(r.hosted), bool(r.disabled))
                for r in rows]

    async def update_establishment(self, establishment_id: int, **values: Any) -> None:
        async def job(conn: AsyncConnection) -> None:
            await conn.execute(
                update(t.establishments)
                .where(t.establishments.c.id == establishment_id)
                .values(**values)
            )

        await self.write(job)

    async def find_users(
        self, *, username: str | None = None, email: str | None = None
    ) -> list[User]:
        stmt = select(t.users)
        if username is not None:
            stmt = stmt.where(t.users.c.username == username)
        if email is not None:
            stmt = stmt.where(func.lower(t.users.c.email) == email.lower())
        return [_user(r) for r in await self._read(stmt.order_by(t.users.c.id))]

    async def create_user(
        self,
        *,
        establishment_id: int,
        username: str,
        email: str,
        display_name: str,
        role: str,
        password_hash: str | None,
    ) -> User:
        values = {
            "establishment_id": establishment_id,
            "username": username,
            "email": email,
            "display_name": display_name,
            "role": role,
            "password_hash": password_hash,
            "disabled": False,
            "granted_senders": "[]",
            "created_at": time.time(),
        }

        async def job(conn: AsyncConnection) -> int:
            res = await conn.execute(insert(t.users).values(**values))
            return int(res.inserted_primary_key[0])  # type: ignore[index]

        try:
            user_id = await self.write(job)
        except Conflict as exc:
            raise Conflict(
                N_("A user named {username} already exists."), username=username
            ) from exc
        user = await self.get_user(user_id=user_id)
        assert user is not None
        return user

    async def get_user(
        self,
        *,
        user_id: int | None = None,
        establishment_id: int | None = None,
        username: str | None = None,
    ) -> User | None:
        stmt = select(t.users)
        if user_id is not None:
            stmt = stmt.where(t.users.c.id == user_id)
        else:
            stmt = stmt.where(
                t.users.c.establishment_id == establishment_id, t.users.c.username == username
            )
        rows = await self._read(stmt)
        return _user(rows[0]) if rows else None

    async def list_users(self, establishment_id: int) -> list[User]:
        rows = await self._read(
            select(t.users)
            .where(t.users.c.establishment_id == establishment_id)
            .order_by(t.users.c.username)
        )
        return [_user(r) for r in rows]

    async def update_user(self, user_id: int, **values: Any) -> None:
        if "granted_senders" in values:
            values["granted_senders"] = json.dumps(list(values["granted_senders"]))

        async def job(conn: AsyncConnection) -> None:
            await conn.execute(update(t.users).where(t.users.c.id == user_id).values(**values))

        await self.write(job)

    async def create_token(self, user_id: int, name: str, token_hash: str) -> TokenInfo:
        now = time.time()

        async def job(conn: AsyncConnection) -> int:
            res = await conn.execute(
                insert(t.tokens).values(
                    user_id=user_id, name=name, token_hash=token_hash, created_at=now
                )
            )
            return int(res.inserted_primary_key[0])  # type: ignore[index]

        token_id = await self.write(job)
        return TokenInfo(token_id, user_id, name, now, None, None)

    async def user_for_token(self, token_hash: str) -> User | None:
        rows = await self._read(
            select(t.users)
            .join(t.tokens, t.tokens.c.user_id == t.users.c.id)
            .join(t.establishments, t.establishments.c.id == t.users.c.establishment_id)
            .where(
                t.tokens.c.token_hash == token_hash,
                t.tokens.c.revoked_at.is_(None),
                t.users.c.disabled.is_(False),
                t.establishments.c.disabled.is_(False),
            )
        )
        return _user(rows[0]) if rows else None

    async def list_tokens(self, user_id: int) -> list[TokenInfo]:
        rows = await self._read(
            select(t.tokens).where(t.tokens.c.user_id == user_id).order_by(t.tokens.c.id)
        )
        return [_token(r) for r in rows]

    async def revoke_token(self, user_id: int, token_id: int) -> bool:
        async def job(conn: AsyncConnection) -> int:
            res = await conn.execute(
                update(t.tokens)
                .where(
                    t.tokens.c.id == token_id,
                    t.tokens.c.user_id == user_id,
                    t.tokens.c.revoked_at.is_(None),
                )
                .values(revoked_at=time.time())
            )
            return int(res.rowcount)

        return bool(await self.write(job))

    async def revoke_all_tokens(self, user_id: int) -> int:
        async def job(conn: AsyncConnection) -> int:
            res = await conn.execute(
                update(t.tokens)
                .where(t.tokens.c.user_id == user_id, t.tokens.c.revoked_at.is_(None))
                .values(revoked_at=time.time())
            )
            return int(res.rowcount)

        result: int = await self.write(job)
        return result

    # -- sender address verification -----------------------------------------------------
    async def list_sender_addresses(self, user_id: int) -> list[SenderAddress]:
        sa = t.sender_addresses
        rows = await self._read(
            select(sa).where(sa.c.user_id == user_id).order_by(sa.c.address_key))
        return [SenderAddress(r.address, r.verified_at,
                              r.code_expires_at if r.code_hash else None, r.failed_attempts)
                for r in rows]

    async def start_sender_code(
        self, *, establishment_id: int, user_id: int, address: str, code_hash: str,
        expires_at: float, now: float, min_interval: float, day_limit: int,
    ) -> float:
        sa, sends = t.sender_addresses, t.sender_code_sends
        key = address.lower()

        async def job(conn: AsyncConnection) -> float:
            last = (await conn.execute(select(func.max(sends.c.at)).where(
                sends.c.user_id == user_id, sends.c.address_key == key))).scalar()
            if last is not None and now - last < min_interval:
                return float(min_interval - (now - last))
            day = [r.at for r in await conn.execute(
                select(sends.c.at).where(sends.c.user_id == user_id, sends.c.at > now - 86400)
                .order_by(sends.c.at))]
            if len(day) >= day_limit:
                return float(day[len(day) - day_limit] + 86400 - now)
            await conn.execute(delete(sends).where(sends.c.user_id == user_id,
                                                   sends.c.at < now - 2 * 86400))
            res = await conn.execute(update(sa).where(sa.c.user_id == user_id,
                                                      sa.c.address_key == key).values(
                address=address, code_hash=code_hash, code_expires_at=expires_at,
                failed_attempts=0))
            if res.rowcount == 0:
                await conn.execute(insert(sa).values(
                    establishment_id=establishment_id, user_id=user_id, address=address,
                    address_key=key, code_hash=code_hash, code_expires_at=expires_at,
                    failed_attempts=0, created_at=now))
            await conn.execute(insert(sends).values(user_id=user_id, address_key=key, at=now))
            return 0.0

        result: float = await self.write(job)
        return result

    async def check_sender_code(
        self, *, user_id: int, address: str, code_hash: str, now: float, max_failures: int,
    ) -> tuple[str, int]:
        sa = t.sender_addresses
        where = (sa.c.user_id == user_id, sa.c.address_key == address.lower())

        async def job(conn: AsyncConnection) -> tuple[str, int]:
            row = (await conn.execute(select(sa).where(*where))).first()
            if row is None or row.code_hash is None:
                locked = row is not None and row.failed_attempts >= max_failures
                return ("locked" if locked else "no_code"), 0
            if row.code_expires_at is None or row.code_expires_at <= now:
                return "expired", 0
            if hmac.compare_digest(row.code_hash, code_hash):
                await conn.execute(update(sa).where(*where).values(
                    verified_at=now, code_hash=None, code_expires_at=None, failed_attempts=0))
                return "verified", max_failures
            failed = row.failed_attempts + 1
            if failed >= max_failures:
                # The code is void: whoever is guessing must ask for a new one, which the
                # owner of the address receives (and the resend limits slow down).
                await conn.execute(update(sa).where(*where).values(
                    failed_attempts=failed, code_hash=None, code_expires_at=None))
                return "locked", 0
            await conn.execute(update(sa).where(*where).values(failed_attempts=failed))
            return "wrong", max_failures - failed

        result: tuple[str, int] = await self.write(job)
        return result

    async def delete_sender_address(self, user_id: int, address: str) -> bool:
        sa = t.sender_addresses

        async def job(conn: AsyncConnection) -> int:
            res = await conn.execute(delete(sa).where(sa.c.user_id == user_id,
                                                      sa.c.address_key == address.lower()))
            return int(res.rowcount)

        return bool(await self.write(job))

    # -- failed sign-ins -------------------------------------------------------------------
    async def recent_failures(self, keys: Sequence[str], since: float) -> dict[str, list[float]]:
        lf = t.login_failures
        rows = await self._read(select(lf.c.key, lf.c.at)
                                .where(lf.c.key.in_(_keys(keys)), lf.c.at >= since)
                                .order_by(lf.c.at))
        out: dict[str, list[float]] = {}
        for row in rows:
            out.setdefault(row.key, []).append(row.at)
        return {key: out[stored] for key, stored in zip(keys, _keys(keys), strict=True)
                if stored in out}

    async def add_failure(self, keys: Sequence[str], now: float, forget_before: float) -> None:
        lf = t.login_failures
        stored = _keys(keys)

        async def job(conn: AsyncConnection) -> None:
            # These keys' old failures (their window is the caller's), and anyone's older
            # than any window, so that keys never seen again do not pile up.
            await conn.execute(delete(lf).where(lf.c.key.in_(stored), lf.c.at < forget_before))
            await conn.execute(delete(lf).where(lf.c.at < now - FAILURES_KEPT))
            await conn.execute(insert(lf), [{"key": k, "at": now} for k in stored])

        await self.write(job)

    async def clear_failures(self, keys: Sequence[str]) -> None:
        lf = t.login_failures

        async def job(conn: AsyncConnection) -> None:
            await conn.execute(delete(lf).where(lf.c.key.in_(_keys(keys))))

        await self.write(job)

    # -- ended sign-in sessions ------------------------------------------------------------
    async def end_session(self, session_id: str, expires_at: float, now: float) -> None:
        es = t.ended_sessions

        async def job(conn: AsyncConnection) -> None:
            await conn.execute(delete(es).where(es.c.expires_at < now))
            await conn.execute(self._dialect().insert(es).values(
                session_id=session_id, expires_at=expires_at).on_conflict_do_nothing())

        await self.write(job)

    async def session_ended(self, session_id: str) -> bool:
        es = t.ended_sessions
        return bool(await self._read(select(es.c.session_id)
                                     .where(es.c.session_id == session_id)))
