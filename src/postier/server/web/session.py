"""Sign-in sessions of the pages and their CSRF token.

A session is a small JSON document sealed with the installation's secret box (Fernet:
encrypted and authenticated), kept in an HttpOnly, SameSite=Lax cookie: every process
sharing the secret key understands it. It names the user, carries the session's id, its
CSRF token and a fingerprint of the user's password hash, so that a password reset ends
every session of that user; a disabled user's session ends at once because the user is
read again on every request. Signing out ends the session in the store (its id is kept
until the session would have expired anyway): a copy of the cookie, replayed after, opens
nothing, whichever process reads it. Failed sign-ins are throttled by
the service layer's sign-in (postier.core.authentication), the same rule as SMTP
AUTH's.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import asdict, dataclass

from postier.core.service import Postier
from postier.errors import PostierError
from postier.store.base import User

SESSION_COOKIE = "postier_session"
LOGIN_CSRF_COOKIE = "postier_login_csrf"
SESSION_LIFETIME = 12 * 3600  # a school day; then sign in again


@dataclass(frozen=True)
class Session:
    id: str
    user_id: int
    establishment_id: int
    csrf: str
    issued_at: float
    password_fp: str

    @property
    def expires_at(self) -> float:
        return self.issued_at + SESSION_LIFETIME

    @property
    def expired(self) -> bool:
        return time.time() > self.expires_at


def password_fingerprint(user: User) -> str:
    return hashlib.sha256((user.password_hash or "").encode()).hexdigest()[:16]


def new_session(user: User) -> Session:
    return Session(
        id=secrets.token_urlsafe(24),
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
            id=str(doc["id"]),
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
    """The session's user, if they may still use it (not signed out, active, same
    password)."""
    user = await core.session_user(session.user_id, session.id)
    if (
        user is None
        or user.establishment_id != session.establishment_id
        or not secrets.compare_digest(password_fingerprint(user), session.password_fp)
    ):
        return None
    return user


async def end_session(core: Postier, session: Session) -> None:
    """Signing out: the session opens nothing any more, even from a copy of its cookie."""
    await core.end_session(session.id, session.expires_at)


def same_token(given: str | None, expected: str) -> bool:
    return bool(given) and secrets.compare_digest(str(given), expected)
