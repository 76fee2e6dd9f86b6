"""Administration of an establishment: users, tokens, sending profiles, settings,
test-send, audit.

Every method checks the caller's role and records administrative changes in the audit log
(who, what, when — never a secret's value). Used by the HTTP API, the CLI and the web
pages alike.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import Any

from pydantic import Field, field_validator

from postier.core import accounts, first_run, policy
from postier.core.accounts import may_act_on, no_escalation, require_admin
from postier.core.bounces import check_bounce_address
from postier.core.dkim_keys import DkimKeys
from postier.core.domains import Domains, settings_claims
from postier.core.installation import Installation
from postier.core.relay_warnings import relay_warnings, settings_warnings
from postier.core.sender_decision import decide_sender
from postier.core.sender_verification import SenderAddresses
from postier.core.settings import (
    RELAY_SECTIONS,
    SECRET_FIELDS,
    AuthMethod,
    DeliverySettings,
    RelaySettings,
)
from postier.core.user_accounts import UserAccounts
from postier.delivery import diagnose
from postier.errors import InvalidInput, NotFound, SenderNotConfigured
from postier.i18n import N_, translate
from postier.store.base import AuditEntry, ProfileRecord, TokenInfo, User

__all__ = ["Administration", "ProfileIn", "may_act_on", "profile_public", "require_admin"]
log = logging.getLogger("postier")


class ProfileIn(RelaySettings):
    """A sending profile: a label users recognise and SMTP server settings."""

    label: str = Field(min_length=1, max_length=100, description="Label shown to users")

    @field_validator("auth")
    @classmethod
    def _no_oauth2(cls, value: Any) -> Any:
        if str(value) == "oauth2":
            raise ValueError("OAuth2 is set in the server's settings, not in a profile")
        return value

    @field_validator("kind")
    @classmethod
    def _smtp_only(cls, value: Any) -> Any:
        if str(value) != "smtp":
            raise ValueError("a sending profile describes an SMTP server")
        return value

    @field_validator("label")
    @classmethod
    def _label(cls, value: str) -> str:
        value = " ".join(value.split())
        if not value:
            raise ValueError("the label cannot be empty")
        return value


def profile_public(p: ProfileRecord) -> dict[str, Any]:
    """What any user may see of a profile: never the shared password."""
    data = {k: v for k, v in p.data.items() if k != "password_enc"}
    return {"id": p.id, "label": p.label, **data, "password_set": "password_enc" in p.data}


def _flatten(doc: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in doc.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def changed_keys(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    a, b = dict(_flatten(before)), dict(_flatten(after))
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


class Administration:
    """What an establishment's administrators (and the installation's operators) do."""

    def __init__(self, installation: Installation, user_accounts: UserAccounts,
                 domains: Domains, senders: SenderAddresses, dkim: DkimKeys) -> None:
        self.installation = installation
        self.store = installation.store
        self.accounts = user_accounts
        self.domains = domains
        self.senders = senders
        self.dkim = dkim

    # -- users ---------------------------------------------------------------------------
    async def target(self, actor: User, username: str) -> User:
        """The account of the actor's establishment an administrator acts on, checked
        against the actor's rank (:func:`may_act_on`)."""
        require_admin(actor)
        target = await self.accounts.find_user(username, actor.establishment_id)
        may_act_on(actor, target)
        return target

    async def list_users(self, actor: User) -> list[User]:
        require_admin(actor)
        return await self.store.list_users(actor.establishment_id)

    async def create_user(self, actor: User, **fields: Any) -> User:
        require_admin(actor)
        no_escalation(actor, fields.get("role"))
        user = await self.accounts.add_user(establishment_id=actor.establishment_id, **fields)
        await self.store.audit(actor.establishment_id, actor.username, "user.create",
                               user.username, {"role": user.role, "email": user.email})
        return user

    async def update_user(
        self,
        actor: User,
        username: str,
        *,
        email: str | None = None,
        display_name: str | None = None,
        role: str | None = None,
        disabled: bool | None = None,
        password: str | None = None,
        granted_senders: list[str] | None = None,
    ) -> User:
        target = await self.target(actor, username)
        values: dict[str, Any] = {}
        if email is not None:
            values["email"] = policy.normalize_address(email)
        if display_name is not None:
            if any(c in display_name for c in "\r\n\0"):
                raise InvalidInput(N_("The name cannot contain line breaks."), field="name")
            values["display_name"] = display_name.strip()
        no_escalation(actor, role)
        if role is not None:
            if role not in accounts.ROLES:
                raise InvalidInput(
                    N_("Unknown role {role!r}: choose admin, user, operator or relay."),
                    field="role", role=role)
            accounts.check_placement(role, actor.establishment_id)
            values["role"] = role
        if granted_senders is not None:
            values["granted_senders"] = [policy.normalize_address(a) for a in granted_senders]
            await self.domains.check_grants(actor.establishment_id,
                                                 values["granted_senders"], target)
        if disabled is not None:
            values["disabled"] = disabled
        if target.id == actor.id and (
            disabled or (role is not None and accounts.rank(role) < accounts.rank(actor.role))
        ):
            raise InvalidInput(
                N_("You cannot disable yourself or remove your own administrator role."),
                hint=N_("Ask another administrator to do it."),
                field="role" if role is not None else "disabled",
            )
        if password is not None:
            values["password_hash"] = await asyncio.to_thread(accounts.hash_password, password)
        if values:
            await self.store.update_user(target.id, **values)
            self.installation.forget_tokens()
        if disabled:
            # A disabled account's tokens stop working at once, and stay revoked.
            await self.store.revoke_all_tokens(target.id)
            self.installation.forget_tokens()
        details = {k: v for k, v in values.items() if k != "password_hash"}
        if password is not None:
            details["password"] = "reset"  # noqa: S105 - what happened, not the value
        await self.store.audit(actor.establishment_id, actor.username, "user.update",
                               target.username, details)
        return await self.accounts.find_user(username, actor.establishment_id)

    async def disable_user(self, actor: User, username: str) -> User:
        """A disabled user can no longer sign in and their tokens stop working at once;
        their e-mails stay in the history."""
        return await self.update_user(actor, username, disabled=True)

    async def change_own_password(self, user: User, current: str, new: str) -> None:
        if not await asyncio.to_thread(accounts.verify_password, user.password_hash, current):
            raise InvalidInput(N_("The current password is wrong."), field="current")
        if len(new) < 8:
            raise InvalidInput(N_("A password has at least 8 characters."), field="new")
        await self.store.update_user(
            user.id, password_hash=await asyncio.to_thread(accounts.hash_password, new)
        )
        await self.store.audit(user.establishment_id, user.username, "user.password",
                               user.username, {})

    async def create_first_administrator(
        self, token: str, username: str, email: str, name: str, password: str
    ) -> User | first_run.Check:
        """The first administrator, made from the setup page with its one-time ``token``
        (:mod:`postier.core.first_run`): the account, or the check that refused the
        token. Audited as done by ``setup``."""
        async def create() -> User:
            user = await self.accounts.add_user(username, email, display_name=name,
                                                role="admin", password=password)
            await self.store.audit(user.establishment_id, "setup", "user.create",
                                   user.username, {"role": user.role, "email": user.email})
            return user

        return await first_run.use(self.store, token, create)

    async def record_data_export(self, actor: User, subject: User, messages: int) -> None:
        """An administrator exported what Postier keeps about ``subject`` (RGPD access)."""
        await self.store.audit(actor.establishment_id, actor.username, "user.data_export",
                               subject.username, {"messages": messages})

    # -- tokens --------------------------------------------------------------------------
    async def _token_owner(self, actor: User, username: str | None) -> User:
        if username is None or username == actor.username:
            return actor
        return await self.target(actor, username)

    async def list_tokens(self, actor: User, username: str | None = None) -> list[TokenInfo]:
        owner = await self._token_owner(actor, username)
        return await self.store.list_tokens(owner.id)

    async def create_token(
        self, actor: User, name: str = "", username: str | None = None
    ) -> tuple[str, TokenInfo]:
        owner = await self._token_owner(actor, username)
        token, info = await self.accounts.create_token(owner, name)
        await self.store.audit(actor.establishment_id, actor.username, "token.create",
                               owner.username, {"token_id": info.id, "name": name})
        return token, info

    async def revoke_token(self, actor: User, token_id: int, username: str | None = None) -> None:
        owner = await self._token_owner(actor, username)
        revoked = await self.store.revoke_token(owner.id, token_id)
        self.installation.forget_tokens()
        if not revoked:
            raise NotFound(N_("There is no active token {id} for {username}."),
                           id=token_id, username=owner.username)
        await self.store.audit(actor.establishment_id, actor.username, "token.revoke",
                               owner.username, {"token_id": token_id})

    # -- profiles ------------------------------------------------------------------------
    def _encode_profile(self, p: ProfileIn, keep: ProfileRecord | None) -> dict[str, Any]:
        data = p.model_dump(mode="json", exclude={"label", *SECRET_FIELDS})
        if p.password:
            data["password_enc"] = self.installation.secrets.encrypt(p.password)
        elif p.password is None and keep is not None and "password_enc" in keep.data:
            data["password_enc"] = keep.data["password_enc"]
        return data

    async def _profile(self, user: User, profile_id: int) -> ProfileRecord:
        record = await self.store.get_profile(profile_id)
        if record is None or record.establishment_id != user.establishment_id:
            raise NotFound(N_("There is no sending profile {id}."), id=profile_id)
        return record

    async def list_profiles(self, user: User) -> list[dict[str, Any]]:
        return [profile_public(p) for p in await self.store.list_profiles(user.establishment_id)]

    async def get_profile(self, user: User, profile_id: int) -> dict[str, Any]:
        return profile_public(await self._profile(user, profile_id))

    async def create_profile(self, actor: User, payload: dict[str, Any]) -> dict[str, Any]:
        require_admin(actor)
        p = ProfileIn.model_validate(payload)
        record = await self.store.create_profile(
            actor.establishment_id, p.label, self._encode_profile(p, None)
        )
        await self.store.audit(actor.establishment_id, actor.username, "profile.create",
                               p.label, {"id": record.id, "host": p.host})
        return profile_public(record)

    async def update_profile(
        self, actor: User, profile_id: int, payload: dict[str, Any]
    ) -> dict[str, Any]:
        require_admin(actor)
        current = await self._profile(actor, profile_id)
        p = ProfileIn.model_validate(payload)
        data = self._encode_profile(p, current)
        await self.store.update_profile(profile_id, p.label, data)
        after = {k: v for k, v in data.items() if k != "password_enc"} | {"label": p.label}
        before = {k: v for k, v in current.data.items() if k != "password_enc"} | {
            "label": current.label}
        changed = changed_keys(before, after)
        if p.password or ("password_enc" in data) != ("password_enc" in current.data):
            changed.append("password")  # set, changed or removed: never its value
        await self.store.audit(actor.establishment_id, actor.username, "profile.update",
                               p.label, {"id": profile_id, "changed": changed})
        return profile_public(await self._profile(actor, profile_id))

    async def delete_profile(self, actor: User, profile_id: int) -> None:
        require_admin(actor)
        current = await self._profile(actor, profile_id)
        await self.store.delete_profile(profile_id)
        await self.store.audit(actor.establishment_id, actor.username, "profile.delete",
                               current.label, {"id": profile_id})

    async def retrieve_profile(self, user: User, profile_id: int) -> dict[str, Any]:
        """What a workstation needs to use the profile ("Récupérer un profil d'envoi
        d'e-mails"), with the shared password when the administrator stored one."""
        record = await self._profile(user, profile_id)
        out = profile_public(record)
        enc = record.data.get("password_enc")
        out["password"] = self.installation.secrets.decrypt(enc) if enc else None
        await self.store.record_retrieval(profile_id, user.id)
        await self.store.audit(user.establishment_id, user.username, "profile.retrieve",
                               record.label, {"id": profile_id})
        return out

    # -- settings and test-send ----------------------------------------------------------
    async def get_settings(self, user: User, lang: str = "en") -> dict[str, Any]:
        require_admin(user)
        installation = self.installation
        doc = (await installation.stored_settings(user.establishment_id)).public()
        est = await installation.establishment(user.establishment_id)
        doc["hosted"] = bool(est and est.hosted and installation.config.platform_relay is not None)
        doc["warnings"] = settings_warnings(
            await installation.stored_settings(user.establishment_id), lang)
        return doc

    async def put_settings(self, user: User, payload: dict[str, Any], lang: str = "en"
                           ) -> dict[str, Any]:
        """Change the settings given in ``payload`` (any part; the rest stays), validated
        whole before anything is saved; the relay password is kept when none is given.
        The answer is the settings as saved, with their ``warnings`` (nothing refused)."""
        require_admin(user)
        current = await self.installation.stored_settings(user.establishment_id)
        # What GET adds for reading (hosted, warnings) may come back: it is not a setting.
        merged = current.updated(
            {k: v for k, v in payload.items() if k not in ("hosted", "warnings")}
        )
        check_bounce_address(merged)
        await self.domains.check(user.establishment_id, settings_claims(current, merged))
        await self.installation.check_targets(user.establishment_id, merged, current)
        await self.installation.replace_settings(user.establishment_id, merged)
        await self.audit_settings_change(user, current, merged)
        log.info("settings of establishment %s changed by %s", user.establishment_id,
                 user.username)
        return merged.public() | {"warnings": settings_warnings(merged, lang)}

    async def test_warnings(self, user: User, candidate: dict[str, Any] | None,
                            backup: bool, lang: str) -> list[str]:
        """The warnings of the relay a test-send uses (saved settings, or unsaved ones)."""
        require_admin(user)
        saved = await self.installation.delivery_settings(user.establishment_id)
        settings = saved.updated(candidate) if candidate else saved
        relay = settings.backup_relay if backup else settings.relay
        return relay_warnings(relay, lang) if relay is not None else []

    async def audit_settings_change(
        self, actor: User, before: DeliverySettings, after: DeliverySettings
    ) -> None:
        changed = set(changed_keys(before.public(), after.public()))
        for section in RELAY_SECTIONS:
            old, new = getattr(before, section), getattr(after, section)
            for name in SECRET_FIELDS:
                changed.discard(f"{section}.{name}_set")
                if getattr(old, name, None) != getattr(new, name, None):
                    changed.add(f"{section}.{name}")  # that it changed, never the value
        changed.discard("alerts.webhook_secret_set")
        if before.alerts.webhook_secret != after.alerts.webhook_secret:
            changed.add("alerts.webhook_secret")
        changed.discard("bounces.imap.password_set")
        if ((before.bounces.imap and before.bounces.imap.password)
                != (after.bounces.imap and after.bounces.imap.password)):
            changed.add("bounces.imap.password")
        await self.store.audit(actor.establishment_id, actor.username, "settings.update",
                               "settings", {"changed": sorted(changed)})

    async def test_settings(
        self,
        actor: User,
        to: str,
        candidate: dict[str, Any] | None,
        lang: str,
        *,
        check_senders: bool = False,
        backup: bool = False,
        send: bool = True,
    ) -> diagnose.TestReport:
        """Send a real test e-mail with the saved settings, or with unsaved ones given in
        ``candidate`` (any part of the settings, merged over the saved ones); ``send=False``
        only checks the connection (up to authentication, no e-mail). When the settings
        tested differ from the saved ones, the report and the e-mail say they are not
        saved yet."""
        require_admin(actor)
        saved = await self.installation.delivery_settings(actor.establishment_id)
        settings = saved.updated(candidate) if candidate else saved
        unsaved = settings != saved
        await self.installation.check_targets(actor.establishment_id, settings, saved)
        if backup:
            if settings.backup_relay is None or not settings.backup_relay.configured:
                raise InvalidInput(N_("No backup relay is set: there is nothing to test."),
                                   field="backup_relay")
            settings = settings.model_copy(update={"relay": settings.backup_relay})
        address = policy.normalize_address(to)
        # The test e-mail leaves as the administrator's own e-mails would (an address not
        # verified yet, when the establishment asks for it, gives way to the
        # establishment's sender); from the console (no address of its own), as the
        # establishment's sender.
        sender_name, sender_address = settings.sender.name, settings.sender.address
        if actor.email:
            try:
                decision = decide_sender(
                    actor, settings, verified=await self.senders.verified(actor, settings))
                sender_name, sender_address = decision.from_name, decision.envelope_from
            except SenderNotConfigured:
                sender_name, sender_address = actor.display_name, actor.email
        if not sender_address:
            raise InvalidInput(
                N_("Enter the establishment's sender address before testing."),
                field="sender.address",
            )
        senders: list[str] = []
        if check_senders:
            senders = await self._sender_identities(actor, settings)
        started = time.monotonic()
        keys = await self.dkim.keys(actor.establishment_id)
        report = await diagnose.test_send(
            settings.relay,
            to=address,
            sender_name=sender_name,
            sender_address=sender_address,
            lang=lang,
            local_hostname=self.installation.config.hostname,
            check_senders=senders,
            dkim_key=keys.get(sender_address.rpartition("@")[2].lower()),
            label=translate(
                lang,
                N_("the establishment's delivery settings, not saved yet")
                if unsaved
                else N_("the establishment's delivery settings"),
            ),
            send=send,
            unsaved=unsaved,
        )
        await self.store.audit(
            actor.establishment_id, actor.username,
            "settings.test" if send else "settings.check", address,
            {"ok": report.ok, "code": (report.error or {}).get("code"),
             "ms": int((time.monotonic() - started) * 1000), "unsaved": unsaved},
        )
        return report

    async def test_profile(
        self,
        actor: User,
        profile_id: int,
        candidate: dict[str, Any] | None,
        lang: str,
        *,
        to: str | None = None,
        send: bool = True,
    ) -> diagnose.TestReport:
        """Check a sending profile's SMTP server (``send=False``) or send a test e-mail
        through it, as the administrator (their address is the sender and, by default,
        the recipient). ``candidate``: the profile's fields being edited, merged over the
        saved ones (a blank password keeps the shared one); the report says when they
        differ from what is saved."""
        require_admin(actor)
        record = await self._profile(actor, profile_id)
        enc = record.data.get("password_enc")
        stored = {k: v for k, v in record.data.items() if k != "password_enc"}
        stored |= {"label": record.label,
                   "password": self.installation.secrets.decrypt(enc) if enc else None}
        saved = ProfileIn.model_validate(stored)
        merged = stored | {k: v for k, v in (candidate or {}).items()
                           if not (k == "password" and v is None)}
        if merged.get("password") == "":
            merged["password"] = None
        profile = ProfileIn.model_validate(merged)
        if not actor.email:
            raise InvalidInput(N_("Your account has no e-mail address to test from."),
                               field="form")
        if profile.auth == AuthMethod.PASSWORD and not (profile.username and profile.password):
            raise InvalidInput(
                N_("This profile has no shared username and password: enter them to test "
                   "it (they are saved only if you click Save)."), field="username")
        address = policy.normalize_address(to or actor.email)
        started = time.monotonic()
        report = await diagnose.test_send(
            profile, to=address, sender_name=actor.display_name, sender_address=actor.email,
            lang=lang, local_hostname=self.installation.config.hostname, send=send,
            unsaved=profile != saved,
            label=translate(lang, N_("the sending profile {label}"), label=profile.label),
        )
        await self.store.audit(
            actor.establishment_id, actor.username,
            "profile.test" if send else "profile.check", record.label,
            {"id": profile_id, "ok": report.ok, "code": (report.error or {}).get("code"),
             "ms": int((time.monotonic() - started) * 1000), "unsaved": profile != saved},
        )
        return report

    async def _sender_identities(self, actor: User, settings: DeliverySettings) -> list[str]:
        """The envelope senders the policy will use: the establishment's sender, and for
        each allowed domain one of the users whose address it covers."""
        out: list[str] = []
        if settings.sender.address:
            out.append(settings.sender.address)
        users = await self.store.list_users(actor.establishment_id)
        for pattern in settings.allowed_domains:
            for u in users:
                if not u.disabled and policy.matching_pattern(u.email, [pattern]):
                    out.append(u.email)
                    break
        return list(dict.fromkeys(out))

    async def audit_log(self, actor: User, limit: int = 200) -> list[AuditEntry]:
        require_admin(actor)
        return await self.store.list_audit(actor.establishment_id, limit)
