"""One installation as every part of the service layer sees it: its configuration, its
store, its secrets, and short-lived copies of what rarely changes (establishments, their
settings, their DKIM keys, the accounts API tokens open).

The parts of the service layer (:mod:`postier.core.service` composes them) share one
:class:`Installation`: a change made through one part forgets the copies at once in this
process; another process's changes count after ``SETTINGS_TTL`` seconds.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.exc import DBAPIError

from postier.core import targets
from postier.core.cache import TTLCache
from postier.core.crypto import SecretBox
from postier.core.dkim_signing import DkimKey
from postier.core.settings import RELAY_SECTIONS, SECRET_FIELDS, DeliverySettings, SenderSettings
from postier.errors import StoreUnavailable
from postier.i18n import N_
from postier.server.config import ServerConfig, networks
from postier.store import create_store, database_url
from postier.store.base import Establishment, Store, User

SETTINGS_TTL = 2.0  # seconds a process trusts its cached copy of another process's change


class Installation:
    """The store, the secrets, the settings and their short-lived copies."""

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
        self.dkim_cache: TTLCache[int, dict[str, DkimKey]] = TTLCache(SETTINGS_TTL)
        # API token digest -> (its account, when it was read): see Authentication.
        self.token_cache: dict[str, tuple[User, float]] = {}
        self._on_accept: list[Callable[[], Any]] = []

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

    # -- waking delivery ---------------------------------------------------------------
    def on_accept(self, callback: Callable[[], Any]) -> None:
        """Register a callable run after each acceptance (the worker's wake-up)."""
        self._on_accept.append(callback)

    def accepted_elsewhere(self) -> None:
        """Another process of this server (``--http-processes``) stored e-mails: wake
        delivery as for this process's own."""
        for notify in self._on_accept:
            notify()

    def wake_delivery(self) -> None:
        """E-mails were stored or made due now: tell delivery at once."""
        for notify in self._on_accept:
            notify()

    # -- short-lived copies --------------------------------------------------------------
    def forget_tokens(self) -> None:
        """A user, a token or an establishment changed: check every token again."""
        self.token_cache.clear()
        self._establishments.forget()

    def forget_dkim(self, *establishment_ids: int) -> None:
        for establishment_id in establishment_ids:
            self.dkim_cache.forget(establishment_id)

    async def establishment(self, slug_or_id: str | int) -> Establishment | None:
        """An establishment, from a short-lived cache (they rarely change)."""
        return await self._establishments.get(
            slug_or_id, lambda: self.store.get_establishment(slug_or_id)
        )

    # -- settings ------------------------------------------------------------------------
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
        """Store an establishment's whole settings as an action decided them (audited by
        that action)."""
        await self.store.save_settings(establishment_id, self._encode_settings(settings))
        self._settings.forget(establishment_id)

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

    async def check_targets(self, establishment_id: int, settings: DeliverySettings,
                            before: DeliverySettings | None = None) -> None:
        """A hosted establishment's servers (relays, OAuth2 token URL, webhook) must not
        lead to the platform's own networks: see :mod:`postier.core.targets`."""
        est = await self.establishment(establishment_id)
        if est is not None and est.hosted:
            await targets.check(settings, before, networks(
                self.config.hosted_allowed_networks, "POSTIER_HOSTED_ALLOWED_NETWORKS"))

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
        imap = (doc.get("bounces") or {}).get("imap")
        if isinstance(imap, dict):
            enc = imap.pop("password_enc", None)
            imap["password"] = self.secrets.decrypt(enc) if enc else None
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
        imap = doc["bounces"]["imap"]
        if isinstance(imap, dict):
            password = imap.pop("password", None)
            if password:
                imap["password_enc"] = self.secrets.encrypt(password)
        return doc
