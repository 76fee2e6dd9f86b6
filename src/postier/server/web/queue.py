"""The queue (administrators), one e-mail's detail with its attempts, and "My e-mails" for
every user. Each page refreshes itself by polling a small JSON endpoint that returns the
same fragments, rendered by the same templates."""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from babel.dates import parse_date
from fastapi import APIRouter
from fastapi.responses import Response

from postier.core import reasons
from postier.i18n import N_
from postier.server.web import stats
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
)
from postier.store.base import FINAL_STATUSES, STATUSES, AttemptRecord, MessageRecord

router = APIRouter(include_in_schema=False)

PERIOD_LABELS = {"24h": N_("Last 24 hours"), "7d": N_("Last 7 days"),
                 "30d": N_("Last 30 days")}
OUTCOME_LABELS = {"sent": N_("Sent"), "deferred": N_("Deferred"), "failed": N_("Failed")}
LIST_LIMIT = 200


@dataclass
class QueueQuery:
    status: str = ""
    sender: str = ""
    recipient: str = ""
    since: str = ""  # YYYY-MM-DD, local date
    until: str = ""
    period: str = "24h"

    def filters(self) -> stats.Filters:
        return stats.Filters(
            status=self.status if self.status in STATUSES else None,
            sender=self.sender.strip() or None,
            recipient=self.recipient.strip() or None,
            since=_day_start(self.since, 0),
            until=_day_start(self.until, 1),
        )

    def params(self, **changes: str) -> dict[str, str]:
        values = {**self.__dict__, **changes}
        return {k: v for k, v in values.items() if v and not (k == "period" and v == "24h")}


def _day_start(value: str, plus_days: int) -> float | None:
    try:
        day = dt.date.fromisoformat(value)
    except ValueError:
        return None
    return dt.datetime.combine(day + dt.timedelta(days=plus_days), dt.time()).timestamp()


def chart(p: Page, buckets: list[stats.Bucket], period: str) -> dict[str, Any]:
    """Geometry of the stacked bar chart (drawn as SVG by the template)."""
    width, height, left, bottom, top = 720, 200, 36, 24, 8
    peak = max([b.total for b in buckets] + [1])
    # A round upper bound for the axis: 1, 2, 5, 10, 20, 50...
    scale = 1
    while scale < peak:
        scale = scale * 5 // 2 if str(scale)[0] == "2" else scale * 2
    step = (width - left) / max(len(buckets), 1)
    plot = height - bottom - top
    bars = []
    every = 3 if len(buckets) > 12 else 1
    for i, b in enumerate(buckets):
        y = float(height - bottom)
        parts = []
        for outcome in stats.OUTCOMES:
            h = plot * b.counts[outcome] / scale
            if h:
                y -= h
                parts.append({"outcome": outcome, "y": round(y, 1), "h": round(h, 1),
                              "n": b.counts[outcome]})
        if period == "24h":
            label, title = p.datetime(b.start, "HH"), p.datetime(b.start, "short")
        else:
            label, title = p.datetime(b.start, "d MMM"), p.datetime(b.start, "EEEE d MMMM")
        bars.append({"x": round(left + i * step + step * 0.15, 1), "w": round(step * 0.7, 1),
                     "parts": parts, "label": label if i % every == 0 else "",
                     "title": title, "counts": b.counts,
                     "tx": round(left + i * step + step / 2, 1)})
    totals = {o: sum(b.counts[o] for b in buckets) for o in stats.OUTCOMES}
    return {"width": width, "height": height, "left": left, "bottom": height - bottom,
            "top": top, "scale": scale, "mid": (height - bottom + top) / 2, "bars": bars,
            "totals": totals, "outcome_labels": OUTCOME_LABELS,
            "period_label": PERIOD_LABELS.get(period, PERIOD_LABELS["24h"])}


def explain(p: Page, last_error: str | None) -> dict[str, Any] | None:
    """Why an e-mail waits or failed, for this reader: what happens to it for everyone,
    what to change for an administrator (see postier.core.reasons)."""
    return reasons.explain(last_error, p.lang, admin=p.me.is_admin)


@dataclass
class AttemptRow:
    """One attempt as the e-mail's page shows it: its reason for this reader, the relay's
    reply only when a relay replied; an attempt recorded before reasons were kept shows
    its stored detail."""

    attempt: AttemptRecord
    why: dict[str, Any] | None
    reply: str | None
    stored: str | None


def attempt_rows(p: Page, record: MessageRecord) -> list[AttemptRow]:
    rows = []
    for a in record.history:
        why = explain(p, a.reason)
        if why is not None:
            rows.append(AttemptRow(a, why, why["reply"], None))
        elif a.code is not None:
            rows.append(AttemptRow(a, None, f"{a.code} {a.detail or ''}".strip(), None))
        else:
            rows.append(AttemptRow(a, None, None, a.detail))
    return rows


async def _queue_data(p: Page, q: QueueQuery) -> dict[str, Any]:
    core, eid = p.core, p.me.establishment_id
    period = q.period if q.period in stats.PERIODS else "24h"
    counts = await core.store.counts(eid)
    buckets = await stats.activity(core.store, eid, period, time.time())
    rows = await stats.search(core.store, eid, q.filters(), LIST_LIMIT)
    return {"counts": counts, "chart": chart(p, buckets, period), "rows": rows, "q": q,
            "period": period, "explain": lambda e: explain(p, e), "limit": LIST_LIMIT,
            "updated": p.updated_now(), "today": dt.date.today().isoformat()}


