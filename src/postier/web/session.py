"""Sign-in sessions of the pages, their CSRF token, and the throttling of failed sign-ins.

A session is a small JSON document sealed with the installation's secret box (Fernet:
encrypted and authenticated), kept in an HttpOnly, SameSite=Lax cookie: nothing to store
on the server, and every process sharing the secret key understands it. It names the user,
carries the session's CSRF token and a fingerprint of the user's password hash, so that a
password reset ends every session of that user; a disabled user's session ends at once
because the user is read again on every request.

Throttling is kept in the memory of the process: after ``USER_LIMIT`` failures for a
username (or ``ADDRESS_LIMIT`` from one address — a school is often one address behind its
router, hence the higher limit) within ``WINDOW`` seconds, further attempts are refused
without checking the password, for a wait that doubles with each new failure.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import asdict, dataclass

from postier.errors import PostierError
from postier.service import Postier
from postier.store.base import User

SESSION_COOKIE = "postier_session"
LOGIN_CSRF_COOKIE = "postier_login_csrf"
SESSION_LIFETIME = 12 * 3600  # a school day; then sign in again


@dataclass(frozen=True)
class Session:
    user_id: int
    establishment_id: int
    csrf: str
    issued_at: float
    password_fp: str

    @property
    def expired(self) -> bool:
        return time.time() - self.issued_at > SESSION_LIFETIME


def password_fingerprint(user: User) -> str:
    return hashlib.sha256((user.password_hash or "").encode()).hexdigest()[:16]


def new_session(user: User) -> Session:
    return Session(
        user_id=user.id,
        establishment_id=user.establishment_id,
        csrf=secrets.token_urlsafe(32),
        issued_at=time.time(),
        password_fp=password_fingerprint(user),
    )


def seal(core: Postier, session: Session) -> str:
    return core.secrets.encrypt(json.dumps(asdict(session), separators=(",", ":")))


def unseal(core: Postier, value: str | None) -> Session | None:
    if not value or len(value) > 4096:
        return None
    try:
        doc = json.loads(core.secrets.decrypt(value))
        session = Session(
            user_id=int(doc["user_id"]),
            establishment_id=int(doc["establishment_id"]),
            csrf=str(doc["csrf"]),
            issued_at=float(doc["issued_at"]),
            password_fp=str(doc["password_fp"]),
        )
    except (PostierError, ValueError, KeyError, TypeError):
        return None
    return None if session.expired else session


async def session_user(core: Postier, session: Session) -> User | None:
    """The session's user, if they may still use it (active, same password)."""
    user = await core.store.get_user(user_id=session.user_id)
    if (
        user is None
        or user.disabled
        or user.establishment_id != session.establishment_id
        or not secrets.compare_digest(password_fingerprint(user), session.password_fp)
    ):
        return None
    return user


def same_token(given: str | None, expected: str) -> bool:
    return bool(given) and secrets.compare_digest(str(given), expected)


class LoginThrottle:
    """Counts recent failed sign-ins per username and per client address."""

    WINDOW = 15 * 60
    USER_LIMIT = 5
    ADDRESS_LIMIT = 20
    FIRST_WAIT = 30.0
    LONGEST_WAIT = 15 * 60.0
    MAX_KEYS = 10_000

    def __init__(self) -> None:
        self._failures: dict[str, list[float]] = {}

    def _recent(self, key: str, now: float) -> list[float]:
        kept = [t for t in self._failures.get(key, ()) if now - t < self.WINDOW]
        if kept:
            self._failures[key] = kept
        else:
            self._failures.pop(key, None)
        return kept

    def _wait(self, key: str, limit: int, now: float) -> float:
        recent = self._recent(key, now)
        if len(recent) < limit:
            return 0.0
        wait = min(self.LONGEST_WAIT, self.FIRST_WAIT * 2.0 ** (len(recent) - limit))
        return max(0.0, recent[-1] + wait - now)

    def wait_for(self, username: str, address: str, now: float | None = None) -> float:
        """Seconds to wait before this username may try again from this address (0: now)."""
        now = time.time() if now is None else now
        return max(
            self._wait("u:" + username.casefold(), self.USER_LIMIT, now),
            self._wait("a:" + address, self.ADDRESS_LIMIT, now),
        )

    def failed(self, username: str, address: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        if len(self._failures) > self.MAX_KEYS:
            for key in list(self._failures):
                self._recent(key, now)
        for key in ("u:" + username.casefold(), "a:" + address):
            self._failures.setdefault(key, []).append(now)

    def succeeded(self, username: str) -> None:
        # The address keeps its count: one good account must not clear a password sweep.
        self._failures.pop("u:" + username.casefold(), None)
