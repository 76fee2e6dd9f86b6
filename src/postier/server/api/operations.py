"""Operations: readiness, Prometheus metrics, and what is kept about a user (RGPD)."""

from __future__ import annotations

import ipaddress
import re
import secrets
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from postier.errors import Forbidden
from postier.i18n import N_
from postier.ops import metrics, retention
from postier.server.api.deps import Core, CurrentUser, Lang
from postier.server.api.views import ErrorResponse
from postier.server.config import metrics_networks
from postier.store import database_url

router = APIRouter(tags=["operations"])

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


@router.get(
    "/api/v1/ready",
    responses={200: {"description": "Ready"}, 503: {"description": "Not ready, and why"}},
)
async def ready(request: Request, core: Core) -> JSONResponse:
    """Readiness, without authentication: the store takes a real write, its disk has room
    for the largest e-mail (else a submission may get 507), and the delivery workers run
    (or this process does not deliver: ``--no-delivery``). 503 otherwise, with what is
    wrong; nothing secret is shown."""
    store_problem = await metrics.probe_store(core.store) or \
        metrics.store_room(database_url(core.data_dir, core.config.database_url),
                           core.config.max_message_size)
    delivery = metrics.delivery_state(
        getattr(request.app.state, "worker", None), core.config.delivery
    )
    problems = []
    if store_problem:
        problems.append(f"store: {store_problem}")
    if delivery == "stopped":
        problems.append("delivery: the delivery workers are not running")
    # A background loop that died and is being started again (postier.core.supervision).
    failed: list[str] = getattr(getattr(request.app.state, "worker", None), "problems",
                                list)()
    problems.extend(f"delivery: {name} failed; starting it again" for name in failed)
    body: dict[str, Any] = {
        "status": "not_ready" if problems else "ready",
        "store": "unavailable" if store_problem else "ok",
        "delivery": delivery,
    }
    if problems:
        body["problems"] = problems
    return JSONResponse(body, status_code=503 if problems else 200,
                        headers={"Cache-Control": "no-store"})


def _may_read_metrics(request: Request, token: str | None, allow: str) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if token and scheme.lower() == "bearer" and secrets.compare_digest(
        given.strip().encode(), token.encode()
    ):
        return True
    host = request.client.host if request.client else ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in metrics_networks(allow))


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {PROMETHEUS_TEXT: {}}}, 403: {"model": ErrorResponse}},
)
async def prometheus(request: Request, core: Core, lang: Lang) -> Response:
    """Prometheus metrics (text format 0.0.4). Readable with the bearer token
    ``POSTIER_METRICS_TOKEN`` or from an address in ``POSTIER_METRICS_ALLOW``
    (default: this machine only)."""
    config = core.config
    if not _may_read_metrics(request, config.metrics_token, config.metrics_allow):
        refused = Forbidden(
            N_("The metrics are not readable from {address}."),
            hint=N_("Give the metrics token (POSTIER_METRICS_TOKEN) as a bearer token, or add "
                    "this address to POSTIER_METRICS_ALLOW."),
            address=request.client.host if request.client else "?",
        )
        # Answered here, in the API's JSON shape: this path is outside /api, where the web
        # pages would turn an error into an HTML page.
        return JSONResponse({"error": refused.render(lang)}, status_code=403)
    collector: metrics.Collector | None = getattr(request.app.state, "metrics", None)
    if collector is None:
        collector = request.app.state.metrics = metrics.Collector(core.store)
    snap = await collector.snapshot()
    snap.delivery = metrics.delivery_state(
        getattr(request.app.state, "worker", None), config.delivery
    )
    return PlainTextResponse(metrics.render(snap), media_type=PROMETHEUS_TEXT,
                             headers={"Cache-Control": "no-store"})


_ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse} for s in (401, 403, 404)
}


@router.get("/api/v1/me/data", responses=_ERRORS)
async def my_data(user: CurrentUser, core: Core, lang: Lang) -> dict[str, Any]:
    """What Postier keeps about my e-mails and my account, and until when (RGPD)."""
    return await retention.user_data(core, user, lang)


@router.get("/api/v1/users/{username}/data", responses=_ERRORS)
async def user_data(username: str, user: CurrentUser, core: Core, lang: Lang) -> JSONResponse:
    """Administrators: export what Postier keeps about a user's e-mails and account (for a
    request of access; the export is recorded in the audit log)."""
    subject = await core.admin.target(user, username)
    data = await retention.user_data(core, subject, lang)
    await core.admin.record_data_export(user, subject, len(data["messages"]))
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", subject.username)
    filename = f"postier-{safe}-data.json"
    return JSONResponse(
        data,
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )
