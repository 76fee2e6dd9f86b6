"""Typed delivery settings of an establishment ("Paramètres d'envoi des e-mails").

The same models validate what the HTTP API, the CLI and the web pages receive, so a bad
port or an unknown security mode is refused the same way whatever the door. Secrets
(``relay.password``) are write-only: :meth:`DeliverySettings.public` is what any interface
shows, with ``password_set`` in place of the value.
"""

from __future__ import annotations

import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from postier.core import policy
from postier.delivery import client_certificate
from postier.errors import InvalidSetting
from postier.i18n import N_

# Each pattern is checked on its own so an error names its position (allowed_domains.2).
DomainPattern = Annotated[str, AfterValidator(policy.normalize_domain_pattern)]


def http_url(value: str) -> str:
    """A server address given by a person: trimmed, without its final slash."""
    value = value.strip().rstrip("/")
    if value and not value.startswith(("http://", "https://")):
        raise ValueError("the server address starts with http:// or https://")
    return value


class Security(StrEnum):
    NONE = "none"
    STARTTLS = "starttls"
    TLS = "tls"


class AuthMethod(StrEnum):
    NONE = "none"
    PASSWORD = "password"  # noqa: S105 - a method name
    OAUTH2 = "oauth2"  # XOAUTH2: Microsoft 365, Google Workspace


class OAuth2Provider(StrEnum):
    MICROSOFT = "microsoft"  # client credentials (tenant, client id, secret or certificate)
    GOOGLE = "google"  # refresh token (client id, secret, refresh token)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RelayKind(StrEnum):
    SMTP = "smtp"
    POSTIER = "postier"  # another Postier server (the original product's "shared base")


