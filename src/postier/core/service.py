"""The service layer: what every door (HTTP API, SMTP submission, CLI, web) calls.

It applies authentication, roles, validation, the sender policy and the queue; a door only
translates between its protocol and these methods, so policy is decided in one place.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import functools
import json
import logging
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import format_datetime
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy.exc import DBAPIError

from postier.core import accounts, dkim_signing, policy, reasons, targets
from postier.core.administration import Administration, require_admin
from postier.core.cache import TTLCache
from postier.core.crypto import SecretBox
from postier.core.dkim_signing import DkimKey
from postier.core.domains import Domains, address_claims, settings_claims
from postier.core.message import (
    BuiltMessage,
    MessageIn,
    build_message,
    make_message_id,
    read_submitted,
    rewrite_submitted,
)
from postier.core.pace import pace_for
from postier.core.settings import (
    RELAY_SECTIONS,
    SECRET_FIELDS,
    AuthMethod,
    DeliverySettings,
    RelayKind,
    RelaySettings,
    Security,
    SenderSettings,
)
from postier.errors import (
    AuthenticationRequired,
    Conflict,
    DelegationOff,
    InvalidInput,
    NotFound,
    PostierError,
    StoreUnavailable,
    load,
)
from postier.i18n import N_, translate
from postier.server.config import ServerConfig, networks
from postier.store import create_store, database_url
from postier.store.base import (
    CANCELLED,
    DEFERRED,
    FAILED,
    PRIORITIES,
    QUEUED,
    SENDING,
    SENT,
    EnqueueResult,
    Establishment,
    MessageRecord,
    NewMessage,
    Store,
    TokenInfo,
    User,
)

log = logging.getLogger("postier")

NOTICE_PREFIX = "notice:"
SYSTEM_USER = 0  # the author of the notices Postier itself sends
NOTICE_SUBJECT = N_("Undelivered")
NOTICE_BODY = N_(
    "Your e-mail \"{subject}\" could not be delivered to:\n{recipients}\n\nWhat to do: "
    "{hint}"
)
NOTICE_HINT = N_("Check the addresses, then send the e-mail again to these recipients.")
DELAY_SUBJECT = N_("Delayed")
DELAY_BODY = N_(
    "Your e-mail \"{subject}\" has not reached these recipients yet:\n{recipients}\n\n"
    "{hint}"
)
DELAY_HINT = N_(
    "Nothing is lost: Postier keeps trying and tells you again only if it gives up. If it "
    "is urgent, reach these people another way."
)
SETTINGS_TTL = 2.0  # seconds a process trusts its cached copy of another process's change


# The sender policy is a pure function of these values, and the same few come back for
# every e-mail (a teacher's, a copier's, a mass mailing's): its decisions are remembered,
# 30-50 µs each, a tenth of an SMTP acceptance. A refusal (an exception) is not cached.
@functools.lru_cache(maxsize=2048)
def _decide(user_address: str, user_name: str, allowed_domains: tuple[str, ...],
            establishment_name: str, establishment_address: str, requested_from: str | None,
            reply_to: tuple[str, ...], granted: tuple[str, ...],
            verified: tuple[str, ...] | None, display: str) -> policy.SenderDecision:
    return policy.decide_sender(
        user_address=user_address, user_name=user_name, allowed_domains=allowed_domains,
        establishment_name=establishment_name, establishment_address=establishment_address,
        requested_from=requested_from, message_reply_to=reply_to,
        granted_addresses=granted, verified_addresses=verified, display=display)


def new_message_id() -> str:
    """Time-ordered 32-hex id: recent messages sit together in the index."""
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(10)}"


def queued(
    built: BuiltMessage,
    header_from: str,
    *,
    establishment_id: int,
    user_id: int,
    priority: int = PRIORITIES["normal"],
    idempotency_key: str | None = None,
) -> NewMessage:
    """A rendered message as the queue stores it (a fresh queue id)."""
    return NewMessage(
        id=new_message_id(), establishment_id=establishment_id, user_id=user_id,
        priority=priority, envelope_from=built.envelope_from, header_from=header_from,
        message_id=built.message_id, subject=built.subject, data=built.data,
        recipients=built.recipients, smtputf8=built.smtputf8,
        idempotency_key=idempotency_key,
    )


class _Sender(NamedTuple):
    """A sender decision taken during a submission, with its From as stored."""

    decision: policy.SenderDecision
    header_from: str


@dataclass
class Preview:
    from_: str
    reply_to: list[str]
    envelope_from: str
    rule: str
    explanation: str


class Postier:
    """One installation: its store, its secrets, its settings; shared by all doors."""

    def __init__(
        self, config: ServerConfig, store: Store | None = None, store_role: str = "all"
    ) -> None:
        self.config = config
        self.data_dir = Path(config.data_dir)
        self.store = store or create_store(database_url(self.data_dir, config.database_url),
                                           store_role)
        self.secrets = SecretBox.for_data_dir(self.data_dir)
        self._settings: TTLCache[int, DeliverySettings] = TTLCache(SETTINGS_TTL)
        self._establishments: TTLCache[str | int, Establishment | None] = TTLCache(SETTINGS_TTL)
        self._dkim: TTLCache[int, dict[str, DkimKey]] = TTLCache(SETTINGS_TTL)
        self._tokens: dict[str, tuple[User, float]] = {}
        self._notify: list[Any] = []
        self.admin = Administration(self)
        from postier.core.sender_verification import SenderAddresses

        self.senders = SenderAddresses(self)
        self.domains = Domains(self)

    async def open(self) -> None:
        # The queue holds pupils' and parents' personal data: only its owner may read it.
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.data_dir.stat().st_mode & 0o077:
            self.data_dir.chmod(0o700)
        try:
            await self.store.open()
        except (OSError, DBAPIError) as exc:
            raise StoreUnavailable(
                reason=f"the database cannot be opened: {getattr(exc, 'orig', None) or exc}",
                hint=N_("Check --database-url (or POSTIER_DATABASE_URL) and that the "
                        "database server is running."),
            ) from exc
        for path in self.data_dir.glob("postier.db*"):
            path.chmod(0o600)
        # A process with the wrong key must say so now, not at the first delivery: the first
        # process to open the store leaves a value only the right key can read.
        check = await self.store.get_meta("key_check")
        if check is None:
            await self.store.set_meta("key_check", self.secrets.fingerprint())
        else:
            self.secrets.check(check)

    async def close(self) -> None:
        await self.store.close()

    def on_accept(self, callback: Any) -> None:
        """Register a callable run after each acceptance (the worker's wake-up)."""
        self._notify.append(callback)

    def accepted_elsewhere(self) -> None:
        """Another process of this server (``--http-processes``) stored e-mails: wake
        delivery as for this process's own."""
        for notify in self._notify:
            notify()

    # -- authentication -----------------------------------------------------------------
    async def authenticate_token(self, token: str | None) -> User:
        if not token:
            raise AuthenticationRequired()
        digest = accounts.token_hash(token)
        now = time.monotonic()
        cached = self._tokens.get(digest)
        if cached is not None and now - cached[1] < SETTINGS_TTL:
            user: User | None = cached[0]
        else:
            # One indexed query per token every few seconds rather than per request: the
            # hot path of submission. Changes made here forget the cache at once (see
            # forget_tokens); another process's changes count after SETTINGS_TTL.
            user = await self.store.user_for_token(digest)
            if user is not None:
                if len(self._tokens) > 10_000:
                    self._tokens.clear()
                self._tokens[digest] = (user, now)
        if user is None:
            raise AuthenticationRequired(
                N_("This API token is not valid (unknown, revoked, or its user is disabled).")
            )
        return user

    def forget_tokens(self) -> None:
        """A user, a token or an establishment changed: check every token again."""
        self._tokens.clear()
        self._establishments.forget()

    async def login_candidates(self, login: str) -> list[User]:
        """The accounts a name given at sign-in may mean. ``slug:username`` names one
        account of one establishment; a username or an e-mail address may name accounts of
        several establishments, and the password then tells which (check_password): what
        one establishment creates never changes how another's people sign in."""
        login = login.strip()
        if ":" in login:
            slug, _, username = login.partition(":")
            est = await self.establishment(slug) if slug else None
            user = (await self.store.get_user(establishment_id=est.id, username=username)
                    if est is not None else None)
            return [user] if user is not None else []
        found = await self.store.find_users(username=login) if login else []
        if "@" in login:
            named = {u.id for u in found}
            found += [u for u in await self.store.find_users(email=login)
                      if u.id not in named]
        return found

    async def check_password(self, candidates: Sequence[User], password: str) -> User:
        """The one account among ``candidates`` that this password opens (an active account
        of an active establishment). Every candidate's hash is verified, never stopping
        early, and a dummy hash stands in when there is no candidate (or no password): the
        answer takes as long for an unknown name as for a known one, whichever matched. A
        password that opens two accounts opens none."""
        hashes = [u.password_hash for u in candidates] or [None]
        matches = await asyncio.to_thread(self._verify_each, hashes, password)
        opened = []
        for user, match in zip(candidates, matches, strict=False):
            if match and await self._may_sign_in(user):
                opened.append(user)
        if len(opened) != 1:
            raise AuthenticationRequired(N_("Wrong username or password."))
        return opened[0]

    async def authenticate_password(self, login: str, password: str) -> User:
        """The account a sign-in names (see login_candidates) and its password opens."""
        return await self.check_password(await self.login_candidates(login), password)

    async def _may_sign_in(self, user: User) -> bool:
        if user.disabled:
            return False
        est = await self.establishment(user.establishment_id)
        return est is not None and not est.disabled

    @staticmethod
    def _verify_each(hashes: Sequence[str | None], password: str) -> list[bool]:
        """One argon2 verification per hash; the dummy's, never a match, for a missing one."""
        return [accounts.verify_password(h or Postier._dummy_hash(), password) and bool(h)
                for h in hashes]

    @staticmethod
    @functools.cache
    def _dummy_hash() -> str:
        """The hash of a password nobody knows, made as every other (at the same cost)."""
        return accounts.hash_password(secrets.token_urlsafe(32))

    async def act_in(self, user: User, slug: str) -> User:
        """The operator ``user`` acting in the establishment ``slug``; anybody else may only
        name their own establishment."""
        est = await self.establishment(slug)
        if est is None or (not user.is_operator and est.id != user.establishment_id):
            # Another establishment does not exist for those who may not see it.
            raise NotFound(N_("There is no establishment {slug} for you."), slug=slug)
        return dataclasses.replace(user, establishment_id=est.id)

    async def add_establishment(self, slug: str, name: str, hosted: bool = False) -> Establishment:
        slug = slug.strip().lower()
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]{1,62}", slug):
            raise InvalidInput(
                N_("An establishment's short name is 2 to 63 lower-case letters, digits or "
                   "hyphens (for example clg-jean-moulin)."),
                field="slug",
            )
        return await self.store.create_establishment(slug, name.strip() or slug, hosted)

    # -- DKIM ------------------------------------------------------------------------------
    async def dkim_keys(self, establishment_id: int) -> dict[str, DkimKey]:
        async def load() -> dict[str, DkimKey]:
            return {
                row["domain"]: DkimKey(row["domain"], row["selector"],
                                       self.secrets.decrypt(row["private_key_enc"]).encode(),
                                       row["public_key"])
                for row in await self.store.list_dkim_keys(establishment_id)
            }

        return await self._dkim.get(establishment_id, load)

    async def dkim_generate(self, user: User, domain: str, selector: str = "postier") -> DkimKey:
        """Make (or replace) the DKIM key of one of the establishment's domains."""
        require_admin(user)
        try:
            domain = policy.normalize_domain_pattern(domain)
        except InvalidInput as exc:
            exc.field = "domain"
            raise
        settings = await self.stored_settings(user.establishment_id)
        own = {settings.sender.address.rpartition("@")[2].lower()} - {""}
        if domain.startswith("*.") or not (
            domain in own or policy.matching_pattern(f"x@{domain}", settings.allowed_domains)
        ):
            raise InvalidInput(
                N_("{domain} is neither an allowed domain nor the domain of the sender "
                   "address: Postier would never sign for it."),
                hint=N_("Add it to the allowed domains first."), field="domain", domain=domain,
            )
        # Signing d=<domain> speaks for the domain: only its holder may.
        await self.domains.check(user.establishment_id,
                                 address_claims([f"x@{domain}"], "domain"))
        selector = selector.strip().lower()
        if not dkim_signing.valid_selector(selector):
            raise InvalidInput(N_("A selector is made of letters, digits and hyphens."),
                               field="selector")
        key = await asyncio.to_thread(dkim_signing.generate, domain, selector)
        await self.store.save_dkim_key(user.establishment_id, domain, selector,
                                       self.secrets.encrypt(key.private_pem.decode()),
                                       key.public_b64)
        self._dkim.forget(user.establishment_id)
        await self.store.audit(user.establishment_id, user.username, "dkim.generate", domain,
                               {"selector": selector})
        return key

    async def dkim_remove(self, user: User, domain: str) -> str:
        """Stop signing for one of the establishment's domains (its key is deleted); the
        domain as stored."""
        require_admin(user)
        try:  # as generate() stored it: "xn--…" or any case of the Unicode form
            domain = policy.normalize_domain_pattern(domain)
        except InvalidInput:
            domain = domain.strip().lower()  # not a domain: found nowhere, said so below
        if not await self.store.delete_dkim_key(user.establishment_id, domain):
            raise NotFound(N_("There is no DKIM key for {domain}."), domain=domain)
        self._dkim.forget(user.establishment_id)
        await self.store.audit(user.establishment_id, user.username, "dkim.remove", domain, {})
        return domain

    async def dkim_sign(self, establishment_id: int, data: bytes) -> bytes:
        """Sign stored bytes when the From's domain has a key (at delivery)."""
        keys = await self.dkim_keys(establishment_id)
        if not keys:
            return data
        domain = dkim_signing.from_domain(data)
        key = keys.get(domain or "")
        if key is None:
            return data
        return await asyncio.to_thread(dkim_signing.sign, data, key)

    # -- users and tokens ----------------------------------------------------------------
    async def add_user(
        self,
        username: str,
        email: str,
        *,
        display_name: str = "",
        role: str = "user",
        password: str | None = None,
        establishment_id: int = 1,
    ) -> User:
        if role not in accounts.ROLES:
            raise InvalidInput(
                N_("Unknown role {role!r}: choose admin, user, operator or relay."),
                field="role", role=role,
            )
        accounts.check_placement(role, establishment_id)
        username = username.strip()
        if not username or len(username) > 100 or any(c.isspace() for c in username):
            raise InvalidInput(
                N_("A username is 1 to 100 characters without spaces."), field="username"
            )
        address = policy.normalize_address(email)
        if any(c in display_name for c in "\r\n\0"):
            raise InvalidInput(N_("The name cannot contain line breaks."), field="name")
        pw_hash = await asyncio.to_thread(accounts.hash_password, password) if password else None
        return await self.store.create_user(
            establishment_id=establishment_id,
            username=username,
            email=address,
            display_name=display_name.strip(),
            role=role,
            password_hash=pw_hash,
        )

    async def find_user(self, username: str, establishment_id: int = 1) -> User:
        user = await self.store.get_user(establishment_id=establishment_id, username=username)
        if user is None:
            raise NotFound(N_("There is no user named {username}."), username=username)
        return user

    async def create_token(self, user: User, name: str = "") -> tuple[str, TokenInfo]:
        token = accounts.new_token()
        info = await self.store.create_token(user.id, name, accounts.token_hash(token))
        return token, info

    # -- settings ------------------------------------------------------------------------
    async def establishment(self, slug_or_id: str | int) -> Establishment | None:
        """An establishment, from a short-lived cache (they rarely change)."""
        return await self._establishments.get(
            slug_or_id, lambda: self.store.get_establishment(slug_or_id)
        )

    async def stored_settings(self, establishment_id: int, fresh: bool = False
                              ) -> DeliverySettings:
        """The establishment's own settings, secrets decrypted (never shown); ``fresh``:
        read now, not from the short-lived cache."""
        async def load() -> DeliverySettings:
            doc = await self.store.load_settings(establishment_id)
            return self._decode_settings(doc[0]) if doc else DeliverySettings()

        if fresh:
            self._settings.forget(establishment_id)
        return await self._settings.get(establishment_id, load)

    async def replace_settings(self, establishment_id: int, settings: DeliverySettings
                               ) -> None:
        """Store an establishment's whole settings as an operator's action decided them
        (audited by that action)."""
        await self.store.save_settings(establishment_id, self._encode_settings(settings))
        self._settings.forget(establishment_id)

    def forget_dkim(self, *establishment_ids: int) -> None:
        for establishment_id in establishment_ids:
            self._dkim.forget(establishment_id)

    async def delivery_settings(self, establishment_id: int) -> DeliverySettings:
        """The settings e-mails are sent with. A hosted establishment sends through the
        operator's platform relay with no setup at all: its sender defaults to its name
        and an address of the platform's domain; its allowed domains still apply."""
        settings = await self.stored_settings(establishment_id)
        est = await self.establishment(establishment_id)
        platform = self.config.platform_relay
        if est is None or not est.hosted or platform is None:
            return settings
        sender = settings.sender
        if not sender.address and self.config.platform_sender_domain:
            sender = SenderSettings(
                name=sender.name or est.name,
                address=f"{est.slug}@{self.config.platform_sender_domain}",
            )
        return settings.model_copy(update={"relay": platform, "sender": sender})

    def _decode_settings(self, doc: dict[str, Any]) -> DeliverySettings:
        doc = json.loads(json.dumps(doc))
        for section in RELAY_SECTIONS:
            relay = doc.get(section)
            if not isinstance(relay, dict):
                continue
            for name in SECRET_FIELDS:
                enc = relay.pop(f"{name}_enc", None)
                relay[name] = self.secrets.decrypt(enc) if enc else None
        alerts = doc.get("alerts")
        if isinstance(alerts, dict):
            enc = alerts.pop("webhook_secret_enc", None)
            alerts["webhook_secret"] = self.secrets.decrypt(enc) if enc else None
        return DeliverySettings.model_validate(doc)

    def _encode_settings(self, settings: DeliverySettings) -> dict[str, Any]:
        doc = settings.model_dump(mode="json")
        for section in RELAY_SECTIONS:
            if not isinstance(doc.get(section), dict):
                continue
            for name in SECRET_FIELDS:
                value = doc[section].pop(name, None)
                if value:
                    doc[section][f"{name}_enc"] = self.secrets.encrypt(value)
        secret = doc["alerts"].pop("webhook_secret", None)
        if secret:
            doc["alerts"]["webhook_secret_enc"] = self.secrets.encrypt(secret)
        return doc

    async def get_settings(self, user: User, lang: str = "en") -> dict[str, Any]:
        require_admin(user)
        doc = (await self.stored_settings(user.establishment_id)).public()
        est = await self.establishment(user.establishment_id)
        doc["hosted"] = bool(est and est.hosted and self.config.platform_relay is not None)
        doc["warnings"] = settings_warnings(await self.stored_settings(user.establishment_id),
                                            lang)
        return doc

    async def put_settings(self, user: User, payload: dict[str, Any], lang: str = "en"
                           ) -> dict[str, Any]:
        """Change the settings given in ``payload`` (any part; the rest stays), validated
        whole before anything is saved; the relay password is kept when none is given.
        The answer is the settings as saved, with their ``warnings`` (nothing refused)."""
        require_admin(user)
        current = await self.stored_settings(user.establishment_id)
        # What GET adds for reading (hosted, warnings) may come back: it is not a setting.
        merged = current.updated(
            {k: v for k, v in payload.items() if k not in ("hosted", "warnings")}
        )
        await self.domains.check(user.establishment_id, settings_claims(current, merged))
        await self.check_targets(user.establishment_id, merged, current)
        await self.store.save_settings(user.establishment_id, self._encode_settings(merged))
        self._settings.forget(user.establishment_id)
        await self.admin.audit_settings_change(user, current, merged)
        log.info("settings of establishment %s changed by %s", user.establishment_id,
                 user.username)
        return merged.public() | {"warnings": settings_warnings(merged, lang)}

    async def test_warnings(self, user: User, candidate: dict[str, Any] | None,
                            backup: bool, lang: str) -> list[str]:
        """The warnings of the relay a test-send uses (saved settings, or unsaved ones)."""
        require_admin(user)
        saved = await self.delivery_settings(user.establishment_id)
        settings = saved.updated(candidate) if candidate else saved
        relay = settings.backup_relay if backup else settings.relay
        return relay_warnings(relay, lang) if relay is not None else []

    async def check_targets(self, establishment_id: int, settings: DeliverySettings,
                            before: DeliverySettings | None = None) -> None:
        """A hosted establishment's servers (relays, OAuth2 token URL, webhook) must not
        lead to the platform's own networks: see :mod:`postier.core.targets`."""
        est = await self.establishment(establishment_id)
        if est is not None and est.hosted:
            await targets.check(settings, before, networks(
                self.config.hosted_allowed_networks, "POSTIER_HOSTED_ALLOWED_NETWORKS"))

    # -- sender policy -------------------------------------------------------------------
    def decide_sender(
        self,
        user: User,
        settings: DeliverySettings,
        requested_from: str | None = None,
        reply_to: Sequence[str] = (),
        verified: Sequence[str] | None = None,
    ) -> policy.SenderDecision:
        """The sender policy for ``user``; ``verified`` is what
        :meth:`SenderAddresses.verified` returned (``None``: no verification asked)."""
        granted = user.granted_senders
        if user.role == "relay" and requested_from:
            granted = (*granted, requested_from)
        # Hashable: the arguments are _decide's cache key.
        return _decide(user.email, user.display_name, tuple(settings.allowed_domains),
                       settings.sender.name, settings.sender.address, requested_from,
                       tuple(reply_to), granted,
                       None if verified is None else tuple(verified), settings.sender.display)

    async def preview(self, user: User, username: str | None, lang: str) -> Preview:
        target = user
        if username and username != user.username:
            target = await self.admin.target(user, username)
        settings = await self.delivery_settings(user.establishment_id)
        d = self.decide_sender(target, settings,
                               verified=await self.senders.verified(target, settings))
        return Preview(d.formatted_from, list(d.reply_to), d.envelope_from, d.rule,
                       d.explain(lang))

    # -- submission ----------------------------------------------------------------------
    async def submit(self, user: User, messages: Sequence[MessageIn]) -> list[EnqueueResult]:
        """Accept messages: policy, render, store durably in one commit, then return."""
        settings = await self.delivery_settings(user.establishment_id)
        if not settings.delegation:
            raise DelegationOff(
                hint=N_("Send from your workstation with your own parameters, or ask an "
                        "administrator to turn central sending on.")
            )
        verified = await self.senders.verified(user, settings)
        # The decision depends only on the message's From and Reply-To: a batch (a mass
        # mailing: the same sender, thousands of recipients) decides once per pair.
        decisions: dict[tuple[str | None, tuple[str, ...]], _Sender] = {}
        batch = [self._prepare(user, settings, m, index if len(messages) > 1 else None,
                               verified, decisions)
                 for index, m in enumerate(messages)]
        results = await self.store.enqueue(batch)
        for notify in self._notify:
            notify()
        # Built directly: dataclasses.replace costs ~3 µs an e-mail in a batch.
        return [EnqueueResult(r.id, r.status, r.duplicate, m.sender_rule)
                for r, m in zip(results, batch, strict=True)]

    async def submit_raw(
        self,
        user: User,
        mail_from: str,
        recipients: Sequence[str],
        raw: bytes,
        *,
        smtputf8: bool = False,
        idempotency_key: str | None = None,
    ) -> EnqueueResult:
        """Accept a message submitted over SMTP: the envelope sender and the From must be
        the account's own (or granted) addresses; the policy then rewrites the sender."""
        settings = await self.delivery_settings(user.establishment_id)
        if not settings.delegation:
            raise DelegationOff()
        headers = read_submitted(raw)
        requested = headers.from_addresses[0] if headers.from_addresses else mail_from
        for address in dict.fromkeys((mail_from, *headers.from_addresses)):
            if address != requested:  # the decision below checks that one
                self.decide_sender(user, settings, address)  # SenderForbidden if not theirs
        decision = self.decide_sender(user, settings, requested, headers.reply_to,
                                      await self.senders.verified(user, settings))
        message_id = self._message_id(decision)
        data = rewrite_submitted(raw, decision, message_id=message_id,
                                 max_size=self.config.max_message_size, smtputf8=smtputf8)
        wire = (lambda a: a) if smtputf8 else policy.ascii_address
        (result,) = await self.store.enqueue([
            NewMessage(
                id=new_message_id(),
                establishment_id=user.establishment_id,
                user_id=user.id,
                priority=PRIORITIES["normal"],
                envelope_from=wire(decision.envelope_from),
                header_from=decision.formatted_from,
                message_id=headers.message_id or message_id,
                subject=headers.subject,
                data=data,
                recipients=list(dict.fromkeys(recipients)),
                smtputf8=smtputf8,
                idempotency_key=idempotency_key,
                sender_rule=decision.rule,
            )
        ])
        for notify in self._notify:
            notify()
        return dataclasses.replace(result, sender_rule=decision.rule)

    def _message_id(self, decision: policy.SenderDecision) -> str:
        # The From's domain, as mail programs do: a Message-ID from another domain (or from
        # "localhost") is one more reason for a filter to doubt the e-mail.
        domain = policy.ascii_domain(decision.from_address.rpartition("@")[2])
        return make_message_id(domain or self.config.hostname)

    def _prepare(
        self, user: User, settings: DeliverySettings, msg: MessageIn, index: int | None,
        verified: Sequence[str] | None = None,
        decisions: dict[tuple[str | None, tuple[str, ...]], _Sender] | None = None,
    ) -> NewMessage:
        """One message of a submission rendered for the queue; ``decisions`` holds the
        sender decisions already taken for the same user, settings and ``verified``."""
        try:
            key = (msg.from_, tuple(msg.reply_to))
            sender = decisions.get(key) if decisions is not None else None
            if sender is None:
                decision = self.decide_sender(user, settings, msg.from_, msg.reply_to,
                                              verified)
                sender = _Sender(decision, decision.formatted_from)
                if decisions is not None:
                    decisions[key] = sender
            decision = sender.decision
            built = build_message(
                msg,
                decision,
                message_id=self._message_id(decision),
                max_size=self.config.max_message_size,
            )
        except PostierError as exc:
            if index is not None and exc.field is None:
                exc.field = f"messages.{index}"
            elif index is not None:
                exc.field = f"messages.{index}.{exc.field}"
            raise
        new = queued(built, sender.header_from, establishment_id=user.establishment_id,
                     user_id=user.id, priority=PRIORITIES[msg.priority],
                     idempotency_key=msg.idempotency_key)
        new.sender_rule = decision.rule
        return new

    # -- failure notices -------------------------------------------------------------------
    async def failure_notice(self, message_id: str) -> str | None:
        """Tell the sender, by e-mail, which recipients an e-mail could not reach for good,
        the relay's reply and what to do — in French and English, since the notice may be
        read anywhere. Sent once per e-mail; never about a notice itself."""
        return await self._notice(message_id, "failure", FAILED, NOTICE_SUBJECT, NOTICE_BODY,
                                  NOTICE_HINT)

    async def delay_notice(self, message_id: str) -> str | None:
        """Warn the sender once that an e-mail is still waiting (Postfix's
        delay_warning_time): it is not lost, Postier keeps trying."""
        return await self._notice(message_id, "delay", DEFERRED, DELAY_SUBJECT, DELAY_BODY,
                                  DELAY_HINT)

    async def _notice(
        self, message_id: str, kind: str, status: str, subject: str, body: str, hint: str
    ) -> str | None:
        record = await self.store.get_message(message_id)
        if record is None or (record.idempotency_key or "").startswith(NOTICE_PREFIX):
            return None
        concerned = [r for r in record.recipients
                     if r.status == status or (status == DEFERRED and r.status == "pending")]
        user = await self.store.get_user(user_id=record.user_id) if concerned else None
        if user is None or user.disabled or not user.email or user.role == "relay":
            # A downstream Postier server tells its own user; it needs no e-mail from us.
            return None
        settings = await self.delivery_settings(record.establishment_id)
        # The relay's reply only when a relay replied: never a Python exception's text.
        lines = "\n".join(f"  - {r.address} : {r.code} {r.reply or ''}".rstrip()
                           if r.code is not None else f"  - {r.address}" for r in concerned)

        def text(lang: str) -> str:
            # The sender's wording: what happened and what is asked of them, never the
            # administrator's remedy (see postier.core.reasons).
            why = reasons.explain(record.last_error, lang, admin=False)
            return translate(lang, body, subject=record.subject, recipients=lines,
                             hint=why["sender"] if kind == "failure" and why
                             else translate(lang, hint))

        return await self.system_email(
            record.establishment_id, [user.email],
            f"{translate('fr', subject)} / {subject} : {record.subject}",
            "\n\n".join([text("fr"), "-- English --", text("en")]),
            headers={"X-Postier-Notice": kind, "X-Postier-Message": record.id},
            idempotency_key=f"{NOTICE_PREFIX}{kind}:{record.id}",
            settings=settings,
        )

    async def system_email(
        self,
        establishment_id: int,
        to: Sequence[str],
        subject: str,
        text: str,
        *,
        headers: dict[str, str],
        idempotency_key: str,
        settings: DeliverySettings | None = None,
        priority: int = PRIORITIES["normal"],
    ) -> str:
        """Queue an e-mail Postier itself writes for the establishment (a notice, an
        alert): from the establishment's sender, once per ``idempotency_key`` (atomic with
        the store's idempotency check, whatever the number of workers)."""
        settings = settings or await self.delivery_settings(establishment_id)
        notice = MessageIn.model_validate({
            "to": list(to), "subject": subject[:900], "text": text, "headers": headers,
            "idempotency_key": idempotency_key,
        })
        decision = policy.SenderDecision(
            from_name=settings.sender.name or "Postier",
            from_address=settings.sender.address or to[0],
            reply_to=(), envelope_from=settings.sender.address or to[0],
            rule="outside_allowed", user_address=to[0], matched_pattern=None,
            allowed_domains=tuple(settings.allowed_domains),
        )
        built = build_message(notice, decision, message_id=self._message_id(decision))
        # Sent by the establishment, not by a user: it is nobody's "my e-mails".
        (result,) = await self.store.enqueue([queued(
            built, decision.formatted_from, establishment_id=establishment_id,
            user_id=SYSTEM_USER, idempotency_key=notice.idempotency_key, priority=priority,
        )])
        if not result.duplicate:
            for notify in self._notify:
                notify()
        return result.id

    # -- the queue -----------------------------------------------------------------------
    async def get_message(self, user: User, message_id: str) -> MessageRecord:
        record = await self.store.get_message(message_id)
        # Another establishment's or another user's message does not exist for this user.
        if (
            record is None
            or record.establishment_id != user.establishment_id
            or (not user.is_admin and record.user_id != user.id)
        ):
            raise NotFound(N_("There is no e-mail {id} for you."), id=message_id)
        return record

    async def list_messages(
        self, user: User, status: str | None = None, limit: int = 100, mine: bool = False
    ) -> list[MessageRecord]:
        return await self.store.list_messages(
            establishment_id=user.establishment_id,
            user_id=None if (user.is_admin and not mine) else user.id,
            status=status,
            limit=limit,
        )

    async def retry(self, user: User, message_id: str) -> MessageRecord:
        record = await self.get_message(user, message_id)
        if record.status not in (QUEUED, DEFERRED, FAILED):
            raise Conflict(
                N_("This e-mail is {status}: only waiting or failed e-mails can be retried."),
                status=record.status,
            )
        if not await self.store.has_body(message_id):
            raise Conflict(
                N_("The content of this e-mail is no longer kept (retention of personal "
                   "data): it cannot be sent again from here."),
                hint=N_("Send it again from the application that wrote it."),
            )
        await self.store.retry_now(message_id, time.time())
        for notify in self._notify:
            notify()
        return await self.get_message(user, message_id)

    async def cancel(self, user: User, message_id: str) -> MessageRecord:
        record = await self.get_message(user, message_id)
        ok = await self.store.set_status(
            message_id, CANCELLED, from_statuses=(QUEUED, DEFERRED), now=time.time()
        )
        if not ok:
            hint = (
                N_("It is being sent right now; try again in a moment.")
                if record.status == SENDING
                else None
            )
            raise Conflict(
                N_("This e-mail is {status} and can no longer be cancelled."),
                hint=hint,
                status=record.status,
            )
        return await self.get_message(user, message_id)

    async def retry_all(self, user: User, status: str | None = None, mine: bool = False,
                        **narrower: Any) -> int:
        """Try again now every waiting or failed e-mail the list with the same filters shows
        ``user`` (an administrator: the establishment's unless ``mine``; anybody else:
        their own), in one transaction; how many. E-mails whose content is no longer kept
        are left as they are. ``narrower``: the queue page's other filters (sender,
        recipient, since, until; see :meth:`Store.retry_matching`)."""
        if status is not None and status not in RETRYABLE:
            raise InvalidInput(
                N_("Only waiting or failed e-mails can be retried, not {status} ones."),
                hint=N_("Choose the status queued, deferred or failed, or none."),
                field="status", status=status)
        everyone = user.is_admin and not mine
        count = await self.store.retry_matching(
            establishment_id=user.establishment_id, user_id=None if everyone else user.id,
            statuses=RETRYABLE if status is None else (status,), now=time.time(),
            **narrower)
        if count:
            for notify in self._notify:
                notify()
            await self.store.audit(user.establishment_id, user.username, "messages.retry_all",
                                   status or "", {"count": count, "everyone": everyone})
        return count

    async def resend(self, user: User, message_id: str) -> EnqueueResult:
        """An administrator sends a sent e-mail again: a new e-mail (new queue id and
        Message-ID, today's Date) with the same content, sender and recipients, in its
        author's name; the audit log says who resent it. It counts in the administrator's
        submission pace."""
        require_admin(user)
        record = await self.get_message(user, message_id)
        if record.status != SENT:
            raise Conflict(
                N_("This e-mail is {status}: only a sent e-mail can be sent again."),
                hint=N_("Retry a waiting or failed e-mail instead."), status=record.status)
        content = await self.store.get_content(message_id)
        if content is None:
            raise Conflict(
                N_("The content of this e-mail is no longer kept (retention of personal "
                   "data): it cannot be sent again from here."),
                hint=N_("Send it again from the application that wrote it."))
        new_mid = self._message_id(_sender_of(record))
        pace = pace_for(self.store, self.config)  # a resend counts as a submission
        await pace.take(user, len(record.recipients))
        try:
            (result,) = await self.store.enqueue([NewMessage(
                id=new_message_id(), establishment_id=record.establishment_id,
                user_id=record.user_id, priority=record.priority,
                envelope_from=record.envelope_from, header_from=record.header_from,
                message_id=new_mid, subject=record.subject, data=renewed(content[0], new_mid),
                recipients=[r.address for r in record.recipients], smtputf8=content[1],
                sender_rule=record.sender_rule)])
        except BaseException:
            pace.give_back(user, len(record.recipients))
            raise
        for notify in self._notify:
            notify()
        await self.store.audit(user.establishment_id, user.username, "message.resend",
                               record.id, {"new_id": result.id})
        return result


