"""The "Paramètres d'envoi des e-mails" page, its "Tester l'envoi d'e-mails" button and the
sender preview."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from pydantic import ValidationError

from postier.diagnose import STEP_LABELS, TestReport
from postier.errors import InvalidAddress, PostierError
from postier.i18n import N_
from postier.web.context import (
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
from postier.web.forms import (
    checkbox,
    error_text,
    field_errors,
    postier_field_errors,
    settings_payload,
    settings_values,
)

router = APIRouter(include_in_schema=False)


FIELDS = {
    "delegation", "sender.name", "sender.address", "allowed_domains", "relay.host",
    "relay.port", "relay.security", "relay.auth", "relay.username", "relay.password",
    "relay.timeout", "relay.verify_tls", "retry.first_delay", "retry.max_delay",
    "retry.max_age", "test_to", "form",
}


async def _settings_page(
    p: Page,
    *,
    status_code: int = 200,
    values: dict[str, Any] | None = None,
    errors: dict[str, str] | None = None,
    report: TestReport | None = None,
    test_to: str | None = None,
) -> Response:
    saved = await p.core.get_settings(p.me)
    return render(
        p,
        "settings.html",
        status_code,
        title=p._("E-mail sending settings"),
        v=values or settings_values(saved),
        saved=saved,
        password_set=bool(saved["relay"].get("password_set")),
        errors=errors or {},
        report=report,
        step_labels=STEP_LABELS,
        test_to=p.me.email if test_to is None else test_to,
    )


@router.get("/settings")
async def settings_form(p: AdminPage) -> Response:
    return await _settings_page(p)


@router.post("/settings")
async def save_settings(p: AdminPage) -> Response:
    form = await checked_form(p)
    payload = settings_payload(form)
    try:
        await p.core.put_settings(p.me, payload)
    except ValidationError as exc:
        errors = field_errors(exc, p.lang)
    except PostierError as exc:
        errors = postier_field_errors(exc, p.lang, FIELDS)
    else:
        return redirect(flash_url("/settings", "settings_saved"))
    return await _settings_page(p, status_code=422, values=settings_values(payload),
                                errors=errors, test_to=text(form, "test_to"))


@router.post("/settings/test")
async def test_settings(p: AdminPage) -> Response:
    """Test the values in the form, saved or not. The page's script asks for JSON (the
    report's HTML, revealed step by step, and the field errors); without script the
    whole page comes back with the report."""
    form = await checked_form(p)
    payload = settings_payload(form)
    to = text(form, "test_to").strip() or p.me.email
    errors: dict[str, str] = {}
    report: TestReport | None = None
    try:
        report = await p.core.admin.test_settings(
            p.me, to, payload, p.lang, check_senders=checkbox(form, "test_check_senders")
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
        html = (render_fragment(p, "_test_report.html", report=report,
                                step_labels=STEP_LABELS) if report else "")
        return json_response({
            "ok": None if report is None else report.ok,
            "html": html,
            "errors": errors,
            "message": p._(N_("Nothing was tested: correct the fields marked.")) if errors
            else "",
        }, 200 if report else 422)
    return await _settings_page(p, status_code=200 if report else 422,
                                values=settings_values(payload), errors=errors,
                                report=report, test_to=to)


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