class RelaySettings(_Model):
    """How to reach the SMTP server that sends the establishment's e-mails — or the
    Postier server this one hands its e-mails on to (``kind: postier``, with ``url`` and
    an API token of that server in ``password``)."""

    kind: RelayKind = RelayKind.SMTP
    url: str = Field("", max_length=500, description="kind postier: the upstream server's URL")
    host: str = Field("", max_length=253, description="Host name or address of the SMTP server")
    port: int = Field(587, ge=1, le=65535)
    security: Security = Security.STARTTLS
    auth: AuthMethod = AuthMethod.NONE
    username: str = Field("", max_length=320)
    password: str | None = Field(
        None, max_length=1024, description="Write-only; never returned. Omit to keep."
    )
    timeout: int = Field(30, ge=1, le=600, description="Server timeout in seconds")
    verify_tls: bool = Field(True, description="Verify the server's TLS certificate")
    pipelining: bool = Field(True, description=(
        "Send each e-mail's commands together when the server offers PIPELINING (RFC 2920); "
        "off only for a server that mishandles it"))
    oauth2_provider: OAuth2Provider = OAuth2Provider.MICROSOFT
    oauth2_tenant: str = Field("", max_length=100, description="Microsoft: the tenant id")
    oauth2_client_id: str = Field("", max_length=200)
    oauth2_client_secret: str | None = Field(None, max_length=2000,
                                             description="Write-only; never returned")
    oauth2_refresh_token: str | None = Field(None, max_length=4000,
                                             description="Google: write-only")
    # Microsoft's certificate credentials, instead of a client secret (the certificate
    # comes first so that the key's check can compare the two).
    oauth2_certificate: str | None = Field(
        None, max_length=client_certificate.PEM_MAX,
        description="Microsoft: the certificate (PEM) whose public part is registered on "
        "the application; write-only. With oauth2_private_key, used instead of the secret",
    )
    oauth2_private_key: str | None = Field(
        None, max_length=client_certificate.PEM_MAX, validate_default=True,
        description="Microsoft: the certificate's RSA private key (PEM, no passphrase); "
        "write-only",
    )
    oauth2_token_url: str = Field("", max_length=500,
                                  description="Token endpoint, when not the provider's")
    oauth2_secret_expires: str = Field(
        "", max_length=10, description="YYYY-MM-DD when the client secret expires (warned)"
    )
    max_per_minute: int | None = Field(
        None, ge=1, le=100_000,
        description="At most this many e-mails per minute to this server (its sending "
        "limit, e.g. 30 for an Exchange Online mailbox); empty: no limit",
    )
    max_per_hour: int | None = Field(
        None, ge=1, le=1_000_000,
        description="At most this many e-mails started per hour (over any 60 minutes), all "
        "workers together; empty: no limit",
    )
    max_recipients_per_day: int | None = Field(
        None, ge=1, le=10_000_000,
        description="At most this many recipients per day (over any 24 hours), all workers "
        "together, e.g. 10000 for an Exchange Online mailbox; once reached, the rest waits "
        "for the next day; empty: no limit",
    )
    max_connections: int | None = Field(
        None, ge=1, le=100,
        description="At most this many simultaneous connections to this server from all of "
        "Postier's workers together, e.g. 3 for an Exchange Online mailbox; empty: no limit "
        "(each worker opens up to its own relay_concurrency)",
    )

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        value = value.strip()
        if any(c.isspace() for c in value) or "/" in value:
            raise ValueError("a host name has no spaces or slashes (example: smtp.ac-lyon.fr)")
        return value

    @field_validator("oauth2_secret_expires")
    @classmethod
    def _expires(cls, value: str) -> str:
        if value:
            datetime.date.fromisoformat(value)  # its ValueError says what is wrong
        return value

    @field_validator("oauth2_certificate")
    @classmethod
    def _certificate(cls, value: str | None) -> str | None:
        return client_certificate.check_certificate(value) if value else value

    @field_validator("oauth2_private_key")
    @classmethod
    def _private_key(cls, value: str | None, info: ValidationInfo) -> str | None:
        if "oauth2_certificate" not in info.data:  # the certificate itself was refused
            return value
        certificate = info.data["oauth2_certificate"]
        if value and certificate:
            client_certificate.load(value, certificate)  # says what does not match
        elif value:
            client_certificate.check_private_key(value)
            raise InvalidSetting(N_("Paste the certificate too: Postier needs the private "
                                    "key and its certificate."))
        elif certificate:
            raise InvalidSetting(N_("Paste the certificate's private key too: Postier "
                                    "needs the private key and its certificate."))
        return value

    @field_validator("url", "oauth2_token_url")
    @classmethod
    def _url(cls, value: str) -> str:
        return http_url(value)

    @property
    def configured(self) -> bool:
        return bool(self.url if self.kind == RelayKind.POSTIER else self.host)

    def certificate_credentials(self) -> client_certificate.ClientCertificate | None:
        """The checked certificate credentials, when both parts are set."""
        if self.oauth2_private_key and self.oauth2_certificate:
            return client_certificate.load(self.oauth2_private_key, self.oauth2_certificate)
        return None

    def oauth2_expiries(self) -> list[tuple[str, datetime.date]]:
        """When this relay's OAuth2 credentials stop working, soonest first: ``("secret",
        date)`` as entered, ``("certificate", date)`` read from the certificate."""
        if self.auth != AuthMethod.OAUTH2:
            return []
        out = []
        if self.oauth2_secret_expires:
            out.append(("secret", datetime.date.fromisoformat(self.oauth2_secret_expires)))
        pair = self.certificate_credentials()
        if pair is not None:
            out.append(("certificate", pair.not_after))
        return sorted(out, key=lambda x: x[1])

    def describe(self) -> str:
        return self.url if self.kind == RelayKind.POSTIER else f"{self.host}:{self.port}"

    def key(self) -> tuple[Any, ...]:
        """Identity of a relay for connection pooling (secrets included, so a new
        password opens new connections)."""
        return (
            self.kind,
            self.url,
            self.host.lower(),
            self.port,
            self.security,
            self.auth,
            self.username,
            self.password,
            self.oauth2_client_id,
            self.oauth2_client_secret,
            self.oauth2_refresh_token,
            self.oauth2_private_key,
            self.oauth2_certificate,
            self.verify_tls,
            self.pipelining,
        )

    def public(self) -> dict[str, Any]:
        out = self.model_dump(mode="json", exclude=set(SECRET_FIELDS))
        for name in SECRET_FIELDS:
            out[f"{name}_set"] = bool(getattr(self, name))
        return out


# Write-only fields of a relay: encrypted at rest, shown as ``<name>_set`` only.
SECRET_FIELDS = ("password", "oauth2_client_secret", "oauth2_refresh_token",
                 "oauth2_certificate", "oauth2_private_key")
RELAY_SECTIONS = ("relay", "backup_relay")


class SenderSettings(_Model):
    """The establishment's sender identity, used for addresses outside the allowed domains."""

    name: str = Field("", max_length=200)
    address: str = Field("", max_length=320)
    display: Literal["establishment", "user_via"] = Field(
        "establishment",
        description="How the establishment's sender is named when it replaces a user's "
        "address: the establishment's name, or \"<user> via <establishment>\"")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if any(c in value for c in "\r\n\0"):
            raise ValueError("the sender name cannot contain line breaks")
        return value.strip()

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        value = value.strip()
        if not value:
            return value
        return policy.normalize_address(value)


class RetrySettings(_Model):
    first_delay: int = Field(60, ge=1, le=86400, description="Seconds before the first retry")
    max_delay: int = Field(3600, ge=1, le=7 * 86400, description="Longest wait between retries")
    max_age: int = Field(
        5 * 86400, ge=60, le=30 * 86400, description="Give up after this many seconds"
    )
    delay_warning: int = Field(
        4 * 3600, ge=0, le=30 * 86400,
        description="Warn the sender once when an e-mail still waits after this many "
        "seconds (0: never)",
    )


