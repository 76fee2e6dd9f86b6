"""The "Paramètres d'envoi des e-mails" page, its "Tester l'envoi d'e-mails" button and the
sender preview. The page's bounce part has its buttons in :mod:`.settings_bounces`."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.datastructures import FormData

from postier.core.presets import PRESETS
from postier.core.presets import presets as relay_presets
from postier.core.relay_warnings import relay_warnings
from postier.core.settings import (
    RELAY_SECTIONS,
    SECRET_FIELDS,
    BounceMailbox,
    DeliverySettings,
    RelaySettings,
)
from postier.delivery.diagnose import STEP_LABELS, TestReport
from postier.errors import InvalidAddress, PostierError
from postier.i18n import N_
from postier.server.web.context import (
    AdminPage,
    Page,
    UserPage,
    checked_form,
    flash_url,
    json_response,
    redirect,
    render,
    render_fragment,
    text,
    wants_json,
)
from postier.server.web.forms import (
    checkbox,
    duration,
    duration_parts,
    duration_units,
    error_text,
    field_errors,
    postier_field_errors,
    settings_payload,
    settings_values,
)

router = APIRouter(include_in_schema=False)

_RELAY_FIELDS = [*RelaySettings.model_fields,
                 *(f"remove_{name}" for name in SECRET_FIELDS)]
FIELDS = {
    "delegation", "sender.name", "sender.address", "sender.display", "allowed_domains",
    "backup_relay",
    "failover_after", "retry.first_delay", "retry.max_delay", "retry.max_age",
    "retry.delay_warning", "retention.body_days", "retention.metadata_days", "test_to",
    "form", "alerts.relay_failing_after", "alerts.oldest_deferred_after",
    "alerts.credential_expiry_days", "alerts.email", "alerts.webhook_url",
    "alerts.webhook_secret", "alerts.remove_webhook_secret", "alerts.webhook_events",
    *(f"{section}.{name}" for section in RELAY_SECTIONS for name in _RELAY_FIELDS),
}
_IMAP = "bounces.imap."
BOUNCE_FIELDS = {"bounces.address", _IMAP + "remove_password",
                 *(_IMAP + name for name in BounceMailbox.model_fields)}
FIELDS |= BOUNCE_FIELDS
DKIM_FIELDS = {"dkim.domain", "dkim.selector", "form"}


def _relay_warnings(settings: DeliverySettings, lang: str) -> dict[str, list[str]]:
    """What each relay's administrator must know (a password sent without encryption, an
    OAuth2 secret about to expire), by section."""
    out = {"relay": relay_warnings(settings.relay, lang)}
    if settings.backup_relay is not None:
        out["backup_relay"] = relay_warnings(settings.backup_relay, lang)
    return out


def _signable_domains(settings: DeliverySettings) -> list[str]:
    """The domains a DKIM key can be made for: the exact allowed domains and the sender
    address's domain (a ``*.`` pattern names no one domain to publish a key in)."""
    own = settings.sender.address.rpartition("@")[2].lower()
    domains = [d for d in settings.allowed_domains if not d.startswith("*.")]
    return list(dict.fromkeys([*([own] if own else []), *domains]))


async def settings_page(
    p: Page,
    *,
    status_code: int = 200,
    values: dict[str, Any] | None = None,
    errors: dict[str, str] | None = None,
    report: TestReport | None = None,
    test_to: str | None = None,
    test_relay: str = "main",
    notice: str | None = None,
    dkim_values: dict[str, str] | None = None,
    dkim_errors: dict[str, str] | None = None,
    **extra: Any,
) -> Response:
    """The page; ``extra`` is for its bounce part (:mod:`.settings_bounces`): the mailbox
    test's outcome (``mailbox``), the domain typed and its check (``check_domain``,
    ``domain_check``, ``domain_errors``)."""
    saved = await p.core.get_settings(p.me)
    stored = await p.core.stored_settings(p.me.establishment_id)
    keys = await p.core.dkim_keys(p.me.establishment_id)
    presets = relay_presets(p.lang)
    extra = {"check_domain": stored.sender.address.rpartition("@")[2], "mailbox": None,
             "domain_check": None, "domain_errors": {}} | extra
    return render(
        p,
        "settings.html",
        status_code,
        title=p._("E-mail sending settings"),
        v=values or settings_values(saved) | bounce_values(saved["bounces"]),
        saved=saved,
        secrets_set={
            section: {name: bool((saved.get(section) or {}).get(f"{name}_set"))
                      for name in SECRET_FIELDS}
            for section in RELAY_SECTIONS
        } | {"alerts": {"webhook_secret": bool(saved["alerts"].get("webhook_secret_set"))},
             "bounces.imap": {"password": bool((saved["bounces"]["imap"] or {}).get(
                 "password_set"))}},
        password_set=bool(saved["relay"].get("password_set")),
        limit_fields=[name for name in RelaySettings.model_fields if name.startswith("max_")],
        presets=presets,
        presets_json=json.dumps({x["id"]: x["relay"] for x in presets}),
        relay_warnings=_relay_warnings(stored, p.lang),
        errors=errors or {},
        report=report,
        step_labels=STEP_LABELS,
        test_to=p.me.email if test_to is None else test_to,
        test_relay=test_relay,
        notice=notice,
        # The form shows values that are not the saved ones: leaving warns at once.
        unsaved=report.unsaved if report is not None else values is not None,
        dkim_keys=sorted(keys.values(), key=lambda k: k.domain),
        dkim_domains=_signable_domains(stored),
        dkim_values=dkim_values or {},
        dkim_errors=dkim_errors or {},
        duration_parts=duration_parts,
        **extra,
    )


def form_values(form: FormData, payload: dict[str, Any]) -> dict[str, Any]:
    """The form's values as typed, to show again (with the durations' units)."""
    bounces = payload.get("bounces") or {}
    if "bounces.address" in form:  # the mailbox's fields as typed, even without a server
        bounces = {"address": text(form, "bounces.address").strip(),
                   "imap": mailbox_payload(form)}
    return (settings_values(payload) | duration_units(form) | bounce_values(bounces)
            | {_IMAP + "interval.unit": text(form, _IMAP + "interval.unit")})


# -- the bounce part of the form: "Retours (e-mails non distribués)" ---------------------
def mailbox_payload(form: FormData) -> dict[str, Any]:
    """The bounce mailbox's fields as typed. Its password is write-only like the relay's:
    left blank it is kept, the "remove" box removes it."""
    imap: dict[str, Any] = {name: text(form, _IMAP + name).strip()
                            for name in ("host", "port", "security", "username", "folder")}
    imap["verify_tls"] = checkbox(form, _IMAP + "verify_tls")
    imap["interval"] = duration(form, _IMAP + "interval")
    if checkbox(form, _IMAP + "remove_password"):
        imap["password"] = ""
    elif text(form, _IMAP + "password"):
        imap["password"] = text(form, _IMAP + "password")
    return imap


def page_payload(form: FormData) -> dict[str, Any]:
    """The whole form as PUT /api/v1/settings takes it: :func:`settings_payload` and the
    bounce part, whose mailbox is removed when its server is left blank."""
    payload = settings_payload(form)
    if "bounces.address" in form:
        imap = mailbox_payload(form)
        payload["bounces"] = {"address": text(form, "bounces.address").strip(),
                              "imap": imap if imap["host"] else None}
    return payload


def bounce_values(bounces: dict[str, Any]) -> dict[str, Any]:
    """The bounce part's fields to fill the form again (never the password)."""
    imap = {**BounceMailbox().public(), **(bounces.get("imap") or {})}
    return {"bounces.address": bounces.get("address", ""),
            **{_IMAP + k: v for k, v in imap.items() if k not in ("password", "password_set")}}


@router.get("/settings")
async def settings_form(p: AdminPage) -> Response:
    return await settings_page(p)


@router.post("/settings")
async def save_settings(p: AdminPage) -> Response:
    form = await checked_form(p)
    payload = page_payload(form)
    try:
        await p.core.put_settings(p.me, payload)
    except ValidationError as exc:
        errors = field_errors(exc, p.lang)
    except PostierError as exc:
        errors = postier_field_errors(exc, p.lang, FIELDS)
    else:
        return redirect(flash_url("/settings", "settings_saved"))
    return await settings_page(p, status_code=422, values=form_values(form, payload),
                               errors=errors, test_to=text(form, "test_to"),
                               test_relay=text(form, "test_relay", "main"))


@router.post("/settings/preset")
async def apply_preset(p: AdminPage) -> Response:
    """Without script, "Fill in" a preset: the form comes back with the preset's server
    settings in place of the typed ones, nothing saved yet (the script does the same in
    the page)."""
    form = await checked_form(p)
    payload = page_payload(form)
    section = text(form, "preset_for", "relay")
    section = section if section in RELAY_SECTIONS else "relay"
    chosen = PRESETS.get(text(form, f"{section}.preset"))
    notice = None
    if chosen is not None and payload.get(section) is not None:
        payload[section] = {**payload[section], **chosen["relay"]}
        notice = p._(N_("The preset filled in the SMTP server's fields. Check them, then "
                        "save."))
    return await settings_page(p, values=form_values(form, payload),
                               test_to=text(form, "test_to"), notice=notice)


@router.post("/settings/test")
async def test_settings(p: AdminPage) -> Response:
    """Test the values in the form, saved or not ("send=0": "Vérifier la connexion", no
    e-mail). The page's script asks for JSON (the report's HTML, revealed step by step,
    and the field errors); without script the whole page comes back with the report."""
    form = await checked_form(p)
    payload = page_payload(form)
    to = text(form, "test_to").strip() or p.me.email
    backup = text(form, "test_relay") == "backup"
    send = text(form, "send", "1") != "0"
    errors: dict[str, str] = {}
    report: TestReport | None = None
    try:
        report = await p.core.admin.test_settings(
            p.me, to, payload, p.lang, check_senders=checkbox(form, "test_check_senders"),
            backup=backup, send=send,
        )
    except ValidationError as exc:
        errors = field_errors(exc, p.lang)
    except InvalidAddress as exc:
        # The recipient typed for the test (the settings' own addresses come as
        # ValidationError).
        errors = {exc.field if exc.field in FIELDS else "test_to": error_text(exc, p.lang)}
    except PostierError as exc:
        errors = postier_field_errors(exc, p.lang, FIELDS)
    if wants_json(p.request):
        return test_json(p, report, errors)
    return await settings_page(p, status_code=200 if report else 422,
                               values=form_values(form, payload), errors=errors,
                               report=report, test_to=to,
                               test_relay="backup" if backup else "main")


def test_json(p: Page, report: TestReport | None, errors: dict[str, str]) -> Response:
    """A test's answer to the page's script: the report's HTML, or the field errors."""
    html = (render_fragment(p, "_test_report.html", report=report, step_labels=STEP_LABELS)
            if report else "")
    return json_response({
        "ok": None if report is None else report.ok,
        "unsaved": bool(report and report.unsaved),
        "unsaved_message": report.unsaved_message if report else None,
        "html": html,
        "errors": errors,
        "message": p._(N_("Nothing was tested: correct the fields marked.")) if errors
        else "",
    }, 200 if report else 422)


@router.post("/settings/dkim")
async def generate_dkim_key(p: AdminPage) -> Response:
    """Make (or replace) a domain's DKIM key; the page then shows the record to publish."""
    form = await checked_form(p)
    domain = text(form, "dkim.domain").strip()
    selector = text(form, "dkim.selector").strip() or "postier"
    try:
        key = await p.core.dkim_generate(p.me, domain, selector)
    except PostierError as exc:
        field = {"domain": "dkim.domain", "selector": "dkim.selector"}.get(exc.field or "")
        errors = ({field: error_text(exc, p.lang)} if field
                  else postier_field_errors(exc, p.lang, DKIM_FIELDS))
        return await settings_page(p, status_code=422, dkim_errors=errors,
                                   dkim_values={"dkim.domain": domain,
                                                "dkim.selector": selector})
    return redirect(flash_url("/settings", "dkim_generated", domain=key.domain) + "#dkim")


@router.post("/settings/dkim/remove")
async def remove_dkim_key(p: AdminPage) -> Response:
    """Stop signing for a domain: its key is deleted."""
    form = await checked_form(p)
    try:
        domain = await p.core.dkim_remove(p.me, text(form, "domain"))
    except PostierError as exc:  # already removed (another page, the console)
        return await settings_page(p, status_code=exc.http_status,
                                   dkim_errors={"remove": error_text(exc, p.lang)})
    return redirect(flash_url("/settings", "dkim_removed", domain=domain) + "#dkim")


@router.get("/preview")
async def sender_preview(p: UserPage, user: str = "") -> Response:
    """Which From, Reply-To and envelope sender a user's e-mails carry, and why."""
    users = await p.core.admin.list_users(p.me) if p.me.is_admin else []
    chosen = user if (user and p.me.is_admin) else p.me.username
    preview, problem = None, None
    try:
        preview = await p.core.preview(p.me, chosen, p.lang)
    except PostierError as exc:
        problem = exc.render(p.lang)
    return render(p, "preview.html", title=p._("Sender preview"), users=users,
                  chosen=chosen, preview=preview, problem=problem)
