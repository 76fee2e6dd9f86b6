"""Failed sign-ins and the waits they impose: one rule for every door where a password is
given (the web pages' sign-in form, SMTP AUTH).

Failures are counted in the store, so the counts hold across every process and server of
the installation, and the two doors' failures add up. Within ``WINDOW`` seconds, attempts
are held back past one of three ceilings:

- ``SOURCE_LIMIT`` failures for an account from one client address: a guesser is held
  back, while the rightful user, from another address, still signs in;
- ``ACCOUNT_LIMIT`` failures for an account from any address, far higher: a guesser
  spread over many addresses is still slowed, yet no stranger locks a person out by
  failing a few times;
- ``ADDRESS_LIMIT`` failures from one address, whatever the account (a school is often one
  address behind its router, hence more than for one account).

The setup page's one-time address (:mod:`postier.core.first_run`) is held back the same
way: ``SETUP_LIMIT`` wrong tokens from one client address (:class:`SetupThrottle`).

A name that names no account is counted like an account, so the answers never tell
whether it exists. A held-back attempt is refused without its password being checked, for
``FIRST_WAIT`` seconds doubled by each further failure, at most ``LONGEST_WAIT``. When a
name names several accounts (establishments sharing a username), only those not held back
may be opened.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from postier.store.base import (
    SIGN_IN_DOORS,
    Store,
    User,
    account_key,
    address_key,
    name_key,
    source_key,
)

WINDOW = 15 * 60
FIRST_WAIT = 30.0
LONGEST_WAIT = 15 * 60.0


def held_back(recent: list[float], limit: int, now: float) -> float:
    """Seconds to wait after the failures at times ``recent`` (sorted), past ``limit``:
    ``FIRST_WAIT`` doubled by each further failure, at most ``LONGEST_WAIT``."""
    if len(recent) < limit:
        return 0.0
    wait = min(LONGEST_WAIT, FIRST_WAIT * 2.0 ** (len(recent) - limit))
    return max(0.0, recent[-1] + wait - now)


@dataclass(frozen=True)
class Admission:
    """The accounts a sign-in may try now; none, and ``wait`` seconds, when held back."""

    accounts: list[User]
    wait: float
    # The keys with failures counted now: a sign-in that succeeds clears only those, so an
    # ordinary sign-in writes nothing (and goes through while the store cannot write).
    failing: frozenset[str] = frozenset()


class SignInThrottle:
    """Counts failed sign-ins at one door (``web`` or ``smtp``) and says who may try."""

    WINDOW = WINDOW
    SOURCE_LIMIT = 5
    ACCOUNT_LIMIT = 100
    ADDRESS_LIMIT = 20
    FIRST_WAIT = FIRST_WAIT
    LONGEST_WAIT = LONGEST_WAIT

    def __init__(self, store: Store, door: str) -> None:
        self.store = store
        self.door = door

    @staticmethod
    def identity(door: str, login: str, user: User | None) -> str:
        """The key a sign-in counts under: the account's, or the name's when it names none."""
        return (account_key(door, user.establishment_id, user.username) if user is not None
                else name_key(door, login))

    def _wait(self, recent: list[float], limit: int, now: float) -> float:
        return held_back(recent, limit, now)

    async def admit(self, login: str, candidates: Sequence[User], address: str,
                    now: float | None = None) -> Admission:
        """Which of the accounts ``login`` names may be tried from ``address`` now."""
        now = time.time() if now is None else now
        named: list[User | None] = [*candidates] or [None]
        idents = [[self.identity(door, login, u) for door in SIGN_IN_DOORS] for u in named]
        addresses = [address_key(door, address) for door in SIGN_IN_DOORS]
        keys = [*addresses, *(k for keys in idents for k in keys),
                *(source_key(k, address) for keys in idents for k in keys)]
        recent = await self.store.recent_failures(keys, now - self.WINDOW)

        def wait(keys: Iterable[str], limit: int) -> float:
            return self._wait(sorted(t for k in keys for t in recent.get(k, [])), limit, now)

        waits = [max(wait(keys, self.ACCOUNT_LIMIT),
                     wait((source_key(k, address) for k in keys), self.SOURCE_LIMIT))
                 for keys in idents]
        held = max(wait(addresses, self.ADDRESS_LIMIT), min(waits))
        if held > 0:
            return Admission([], held, frozenset(recent))
        return Admission([u for u, w in zip(named, waits, strict=True)
                          if u is not None and w == 0], 0.0, frozenset(recent))

    async def failed(self, login: str, tried: Sequence[User], address: str,
                     now: float | None = None) -> None:
        """A wrong password for the accounts tried (for the name, when it names none)."""
        now = time.time() if now is None else now
        named: list[User | None] = [*tried] or [None]
        idents = [self.identity(self.door, login, u) for u in named]
        keys = [address_key(self.door, address), *idents,
                *(source_key(k, address) for k in idents)]
        await self.store.add_failure(keys, now, forget_before=now - self.WINDOW)

    async def succeeded(self, user: User, address: str, admission: Admission) -> None:
        # Only this account from this address is cleared: the address keeps its count (one
        # good account must not clear a password sweep), the account its own (a right
        # password from here must not clear a guesser's count from everywhere).
        keys = [source_key(self.identity(door, "", user), address) for door in SIGN_IN_DOORS]
        keys = [k for k in keys if k in admission.failing]
        if keys:
            await self.store.clear_failures(keys)


class SetupThrottle:
    """Wrong setup tokens from one client address, counted in the store like failed
    sign-ins and held back by the same rule."""

    SETUP_LIMIT = 10

    def __init__(self, store: Store) -> None:
        self.store = store

    @staticmethod
    def _key(address: str) -> str:
        return f"setup:a:{address}"

    async def wait(self, address: str, now: float | None = None) -> float:
        """Seconds the client ``address`` must wait before trying another token."""
        now = time.time() if now is None else now
        key = self._key(address)
        recent = (await self.store.recent_failures([key], now - WINDOW)).get(key, [])
        return held_back(sorted(recent), self.SETUP_LIMIT, now)

    async def failed(self, address: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        await self.store.add_failure([self._key(address)], now, forget_before=now - WINDOW)