RETRYABLE = (QUEUED, DEFERRED, FAILED)


def _sender_of(record: MessageRecord) -> policy.SenderDecision:
    """As much of the decision an e-mail was sent with as its Message-ID needs."""
    return policy.SenderDecision(
        from_name="", from_address=record.envelope_from, reply_to=(),
        envelope_from=record.envelope_from, rule="outside_allowed",
        user_address=record.envelope_from, matched_pattern=None, allowed_domains=())
_RENEWED_FIELDS = (b"message-id", b"date")


def renewed(data: bytes, message_id: str) -> bytes:
    """Stored bytes with a new Message-ID and Date (every other field and the body kept):
    a receiving server that has seen the old Message-ID would drop the copy as a
    duplicate."""
    head, sep, body = data.partition(b"\r\n\r\n")
    kept: list[bytes] = []
    dropping = False
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):  # a folded field's continuation
            if not dropping:
                kept.append(line)
            continue
        dropping = line.split(b":", 1)[0].strip().lower() in _RENEWED_FIELDS
        if not dropping:
            kept.append(line)
    fresh = [f"Message-ID: {message_id}".encode(),
             f"Date: {format_datetime(datetime.datetime.now(datetime.UTC))}".encode()]
    return b"\r\n".join([*fresh, *kept]) + sep + body


