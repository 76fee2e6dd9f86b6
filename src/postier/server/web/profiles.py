"""The "Profils d'envoi d'e-mails" page: administrators create a profile from the creation
line (a label, then Enter) and fill in its SMTP server on the right; every user sees the
list and retrieves a profile ("Récupérer un profil d'envoi d'e-mails") as a file that
``postier config import FILE`` accepts. Administrators also check a profile's server or
send a test e-mail through it, saved or being edited, with the settings' test report."""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter
from fastapi.responses import Response
from pydantic import ValidationError

from postier.delivery.diagnose import STEP_LABELS, TestReport
from postier.errors import InvalidAddress, PostierError
from postier.server.web.context import (
    AdminPage,
    Page,
    UserPage,
    checked_form,
    flash_url,
    redirect,
    render,
    text,
    wants_json,
)
from postier.server.web.forms import error_text, field_errors, postier_field_errors, relay_payload
from postier.server.web.settings_pages import test_json

router = APIRouter(include_in_schema=False)

FIELDS = {"label", "host", "port", "security", "auth", "username", "password", "timeout",
          "verify_tls", "test_to", "form"}


def file_name(label: str) -> str:
    ascii_label = unicodedata.normalize("NFKD", label).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_label.lower()).strip("-") or "profil"
    return f"profil-{slug[:60]}.json"


async def _profiles_page(
    p: Page,
    selected_id: int | None,
    *,
    status_code: int = 200,
    errors: dict[str, str] | None = None,
    values: dict[str, Any] | None = None,
    new_label: str = "",
    report: TestReport | None = None,
    test_to: str | None = None,
) -> Response:
    profiles = await p.core.admin.list_profiles(p.me)
    selected = None
    if selected_id is not None:
        selected = await p.core.admin.get_profile(p.me, selected_id)
    return render(
        p, "profiles.html", status_code, title=p._("E-mail sending profiles"),
        profiles=profiles, selected=selected, v=values or selected or {},
        errors=errors or {}, new_label=new_label,
        file_name=file_name(str(selected["label"])) if selected else "",
        report=report, step_labels=STEP_LABELS,
        test_to=p.me.email if test_to is None else test_to,
        # The form shows values that are not the saved ones: leaving warns at once.
        unsaved=report.unsaved if report is not None else values is not None,
    )


@router.get("/profiles")
async def profiles_list(p: UserPage) -> Response:
    return await _profiles_page(p, None)


@router.get("/profiles/{profile_id}")
async def profile_detail(profile_id: int, p: UserPage) -> Response:
    return await _profiles_page(p, profile_id)


@router.post("/profiles")
async def create_profile(p: AdminPage) -> Response:
    """The creation line: a label is enough; the SMTP server comes next, on the right."""
    form = await checked_form(p)
    label = text(form, "label")
    try:
        created = await p.core.admin.create_profile(p.me, {"label": label})
    except ValidationError as exc:
        errors = field_errors(exc, p.lang, prefix="new_")
    except PostierError as exc:
        errors = {"new_label": postier_field_errors(exc, p.lang, FIELDS).popitem()[1]}
    else:
        return redirect(flash_url(f"/profiles/{created['id']}", "profile_created"))
    return await _profiles_page(p, None, status_code=422, errors=errors, new_label=label)


@router.post("/profiles/{profile_id}")
async def update_profile(profile_id: int, p: AdminPage) -> Response:
    form = await checked_form(p)
    payload = {"label": text(form, "label"), **relay_payload(form)}
    try:
        await p.core.admin.update_profile(p.me, profile_id, payload)
    except ValidationError as exc:
        errors = field_errors(exc, p.lang)
    except PostierError as exc:
        if exc.http_status == 404:
            raise
        errors = postier_field_errors(exc, p.lang, FIELDS)
    else:
        return redirect(flash_url(f"/profiles/{profile_id}", "profile_saved"))
    values = {k: v for k, v in payload.items() if k != "password"}
    return await _profiles_page(p, profile_id, status_code=422, errors=errors, values=values)


@router.post("/profiles/{profile_id}/test")
async def test_profile(profile_id: int, p: AdminPage) -> Response:
    """The profile's form as it is (saved or not): "send=0" checks the connection, else a
    test e-mail goes to ``test_to``. JSON for the page's script, else the whole page."""
    form = await checked_form(p)
    payload = {"label": text(form, "label"), **relay_payload(form)}
    to = text(form, "test_to").strip() or p.me.email
    errors: dict[str, str] = {}
    report: TestReport | None = None
    try:
        report = await p.core.admin.test_profile(p.me, profile_id, payload, p.lang, to=to,
                                                 send=text(form, "send", "1") != "0")
    except ValidationError as exc:
        errors = field_errors(exc, p.lang)
    except InvalidAddress as exc:
        errors = {"test_to": error_text(exc, p.lang)}
    except PostierError as exc:
        if exc.http_status == 404:
            raise
        errors = postier_field_errors(exc, p.lang, FIELDS)
    if wants_json(p.request):
        return test_json(p, report, errors)
    values = {k: v for k, v in payload.items() if k != "password"}
    return await _profiles_page(p, profile_id, status_code=200 if report else 422,
                                errors=errors, values=values, report=report, test_to=to)


@router.post("/profiles/{profile_id}/delete")
async def delete_profile(profile_id: int, p: AdminPage) -> Response:
    await checked_form(p)
    await p.core.admin.delete_profile(p.me, profile_id)
    return redirect(flash_url("/profiles", "profile_deleted"))


@router.post("/profiles/{profile_id}/retrieve")
async def retrieve_profile(profile_id: int, p: UserPage) -> Response:
    """The file is the service's retrieval answer (with the shared password, if one is
    stored): downloaded, never shown in a page."""
    await checked_form(p)
    profile = await p.core.admin.retrieve_profile(p.me, profile_id)
    profile.pop("password_set", None)
    name = file_name(str(profile.get("label", "")))
    body = json.dumps(profile, ensure_ascii=False, indent=2) + "\n"
    return Response(
        body.encode(),
        media_type="application/json",
        headers={
            "Content-Disposition": f"attachment; filename=\"{name}\"; "
            f"filename*=UTF-8''{quote(name)}",
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
        },
    )
