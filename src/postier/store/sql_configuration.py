"""The SQL of the configuration: settings, sending profiles, the audit log, the
installation's values (``meta``), DKIM keys and the domains they hold
(:class:`postier.store.configuration.ConfigurationStore`)."""

from __future__ import annotations

import json
import time
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from postier.errors import Conflict, InvalidInput
from postier.i18n import N_
from postier.store import schema as t
from postier.store.records import AuditEntry, ProfileRecord
from postier.store.sql_base import SQLBase


def _profile(row: Any) -> ProfileRecord:
    return ProfileRecord(
        row.id, row.establishment_id, row.label, json.loads(row.data), row.created_at,
        row.updated_at,
    )


def _label_taken(label: str) -> InvalidInput:
    return InvalidInput(
        N_("A profile labelled {label!r} already exists: choose another label."),
        field="label",
        label=label,
    )


class SQLConfiguration(SQLBase):
    """Settings, profiles, DKIM keys and the audit log, in SQL."""

    # -- profiles and audit ----------------------------------------------------------------
    async def create_profile(
        self, establishment_id: int, label: str, data: dict[str, Any]
    ) -> ProfileRecord:
        now = time.time()
        doc = json.dumps(data, sort_keys=True)

        async def job(conn: AsyncConnection) -> int:
            res = await conn.execute(
                insert(t.profiles).values(
                    establishment_id=establishment_id, label=label, data=doc,
                    created_at=now, updated_at=now,
                )
            )
            return int(res.inserted_primary_key[0])  # type: ignore[index]

        try:
            profile_id = await self.write(job)
        except Conflict as exc:
            raise _label_taken(label) from exc
        return ProfileRecord(profile_id, establishment_id, label, data, now, now)

    async def update_profile(self, profile_id: int, label: str, data: dict[str, Any]) -> None:
        doc = json.dumps(data, sort_keys=True)

        async def job(conn: AsyncConnection) -> None:
            await conn.execute(
                update(t.profiles)
                .where(t.profiles.c.id == profile_id)
                .values(label=label, data=doc, updated_at=time.time())
            )

        try:
            await self.write(job)
        except Conflict as exc:
            raise _label_taken(label) from exc

    async def delete_profile(self, profile_id: int) -> bool:
        async def job(conn: AsyncConnection) -> int:
            res = await conn.execute(delete(t.profiles).where(t.profiles.c.id == profile_id))
            return int(res.rowcount)

        return bool(await self.write(job))

    async def get_profile(self, profile_id: int) -> ProfileRecord | None:
        rows = await self._read(select(t.profiles).where(t.profiles.c.id == profile_id))
        return _profile(rows[0]) if rows else None

    async def list_profiles(self, establishment_id: int) -> list[ProfileRecord]:
        rows = await self._read(
            select(t.profiles)
            .where(t.profiles.c.establishment_id == establishment_id)
            .order_by(t.profiles.c.label)
        )
        return [_profile(r) for r in rows]

    async def record_retrieval(self, profile_id: int, user_id: int) -> None:
        async def job(conn: AsyncConnection) -> None:
            await conn.execute(
                insert(t.profile_retrievals).values(
                    profile_id=profile_id, user_id=user_id, at=time.time()
                )
            )

        await self.write(job)

    async def audit(
        self,
        establishment_id: int,
        actor: str,
        action: str,
        target: str = "",
        details: dict[str, Any] | None = None,
    ) -> None:
        row = {
            "establishment_id": establishment_id,
            "at": time.time(),
            "actor": actor,
            "action": action,
            "target": target,
            "details": json.dumps(details or {}, sort_keys=True),
        }

        async def job(conn: AsyncConnection) -> None:
            await conn.execute(insert(t.audit_log).values(**row))

        await self.write(job)

    async def list_audit(self, establishment_id: int, limit: int = 200) -> list[AuditEntry]:
        rows = await self._read(
            select(t.audit_log)
            .where(t.audit_log.c.establishment_id == establishment_id)
            .order_by(t.audit_log.c.id.desc())
            .limit(limit)
        )
        return [
            AuditEntry(r.id, r.at, r.actor, r.action, r.target, json.loads(r.details))
            for r in rows
        ]

    async def get_meta(self, key: str) -> str | None:
        rows = await self._read(select(t.meta.c.value).where(t.meta.c.key == key))
        return str(rows[0].value) if rows else None

    async def set_meta(self, key: str, value: str) -> None:
        async def job(conn: AsyncConnection) -> None:
            res = await conn.execute(update(t.meta).where(t.meta.c.key == key).values(value=value))
            if res.rowcount == 0:
                await conn.execute(insert(t.meta).values(key=key, value=value))

        await self.write(job)

    async def swap_meta(self, key: str, expected: str, value: str) -> bool:
        async def job(conn: AsyncConnection) -> bool:
            res = await conn.execute(update(t.meta).where(
                t.meta.c.key == key, t.meta.c.value == expected).values(value=value))
            return bool(res.rowcount == 1)

        return bool(await self.write(job))

    async def save_dkim_key(
        self, establishment_id: int, domain: str, selector: str, private_enc: str,
        public_b64: str,
    ) -> None:
        async def job(conn: AsyncConnection) -> None:
            await conn.execute(delete(t.dkim_keys).where(
                t.dkim_keys.c.establishment_id == establishment_id,
                t.dkim_keys.c.domain == domain))
            await conn.execute(insert(t.dkim_keys).values(
                establishment_id=establishment_id, domain=domain, selector=selector,
                private_key_enc=private_enc, public_key=public_b64, created_at=time.time()))

        await self.write(job)

    async def list_dkim_keys(self, establishment_id: int) -> list[dict[str, Any]]:
        rows = await self._read(select(t.dkim_keys).where(
            t.dkim_keys.c.establishment_id == establishment_id).order_by(t.dkim_keys.c.domain))
        return [dict(r._mapping) for r in rows]

    async def delete_dkim_key(self, establishment_id: int, domain: str) -> bool:
        async def job(conn: AsyncConnection) -> int:
            res = await conn.execute(delete(t.dkim_keys).where(
                t.dkim_keys.c.establishment_id == establishment_id,
                t.dkim_keys.c.domain == domain))
            return int(res.rowcount)

        return bool(await self.write(job))

    # -- domains of a hosted installation ---------------------------------------------------
    async def all_settings(self) -> dict[int, dict[str, Any]]:
        rows = await self._read(select(t.settings.c.establishment_id, t.settings.c.data))
        return {int(r.establishment_id): json.loads(r.data) for r in rows}

    async def all_dkim_domains(self) -> list[tuple[int, str]]:
        rows = await self._read(select(t.dkim_keys.c.establishment_id, t.dkim_keys.c.domain))
        return [(int(r.establishment_id), str(r.domain)) for r in rows]

    async def move_dkim_key(self, from_id: int, to_id: int, domain: str) -> bool:
        keys = t.dkim_keys.c

        async def job(conn: AsyncConnection) -> bool:
            held = await conn.execute(select(keys.establishment_id).where(
                keys.domain == domain, keys.establishment_id.in_((from_id, to_id))))
            owners = {int(r.establishment_id) for r in held}
            if from_id not in owners:
                return False
            mine = (keys.establishment_id == from_id) & (keys.domain == domain)
            if to_id in owners:  # the receiving establishment's own key stays
                await conn.execute(delete(t.dkim_keys).where(mine))
            else:
                await conn.execute(update(t.dkim_keys).where(mine).values(
                    establishment_id=to_id))
            return True

        return bool(await self.write(job))

    # -- settings ------------------------------------------------------------------------
    async def load_settings(self, establishment_id: int) -> tuple[dict[str, Any], float] | None:
        rows = await self._read(
            select(t.settings.c.data, t.settings.c.updated_at).where(
                t.settings.c.establishment_id == establishment_id
            )
        )
        if not rows:
            return None
        return json.loads(rows[0].data), rows[0].updated_at

    async def save_settings(self, establishment_id: int, data: dict[str, Any]) -> None:
        doc = json.dumps(data, sort_keys=True)

        async def job(conn: AsyncConnection) -> None:
            now = time.time()
            res = await conn.execute(
                update(t.settings)
                .where(t.settings.c.establishment_id == establishment_id)
                .values(data=doc, updated_at=now)
            )
            if res.rowcount == 0:
                await conn.execute(
                    insert(t.settings).values(
                        establishment_id=establishment_id, data=doc, updated_at=now
                    )
                )

        await self.write(job)
