"""The establishment's alerts: incidents open now and past."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from postier.ops import alerts
from postier.server.api.deps import Core, CurrentUser, Lang
from postier.server.api.views import ErrorResponse

router = APIRouter(prefix="/api/v1/alerts", tags=["operations"])
_ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorResponse} for s in (401, 403)}


class AlertOut(BaseModel):
    id: int
    kind: str = Field(description="relay_failing, queue_behind or oauth2_expiry")
    status: str = Field(description="open or resolved")
    title: str
    message: str = Field(description="What happens, in the reader's language")
    hint: str | None = Field(description="What to do")
    started_at: str | None
    resolved_at: str | None
    details: dict[str, Any]


@router.get("", responses=_ERRORS)
async def list_alerts(
    user: CurrentUser, core: Core, lang: Lang,
    limit: int = Query(100, ge=1, le=1000),
) -> list[AlertOut]:
    """The establishment's incidents, open ones first, then the most recent (administrators).
    Each was announced once when it began and once when it ended."""
    return [AlertOut(**a) for a in await alerts.list_alerts(core, user, lang, limit)]
