"""What every HTTP request goes through before the application reads its body.

A body is refused with 413 once it is larger than ``ServerConfig.request_size_limit()``:
at once from its ``Content-Length``, and while it arrives when it is sent in chunks
(without a length), so that no request larger than the limit is ever held in memory. An
API request with a body (``/api/...``) shows a valid token first: a stranger's body is
never read. The account found is kept in the request's scope, where ``deps.get_user``
takes it instead of looking the token up again.
"""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from postier.core.service import Postier
from postier.errors import (
    AuthenticationRequired,
    InvalidInput,
    PostierError,
    StoreUnavailable,
)
from postier.i18n import N_, negotiate

# Where the account that presented the request's token is kept in the ASGI scope.
SCOPE_USER = "postier.user"


class RequestTooLarge(InvalidInput):
    code = "request_too_large"
    http_status = 413
    default_template = N_(
        "The request is too large ({size} bytes); this server accepts at most {limit} bytes."
    )


_TOO_LARGE_STREAMED = N_(
    "The request is too large (more than {limit} bytes); this server accepts at most "
    "{limit} bytes."
)
_TOO_LARGE_HINT = N_(
    "Send fewer e-mails per batch, or smaller attachments (share large files through a "
    "link). The server's operator sets the limit (POSTIER_MAX_REQUEST_SIZE)."
)


def _headers(scope: Scope) -> tuple[int | None, bool, str | None, str | None]:
    """Content-Length, whether the body comes in chunks, the bearer token, the language."""
    length: int | None = None
    chunked = False
    token = lang = None
    for name, value in scope["headers"]:
        if name == b"content-length":
            length = int(value) if value.isdigit() else None
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"authorization":
            scheme, _, credentials = value.decode("latin-1").partition(" ")
            token = credentials.strip() if scheme.lower() == "bearer" else None
        elif name == b"accept-language":
            lang = value.decode("latin-1")
    return length, chunked, token, lang


async def _refuse(error: PostierError, lang: str | None, scope: Scope, receive: Receive,
                  send: Send) -> None:
    """Answer ``error`` in the API's shape and close the connection: the body that may
    follow is never read."""
    headers = {"Connection": "close"}
    if error.http_status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if isinstance(error, StoreUnavailable) and error.http_status == 503:
        headers["Retry-After"] = "5"  # the database restarting: as the API's handler says
    response = JSONResponse({"error": error.render(negotiate(lang))},
                            status_code=error.http_status, headers=headers)
    await response(scope, receive, send)


class RequestGuard:
    """ASGI middleware: the size limit of request bodies and the token before the body."""

    def __init__(self, app: ASGIApp, core: Postier, limit: int) -> None:
        self.app = app
        self.core = core
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length, chunked, token, lang = _headers(scope)
        if length is not None and length > self.limit:
            await _refuse(RequestTooLarge(size=length, limit=self.limit, hint=_TOO_LARGE_HINT),
                          lang, scope, receive, send)
            return
        has_body = chunked or bool(length)
        if has_body and scope["path"].startswith("/api/"):
            try:
                scope[SCOPE_USER] = await self.core.authenticate_token(token)
            except (AuthenticationRequired, StoreUnavailable) as exc:
                await _refuse(exc, lang, scope, receive, send)
                return
        if chunked and length is None:
            body = await self._read_chunks(receive)
            if body is None:
                await _refuse(RequestTooLarge(_TOO_LARGE_STREAMED, limit=self.limit,
                                              hint=_TOO_LARGE_HINT),
                              lang, scope, receive, send)
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    async def _read_chunks(self, receive: Receive) -> list[Message] | None:
        """The body's messages as they came, or None as soon as it passes the limit."""
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return messages  # the client left: the application learns it as usual
            size += len(message.get("body", b""))
            if size > self.limit:
                return None
            if not message.get("more_body", False):
                return messages


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A ``receive`` that gives the body read ahead, then what the connection says next
    (a disconnection, while the application streams its answer)."""
    pending = list(reversed(messages))

    async def replay() -> Message:
        if pending:
            return pending.pop()
        return await receive()

    return replay
