"""Changes an operator or an administrator makes from the server's console, done here so
that each is audited like the same change made through the API: disabling an
establishment, setting a user's password for them.

The console passes its own identity as ``actor`` (:data:`postier.cli.common.CONSOLE`);
the audit log then says "console" for who did it.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from postier.core import accounts
from postier.store.base import Establishment, User

if TYPE_CHECKING:
    from postier.core.service import Postier


async def disable_establishment(core: Postier, actor: User, establishment: Establishment
                                ) -> None:
    """Its users can no longer sign in or send. The entry goes to the establishment's own
    audit log, where its administrators and the operators read it."""
    await core.store.update_establishment(establishment.id, disabled=True)
    core.forget_tokens()
    await core.store.audit(establishment.id, actor.username, "establishment.disable",
                           establishment.slug, {})


async def set_password(core: Postier, actor: User, user: User, password: str) -> None:
    """A new password for ``user`` (checked for length by the caller): their open sessions
    end, since a session is tied to the password it was opened with."""
    digest = await asyncio.to_thread(accounts.hash_password, password)
    await core.store.update_user(user.id, password_hash=digest)
    core.forget_tokens()
    await core.store.audit(user.establishment_id, actor.username, "user.password",
                           user.username, {})
