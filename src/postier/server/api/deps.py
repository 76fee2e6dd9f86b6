"""Shared request plumbing: the installation, the caller's language, the caller."""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

import pydantic_core
from fastapi import Depends, Request, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from postier.core.service import Postier
from postier.i18n import negotiate
from postier.server.api.guard import SCOPE_USER
from postier.store.base import User

# An operator serves every establishment: this header says which one a request is about.
ESTABLISHMENT_HEADER = "X-Postier-Establishment"

bearer = HTTPBearer(auto_error=False, description="An API token (postier tokens create USER)")


class JSONRequest(Request):
    """A request whose JSON body is read by pydantic-core's parser (Rust) rather than the
    standard library's: about 40 % less time for a batch of 1,000 e-mails. Any body that
    parser refuses is read again by ``json.loads``, so a valid body gives the same values
    (a property test holds the two to that) and a malformed one the same 422 as before."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = pydantic_core.from_json(body)
            except ValueError:
                self._json = json.loads(body)  # raises the error FastAPI turns into a 422
        return self._json


class JSONRoute(APIRoute):
    """Routes that read their JSON body with :class:`JSONRequest` (``APIRouter(route_class=
    JSONRoute)``): the submission routes, whose bodies reach megabytes. Other routes keep
    FastAPI's own reading; their bodies are small."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            return await handler(JSONRequest(request.scope, request.receive))

        return route


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
    # A request with a body showed its token before the body was read (guard.py).
    user: User | None = request.scope.get(SCOPE_USER)
    if user is None:
        user = await core.authenticate_token(credentials.credentials if credentials else None)
    slug = request.headers.get(ESTABLISHMENT_HEADER)
    if slug:
        user = await core.act_in(user, slug)
    request.state.user = user
    return user


Core = Annotated[Postier, Depends(get_core)]
Lang = Annotated[str, Depends(get_lang)]
CurrentUser = Annotated[User, Depends(get_user)]
