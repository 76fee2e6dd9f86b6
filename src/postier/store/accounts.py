"""The accounts part of the store: establishments, users, their API tokens and sender
addresses, failed sign-ins (the throttling's) and ended sign-in sessions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from postier.store.records import Establishment, SenderAddress, TokenInfo, User


class AccountStore(Protocol):
    """Who may send: establishments, users and their credentials."""

    # -- establishments --------------------------------------------------------------------
    async def get_establishment(self, slug_or_id: str | int) -> Establishment | None: ...

    async def create_establishment(self, slug: str, name: str, hosted: bool) -> Establishment:
        """Raises Conflict when the slug is taken."""

    async def list_establishments(self) -> list[Establishment]: ...

    async def update_establishment(self, establishment_id: int, **values: Any) -> None: ...

    # -- users -----------------------------------------------------------------------------
    async def find_users(
        self, *, username: str | None = None, email: str | None = None
    ) -> list[User]:
        """Users of every establishment with this username or e-mail address."""

    async def create_user(
        self,
        *,
        establishment_id: int,
        username: str,
        email: str,
        display_name: str,
        role: str,
        password_hash: str | None,
    ) -> User: ...

    async def get_user(
        self, *, user_id: int | None = None, establishment_id: int | None = None,
        username: str | None = None,
    ) -> User | None: ...

    async def list_users(self, establishment_id: int) -> list[User]: ...

    async def update_user(self, user_id: int, **values: Any) -> None: ...

    # -- API tokens ------------------------------------------------------------------------
    async def create_token(self, user_id: int, name: str, token_hash: str) -> TokenInfo: ...

    async def user_for_token(self, token_hash: str) -> User | None:
        """The active user owning an unrevoked token, or None."""

    async def list_tokens(self, user_id: int) -> list[TokenInfo]: ...

    async def revoke_token(self, user_id: int, token_id: int) -> bool: ...

    async def revoke_all_tokens(self, user_id: int) -> int: ...

    # -- sender address verification (postier.core.sender_verification) --------------------
    async def list_sender_addresses(self, user_id: int) -> list[SenderAddress]:
        """The user's verified and pending addresses, by address."""

    async def start_sender_code(
        self, *, establishment_id: int, user_id: int, address: str, code_hash: str,
        expires_at: float, now: float, min_interval: float, day_limit: int,
    ) -> float:
        """Store a new code for the user's address (the previous one stops counting, and
        so do wrong attempts) and record that a code was sent — in one transaction, unless
        a code for this address was sent less than ``min_interval`` seconds ago or the user
        was sent ``day_limit`` codes in the last 24 hours. Returns 0 when stored, else the
        seconds to wait."""

    async def check_sender_code(
        self, *, user_id: int, address: str, code_hash: str, now: float, max_failures: int,
    ) -> tuple[str, int]:
        """Compare a code with the user's waiting one, in one transaction. Returns
        (outcome, wrong attempts left): ``verified``, ``wrong``, ``locked`` (too many wrong
        codes: the code is void), ``expired``, ``no_code``."""

    async def delete_sender_address(self, user_id: int, address: str) -> bool: ...

    # -- failed sign-ins (the web pages' and SMTP AUTH's throttling) -----------------------
    async def recent_failures(self, keys: Sequence[str], since: float) -> dict[str, list[float]]:
        """The times of the failures recorded under each key since ``since``, oldest first
        (keys without any are absent)."""

    async def add_failure(self, keys: Sequence[str], now: float, forget_before: float) -> None:
        """Record one failure under each key, and forget these keys' failures older than
        ``forget_before`` (and any key's older than a day)."""

    async def clear_failures(self, keys: Sequence[str]) -> None: ...

    # -- sign-in sessions ended by signing out (the web pages') ----------------------------
    async def end_session(self, session_id: str, expires_at: float, now: float) -> None:
        """Remember that this session ended, until ``expires_at`` when it would have
        expired anyway; forget the ended sessions expired by ``now``."""

    async def session_ended(self, session_id: str) -> bool: ...
