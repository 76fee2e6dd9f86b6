"""Passwords and API tokens.

Passwords are hashed with argon2id. API tokens are 256-bit random strings shown once; only
their SHA-256 is stored (a random token needs no slow hash, and lookups stay one indexed
query per request).
"""

from __future__ import annotations

import hashlib
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

TOKEN_PREFIX = "pst_"  # noqa: S105 - a prefix, not a secret
# "relay": the account another Postier server hands its e-mails on with; it may send as
# any address (the downstream server applied its own policy), this server's policy applies.
ROLES = ("admin", "user", "operator", "relay")

_hasher = PasswordHasher()


def hash_password(password: str) -> str:
    return str(_hasher.hash(password))


def verify_password(password_hash: str | None, password: str) -> bool:
    if not password_hash:
        return False
    try:
        return bool(_hasher.verify(password_hash, password))
    except (VerificationError, InvalidHashError):
        return False


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
