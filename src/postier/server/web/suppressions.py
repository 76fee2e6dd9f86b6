"""Blocked addresses (administrators): the establishment's suppression list, newest first.

An address is listed when a recipient's server refused it for good, when its owner
reported an e-mail as spam, after temporary failures on several days, or when an
administrator added it. E-mails to it are still accepted, but never sent to it. The page
searches the list, adds an address with a note, and lifts one so that e-mails reach it
again; :meth:`postier.core.bounces.Bounces` decides and audits each of these.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter
from fastapi.responses import Response

from postier.core.bounces import SYSTEM_ACTOR
from postier.errors import PostierError
from postier.i18n import N_
from postier.server.web.context import AdminPage, Page, checked_form, redirect, render, text
from postier.server.web.forms import error_text
from postier.store.bounces import Suppression

router = APIRouter(include_in_schema=False)

PAGE_SIZE = 50
MAX_SEARCH = 320  # an address's longest form
MAX_PAGE = 1_000_000
REASON_LABELS = {
    "bounce": N_("Returned: the recipient's server refused the address"),
    "complaint": N_("Complaint: the recipient reported an e-mail as spam"),
    "repeated": N_("Temporary failures on several days"),
    "manual": N_("Added by an administrator"),
}


def server_reply(entry: Suppression) -> str:
    """What the refusing server said: its code, its status and its words; only its words
    when they start with the code already (as a DSN's diagnostic usually does)."""
    words = entry.diagnostic.strip()
    code = str(entry.code) if entry.code else ""
    if code and words.startswith(code):
        return words
    return " ".join(x for x in (code, entry.status, words) if x)


def _list_url(search: str, page: int, **extra: str) -> str:
    params = {**({"search": search} if search else {}), **({"page": str(page)} if page > 1
                                                           else {}), **extra}
    return "/suppressions" + ("?" + urlencode(params) if params else "")


async def _listed(p: Page, address: str) -> bool:
    """Whether ``address`` is on the list now (a confirmation only says what is true)."""
    items, _total = await p.core.suppressions(p.me, search=address, limit=500)
    return any(e.address.lower() == address.lower() for e in items)


async def _confirmation(p: Page) -> str | None:
    """The message after an address was added or lifted, when the list agrees with it:
    the address in the page's address cannot make the page say anything else."""
    done = p.request.query_params.get("ok", "")
    address = p.request.query_params.get("address", "")[:MAX_SEARCH]
    if done not in ("added", "lifted") or not address:
        return None
    listed = await _listed(p, address)
    if done == "added" and listed:
        return p._(N_("{address} is blocked: e-mails to it are no longer sent."),
                   address=address)
    if done == "lifted" and not listed:
        return p._(N_("{address} is no longer blocked: e-mails to it are sent again."),
                   address=address)
    return None


async def _page(p: Page, search: str = "", page: int = 1, *, status_code: int = 200,
                errors: dict[str, str] | None = None, values: dict[str, str] | None = None,
                problem: str | None = None) -> Response:
    search = search.strip()[:MAX_SEARCH]
    page = min(max(1, page), MAX_PAGE)
    items, total = await p.core.suppressions(p.me, search=search, limit=PAGE_SIZE,
                                             offset=(page - 1) * PAGE_SIZE)
    pages = max(1, -(-total // PAGE_SIZE))
    if page > pages:  # past the end (the last entries of the last page were lifted)
        page = pages
        items, total = await p.core.suppressions(p.me, search=search, limit=PAGE_SIZE,
                                                 offset=(page - 1) * PAGE_SIZE)
    context: dict[str, Any] = {
        "items": items, "total": total, "search": search, "page": page, "pages": pages,
        "first": (page - 1) * PAGE_SIZE + 1 if items else 0,
        "last": (page - 1) * PAGE_SIZE + len(items),
        "previous_url": _list_url(search, page - 1) if page > 1 else None,
        "next_url": _list_url(search, page + 1) if page < pages else None,
        "reasons": REASON_LABELS, "errors": errors or {}, "v": values or {},
        "problem": problem, "confirmation": await _confirmation(p),
        "system_actor": SYSTEM_ACTOR, "server_reply": server_reply,
    }
    return render(p, "suppressions.html", status_code, title=p._("Blocked addresses"),
                  **context)


@router.get("/suppressions")
async def suppressions(p: AdminPage, search: str = "", page: int = 1) -> Response:
    return await _page(p, search, page)


@router.post("/suppressions")
async def add_suppression(p: AdminPage) -> Response:
    """Block an address by hand (someone who left the establishment, a mistyped address
    that keeps coming back)."""
    form = await checked_form(p)
    values = {"address": text(form, "address").strip(), "note": text(form, "note").strip()}
    try:
        entry = await p.core.suppress(p.me, values["address"], values["note"])
    except PostierError as exc:
        field = "note" if exc.field == "note" else "address"
        return await _page(p, status_code=422, values=values,
                           errors={field: error_text(exc, p.lang)})
    return redirect(_list_url("", 1, ok="added", address=entry.address))


@router.post("/suppressions/lift")
async def lift_suppression(p: AdminPage) -> Response:
    """Lift an address: e-mails to it are sent again. The list comes back as it was shown
    (same search, same page)."""
    form = await checked_form(p)
    search = text(form, "search").strip()
    page = int(text(form, "page")) if text(form, "page").isdigit() else 1
    try:
        entry = await p.core.lift_suppression(p.me, text(form, "address"))
    except PostierError as exc:  # already lifted (another page, the API)
        return await _page(p, search, page, status_code=exc.http_status,
                           problem=error_text(exc, p.lang))
    return redirect(_list_url(search, page, ok="lifted", address=entry.address))
