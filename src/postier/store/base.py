"""The storage interface every backend implements, and the records it returns.

The service layer and the delivery engine only see this interface; SQL stays in the
backends. Status values of a message: ``queued`` (waiting for its first attempt),
``sending`` (claimed by a worker under a lease), ``deferred`` (waiting for a retry),
``sent``, ``failed``, ``cancelled``. A recipient is ``pending``, ``sent``, ``deferred`` or
``failed``; a recipient that is ``sent`` is never attempted again.
"""

from __future__ import annotations

import abc
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

# What a process does with the store: accept and deliver ("all": a server delivering in
# its own process, the CLI), accept only, or deliver only. The embedded SQLite store
# writes differently for each (store/sqlite.py); PostgreSQL needs no such hint.
Role = Literal["all", "accept", "deliver"]
ROLES: tuple[Role, ...] = ("all", "accept", "deliver")

QUEUED, SENDING, DEFERRED, SENT, FAILED, CANCELLED = (
    "queued",
    "sending",
    "deferred",
    "sent",
    "failed",
    "cancelled",
)
STATUSES = (QUEUED, SENDING, DEFERRED, SENT, FAILED, CANCELLED)
FINAL_STATUSES = (SENT, FAILED, CANCELLED)
PRIORITIES = {"normal": 0, "bulk": 1}


@dataclass(frozen=True)
class Establishment:
    id: int
    slug: str
    name: str
    hosted: bool
    disabled: bool


@dataclass(frozen=True)
class User:
    id: int
    establishment_id: int
    username: str
    email: str
    display_name: str
    role: str
    disabled: bool
    granted_senders: tuple[str, ...] = ()
    password_hash: str | None = field(default=None, repr=False)

    @property
    def is_admin(self) -> bool:
        """Administers its establishment (an operator administers every establishment)."""
        return self.role in ("admin", "operator")

    @property
    def is_operator(self) -> bool:
        return self.role == "operator"


@dataclass(frozen=True)
class TokenInfo:
    id: int
    user_id: int
    name: str
    created_at: float
    last_used_at: float | None
    revoked_at: float | None


@dataclass
class NewMessage:
    """A message accepted by a door, rendered and ready to be stored."""

    id: str
    establishment_id: int
    user_id: int
    priority: int
    envelope_from: str
    header_from: str
    message_id: str
    subject: str
    data: bytes
    recipients: Sequence[str]
    smtputf8: bool = False
    idempotency_key: str | None = None
    sender_rule: str | None = None


@dataclass(frozen=True)
class EnqueueResult:
    id: str
    status: str
    duplicate: bool
    sender_rule: str | None = None  # set by the service, not the store


@dataclass
class RecipientState:
    position: int
    address: str
    status: str
    code: int | None = None
    reply: str | None = None


@dataclass(frozen=True)
class AttemptRecord:
    started_at: float
    duration_ms: int
    relay: str
    outcome: str
    code: int | None
    detail: str | None  # English, for the log; what older attempts show
    # Why it did not deliver, as PostierError.dump's JSON: rendered in the reader's language
    # (postier.core.reasons); None when it delivered and for attempts recorded before it was kept.
    reason: str | None = None


@dataclass
class Claimed:
    """A message a worker holds under a lease, with everything delivery needs."""

    id: str
    establishment_id: int
    user_id: int
    envelope_from: str
    data: bytes
    smtputf8: bool
    attempts: int
    created_at: float
    recipients: list[RecipientState]
    priority: int = 0


@dataclass
class Outcome:
    """What one delivery attempt decided, written back in a batch by the worker."""

    message_id: str
    status: str
    attempts: int
    next_attempt_at: float
    last_error: str | None
    recipients: list[RecipientState]
    attempt: AttemptRecord


@dataclass
class MessageRecord:
    id: str
    establishment_id: int
    user_id: int
    status: str
    priority: int
    envelope_from: str
    header_from: str
    message_id: str
    subject: str
    size: int
    created_at: float
    updated_at: float
    next_attempt_at: float
    attempts: int
    last_error: str | None
    recipients: list[RecipientState] = field(default_factory=list)
    history: list[AttemptRecord] = field(default_factory=list)
    idempotency_key: str | None = None
    sender_rule: str | None = None


