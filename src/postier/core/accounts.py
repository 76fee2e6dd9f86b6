"""Roles and ranks, passwords and API tokens.

Passwords are hashed with argon2id. API tokens are 256-bit random strings shown once; only
their SHA-256 is stored (a random token needs no slow hash, and lookups stay one indexed
query per request).
"""

from __future__ import annotations

import hashlib
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from postier.errors import Forbidden, InvalidInput
from postier.i18n import N_
from postier.store.base import User

TOKEN_PREFIX = "pst_"  # noqa: S105 - a prefix, not a secret
# "relay": the account another Postier server hands its e-mails on with; it may send as
# any address (the downstream server applied its own policy), this server's policy applies.
ROLES = ("admin", "user", "operator", "relay")
# Who may act on whom: an account's password, role, tokens, state and data are changed or
# read only by someone of its rank or above (the server's console excepted). A relay account
# sends as anybody but administers nothing: it ranks with users.
RANKS = {"user": 0, "relay": 0, "admin": 1, "operator": 2}


# Operator accounts live in the installation's own establishment (the first, `default`),
# never in a school's: no establishment's administrator holds one, and the rank rule keeps
# the administrators of `default` off them.
OPERATORS_ESTABLISHMENT = 1


def rank(role: str) -> int:
    return RANKS.get(role, 0)


def check_placement(role: str, establishment_id: int) -> None:
    """An operator account is made only in the installation's own establishment."""
    if role == "operator" and establishment_id != OPERATORS_ESTABLISHMENT:
        raise InvalidInput(
            N_("Operator accounts live in the installation's own establishment (default), "
               "never in a school's."),
            hint=N_("Create the operator account in the default establishment: it serves "
                    "every establishment from there."),
            field="role",
        )

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


def require_admin(user: User) -> None:
    if not user.is_admin:
        raise Forbidden(N_("Only an administrator of the establishment may do this."))


def no_escalation(actor: User, role: str | None) -> None:
    """Nobody gives a role that outranks their own: only an operator (who serves every
    establishment) makes operators."""
    if role is not None and rank(role) > rank(actor.role):
        raise Forbidden(N_("Only an operator of the installation may give the operator role."))


def may_act_on(actor: User, target: User) -> None:
    """Nobody acts on an account whose role outranks their own: an establishment's
    administrator never sets an operator's password, tokens, role, state or reads its data."""
    if target.id != actor.id and rank(target.role) > rank(actor.role):
        raise Forbidden(
            N_("The account {username} outranks yours: only an operator of the installation "
               "may change it."),
            username=target.username,
        )
