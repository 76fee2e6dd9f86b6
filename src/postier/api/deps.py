"""Shared request plumbing: the installation, the caller's language, the caller."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from postier.i18n import negotiate
from postier.service import Postier
from postier.store.base import User

# An operator serves every establishment: this header says which one a request is about.
ESTABLISHMENT_HEADER = "X-Postier-Establishment"

bearer = HTTPBearer(auto_error=False, description="An API token (postier tokens create USER)")


# Async on purpose: FastAPI runs plain functions in its thread pool, a hand-off per request
# that cost a tenth of the acceptance time (docs/performance.md).
async def get_core(request: Request) -> Postier:
    core: Postier = request.app.state.core
    return core


async def get_lang(request: Request) -> str:
    return negotiate(request.headers.get("accept-language"))


async def get_user(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> User:
    core: Postier = request.app.state.core
    token = credentials.credentials if credentials else None
    user = await core.authenticate_token(token)
    slug = request.headers.get(ESTABLISHMENT_HEADER)
    if slug:
        user = await core.act_in(user, slug)
    request.state.user = user
    return user


Core = Annotated[Postier, Depends(get_core)]
Lang = Annotated[str, Depends(get_lang)]
CurrentUser = Annotated[User, Depends(get_user)]
