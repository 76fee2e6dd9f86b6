"""Who is asking: API tokens, passwords given at a door's sign-in (the web pages' form,
SMTP AUTH), the sessions of the pages, and an operator acting in an establishment.

Every door signs in through :meth:`Authentication.sign_in`, so one throttle
(:mod:`postier.core.sign_in_throttle`) holds back guessers the same way everywhere.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

from postier.core import accounts
from postier.core.installation import SETTINGS_TTL, Installation
from postier.core.sign_in_throttle import SignInThrottle
from postier.errors import AuthenticationRequired, NotFound
from postier.i18n import N_
from postier.store.base import SIGN_IN_DOORS, User


@dataclass(frozen=True)
class SignIn:
    """What a sign-in at a door gave: the account, or none (``wait`` seconds when the
    attempt was held back without its secret being checked)."""

    user: User | None
    wait: float = 0.0


class Authentication:
    """Tokens, passwords, sign-ins and sessions."""

    def __init__(self, installation: Installation) -> None:
        self.installation = installation
        self.store = installation.store
        self._throttles = {door: SignInThrottle(self.store, door) for door in SIGN_IN_DOORS}

    async def authenticate_token(self, token: str | None) -> User:
        if not token:
            raise AuthenticationRequired()
        digest = accounts.token_hash(token)
        now = time.monotonic()
        tokens = self.installation.token_cache
        cached = tokens.get(digest)
        if cached is not None and now - cached[1] < SETTINGS_TTL:
            user: User | None = cached[0]
        else:
            # One indexed query per token every few seconds rather than per request: the
            # hot path of submission. Changes made here forget the cache at once (see
            # Installation.forget_tokens); another process's changes count after
            # SETTINGS_TTL.
            user = await self.store.user_for_token(digest)
            if user is not None:
                if len(tokens) > 10_000:
                    tokens.clear()
                tokens[digest] = (user, now)
        if user is None:
            raise AuthenticationRequired(
                N_("This API token is not valid (unknown, revoked, or its user is disabled).")
            )
        return user

    async def login_candidates(self, login: str) -> list[User]:
        """The accounts a name given at sign-in may mean. ``slug:username`` names one
        account of one establishment; a username or an e-mail address may name accounts of
        several establishments, and the password then tells which (check_password): what
        one establishment creates never changes how another's people sign in."""
        login = login.strip()
        if ":" in login:
            slug, _, username = login.partition(":")
            est = await self.installation.establishment(slug) if slug else None
            user = (await self.store.get_user(establishment_id=est.id, username=username)
                    if est is not None else None)
            return [user] if user is not None else []
        found = await self.store.find_users(username=login) if login else []
        if "@" in login:
            named = {u.id for u in found}
            found += [u for u in await self.store.find_users(email=login)
                      if u.id not in named]
        return found

    async def check_password(self, candidates: Sequence[User], password: str) -> User:
        """The one account among ``candidates`` that this password opens (an active account
        of an active establishment). Every candidate's hash is verified, never stopping
        early, and a dummy hash stands in when there is no candidate (or no password): the
        answer takes as long for an unknown name as for a known one, whichever matched. A
        password that opens two accounts opens none."""
        hashes = [u.password_hash for u in candidates] or [None]
        matches = await asyncio.to_thread(_verify_each, hashes, password)
        opened = []
        for user, match in zip(candidates, matches, strict=False):
            if match and await self._may_sign_in(user):
                opened.append(user)
        if len(opened) != 1:
            raise AuthenticationRequired(N_("Wrong username or password."))
        return opened[0]

    async def authenticate_password(self, login: str, password: str) -> User:
        """The account a sign-in names (see login_candidates) and its password opens."""
        return await self.check_password(await self.login_candidates(login), password)

    async def sign_in(self, door: str, login: str, secret: str, address: str, *,
                      token_as_password: bool = False) -> SignIn:
        """A sign-in at ``door`` (``web`` or ``smtp``) from the client ``address``, held
        back by the sign-in throttle: the account ``secret`` opens among those ``login``
        names. With ``token_as_password``, an API token of one of those accounts opens it
        too (mail programs and copiers know only a username and a password)."""
        throttle = self._throttles[door]
        admitted = await throttle.admit(login, await self.login_candidates(login), address)
        if admitted.wait > 0:
            return SignIn(None, admitted.wait)
        try:
            if token_as_password and secret.startswith(accounts.TOKEN_PREFIX):
                user = await self._token_among(admitted.accounts, secret)
            else:
                user = await self.check_password(admitted.accounts, secret)
        except AuthenticationRequired:
            await throttle.failed(login, admitted.accounts, address)
            return SignIn(None)
        await throttle.succeeded(user, address, admitted)
        return SignIn(user)

    async def _token_among(self, named: Sequence[User], token: str) -> User:
        user = await self.authenticate_token(token)
        # The token must be one of the named accounts'.
        if user.id not in {u.id for u in named}:
            raise AuthenticationRequired(N_("Wrong username or password."))
        return user

    async def _may_sign_in(self, user: User) -> bool:
        if user.disabled:
            return False
        est = await self.installation.establishment(user.establishment_id)
        return est is not None and not est.disabled

    async def act_in(self, user: User, slug: str) -> User:
        """The operator ``user`` acting in the establishment ``slug``; anybody else may only
        name their own establishment."""
        est = await self.installation.establishment(slug)
        if est is None or (not user.is_operator and est.id != user.establishment_id):
            # Another establishment does not exist for those who may not see it.
            raise NotFound(N_("There is no establishment {slug} for you."), slug=slug)
        return dataclasses.replace(user, establishment_id=est.id)

    # -- the pages' sessions -------------------------------------------------------------
    async def session_user(self, user_id: int, session_id: str) -> User | None:
        """The active account a session of the pages names, unless it was signed out."""
        user = await self.store.get_user(user_id=user_id)
        if user is None or user.disabled or await self.store.session_ended(session_id):
            return None
        return user

    async def end_session(self, session_id: str, expires_at: float) -> None:
        """Signing out: the session opens nothing any more, even from a copy of its
        cookie (its id is kept until it would have expired anyway)."""
        await self.store.end_session(session_id, expires_at, time.time())


def _verify_each(hashes: Sequence[str | None], password: str) -> list[bool]:
    """One argon2 verification per hash; the dummy's, never a match, for a missing one."""
    return [accounts.verify_password(h or _dummy_hash(), password) and bool(h)
            for h in hashes]


@functools.cache
def _dummy_hash() -> str:
    """The hash of a password nobody knows, made as every other (at the same cost)."""
    return accounts.hash_password(secrets.token_urlsafe(32))