@dataclass
class ProfileRecord:
    id: int
    establishment_id: int
    label: str
    data: dict[str, Any]
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class SenderAddress:
    """An address a user verified, or is verifying with a code (sender verification)."""

    address: str
    verified_at: float | None
    code_expires_at: float | None  # a code is waiting until then (None: no code)
    failed_attempts: int


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: float
    actor: str
    action: str
    target: str
    details: dict[str, Any]


@dataclass(frozen=True)
class RelayLimits:
    """A relay's sending limits, shared by every worker (None: no such limit).

    ``hour`` and ``day`` are the lengths of the sliding windows, in seconds: always an hour
    and a day, except in tests that cannot wait that long."""

    per_minute: int | None = None
    per_hour: int | None = None
    recipients_per_day: int | None = None
    hour: float = 3600.0
    day: float = 86400.0

    @property
    def any(self) -> bool:
        return bool(self.per_minute or self.per_hour or self.recipients_per_day)


@dataclass
class RelayGrant:
    """The answer to a reservation of several e-mails on a relay.

    ``starts[i]`` is when e-mail ``i`` may start (its slot is counted), or None when it was
    refused; then ``blocked[i]`` says which limit (``pause``, ``minute``, ``hour``,
    ``day``) and ``resume_at[i]`` when asking again may succeed."""

    starts: list[float | None]
    blocked: list[str | None]
    resume_at: list[float]
    paused_until: float = 0.0
    pause: float = 0.0
    pause_error: str | None = None


@dataclass(frozen=True)
class PaceAsk:
    """One counter of the submission pace (``api_usage``): ``scope`` (``a:<user id>`` or
    ``e:<establishment id>``), ``span`` (``m`` minute, ``d`` day) and the current
    ``bucket``; ``need`` recipients must fit under ``limit``, and up to ``want`` are
    taken (what the asking process keeps for its next requests)."""

    scope: str
    span: str
    bucket: int
    need: int
    want: int
    limit: int


@dataclass(frozen=True)
class PaceGrant:
    """What a pace reservation gave: ``granted[i]`` for ``asks[i]`` (all counted), or,
    when ``refused`` is the index of an ask whose ``need`` did not fit, nothing at all;
    ``used`` is then what that counter already held."""

    granted: list[int]
    refused: int | None = None
    used: int = 0


@dataclass(frozen=True)
class RelayPause:
    """A relay's shared pause after a rate-limit reply: until when, how long the next
    one lasts if it asks again, and its reply (a dumped DeliveryError)."""

    paused_until: float
    pause: float
    error: str | None


@dataclass(frozen=True)
class RelayHealth:
    """A relay as every worker sees it: since when it keeps failing (None while it
    answers; wall-clock seconds), when a worker last found it answering again after
    failing, and the establishments other workers wait for one of its connection slots
    for."""

    failing_since: float | None = None
    recovered_at: float | None = None
    waiting: frozenset[int] = frozenset()


# A worker waiting for a relay's connection slot asks again at least this often; its
# ``relay_waiters`` row is ignored once it has not asked for this many seconds.
WAITER_STALE = 3.0


# Seconds after which a failed sign-in is forgotten whatever its key: longer than the
# throttling window (postier.core.sign_in_throttle).
FAILURES_KEPT = 24 * 3600.0

# The doors where a password is given, as their failed sign-ins' keys begin.
SIGN_IN_DOORS = {"web": "w", "smtp": "s"}


# The keys failed sign-ins are counted under, one function per kind. The throttle writes
# and reads them, the right of access (``me/data``) looks an account's up: both go through
# these, so they cannot drift apart. Names are case-folded, so that changing a name's case
# does not buy more guesses.
def account_key(door: str, establishment_id: int, username: str) -> str:
    """An account's key, however it was named at sign-in (username, address, slug:)."""
    return f"{SIGN_IN_DOORS[door]}:u:{establishment_id}:{username.casefold()}"