# -- retention of personal data (RGPD): see postier.ops.retention ---------------------------
class RetentionSettings(_Model):
    """How long the e-mails of the establishment are kept once they are sent, failed or
    cancelled: the content briefly, the delivery record longer."""

    body_days: int = Field(
        30, ge=0, le=3650,
        description="Days the body and attachments of an e-mail are kept after it was sent, "
        "failed or was cancelled (0: removed at the next purge)",
    )
    metadata_days: int = Field(
        365, ge=1, le=3650,
        description="Days the record of an e-mail (sender, recipients, subject, status, "
        "attempts) is kept after it was sent, failed or was cancelled",
    )

    @model_validator(mode="after")
    def _order(self) -> RetentionSettings:
        if self.body_days > self.metadata_days:
            raise ValueError(
                "body_days cannot be longer than metadata_days: the body goes with its record"
            )
        return self


# -- end of retention ----------------------------------------------------------------------


# -- alerts and webhook: see postier.ops.alerts ------------------------------------------------
class WebhookEvent(StrEnum):
    ALERTS = "alerts"  # alert.raised, alert.resolved
    FAILURES = "failures"  # message.failed (the failure notices' facts)
    DELAYS = "delays"  # message.delayed (the delay notices' facts)
    SENT = "sent"  # message.sent
    BOUNCES = "bounces"  # message.bounced (a recipient's server refused it later)


class AlertSettings(_Model):
    """When the establishment's administrators are alerted, and how: an e-mail, the web
    interface's banner (always), and a signed webhook for integrators."""

    relay_failing_after: int = Field(
        900, ge=60, le=7 * 86400,
        description="Alert when the relay (or both relays) keeps failing this many seconds",
    )
    oldest_deferred_after: int = Field(
        4 * 3600, ge=60, le=30 * 86400,
        description="Alert when an e-mail waiting for a retry is older than this (seconds)",
    )
    credential_expiry_days: int = Field(
        14, ge=1, le=365,
        description="Alert this many days before an OAuth2 client secret expires",
    )
    email: bool = Field(True, description="Alert the administrators by e-mail")
    webhook_url: str = Field(
        "", max_length=500, description="POST signed JSON events here (https:// advised)"
    )
    webhook_secret: str | None = Field(
        None, min_length=16, max_length=500,
        description="Write-only; signs the webhook's events (HMAC-SHA256)",
    )
    webhook_events: list[WebhookEvent] = Field(
        default_factory=lambda: [WebhookEvent.ALERTS, WebhookEvent.FAILURES,
                                 WebhookEvent.DELAYS, WebhookEvent.BOUNCES],
        description="Which events the webhook receives",
    )

    @field_validator("webhook_url")
    @classmethod
    def _webhook_url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if value and not value.startswith(("http://", "https://")):
            raise InvalidSetting(N_("The webhook's address starts with https:// (or "
                                    "http:// on a private network)."))
        if any(c.isspace() or ord(c) < 32 for c in value):
            raise InvalidSetting(N_("The webhook's address cannot contain spaces."))
        return value

    @field_validator("webhook_events")
    @classmethod
    def _events(cls, value: list[WebhookEvent]) -> list[WebhookEvent]:
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _signed(self) -> AlertSettings:
        if self.webhook_url and not self.webhook_secret:
            raise InvalidSetting(N_(
                "A webhook needs a secret of at least 16 characters (webhook_secret): the "
                "receiver checks with it that the events come from Postier."),
                field="alerts.webhook_secret")
        return self

    def public(self) -> dict[str, Any]:
        out = self.model_dump(mode="json", exclude={"webhook_secret"})
        out["webhook_secret_set"] = bool(self.webhook_secret)
        return out


# -- end of alerts -------------------------------------------------------------------------


# -- bounces: see postier.core.bounces --------------------------------------------------------
class BounceMailbox(_Model):
    """The IMAP mailbox bounces arrive in, which Postier reads and marks as read."""

    host: str = Field("", max_length=253, description="Host name or address of the IMAP server")
    port: int = Field(993, ge=1, le=65535)
    security: Security = Security.TLS
    username: str = Field("", max_length=320)
    password: str | None = Field(
        None, max_length=1024, description="Write-only; never returned. Omit to keep."
    )
    folder: str = Field("INBOX", min_length=1, max_length=200)
    verify_tls: bool = Field(True, description="Verify the server's TLS certificate")
    interval: int = Field(300, ge=30, le=86400,
                          description="Seconds between two looks at the mailbox")

    @field_validator("host", "username", "folder")
    @classmethod
    def _one_line(cls, value: str) -> str:
        value = value.strip()
        if any(ord(c) < 32 for c in value):
            raise ValueError("must be on one line")
        return value

    def public(self) -> dict[str, Any]:
        out = self.model_dump(mode="json", exclude={"password"})
        out["password_set"] = bool(self.password)
        return out


