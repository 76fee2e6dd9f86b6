"""The first start of an installation: the one-time setup address.

Until the installation's own establishment (the first, ``default``) has an administrator
(or operator) who can sign in — active, with a password — every start of the server issues
a new setup token and prints the address ``/setup?token=…``, where the person at the
server creates that administrator. Only the token's SHA-256 is kept, in the store's
``meta`` table, so every HTTP process and every server of the installation agrees on it;
issuing a new one forgets the previous one. A token opens the page once, for at most
``LIFETIME`` seconds; using it is one compare-and-swap in the store, so two people racing
with the same address create one administrator, not two.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import shlex
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from postier.core.accounts import OPERATORS_ESTABLISHMENT
from postier.i18n import N_, system_language, translate
from postier.store.base import Store, User

log = logging.getLogger(__name__)

SETUP_KEY = "setup_token"
LIFETIME = 3600.0

Verdict = Literal["open", "used", "expired", "unknown"]


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def needs_setup(store: Store) -> bool:
    """Whether nobody can administer the installation from its web pages yet."""
    users = await store.list_users(OPERATORS_ESTABLISHMENT)
    return not any(u.is_admin and not u.disabled and u.password_hash for u in users)


async def issue(store: Store, now: float | None = None) -> str | None:
    """A new setup token (the previous one stops working), or None when an administrator
    can already sign in."""
    if not await needs_setup(store):
        return None
    token = secrets.token_urlsafe(32)
    issued_at = time.time() if now is None else now
    await store.set_meta(SETUP_KEY, json.dumps({"hash": _digest(token), "issued_at": issued_at,
                                                "used_at": None}))
    return token


@dataclass(frozen=True)
class Check:
    verdict: Verdict
    stored: str | None = None  # the meta value the verdict was read from


async def check(store: Store, token: str, now: float | None = None) -> Check:
    """What ``token`` opens now. A token that is not the current one is ``unknown``,
    whatever happened before: nothing is told about a token one does not hold."""
    stored = await store.get_meta(SETUP_KEY)
    try:
        doc = json.loads(stored) if stored else {}
        digest, issued_at = str(doc["hash"]), float(doc["issued_at"])
    except (ValueError, KeyError, TypeError):
        return Check("unknown")
    if not token or not secrets.compare_digest(digest, _digest(token)):
        return Check("unknown")
    if doc.get("used_at") is not None or not await needs_setup(store):
        return Check("used", stored)
    now = time.time() if now is None else now
    if not 0 <= now - issued_at <= LIFETIME:
        return Check("expired", stored)
    return Check("open", stored)


async def use(store: Store, token: str, create: Callable[[], Awaitable[User]]) -> Check | User:
    """Run ``create`` (making the administrator) once for this token: the user made, or the
    check that refused (the token was used meanwhile: ``used``). If ``create`` fails, the
    token opens the page again."""
    found = await check(store, token)
    if found.verdict != "open" or found.stored is None:
        return found
    doc = json.loads(found.stored)
    taken = json.dumps({**doc, "used_at": time.time()})
    if not await store.swap_meta(SETUP_KEY, found.stored, taken):
        return Check("used")
    try:
        return await create()
    except BaseException:
        await store.swap_meta(SETUP_KEY, taken, found.stored)
        raise


def address(host: str, port: int, token: str) -> str:
    """The setup address as printed at start (a wildcard host is reached on this machine)."""
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/setup?token={token}"


SETUP_MESSAGE = N_(
    "No administrator can sign in yet. Open this address within the hour to create the "
    "first one (it works once; each start prints a new one until then):\n  {address}\n"
    "or create one at this console:\n"
    "  {program} users add admin --email you@example.org --role admin --password-stdin "
    "--data-dir {data_dir}"
)


def _program() -> str:
    """How the person at the console runs this command (``.venv/bin/postier`` after
    ``make run``)."""
    argv0 = sys.argv[0] if sys.argv else ""
    return shlex.quote(argv0) if Path(argv0).name == "postier" else "postier"


async def announce(store: Store, host: str, port: int, data_dir: Path) -> str | None:
    """At the server's start: issue a setup token when needed and print its address, on
    standard output in the console's language and in the log; the address, or None."""
    token = await issue(store)
    if token is None:
        return None
    values = {"address": address(host, port, token), "program": _program(),
              "data_dir": shlex.quote(str(data_dir))}
    print(translate(system_language(), SETUP_MESSAGE, **values), flush=True)
    log.info(SETUP_MESSAGE.format(**values))
    return values["address"]
