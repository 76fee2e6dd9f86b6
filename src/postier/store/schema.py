"""Table definitions (SQLAlchemy Core), shared by every backend.

Times are UTC epoch seconds (floats): compact, sortable, and the same on SQLite and
PostgreSQL. The message body lives in its own table so that the queue table stays small
for claims and so that retention can drop bodies while keeping the delivery record.
The Alembic migrations in ``migrations/versions`` create exactly these tables.
"""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    text,
)

metadata = MetaData()

establishments = Table(
    "establishments",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("slug", String(64), nullable=False, unique=True),
    Column("name", String(200), nullable=False),
    Column("hosted", Boolean, nullable=False, server_default=text("false")),
    Column("disabled", Boolean, nullable=False, server_default=text("false")),
    Column("created_at", Float, nullable=False),
)

users = Table(
    "users",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("establishment_id", Integer, ForeignKey("establishments.id"), nullable=False),
    Column("username", String(100), nullable=False),
    Column("email", String(320), nullable=False),
    Column("display_name", String(200), nullable=False, server_default=""),
    Column("role", String(20), nullable=False),
    Column("password_hash", String(200)),
    Column("disabled", Boolean, nullable=False, server_default=text("false")),
    Column("granted_senders", Text, nullable=False, server_default="[]"),
    Column("created_at", Float, nullable=False),
    Index("ux_users_username", "establishment_id", "username", unique=True),
)

tokens = Table(
    "tokens",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("user_id", Integer, ForeignKey("users.id"), nullable=False),
    Column("name", String(100), nullable=False, server_default=""),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("created_at", Float, nullable=False),
    Column("last_used_at", Float),
    Column("revoked_at", Float),
)

settings = Table(
    "settings",
    metadata,
    Column("establishment_id", Integer, ForeignKey("establishments.id"), primary_key=True),
    Column("data", Text, nullable=False),
    Column("updated_at", Float, nullable=False),
)

messages = Table(
    "messages",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("establishment_id", Integer, nullable=False),
    Column("user_id", Integer, nullable=False),
    Column("status", String(12), nullable=False),
    Column("priority", Integer, nullable=False, server_default=text("0")),
    Column("envelope_from", String(320), nullable=False),
    Column("header_from", String(400), nullable=False, server_default=""),
    Column("message_id", String(255), nullable=False),
    Column("subject", Text, nullable=False, server_default=""),
    Column("size", Integer, nullable=False),
    Column("smtputf8", Boolean, nullable=False, server_default=text("false")),
    Column("idempotency_key", String(200)),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("next_attempt_at", Float, nullable=False),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("last_error", Text),
    Column("lease_owner", String(64)),
    Column("lease_expires_at", Float),
    # The sender policy's rule for this e-mail (unverified_sender is explained to the
    # user); NULL for notices and e-mails accepted before it was recorded.
    Column("sender_rule", String(24)),
    # The queue's hot path: each establishment's due messages in priority order, which
    # the claim takes establishment by establishment (round-robin). Partial, so a table
    # holding millions of sent messages costs claims nothing.
    Index(
        "ix_messages_due_establishment",
        "establishment_id",
        "priority",
        "next_attempt_at",
        sqlite_where=text("status IN ('queued', 'deferred')"),
        postgresql_where=text("status IN ('queued', 'deferred')"),
    ),
    Index(
        "ix_messages_leases",
        "lease_expires_at",
        sqlite_where=text("status = 'sending'"),
        postgresql_where=text("status = 'sending'"),
    ),
    Index("ix_messages_user", "user_id", "created_at"),
    Index("ix_messages_establishment", "establishment_id", "status", "created_at"),
    Index("ux_messages_idempotency", "user_id", "idempotency_key", unique=True),
)

bodies = Table(
    "message_bodies",
    metadata,
    Column("message_id", String(32), primary_key=True),
    Column("data", LargeBinary, nullable=False),
)

recipients = Table(
    "recipients",
    metadata,
    Column("message_id", String(32), primary_key=True),
    Column("position", Integer, primary_key=True),
    Column("address", String(320), nullable=False),
    Column("status", String(12), nullable=False),
    Column("code", Integer),
    Column("reply", Text),
    Column("updated_at", Float),
)

attempts = Table(
    "attempts",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("message_id", String(32), nullable=False),
    Column("started_at", Float, nullable=False),
    Column("duration_ms", Integer, nullable=False),
    Column("relay", String(300), nullable=False),
    Column("outcome", String(12), nullable=False),
    Column("code", Integer),
    Column("detail", Text),
    # Why the attempt did not deliver: the error's code and parameters as JSON
    # (PostierError.dump), rendered in the reader's language; NULL when it delivered and
    # for attempts recorded before it was kept (shown as their detail).
    Column("reason", Text),
    Index("ix_attempts_message", "message_id"),
)

profiles = Table(
    "profiles",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("establishment_id", Integer, ForeignKey("establishments.id"), nullable=False),
    Column("label", String(100), nullable=False),
    Column("data", Text, nullable=False),  # SMTP settings; the password encrypted
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Index("ux_profiles_label", "establishment_id", "label", unique=True),
)

profile_retrievals = Table(
    "profile_retrievals",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("profile_id", Integer, nullable=False),
    Column("user_id", Integer, nullable=False),
    Column("at", Float, nullable=False),
    Index("ix_profile_retrievals_profile", "profile_id"),
)

audit_log = Table(
    "audit_log",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("establishment_id", Integer, nullable=False),
    Column("at", Float, nullable=False),
    Column("actor", String(100), nullable=False),
    Column("action", String(50), nullable=False),
    Column("target", String(200), nullable=False, server_default=""),
    Column("details", Text, nullable=False, server_default="{}"),
    Index("ix_audit_establishment", "establishment_id", "at"),
)

meta = Table(
    "meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

dkim_keys = Table(
    "dkim_keys",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("establishment_id", Integer, nullable=False),
    Column("domain", String(253), nullable=False),
    Column("selector", String(63), nullable=False),
    Column("private_key_enc", Text, nullable=False),
    Column("public_key", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Index("ux_dkim_domain", "establishment_id", "domain", unique=True),
)

# Relay sending limits shared by every worker of an installation (see delivery/limits.py).
# One row per relay, keyed by a hash of its identity without secrets: the shared pace
# (``next_start``, the earliest start of the next e-mail) and the pause after a rate-limit
# reply (``paused_until``, ``pause`` the length of the next one, ``pause_error`` why).
relay_limits = Table(
    "relay_limits",
    metadata,
    Column("relay_key", String(64), primary_key=True),
    Column("next_start", Float, nullable=False, server_default=text("0")),
    Column("paused_until", Float, nullable=False, server_default=text("0")),
    Column("pause", Float, nullable=False, server_default=text("0")),
    Column("pause_error", Text),
    Column("updated_at", Float, nullable=False),
    # Since when the relay keeps failing as any worker saw it (NULL while it answers),
    # when one last found it answering again, and when one last probed it while the
    # backup relay stood in (migration 0014): in rows of their own, keyed by the relay's
    # whole connection settings (SharedLimits.health_key).
    Column("failing_since", Float),
    Column("recovered_at", Float),
    Column("probed_at", Float, nullable=False, server_default=text("0")),
)

# What was sent through a relay, per time bucket: ``kind`` "h" counts e-mails in buckets of
# 1/24 hour, "d" recipients in buckets of 1/24 day; a sliding window sums the buckets.
relay_usage = Table(
    "relay_usage",
    metadata,
    Column("relay_key", String(64), primary_key=True),
    Column("kind", String(1), primary_key=True),
    Column("bucket", Float, primary_key=True),
    Column("amount", Integer, nullable=False),
)

# Connections open to a relay, all workers together (``max_connections``): one row per
# slot in use (0 .. max_connections - 1), with its holder (a worker process) and an expiry
# renewed while the connection lives, so a killed worker's slots lapse (migration 0008).
relay_leases = Table(
    "relay_leases",
    metadata,
    Column("relay_key", String(64), primary_key=True),
    Column("slot", Integer, primary_key=True),
    Column("holder", String(100), nullable=False),
    Column("expires_at", Float, nullable=False),
    # Whose e-mail the connection was opened for (migration 0014).
    Column("establishment_id", Integer, nullable=False, server_default=text("0")),
    Index("ix_relay_leases_holder", "holder"),
)

# Processes waiting for one of a relay's connection slots, per establishment: ``since``
# when it waits (put back to now when its process gave a slot up for the others),
# ``seen_at`` when it last asked; a row not asked for a few seconds is ignored (its
# process died or stopped waiting). A free slot goes to the waiter whose establishment
# holds fewest of the relay's slots, then to the longest waiting (migration 0014).
relay_waiters = Table(
    "relay_waiters",
    metadata,
    Column("relay_key", String(64), primary_key=True),
    Column("holder", String(100), primary_key=True),
    Column("establishment_id", Integer, primary_key=True),
    Column("since", Float, nullable=False),
    Column("seen_at", Float, nullable=False),
)

# Sender address verification (postier.core.sender_verification): one row per user and
# address, with the current code's HMAC while one is waiting; and every code sent, for the
# resend limits.
sender_addresses = Table(
    "sender_addresses",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("establishment_id", Integer, nullable=False),
    Column("user_id", Integer, nullable=False),
    Column("address", String(320), nullable=False),
    Column("address_key", String(320), nullable=False),  # lower-case, for matching
    Column("verified_at", Float),
    Column("code_hash", String(64)),
    Column("code_expires_at", Float),
    Column("failed_attempts", Integer, nullable=False, server_default=text("0")),
    Column("created_at", Float, nullable=False),
    Index("ux_sender_addresses_user", "user_id", "address_key", unique=True),
)

sender_code_sends = Table(
    "sender_code_sends",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("user_id", Integer, nullable=False),
    Column("address_key", String(320), nullable=False),
    Column("at", Float, nullable=False),
    Index("ix_sender_code_sends_user", "user_id", "at"),
)

# -- alerts and the webhook outbox: see postier.ops.alerts ------------
incidents = Table(
    "incidents",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("establishment_id", Integer, nullable=False),
    Column("kind", String(40), nullable=False),
    Column("started_at", Float, nullable=False),
    Column("resolved_at", Float),
    Column("details", Text, nullable=False, server_default="{}"),
    Index("ux_incidents_open", "establishment_id", "kind", unique=True,
          sqlite_where=text("resolved_at IS NULL"),
          postgresql_where=text("resolved_at IS NULL")),
    Index("ix_incidents_establishment", "establishment_id", "started_at"),
)

webhook_outbox = Table(
    "webhook_outbox",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("establishment_id", Integer, nullable=False),
    Column("event_id", String(32), nullable=False),
    Column("event", String(40), nullable=False),
    Column("dedupe_key", String(200), nullable=False),
    Column("payload", Text, nullable=False),  # the exact bytes posted (and signed)
    Column("status", String(12), nullable=False, server_default="pending"),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("created_at", Float, nullable=False),
    Column("next_attempt_at", Float, nullable=False),
    Column("delivered_at", Float),
    Column("last_error", Text),
    Index("ux_webhook_dedupe", "establishment_id", "dedupe_key", unique=True),
    Index("ix_webhook_due", "status", "next_attempt_at"),
)

# Failed sign-ins, one row per failure and key (``w:u:<username>``, ``s:a:<address>``...):
# the web pages' and SMTP AUTH's throttling, shared by every process (migration 0009).
login_failures = Table(
    "login_failures",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("key", String(400), nullable=False),
    Column("at", Float, nullable=False),
    Index("ix_login_failures_key", "key", "at"),
    Index("ix_login_failures_at", "at"),
)

# Sign-in sessions ended by signing out, until they would have expired anyway: the session
# is a sealed cookie, so a copy of it is refused only because its id is here (0010).
ended_sessions = Table(
    "ended_sessions",
    metadata,
    Column("session_id", String(64), primary_key=True),
    Column("expires_at", Float, nullable=False),
    Index("ix_ended_sessions_expires_at", "expires_at"),
)

# Recipients queued per account (``a:<user id>``) and per establishment (``e:<id>``), per
# clock minute (``span`` "m") and UTC day ("d"), ``bucket`` the minute's or day's number:
# the submission pace shared by every process (pace.py, migration 0011).
api_usage = Table(
    "api_usage",
    metadata,
    Column("scope", String(40), primary_key=True),
    Column("span", String(1), primary_key=True),
    Column("bucket", Integer, primary_key=True),
    Column("amount", Integer, nullable=False),
)

# Addresses an establishment no longer sends to (postier.core.bounces): added by a hard
# bounce, a complaint, repeated temporary failures, or a person; lifted by a person. One
# row per establishment and address (``address_key`` lower-case, for matching) (0015).
suppressions = Table(
    "suppressions",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("establishment_id", Integer, nullable=False),
    Column("address", String(320), nullable=False),
    Column("address_key", String(320), nullable=False),
    Column("reason", String(12), nullable=False),  # bounce, complaint, repeated, manual
    Column("code", Integer),
    Column("status", String(16), nullable=False, server_default=""),
    Column("diagnostic", Text, nullable=False, server_default=""),
    Column("message_id", String(32)),
    Column("created_at", Float, nullable=False),
    Column("created_by", String(100), nullable=False, server_default=""),
    Index("ux_suppressions_address", "establishment_id", "address_key", unique=True),
)

# Every bounce (or complaint) received for a delivered e-mail: what marked a recipient
# ``bounced``, and the temporary failures counted towards a suppression. Purged with the
# e-mail it is about (retention) (0015).
bounces = Table(
    "bounces",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("establishment_id", Integer, nullable=False),
    Column("message_id", String(32), nullable=False),
    Column("address_key", String(320), nullable=False),
    Column("kind", String(12), nullable=False),  # hard, soft, complaint
    Column("status", String(16), nullable=False, server_default=""),
    Column("code", Integer),
    Column("diagnostic", Text, nullable=False, server_default=""),
    Column("received_at", Float, nullable=False),
    Index("ix_bounces_address", "establishment_id", "address_key", "received_at"),
    Index("ix_bounces_message", "message_id"),
)