def explain_error(last_error: str | None, lang: str) -> dict[str, Any] | None:
    """Render a stored error in the reader's language."""
    if not last_error:
        return None
    try:
        return load(json.loads(last_error)).render(lang)
    except (ValueError, TypeError, AttributeError):  # a damaged row must not break a listing
        return {"code": "unexpected", "message": last_error}


def settings_warnings(settings: DeliverySettings, lang: str = "en") -> list[str]:
    """What the administrator must know about the relays: a password sent without
    encryption, an OAuth2 client secret or certificate about to expire (the backup
    relay's prefixed as such)."""
    out = relay_warnings(settings.relay, lang)
    if settings.backup_relay is not None:
        out += [translate(lang, N_("Backup relay: {warning}"), warning=w)
                for w in relay_warnings(settings.backup_relay, lang)]
    return out


def relay_warnings(relay: RelaySettings, lang: str = "en") -> list[str]:
    """One relay's (or sending profile's) warnings: its sign-in sent without encryption;
    an OAuth2 client secret or certificate about to expire, or e-mails stop leaving."""
    out: list[str] = []
    if cleartext_sign_in(relay.kind, relay.security, relay.auth):
        out.append(translate(lang, CLEARTEXT_WARNING))
    for kind, date in relay.oauth2_expiries():
        if date - datetime.date.today() > datetime.timedelta(days=30):
            continue
        if kind == "certificate":
            out.append(translate(lang, N_(
                "The OAuth2 certificate expires on {date}: register a new one on the "
                "application in Entra ID and paste it here with its key before then, or "
                "e-mails will stop leaving."), date=date.isoformat()))
        else:
            out.append(translate(lang, N_(
                "The OAuth2 client secret expires on {date}: renew it before then, or "
                "e-mails will stop leaving."), date=date.isoformat()))
    return out


CLEARTEXT_WARNING = N_(
    "The sign-in to this SMTP server travels without encryption (security: none): anyone "
    "on the network between them can read the password. Choose STARTTLS or SSL/TLS."
)


def cleartext_sign_in(kind: str, security: str, auth: str) -> bool:
    """A password (or OAuth2 token) would travel in clear to an SMTP server."""
    return kind == RelayKind.SMTP and security == Security.NONE and auth != AuthMethod.NONE


def profile_warnings(profile: dict[str, Any], lang: str = "en") -> list[str]:
    """A sending profile's warnings, from its public form (workstations sign in with it)."""
    if cleartext_sign_in(str(profile.get("kind", "smtp")), str(profile.get("security")),
                         str(profile.get("auth", "none"))):
        return [translate(lang, CLEARTEXT_WARNING)]
    return []
