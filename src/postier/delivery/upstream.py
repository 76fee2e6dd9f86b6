"""Handing e-mails on to another Postier server (``relay.kind: postier``), as the original
product's servers did with a shared base.

The message's stored bytes are submitted to the upstream server's API with an idempotency
key made of this server's message id, so handing on twice (after a crash, or to follow
up) never makes two e-mails: the second call returns the upstream message and its current
state, whose per-recipient results flow back here — the sender sees "sent" or "failed" end
to end. Until the upstream server has a final answer, recipients stay deferred here.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

import httpx

from postier.core.settings import RelaySettings
from postier.delivery.tls import tls_context
from postier.delivery.transaction import RcptResult, TransactionResult
from postier.errors import DeliveryError
from postier.i18n import N_
from postier.store.base import Claimed


def _error(relay: RelaySettings, status: int | None, text: str, transient: bool) -> DeliveryError:
    if status is None:
        return DeliveryError(
            N_("The upstream Postier server {url} cannot be reached: {reason}."),
            hint=N_("Postier will try again. Check the URL and that the upstream server runs."),
            code="upstream_unreachable", transient=True, reply=text, url=relay.url,
            reason=text, step="connect",
        )
    return DeliveryError(
        N_("The upstream Postier server {url} refused the e-mail ({status}): {reason}"),
        hint=N_("Check the API token of this server's account on the upstream server (the "
                "relay password) and that account's rights."),
        code="upstream_refused", transient=transient, reply=text, url=relay.url,
        status=status, reason=text, step="data",
    )


async def hand_on(
    relay: RelaySettings, claimed: Claimed, recipients: Sequence[str]
) -> TransactionResult:
    headers = {"Authorization": f"Bearer {relay.password or ''}"}
    body: dict[str, Any] = {
        "envelope_from": claimed.envelope_from,
        "recipients": list(recipients),
        "data": base64.b64encode(claimed.data).decode(),
        "smtputf8": claimed.smtputf8,
        "idempotency_key": f"relay:{claimed.id}",
    }
    try:
        async with httpx.AsyncClient(base_url=relay.url, headers=headers,
                                     timeout=float(relay.timeout),
                                     verify=tls_context(relay)) as client:
            r = await client.post("/api/v1/messages/raw", json=body)
            if r.status_code not in (200, 202):
                detail = _detail(r)
                err = _error(relay, r.status_code, detail,
                             transient=r.status_code in (401, 403, 409, 429) or
                             r.status_code >= 500)
                status = "deferred" if err.transient else "failed"
                return TransactionResult(
                    [RcptResult(a, status, r.status_code, detail) for a in recipients],
                    error=err, reusable=False)
            upstream_id = r.json()["id"]
            state = (await client.get(f"/api/v1/messages/{upstream_id}")).json()
    except httpx.HTTPError as exc:
        err = _error(relay, None, str(exc) or type(exc).__name__, transient=True)
        return TransactionResult(
            [RcptResult(a, "deferred", None, err.reply) for a in recipients], error=err,
            reusable=False)
    by_address = {x["address"].lower(): x for x in state.get("recipients", [])}
    waiting = DeliveryError(
        N_("Handed on to {url} (as {id}): waiting for its result."),
        hint=N_("Nothing to do: the upstream server delivers it and its result comes back "
                "here."),
        code="upstream_pending", transient=True, reply="", url=relay.url, id=upstream_id,
        step="data",
    )
    results = []
    for address in recipients:
        up = by_address.get(address.lower(), {})
        status = up.get("status", "pending")
        if status in ("sent", "failed"):
            results.append(RcptResult(address, status, up.get("code"),
                                      f"via {relay.url}: {up.get('reply') or ''}".strip()))
        else:
            results.append(RcptResult(
                address, "deferred", None,
                f"handed on to {relay.url} as {upstream_id}: waiting for its result"))
    pending = any(r.status == "deferred" for r in results)
    return TransactionResult(results, error=waiting if pending else None)


def _detail(r: httpx.Response) -> str:
    try:
        err = r.json().get("error", {})
        return str(err.get("message") or r.text[:200])
    except ValueError:
        return r.text[:200]