def iso_day(value: str, lang: str) -> str:
    """A day as typed in the page's language (07/12/2026 in French, 12/7/26 in English) or
    in ISO (2026-12-07, as links carry it), in ISO; empty when it is neither."""
    value = value.strip()
    if not value:
        return ""
    try:
        return dt.date.fromisoformat(value).isoformat()
    except ValueError:
        pass
    try:
        return parse_date(value, locale=lang).isoformat()
    except (ValueError, IndexError):
        return ""


def _query(p: Page, status: str, sender: str, recipient: str, since: str, until: str,
           period: str) -> QueueQuery:
    return QueueQuery(status, sender, recipient, iso_day(since, p.lang),
                      iso_day(until, p.lang), period)


@router.get("/queue")
async def queue(p: AdminPage, status: str = "", sender: str = "", recipient: str = "",
                since: str = "", until: str = "", period: str = "24h") -> Response:
    data = await _queue_data(p, _query(p, status, sender, recipient, since, until, period))
    return render(p, "queue.html", title=p._("Queue"), statuses=STATUSES,
                  periods=PERIOD_LABELS, **data)


@router.post("/queue/retry")
async def retry_all(p: AdminPage) -> Response:
    """The queue's "Retry all" button: every waiting or failed e-mail the current filters
    show, tried again now."""
    form = await checked_form(p)
    q = _query(p, *(text(form, name) for name in
                 ("status", "sender", "recipient", "since", "until", "period")))
    f = q.filters()
    count = await p.core.retry_all(p.me, f.status, sender=f.sender, recipient=f.recipient,
                                   since=f.since, until=f.until)
    return redirect(f"/queue?{urlencode({**q.params(), 'ok': 'retried_all', 'n': count})}")


@router.get("/queue/live.json")
async def queue_live(p: AdminPage, status: str = "", sender: str = "", recipient: str = "",
                     since: str = "", until: str = "", period: str = "24h") -> Response:
    data = await _queue_data(p, _query(p, status, sender, recipient, since, until, period))
    return json_response({
        "counts": data["counts"],
        "regions": {
            "queue-counts": render_fragment(p, "_queue_counts.html", **data),
            "queue-chart": render_fragment(p, "_queue_chart.html", **data),
            "queue-rows": render_fragment(p, "_queue_rows.html", **data),
        },
        "updated": data["updated"],
    })


# -- one e-mail ----------------------------------------------------------------------------


def _message_data(p: Page, record: MessageRecord) -> dict[str, Any]:
    attempts = attempt_rows(p, record)
    return {"m": record, "error": explain(p, record.last_error), "attempts": attempts,
            "attempt_replies": any(a.reply for a in attempts),
            "recipient_replies": any(r.code is not None for r in record.recipients),
            "final": record.status in FINAL_STATUSES,
            "can_retry": record.status in ("queued", "deferred", "failed"),
            "can_cancel": record.status in ("queued", "deferred"),
            "can_resend": record.status == "sent" and p.me.is_admin,
            "outcome_labels": OUTCOME_LABELS, "updated": p.updated_now()}


@router.get("/messages/{message_id}")
async def message_detail(message_id: str, p: UserPage) -> Response:
    record = await p.core.get_message(p.me, message_id)
    back = "/queue" if p.me.is_admin and record.user_id != p.me.id else "/mine"
    return render(p, "message.html", title=record.subject or p._("(no subject)"),
                  back=back, **_message_data(p, record))


@router.get("/messages/{message_id}/live.json")
async def message_live(message_id: str, p: UserPage) -> Response:
    record = await p.core.get_message(p.me, message_id)
    data = _message_data(p, record)
    return json_response({"status": record.status, "updated": data["updated"],
                          "regions": {"message-live": render_fragment(
                              p, "_message_live.html", **data)}})


@router.post("/messages/{message_id}/retry")
async def retry(message_id: str, p: UserPage) -> Response:
    await checked_form(p)
    await p.core.retry(p.me, message_id)
    return redirect(flash_url(f"/messages/{message_id}", "retried"))


@router.post("/messages/{message_id}/resend")
async def resend(message_id: str, p: AdminPage) -> Response:
    await checked_form(p)
    result = await p.core.resend(p.me, message_id)
    return redirect(flash_url(f"/messages/{result.id}", "resent"))


@router.post("/messages/{message_id}/cancel")
async def cancel(message_id: str, p: UserPage) -> Response:
    await checked_form(p)
    await p.core.cancel(p.me, message_id)
    return redirect(flash_url(f"/messages/{message_id}", "cancelled"))


# -- my e-mails ----------------------------------------------------------------------------


async def _mine_data(p: Page, status: str) -> dict[str, Any]:
    chosen = status if status in STATUSES else None
    records = await p.core.list_messages(p.me, chosen, LIST_LIMIT, mine=True)
    return {"messages": records, "status": chosen or "",
            "explain": lambda e: explain(p, e), "updated": p.updated_now()}


@router.get("/mine")
async def my_messages(p: UserPage, status: str = "") -> Response:
    data = await _mine_data(p, status)
    return render(p, "mine.html", title=p._("My e-mails"), statuses=STATUSES, **data)


@router.get("/mine/live.json")
async def my_messages_live(p: UserPage, status: str = "") -> Response:
    data = await _mine_data(p, status)
    return json_response({"updated": data["updated"], "regions": {
        "mine-rows": render_fragment(p, "_mine_rows.html", **data)}})