def name_key(door: str, name: str) -> str:
    """The key of a name given at sign-in that names no account (its first 200
    characters: no account's name is longer, and its source keys stay whole)."""
    return f"{SIGN_IN_DOORS[door]}:n:{name.casefold()[:200]}"


def address_key(door: str, address: str) -> str:
    """A client address's key."""
    return f"{SIGN_IN_DOORS[door]}:a:{address}"


def source_key(key: str, address: str) -> str:
    """An account's (or a name's) key from one client address; an address holds no ``|``."""
    return f"{key}|{address}"


class Store(abc.ABC):
    """Durable storage of accounts, settings and the queue."""

    # Whether the store is a file of this machine's (SQLite), that one process at a time
    # may deliver from, rather than a database server shared by several machines.
    embedded: bool = False
    # The backend's name, for the logs.
    backend: str = "sql"

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and bring the schema up to date."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    # -- establishments, users, tokens ---------------------------------------------------
    @abc.abstractmethod
    async def get_establishment(self, slug_or_id: str | int) -> Establishment | None: ...

    @abc.abstractmethod
    async def create_establishment(self, slug: str, name: str, hosted: bool) -> Establishment:
        """Raises Conflict when the slug is taken."""

    @abc.abstractmethod
    async def list_establishments(self) -> list[Establishment]: ...

    @abc.abstractmethod
    async def update_establishment(self, establishment_id: int, **values: Any) -> None: ...

    @abc.abstractmethod
    async def find_users(
        self, *, username: str | None = None, email: str | None = None
    ) -> list[User]:
        """Users of every establishment with this username or e-mail address."""

    @abc.abstractmethod
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

    @abc.abstractmethod
    async def get_user(
        self, *, user_id: int | None = None, establishment_id: int | None = None,
        username: str | None = None,
    ) -> User | None: ...

    @abc.abstractmethod
    async def list_users(self, establishment_id: int) -> list[User]: ...

    @abc.abstractmethod
    async def update_user(self, user_id: int, **values: Any) -> None: ...

    @abc.abstractmethod
    async def create_token(self, user_id: int, name: str, token_hash: str) -> TokenInfo: ...

    @abc.abstractmethod
    async def user_for_token(self, token_hash: str) -> User | None:
        """The active user owning an unrevoked token, or None."""

    @abc.abstractmethod
    async def list_tokens(self, user_id: int) -> list[TokenInfo]: ...

    @abc.abstractmethod
    async def revoke_token(self, user_id: int, token_id: int) -> bool: ...

    @abc.abstractmethod
    async def revoke_all_tokens(self, user_id: int) -> int: ...

    # -- profiles and audit ----------------------------------------------------------------
    @abc.abstractmethod
    async def create_profile(
        self, establishment_id: int, label: str, data: dict[str, Any]
    ) -> ProfileRecord:
        """Raises Conflict when the label is taken in the establishment."""

    @abc.abstractmethod
    async def update_profile(self, profile_id: int, label: str, data: dict[str, Any]) -> None: ...

    @abc.abstractmethod
    async def delete_profile(self, profile_id: int) -> bool: ...

    @abc.abstractmethod
    async def get_profile(self, profile_id: int) -> ProfileRecord | None: ...

    @abc.abstractmethod
    async def list_profiles(self, establishment_id: int) -> list[ProfileRecord]: ...

    @abc.abstractmethod
    async def record_retrieval(self, profile_id: int, user_id: int) -> None: ...

    @abc.abstractmethod
    async def audit(
        self,
        establishment_id: int,
        actor: str,
        action: str,
        target: str = "",
        details: dict[str, Any] | None = None,
    ) -> None:
        """Append to the audit log (never give it a secret's value)."""

    @abc.abstractmethod
    async def list_audit(self, establishment_id: int, limit: int = 200) -> list[AuditEntry]: ...

    @abc.abstractmethod
    async def get_meta(self, key: str) -> str | None: ...

    @abc.abstractmethod
    async def set_meta(self, key: str, value: str) -> None: ...

    @abc.abstractmethod
    async def swap_meta(self, key: str, expected: str, value: str) -> bool:
        """Set ``key`` to ``value`` only if it still holds ``expected``, in one step:
        whether it did (of two processes swapping the same value, one wins)."""

    @abc.abstractmethod
    async def save_dkim_key(
        self, establishment_id: int, domain: str, selector: str, private_enc: str,
        public_b64: str,
    ) -> None:
        """Create or replace the key of a domain."""

    @abc.abstractmethod
    async def list_dkim_keys(self, establishment_id: int) -> list[dict[str, Any]]: ...

    @abc.abstractmethod
    async def delete_dkim_key(self, establishment_id: int, domain: str) -> bool: ...

    # -- domains of a hosted installation: see postier.core.domains ----------------------------
    @abc.abstractmethod
    async def all_settings(self) -> dict[int, dict[str, Any]]:
        """Every establishment's stored settings document (secrets still encrypted)."""

    @abc.abstractmethod
    async def all_dkim_domains(self) -> list[tuple[int, str]]:
        """(establishment id, domain) of every DKIM key of the installation."""

    @abc.abstractmethod
    async def move_dkim_key(self, from_id: int, to_id: int, domain: str) -> bool:
        """Give ``from_id``'s key of ``domain`` to ``to_id``, unless ``to_id`` has one (then
        ``from_id``'s is deleted); True when ``from_id`` had one."""

    # -- settings ------------------------------------------------------------------------
    @abc.abstractmethod
    async def load_settings(self, establishment_id: int) -> tuple[dict[str, Any], float] | None:
        """The stored settings document and its update time, or None."""

    @abc.abstractmethod
    async def save_settings(self, establishment_id: int, data: dict[str, Any]) -> None: ...

    # -- queue ---------------------------------------------------------------------------
    @abc.abstractmethod
    async def enqueue(self, batch: Sequence[NewMessage]) -> list[EnqueueResult]:
        """Store all messages durably in one commit, or none; return after the commit.

        A message whose (user, idempotency key) is already stored is not stored again: its
        result names the first message with ``duplicate=True``.
        """

    @abc.abstractmethod
    async def claim(
        self, worker_id: str, limit: int, lease_seconds: float, now: float,
        skip_establishments: Collection[int] = (),
    ) -> list[Claimed]:
        """Take up to ``limit`` due messages under a lease: each establishment's in turn
        (round-robin, every establishment's first, then every one's second...), most
        urgent first within an establishment, so that one establishment's flood holds
        back no other's e-mail; leaving those of ``skip_establishments`` (whose relay
        already has as many of this worker's deliveries in flight as it may usefully
        hold) to later claims."""

    @abc.abstractmethod
    async def renew_leases(
        self, worker_id: str, ids: Sequence[str], lease_seconds: float, now: float
    ) -> set[str]:
        """Extend the worker's leases; returns the ids it still held (the others were
        taken back after the lease expired)."""

    @abc.abstractmethod
    async def release_expired_leases(self, now: float, *, everything: bool = False) -> int:
        """Return messages whose lease expired (a crashed worker's) to the queue, due now.

        ``everything`` releases every lease: only for a process that knows it is the sole
        worker of the store (the embedded store's server, holding the data-dir lock).
        """

    @abc.abstractmethod
    async def release_worker(self, worker_id: str) -> int:
        """Return a stopping worker's claimed messages to the queue."""

    @abc.abstractmethod
    async def record_outcomes(self, worker_id: str, outcomes: Sequence[Outcome]) -> None: ...

    @abc.abstractmethod
    async def get_message(self, message_id: str) -> MessageRecord | None: ...

    @abc.abstractmethod
    async def list_messages(
        self,
        *,
        establishment_id: int,
        user_id: int | None = None,
        status: str | None = None,
        limit: int = 100,
    ) -> list[MessageRecord]: ...

    @abc.abstractmethod
    async def set_status(
        self, message_id: str, status: str, *, from_statuses: Sequence[str], now: float,
        next_attempt_at: float | None = None,
    ) -> bool:
        """Change a message's status if it is in one of ``from_statuses``."""

    @abc.abstractmethod
    async def has_body(self, message_id: str) -> bool:
        """Whether the message's content is still kept (retention removes it)."""

    @abc.abstractmethod
    async def retry_now(self, message_id: str, now: float) -> bool:
        """Make a waiting or failed message due now; failed recipients are tried again."""

    @abc.abstractmethod
    async def retry_matching(
        self, *, establishment_id: int, user_id: int | None, statuses: Sequence[str],
        now: float, sender: str | None = None, recipient: str | None = None,
        since: float | None = None, until: float | None = None,
    ) -> int:
        """:meth:`retry_now` for every message of the establishment (of ``user_id`` only,
        unless ``None``) in one of ``statuses`` (waiting or failed ones) whose content is
        still kept, in one transaction; how many were made due. ``sender`` and
        ``recipient`` are parts of an address (any case), ``since`` and ``until`` bound
        the creation time, as the queue page's filters."""

    @abc.abstractmethod
    async def get_content(self, message_id: str) -> tuple[bytes, bool] | None:
        """The message's stored bytes and whether it needs SMTPUTF8, or ``None`` once
        retention removed them."""

    @abc.abstractmethod
    async def counts(self, establishment_id: int | None = None) -> dict[str, int]: ...

    # -- the submission pace, shared by every process (pace.py) ---------------------------
    @abc.abstractmethod
    async def reserve_pace(self, asks: Sequence[PaceAsk]) -> PaceGrant:
        """In one transaction, atomically for every process: if every ask's ``need`` fits
        under its ``limit`` in its counter, count for each ``min(want, what is left)``
        (at least ``need``); else count nothing and say which ask did not fit. A counter's
        older buckets are deleted."""

    # -- relay sending limits, shared by every worker ----------------------------------------
    @abc.abstractmethod
    async def reserve_relay(
        self, relay_key: str, limits: RelayLimits, recipients: Sequence[int], now: float,
        horizon: float,
    ) -> RelayGrant:
        """Reserve, atomically for every process, one start per e-mail of ``recipients``
        (each item its number of recipients), in order: none past the relay's pause, its
        per-hour and recipients-per-day windows, and no start later than ``now + horizon``
        in its per-minute pace. What is granted is counted at once."""

    @abc.abstractmethod
    async def relay_pause(self, relay_key: str) -> RelayPause | None:
        """The relay's shared pause state (None: it never asked to slow down)."""

    @abc.abstractmethod
    async def pause_relay(
        self, relay_key: str, now: float, pause: float, max_pause: float, error: str
    ) -> RelayPause:
        """The relay asked to slow down: unless already paused, pause it for its current
        pause length (``pause`` the first time), and double the next one up to
        ``max_pause``."""

    @abc.abstractmethod
    async def relay_recovered(self, relay_key: str) -> None:
        """An e-mail went through: the next pause starts short again."""

    @abc.abstractmethod
    async def relay_health(self, relay_key: str, now: float, waiters_of: str | None = None,
                           holder: str = "") -> RelayHealth:
        """The relay's shared failing state; with ``waiters_of`` (the key its connection
        slots go by), also the establishments holders other than ``holder`` have been
        waiting for one of its slots for (seen within ``WAITER_STALE`` seconds of
        ``now``)."""

    @abc.abstractmethod
    async def relay_failing(self, relay_key: str, now: float) -> float:
        """A worker saw the relay fail: unless already failing, it fails since ``now``;
        returns since when it fails."""

    @abc.abstractmethod
    async def relay_answered(self, relay_key: str, now: float) -> bool:
        """A worker (or a probe) found the relay answering: it no longer fails, for every
        worker. True when it was failing."""

    @abc.abstractmethod
    async def claim_relay_probe(self, relay_key: str, now: float, every: float) -> bool:
        """Whether this worker is the one to probe the relay now (no worker did within
        ``every`` seconds); noted when so."""

    # -- a relay's connection slots, shared by every worker (max_connections) -------------
    @abc.abstractmethod
    async def take_relay_slot(
        self, relay_key: str, max_connections: int, holder: str, now: float,
        lease_seconds: float, establishment_id: int = 0, *, queue: bool = False,
    ) -> int | None:
        """Take, atomically for every process, one of the relay's ``max_connections``
        connection slots for ``holder`` until ``now + lease_seconds``: a free one, or one
        whose lease expired (its holder died). None when every slot is held.

        With ``queue``, the slot is for an e-mail of ``establishment_id``, and free
        slots go first to the waiters (``relay_waiters``) whose establishment holds
        fewest slots, then to the longest waiting: without a slot for it, the holder is
        noted (or kept) as waiting for that establishment."""

    @abc.abstractmethod
    async def renew_relay_slots(
        self, holder: str, slots: Collection[tuple[str, int]], now: float,
        lease_seconds: float,
    ) -> set[tuple[str, int]]:
        """Extend ``holder``'s leases on ``slots`` (relay key, slot number); returns those
        it still held (the others were taken over after expiring)."""

    @abc.abstractmethod
    async def release_relay_slot(self, relay_key: str, slot: int, holder: str,
                                 handed_round: float | None = None) -> None:
        """The connection closed: the slot is free for any worker (unless another holder
        took it over meanwhile). ``handed_round`` (the time): given up for the other
        waiters, so ``holder``'s own waits go to the back of the line."""

    # -- sender address verification (postier.core.sender_verification) ----------------------
    @abc.abstractmethod
    async def list_sender_addresses(self, user_id: int) -> list[SenderAddress]:
        """The user's verified and pending addresses, by address."""

    @abc.abstractmethod
    async def start_sender_code(
        self, *, establishment_id: int, user_id: int, address: str, code_hash: str,
        expires_at: float, now: float, min_interval: float, day_limit: int,
    ) -> float:
        """Store a new code for the user's address (the previous one stops counting, and
        so do wrong attempts) and record that a code was sent — in one transaction, unless
        a code for this address was sent less than ``min_interval`` seconds ago or the user
        was sent ``day_limit`` codes in the last 24 hours. Returns 0 when stored, else the
        seconds to wait."""

    @abc.abstractmethod
    async def check_sender_code(
        self, *, user_id: int, address: str, code_hash: str, now: float, max_failures: int,
    ) -> tuple[str, int]:
        """Compare a code with the user's waiting one, in one transaction. Returns
        (outcome, wrong attempts left): ``verified``, ``wrong``, ``locked`` (too many wrong
        codes: the code is void), ``expired``, ``no_code``."""

    @abc.abstractmethod
    async def delete_sender_address(self, user_id: int, address: str) -> bool: ...

    # -- failed sign-ins (the web pages' and SMTP AUTH's throttling) ----------------------
    @abc.abstractmethod
    async def recent_failures(self, keys: Sequence[str], since: float) -> dict[str, list[float]]:
        """The times of the failures recorded under each key since ``since``, oldest first
        (keys without any are absent)."""

    @abc.abstractmethod
    async def add_failure(self, keys: Sequence[str], now: float, forget_before: float) -> None:
        """Record one failure under each key, and forget these keys' failures older than
        ``forget_before`` (and any key's older than a day)."""

    @abc.abstractmethod
    async def clear_failures(self, keys: Sequence[str]) -> None: ...

    # -- sign-in sessions ended by signing out (the web pages') ----------------------------
    @abc.abstractmethod
    async def end_session(self, session_id: str, expires_at: float, now: float) -> None:
        """Remember that this session ended, until ``expires_at`` when it would have
        expired anyway; forget the ended sessions expired by ``now``."""

    @abc.abstractmethod
    async def session_ended(self, session_id: str) -> bool: ...
