"""Accounts made and found without a role check: what the console, the setup page and
:class:`~postier.core.administration.Administration` (which checks roles and writes the
audit log) build on."""

from __future__ import annotations

import asyncio
import re

from postier.core import accounts, policy
from postier.core.installation import Installation
from postier.errors import InvalidInput, NotFound
from postier.i18n import N_
from postier.store.base import Establishment, TokenInfo, User


class UserAccounts:
    """Creating establishments, users and API tokens; finding a user."""

    def __init__(self, installation: Installation) -> None:
        self.installation = installation
        self.store = installation.store

    async def add_establishment(self, slug: str, name: str, hosted: bool = False) -> Establishment:
        slug = slug.strip().lower()
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]{1,62}", slug):
            raise InvalidInput(
                N_("An establishment's short name is 2 to 63 lower-case letters, digits or "
                   "hyphens (for example clg-jean-moulin)."),
                field="slug",
            )
        return await self.store.create_establishment(slug, name.strip() or slug, hosted)

    async def add_user(
        self,
        username: str,
        email: str,
        *,
        display_name: str = "",
        role: str = "user",
        password: str | None = None,
        establishment_id: int = 1,
    ) -> User:
        if role not in accounts.ROLES:
            raise InvalidInput(
                N_("Unknown role {role!r}: choose admin, user, operator or relay."),
                field="role", role=role,
            )
        accounts.check_placement(role, establishment_id)
        username = username.strip()
        if not username or len(username) > 100 or any(c.isspace() for c in username):
            raise InvalidInput(
                N_("A username is 1 to 100 characters without spaces."), field="username"
            )
        address = policy.normalize_address(email)
        if any(c in display_name for c in "\r\n\0"):
            raise InvalidInput(N_("The name cannot contain line breaks."), field="name")
        pw_hash = await asyncio.to_thread(accounts.hash_password, password) if password else None
        return await self.store.create_user(
            establishment_id=establishment_id,
            username=username,
            email=address,
            display_name=display_name.strip(),
            role=role,
            password_hash=pw_hash,
        )

    async def find_user(self, username: str, establishment_id: int = 1) -> User:
        user = await self.store.get_user(establishment_id=establishment_id, username=username)
        if user is None:
            raise NotFound(N_("There is no user named {username}."), username=username)
        return user

    async def create_token(self, user: User, name: str = "") -> tuple[str, TokenInfo]:
        token = accounts.new_token()
        info = await self.store.create_token(user.id, name, accounts.token_hash(token))
        return token, info