class BounceSettings(_Model):
    """Where bounces come back: each e-mail leaves with its own return address
    ``<local>+<token>@<domain>`` built from ``address`` (VERP), and bounces are received
    by the bounce SMTP door or read from ``imap``."""

    address: str = Field(
        "", max_length=200,
        description="Return address within the establishment's domains (e.g. "
        "bounces@school.example); e-mails leave with bounces+<token>@that domain",
    )
    imap: BounceMailbox | None = Field(None, description="A mailbox the bounces arrive in")

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        value = value.strip().lower()
        if not value:
            return value
        local, at, domain = value.rpartition("@")
        if not at or not local or not domain or "+" in local or any(
                c.isspace() or c in '<>()[]\\,;:"*' for c in value):
            raise InvalidSetting(N_(
                "The bounce address is an address without '+', such as "
                "bounces@school.example."), field="bounces.address")
        policy.normalize_domain_pattern(domain)
        return value

    def public(self) -> dict[str, Any]:
        return {"address": self.address,
                "imap": self.imap.public() if self.imap else None}


# -- end of bounces ------------------------------------------------------------------------


class DeliverySettings(_Model):
    delegation: bool = Field(
        True, description="Déléguer l'envoi de tous les e-mails au serveur (central sending)"
    )
    sender: SenderSettings = Field(default_factory=SenderSettings)
    allowed_domains: list[DomainPattern] = Field(default_factory=list, max_length=500)
    relay: RelaySettings = Field(default_factory=RelaySettings)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    backup_relay: RelaySettings | None = Field(
        None, description="Takes over while the main relay keeps failing (same shape)"
    )
    failover_after: int = Field(
        300, ge=1, le=86400,
        description="Seconds of failures of the main relay before the backup takes over",
    )
    alerts: AlertSettings = Field(default_factory=AlertSettings)
    bounces: BounceSettings = Field(default_factory=BounceSettings)
    # -- sender address verification: see postier.core.sender_verification ---------------------
    verify_sender_addresses: bool = Field(
        False,
        description="A user's address is used as the From only once its owner confirmed it "
        "with a code sent to it; until then it is treated as outside the allowed domains",
    )

    @field_validator("allowed_domains")
    @classmethod
    def _domains(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))  # duplicates dropped, order kept

    def public(self) -> dict[str, Any]:
        out = self.model_dump(mode="json",
                              exclude={"relay", "backup_relay", "alerts", "bounces"})
        out["relay"] = self.relay.public()
        out["backup_relay"] = self.backup_relay.public() if self.backup_relay else None
        out["alerts"] = self.alerts.public()
        out["bounces"] = self.bounces.public()
        return out

    def updated(self, changes: dict[str, Any]) -> DeliverySettings:
        """These settings with ``changes`` (any part of them, same shape) applied and the
        whole validated: fields not given stay as they are; the relay password stays
        unless a new one is given (``""`` removes it); ``password_set`` as shown by
        :meth:`public` is accepted and ignored, so what GET shows can be PUT back."""
        changes = deep_merge({}, changes)
        for section in RELAY_SECTIONS:
            relay = changes.get(section)
            if isinstance(relay, dict):
                for name in SECRET_FIELDS:
                    relay.pop(f"{name}_set", None)
                    if relay.get(name) is None:
                        relay.pop(name, None)
        alerts = changes.get("alerts")
        if isinstance(alerts, dict):
            alerts.pop("webhook_secret_set", None)
            if alerts.get("webhook_secret") is None:
                alerts.pop("webhook_secret", None)
        imap = changes.get("bounces", {}).get("imap") if isinstance(
            changes.get("bounces"), dict) else None
        if isinstance(imap, dict):
            imap.pop("password_set", None)
            if imap.get("password") is None:
                imap.pop("password", None)
        merged = deep_merge(self.model_dump(mode="json"), changes)
        merged_imap = (merged.get("bounces") or {}).get("imap")
        if isinstance(merged_imap, dict) and merged_imap.get("password") == "":
            merged_imap["password"] = None
        for section in RELAY_SECTIONS:
            for name in SECRET_FIELDS:
                if isinstance(merged.get(section), dict) and merged[section].get(name) == "":
                    merged[section][name] = None
        if isinstance(merged.get("alerts"), dict) and merged["alerts"].get("webhook_secret") == "":
            merged["alerts"]["webhook_secret"] = None
        return DeliverySettings.model_validate(merged)


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` applied recursively (lists and values replaced)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        elif isinstance(value, dict):
            out[key] = deep_merge({}, value)
        else:
            out[key] = value
    return out
