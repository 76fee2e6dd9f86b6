"""The records the store returns and takes, and the values they hold.

Status values of a message: ``queued`` (waiting for its first attempt), ``sending``
(claimed by a worker under a lease), ``deferred`` (waiting for a retry), ``sent``,
``failed``, ``cancelled``. A recipient is ``pending``, ``sent``, ``deferred`` or
``failed``; a recipient that is ``sent`` is never attempted again. Two more recipient
states come from bounces (:mod:`postier.core.bounces`): ``bounced`` (sent, then reported
undeliverable) and ``suppressed`` (on the suppression list when the e-mail was accepted:
never attempted).
"""

from __future__ import annotations

from collections.abc import Sequence
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
PENDING, BOUNCED, SUPPRESSED = "pending", "bounced", "suppressed"  # recipient states
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
    # Recipients on the suppression list: address -> why (the recipient's reply).
    suppressed: dict[str, str] | None = None


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

