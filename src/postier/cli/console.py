"""What the commands run at the server's console share: the ``--establishment`` option, the
establishment and the user it names, the console's identity in an establishment.

They work on the same data as the server (``--data-dir`` or ``POSTIER_DATA_DIR``,
``--database-url`` or ``POSTIER_DATABASE_URL``), also while it runs.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated

import typer

from postier.cli.common import CONSOLE
from postier.core.service import Postier
from postier.errors import NotFound
from postier.i18n import N_, translate
from postier.store.base import Establishment, User

EstablishmentOption = Annotated[str | None, typer.Option(
    "--establishment", help=N_("Short name of the establishment (default: the first one)"))]


async def named_establishment(core: Postier, slug: str | None) -> Establishment:
    """The establishment a command names (the first one when the name is empty)."""
    est = await core.establishment(slug or 1)
    if est is None:
        raise NotFound(N_("There is no establishment {slug} for you."), slug=slug)
    return est


async def establishment_id_of(core: Postier, slug: str | None) -> int:
    """The id of the establishment a command names: the first one's when none is named."""
    return (await named_establishment(core, slug)).id if slug else 1


async def member(core: Postier, login: str, establishment: str | None) -> User:
    """A user named at the console: a username or an e-mail address of the establishment
    given (--establishment, else the first one), or ``slug:username`` for another's. The
    same name in another establishment never changes whom it finds."""
    if ":" in login:
        found = await core.login_candidates(login)
    else:
        est_id = await establishment_id_of(core, establishment)
        named = [u for u in await core.login_candidates(login) if u.establishment_id == est_id]
        found = [u for u in named if u.username == login.strip()] or named
    if len(found) != 1:
        raise NotFound(N_("There is no user named {username} in this establishment."),
                       hint=N_("Name the establishment with --establishment, or write "
                               "slug:username."), username=login)
    return found[0]


async def console_actor(core: Postier, establishment: str | None) -> User:
    """The console, acting as an administrator of ``establishment`` (the first if None)."""
    return dataclasses.replace(CONSOLE,
                               establishment_id=await establishment_id_of(core, establishment))


def state_word(disabled: bool, lang: str) -> str:
    """An establishment's or a user's state, as the console names it."""
    return translate(lang, N_("disabled") if disabled else N_("active"))
