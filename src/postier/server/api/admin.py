"""Establishment administration: delivery settings, test-send and the sender preview."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Body
from pydantic import BaseModel, Field

from postier.core.presets import presets
from postier.server.api.deps import Core, CurrentUser, Lang
from postier.server.api.views import ErrorResponse

router = APIRouter(prefix="/api/v1/settings", tags=["settings"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse},
    403: {"model": ErrorResponse},
    422: {"model": ErrorResponse},
}


@router.get("", responses=_ERRORS)
async def get_settings(user: CurrentUser, core: Core, lang: Lang) -> dict[str, Any]:
    """The establishment's delivery settings; the relay password is shown as
    ``password_set`` only. ``warnings``: what the administrator should fix (a password
    sent without encryption, OAuth2 credentials about to expire), in the caller's
    language."""
    return await core.get_settings(user, lang)


@router.put("", responses=_ERRORS)
async def put_settings(
    user: CurrentUser,
    core: Core,
    lang: Lang,
    payload: dict[str, Any] = Body(
        ...,
        examples=[
            {
                "delegation": True,
                "sender": {"name": "Collège Jean Moulin", "address": "ne-pas-repondre@ac-lyon.fr"},
                "allowed_domains": ["ac-lyon.fr", "*.ac-lyon.fr"],
                "relay": {
                    "host": "smtp.ac-lyon.fr",
                    "port": 587,
                    "security": "starttls",
                    "auth": "password",
                    "username": "college",
                    "password": "secret",
                    "timeout": 30,
                },
                "retry": {"first_delay": 60, "max_delay": 3600, "max_age": 432000},
            }
        ],
    ),
) -> dict[str, Any]:
    """Change the settings given (the others stay). Omit ``relay.password`` to keep the
    stored one. Everything is validated before anything is saved. The answer carries the
    saved settings' ``warnings`` (saved anyway)."""
    return await core.put_settings(user, payload, lang)


class PreviewIn(BaseModel):
    user: str | None = Field(None, description="Username (administrators); default: yourself")


class PreviewOut(BaseModel):
    from_: str = Field(alias="from")
    reply_to: list[str]
    envelope_from: str
    rule: str
    explanation: str


@router.post("/preview", responses=_ERRORS)
async def preview(body: PreviewIn, user: CurrentUser, core: Core, lang: Lang) -> PreviewOut:
    """Explain the sender a user's e-mails will carry, and why."""
    p = await core.preview(user, body.user, lang)
    return PreviewOut.model_validate(
        {"from": p.from_, "reply_to": p.reply_to, "envelope_from": p.envelope_from,
         "rule": p.rule, "explanation": p.explanation}
    )


class TestIn(BaseModel):
    to: str = Field(description="Who receives the test e-mail")
    settings: dict[str, Any] | None = Field(
        None,
        description="Unsaved settings to test (any part of the settings, same shape as "
        "PUT /api/v1/settings); omitted: the saved settings",
    )
    relay: Literal["main", "backup"] = Field(
        "main", description="Which relay to test: the main one or the backup relay"
    )
    check_senders: bool = Field(
        False,
        description="Also check that the relay accepts MAIL FROM for the sender addresses "
        "the policy will use (no e-mail sent for these)",
    )
    send: bool = Field(
        True,
        description="false: only check the connection (connect, TLS, authentication, then "
        "QUIT); no e-mail is sent",
    )


class StepOut(BaseModel):
    step: str
    ok: bool
    ms: int
    detail: str


class TestOut(BaseModel):
    ok: bool
    steps: list[StepOut]
    error: dict[str, Any] | None
    latency_ms: int | None
    suggestion: str | None
    sender_checks: list[dict[str, Any]]
    dkim: dict[str, Any] | None = None
    sent: bool = Field(False, description="Whether the relay accepted a test e-mail")
    unsaved: bool = Field(
        False, description="The settings tested differ from the saved ones: save them to "
        "use them")
    unsaved_message: str | None = Field(
        None, description="What to tell the user when unsaved is true, in their language")
    conversation: list[str] = Field(
        default_factory=list,
        description="The SMTP conversation, one line each (C: sent, S: received); AUTH "
        "payloads masked, the e-mail itself summed up by its size")
    warnings: list[str] = Field(
        default_factory=list,
        description="About the relay tested, e.g. a password sent without encryption")


@router.post("/test", responses=_ERRORS)
async def test_settings(body: TestIn, user: CurrentUser, core: Core, lang: Lang) -> TestOut:
    """"Tester l'envoi d'e-mails": send a real test e-mail and report every step, with
    its timing and the server's replies; a failure comes with its explanation and remedy
    in the caller's language. Never longer than three times the configured timeout.
    ``"send": false`` ("Vérifier la connexion") stops after authentication: no e-mail.
    ``unsaved``: the settings given differ from the saved ones (not in use until saved)."""
    report = await core.admin.test_settings(
        user, body.to, body.settings, lang, check_senders=body.check_senders,
        backup=body.relay == "backup", send=body.send,
    )
    warnings = await core.test_warnings(user, body.settings, body.relay == "backup", lang)
    return TestOut.model_validate(report.as_dict() | {"warnings": warnings})


presets_router = APIRouter(prefix="/api/v1/relay-presets", tags=["settings"])


@presets_router.get("", responses=_ERRORS)
async def relay_presets(user: CurrentUser, lang: Lang) -> list[dict[str, Any]]:
    """Usual SMTP servers (Microsoft 365, Google Workspace, academy relay) with the values
    to put in the relay settings and the provider's documented sending limits."""
    return presets(lang)


domains_router = APIRouter(prefix="/api/v1/domains", tags=["hosting"])


class MoveIn(BaseModel):
    to: str = Field(description="Short name of the establishment that receives the domain")


class MoveOut(BaseModel):
    domain: str
    to: str
    from_: list[str] = Field(alias="from", description="Establishments it was taken from")
    allowed_domains: list[str] = Field(description="Allowed-domain patterns that moved")
    dkim: list[str] = Field(description="Domains whose DKIM key moved with it")
    sender_cleared: list[str] = Field(
        description="Establishments whose sender address was in the domain, now empty")
    grants_removed: int = Field(description="Addresses granted to users there, removed")


@domains_router.post("/{domain}/move", responses={**_ERRORS, 404: {"model": ErrorResponse},
                                                   409: {"model": ErrorResponse}})
async def move_domain(domain: str, body: MoveIn, user: CurrentUser, core: Core) -> MoveOut:
    """Operators: give a domain (with its sub-domains) to another establishment of the
    installation. Whatever other establishments held of it (allowed domains, sender
    address, DKIM keys, addresses granted to users) is taken from them; the DKIM keys move
    with it. Audited in every establishment concerned."""
    report = await core.domains.move(user, domain, body.to)
    return MoveOut.model_validate(report.as_dict())
