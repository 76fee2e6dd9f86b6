"""The buttons of the settings page's bounce part: "Tester la boîte" (can the bounce
mailbox be read, with the values in the form, saved or not?) and "Vérifier le domaine"
(SPF, DKIM and DMARC of a domain, as receiving servers check them).

Neither saves anything; both answer with the whole settings page, the outcome shown in its
part, so they work without script. The service functions decide who may ask
(administrators) and what is read (the establishment's own settings).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from pydantic import ValidationError

from postier.errors import PostierError
from postier.i18n import N_
from postier.ops import bounces, sending_domain
from postier.ops.bounce_mailbox import MailboxError
from postier.server.web.context import AdminPage, checked_form, text
from postier.server.web.forms import error_text, field_errors, postier_field_errors
from postier.server.web.settings_pages import (
    FIELDS,
    form_values,
    mailbox_payload,
    page_payload,
    settings_page,
)

router = APIRouter(include_in_schema=False)

NO_DOMAIN = N_("Enter a domain, for example clg-moulin.ac-lyon.fr.")


@router.post("/settings/bounces/test")
async def test_mailbox(p: AdminPage) -> Response:
    """Sign in to the bounce mailbox typed in the form and open its folder, without
    changing anything in it (a blank password: the saved one). The page comes back with
    the values as typed and the number of unread messages, or what failed and what to do."""
    form = await checked_form(p)
    payload = page_payload(form)
    errors: dict[str, str] = {}
    outcome: dict[str, Any] | None = None
    try:
        unread = await bounces.check_establishment_mailbox(p.core, p.me, mailbox_payload(form))
        outcome = {"ok": True, "unread": unread}
    except MailboxError as exc:
        outcome = {"ok": False, "message": exc.message(p.lang), "hint": exc.hint(p.lang)}
    except ValidationError as exc:
        errors = field_errors(exc, p.lang)
    except PostierError as exc:
        errors = postier_field_errors(exc, p.lang, FIELDS)
    return await settings_page(p, status_code=422 if errors else 200,
                               values=form_values(form, payload), errors=errors,
                               mailbox=outcome, test_to=text(form, "test_to"),
                               test_relay=text(form, "test_relay", "main"))


@router.post("/settings/domain")
async def check_domain(p: AdminPage) -> Response:
    """Check a domain's DNS for the e-mails Postier sends (the sender's domain unless
    another is typed): what is published, what should be, and what to do."""
    form = await checked_form(p)
    domain = text(form, "check_domain").strip()
    if not domain:
        return await settings_page(p, status_code=422, check_domain=domain,
                                   domain_errors={"check_domain": p._(NO_DOMAIN)})
    try:
        result = await sending_domain.establishment_check(p.core, p.me, domain, p.lang)
    except PostierError as exc:
        return await settings_page(p, status_code=exc.http_status, check_domain=domain,
                                   domain_errors={"check_domain": error_text(exc, p.lang)})
    return await settings_page(p, check_domain=domain, domain_check=result)
