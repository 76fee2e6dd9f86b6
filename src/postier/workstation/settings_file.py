"""A workstation's own sending settings ("Paramétrer l'envoi d'e-mails pour ce poste").

One TOML file per user account of the workstation (``POSTIER_CONFIG``, else the platform's
user config directory), written atomically with 0600 permissions since it may hold a
password or a token. Three modes, as in the original product:

- ``server``: hand every e-mail to a Postier server (central sending);
- ``own``: "Définir mes propres paramètres" — the user's own SMTP server;
- ``profile``: SMTP settings retrieved from a profile defined by the administrator.

A host application can build its own settings dialog on this module: :func:`load`,
:meth:`WorkstationSettings.set`, :func:`save`, and
:func:`postier.workstation.sending.pull_profile`.
"""

from __future__ import annotations

import os
import tomllib
from enum import StrEnum
from pathlib import Path
from typing import Any

import platformdirs
import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from postier.core import policy
from postier.core.settings import RelaySettings, http_url
from postier.errors import InvalidInput
from postier.i18n import N_


class Mode(StrEnum):
    SERVER = "server"
    OWN = "own"
    PROFILE = "profile"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ServerLink(_Model):
    url: str = Field("", description="The Postier server, e.g. http://serveur-edt:8025")
    token: str = Field("", description="Your API token on that server (secret)")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return http_url(value)


class Identity(_Model):
    name: str = Field("", max_length=200, description="Sender name")
    address: str = Field("", max_length=320, description="Sender address")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if any(c in value for c in "\r\n\0"):
            raise ValueError("the name cannot contain line breaks")
        return value.strip()

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        return policy.normalize_address(value) if value.strip() else ""


class ProfileRef(_Model):
    id: int = 0
    label: str = ""


class WorkstationSettings(_Model):
    mode: Mode = Mode.SERVER
    server: ServerLink = Field(default_factory=ServerLink)
    identity: Identity = Field(default_factory=Identity)
    smtp: RelaySettings = Field(default_factory=RelaySettings)
    profile: ProfileRef = Field(default_factory=ProfileRef)

    def keys(self) -> list[str]:
        """Every settable dotted key."""
        out = ["mode"]
        for section in ("server", "identity", "smtp"):
            out += [f"{section}.{k}" for k in type(getattr(self, section)).model_fields]
        return out

    def set(self, key: str, value: str) -> None:
        """Set one dotted key from text, validated; raises InvalidInput saying what is
        allowed."""
        if key not in self.keys():
            raise InvalidInput(
                N_("Unknown setting {key!r}. Settings: {keys}."),
                field=key, key=key, keys=", ".join(self.keys()),
            )
        try:
            if key == "mode":
                if value not in {m.value for m in Mode}:
                    raise ValueError("choose server, own or profile")
                self.mode = Mode(value)
                return
            section, leaf = key.split(".", 1)
            # pydantic converts the text ("587", "true") and validates on assignment.
            setattr(getattr(self, section), leaf, None if leaf == "password" and not value
                    else value)
        except (ValueError, ValidationError) as exc:
            raise InvalidInput(
                N_("Invalid value for {key}: {reason}"),
                field=key, key=key, reason=_reason(exc),
            ) from exc

    def public(self) -> dict[str, Any]:
        """The settings with secrets masked, for display."""
        doc = self.model_dump(mode="json")
        doc["server"]["token"] = "********" if self.server.token else ""
        doc["smtp"].pop("password", None)
        doc["smtp"]["password_set"] = bool(self.smtp.password)
        return doc

    def check_ready(self) -> None:
        """Refuse to send with settings that cannot work, saying what to set."""
        missing: list[str] = []
        if self.mode == Mode.SERVER:
            missing = [k for k, v in (("server.url", self.server.url),
                                      ("server.token", self.server.token)) if not v]
        else:
            if not self.smtp.host:
                missing.append("smtp.host")
            if not self.identity.address:
                missing.append("identity.address")
            if self.smtp.auth == "password" and not self.smtp.password:
                missing.append("smtp.password")
        if missing:
            raise InvalidInput(
                N_("This workstation's settings are incomplete for the {mode} mode: set "
                   "{missing}."),
                hint=N_("Use: postier config set KEY VALUE (postier config show lists them)."),
                field=missing[0], mode=self.mode.value, missing=", ".join(missing),
            )


def _reason(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
    return str(exc)


def config_path() -> Path:
    env = os.environ.get("POSTIER_CONFIG")
    if env:
        return Path(env)
    return platformdirs.user_config_path("postier") / "workstation.toml"


def outbox_dir() -> Path:
    env = os.environ.get("POSTIER_OUTBOX")
    if env:
        return Path(env)
    return platformdirs.user_data_path("postier") / "outbox"


def load(path: Path | None = None) -> WorkstationSettings:
    path = path or config_path()
    if not path.exists():
        return WorkstationSettings()
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
        return WorkstationSettings.model_validate(doc)
    except (tomllib.TOMLDecodeError, ValidationError) as exc:
        raise InvalidInput(
            N_("The settings file {path} cannot be read: {reason}"),
            hint=N_("Fix or delete the file, then set the values again with postier config "
                    "set."),
            path=str(path), reason=_reason(exc) if isinstance(exc, ValidationError) else str(exc),
        ) from exc


def save(settings: WorkstationSettings, path: Path | None = None) -> Path:
    """Write the file atomically, readable by its owner only."""
    path = path or config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = settings.model_dump(mode="json", exclude_none=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(tomli_w.dumps(doc).encode())
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


def apply_profile(
    settings: WorkstationSettings, profile: dict[str, Any]
) -> WorkstationSettings:
    """Use a retrieved profile: its SMTP server settings, and its shared username and
    password when it has them (else the user's own are kept); mode becomes ``profile``."""
    smtp = settings.smtp.model_dump()
    for key in ("host", "port", "security", "auth", "timeout", "verify_tls"):
        if key in profile:
            smtp[key] = profile[key]
    if profile.get("username"):
        smtp["username"] = profile["username"]
    if profile.get("password"):
        smtp["password"] = profile["password"]
    try:
        new = settings.model_copy(deep=True)
        new.smtp = RelaySettings.model_validate(smtp)
        new.profile = ProfileRef(id=int(profile.get("id") or 0),
                                 label=str(profile.get("label") or ""))
        new.mode = Mode.PROFILE
    except ValidationError as exc:
        raise InvalidInput(N_("This profile cannot be used: {reason}"),
                           reason=_reason(exc)) from exc
    return new


def with_identity(settings: WorkstationSettings, name: str, address: str) -> WorkstationSettings:
    """The account's name and address (GET /api/v1/me) as the sender identity where the
    workstation has none, so that a pulled profile is ready to send; what the user set
    stays."""
    new = settings.model_copy(deep=True)
    try:
        if not new.identity.address and address:
            new.identity.address = address
        if not new.identity.name and name:
            new.identity.name = name
    except ValidationError as exc:
        raise InvalidInput(N_("Your account's identity cannot be used: {reason}"),
                           hint=N_("Set it with postier config set identity.address ADDRESS."),
                           reason=_reason(exc)) from exc
    return new

