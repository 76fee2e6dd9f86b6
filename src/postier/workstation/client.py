"""The Python SDK's client for a Postier server, over its HTTP API.

>>> from postier import Client
>>> with Client("http://serveur-edt:8025", token) as client:
...     sub = client.submit(to=["parent@example.org"], subject="Bonjour", text="…")
...     client.status(sub.id).status
'queued'

Errors are :class:`postier.errors.PostierError` subclasses carrying the server's code,
message and remedy (in the language asked for with ``lang``); a server that cannot be
reached raises :class:`ServerUnreachable` (transient). The client is synchronous; an
application running an event loop calls it through ``asyncio.to_thread``.

Sending the way the workstation is set up (``postier.send``) is in
:mod:`postier.workstation.sending`; this module knows nothing of the workstation but its
server link (:func:`client_for`) and what became of an e-mail (:class:`SendResult`).
"""

from __future__ import annotations

import base64
import mimetypes
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx

from postier import errors
from postier.i18n import N_, system_language

if TYPE_CHECKING:
    from postier.workstation.settings_file import WorkstationSettings

_BY_STATUS: dict[int, type[errors.PostierError]] = {
    401: errors.AuthenticationRequired,
    403: errors.Forbidden,
    404: errors.NotFound,
    409: errors.Conflict,
    413: errors.TooLarge,
    422: errors.InvalidInput,
    503: errors.StoreUnavailable,
    507: errors.StoreUnavailable,
}

# Answers that say "not now" rather than "no": the same request may succeed later.
_TRANSIENT = frozenset({429})
CONNECT_TIMEOUT = 5.0
_CHECK_SERVER = N_("Check server.url and that the server is running.")


class ServerUnreachable(errors.PostierError):
    code = "server_unreachable"
    transient = True
    default_template = N_("The Postier server at {url} cannot be reached: {reason}.")


class APIError(errors.PostierError):
    """An error answered by the server, already in the requested language."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.body = body
        message = str(body.get("message") or f"HTTP {status}")
        super().__init__(
            message.replace("{", "{{").replace("}", "}}"),
            hint=(body.get("hint") or "").replace("{", "{{").replace("}", "}}") or None,
            field=body.get("field"),
            code=str(body.get("code") or "unexpected"),
            transient=status in _TRANSIENT or status >= 500,
        )
        self.http_status = status

    def message(self, lang: str = "en") -> str:  # already translated by the server
        return self.template.replace("{{", "{").replace("}}", "}")

    def hint(self, lang: str = "en") -> str | None:
        return self.hint_template.replace("{{", "{").replace("}}", "}") \
            if self.hint_template else None


def _reason(exc: httpx.HTTPError) -> str:
    """Why the server could not be reached, in words that are translated when shown."""
    if isinstance(exc, httpx.TimeoutException):
        return N_("timed out")
    if isinstance(exc, httpx.ConnectError) and "refused" in str(exc).lower():
        return N_("connection refused")
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError):
        return N_("the connection closed before its answer")
    return str(exc) or type(exc).__name__


def _error(status: int, body: dict[str, Any]) -> errors.PostierError:
    """An error of the right class (so ``except errors.Forbidden`` works)."""
    cls = _BY_STATUS.get(status, errors.PostierError)
    err: errors.PostierError = type(f"API{cls.__name__}", (APIError, cls), {})(status, body)
    return err


@dataclass(frozen=True)
class Submission:
    id: str
    status: str
    duplicate: bool = False
    sender_note: str | None = None  # why the From is not yours (address not verified)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Submission:
        # Fields a newer server adds are ignored rather than breaking older clients.
        return cls(id=doc["id"], status=doc["status"], duplicate=doc.get("duplicate", False),
                   sender_note=doc.get("sender_note"))


@dataclass(frozen=True)
class Recipient:
    address: str
    status: str
    code: int | None = None
    reply: str | None = None


@dataclass(frozen=True)
class MessageStatus:
    id: str
    status: str
    subject: str
    attempts: int
    created_at: str
    next_attempt_at: str | None
    last_error: dict[str, Any] | None
    recipients: list[Recipient] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> MessageStatus:
        return cls(
            id=doc["id"], status=doc["status"], subject=doc.get("subject", ""),
            attempts=doc.get("attempts", 0), created_at=doc.get("created_at", ""),
            next_attempt_at=doc.get("next_attempt_at"), last_error=doc.get("last_error"),
            recipients=[Recipient(**r) for r in doc.get("recipients", [])], raw=doc,
        )


def attachment(path: str | Path, content_type: str | None = None) -> dict[str, str]:
    """An attachment for :meth:`Client.submit` from a file."""
    p = Path(path)
    ctype = content_type or mimetypes.guess_type(p.name)[0] or "application/octet-stream"
    return {"filename": p.name, "content_type": ctype,
            "content": base64.b64encode(p.read_bytes()).decode()}


def message_payload(
    to: Sequence[str],
    subject: str = "",
    text: str | None = None,
    html: str | None = None,
    *,
    cc: Sequence[str] = (),
    bcc: Sequence[str] = (),
    reply_to: Sequence[str] = (),
    from_: str | None = None,
    attachments: Sequence[dict[str, str] | str | Path] = (),
    headers: dict[str, str] | None = None,
    priority: str = "normal",
    idempotency_key: str | None = None,
) -> dict[str, Any]:
    doc: dict[str, Any] = {"to": list(to), "subject": subject, "priority": priority}
    for key, value in (("cc", cc), ("bcc", bcc), ("reply_to", reply_to)):
        if value:
            doc[key] = list(value)
    for key, opt in (("text", text), ("html", html), ("from", from_),
                     ("idempotency_key", idempotency_key)):
        if opt is not None:
            doc[key] = opt
    if headers:
        doc["headers"] = dict(headers)
    if attachments:
        doc["attachments"] = [a if isinstance(a, dict) else attachment(a) for a in attachments]
    return doc


class Client:
    """A Postier server, reached over its HTTP API with an API token."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        lang: str | None = None,
        timeout: float | httpx.Timeout = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        if not isinstance(timeout, httpx.Timeout):
            # A server that is away is known sooner than a slow answer is given up on.
            timeout = httpx.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT))
        self._http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}",
                     "Accept-Language": lang or system_language()},
            timeout=timeout,
            transport=transport,
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self._http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise ServerUnreachable(url=self.url, reason=_reason(exc),
                                    hint=_CHECK_SERVER) from exc
        if r.status_code == 204:
            return None
        try:
            body = r.json()
        except ValueError:
            body = {}
        if r.status_code >= 400:
            err = body.get("error") if isinstance(body, dict) else None
            raise _error(r.status_code, err if isinstance(err, dict) else
                         {"message": f"HTTP {r.status_code}: {r.text[:200]}"})
        return body

    # -- sending -------------------------------------------------------------------------
    def submit(self, to: Sequence[str], subject: str = "", text: str | None = None,
               html: str | None = None, **options: Any) -> Submission:
        """Hand one e-mail to the server; returns once it is durably queued."""
        return self.submit_message(message_payload(to, subject, text, html, **options))

    def submit_message(self, message: dict[str, Any]) -> Submission:
        return Submission.from_json(self._call("POST", "/api/v1/messages", json=message))

    def submit_batch(self, messages: Sequence[dict[str, Any]]) -> list[Submission]:
        """Many e-mails in one durable commit: all are queued, or none."""
        doc = self._call("POST", "/api/v1/messages/batch", json={"messages": list(messages)})
        return [Submission.from_json(m) for m in doc["messages"]]

    def status(self, message_id: str) -> MessageStatus:
        return MessageStatus.from_json(self._call("GET", f"/api/v1/messages/{message_id}"))

    def messages(self, status: str | None = None, limit: int = 100) -> list[MessageStatus]:
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        return [MessageStatus.from_json(m)
                for m in self._call("GET", "/api/v1/messages", params=params)]

    def cancel(self, message_id: str) -> MessageStatus:
        return MessageStatus.from_json(
            self._call("POST", f"/api/v1/messages/{message_id}/cancel"))

    # -- profiles, account, settings -----------------------------------------------------
    def me(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/api/v1/me")
        return result

    def profiles(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/api/v1/profiles")
        return result

    def retrieve_profile(self, label_or_id: str | int) -> dict[str, Any]:
        """"Récupérer un profil d'envoi d'e-mails": by label (or id)."""
        for p in self.profiles():
            if p["label"] == label_or_id or str(p["id"]) == str(label_or_id):
                result: dict[str, Any] = self._call(
                    "POST", f"/api/v1/profiles/{p['id']}/retrieve")
                return result
        labels = ", ".join(p["label"] for p in self.profiles()) or "-"
        raise errors.NotFound(N_("There is no sending profile {id}. Profiles: {labels}."),
                              id=label_or_id, labels=labels)

    # -- sender addresses (verification by code) ----------------------------------------
    def sender_addresses(self) -> list[dict[str, Any]]:
        """Your verified sender addresses and those waiting for their code."""
        result: list[dict[str, Any]] = self._call("GET", "/api/v1/account/sender-addresses")
        return result

    def verify_sender(self, address: str) -> dict[str, Any]:
        """Have a 6-digit code e-mailed to ``address`` (yours, or one granted to you)."""
        result: dict[str, Any] = self._call("POST", "/api/v1/account/sender-addresses",
                                            json={"address": address})
        return result

    def confirm_sender(self, address: str, code: str) -> dict[str, Any]:
        """Give the code received: ``address`` is then verified."""
        result: dict[str, Any] = self._call(
            "POST", f"/api/v1/account/sender-addresses/{quote(address, safe='@')}/confirm",
            json={"code": code})
        return result

    def remove_sender(self, address: str) -> None:
        self._call("DELETE", f"/api/v1/account/sender-addresses/{quote(address, safe='@')}")

    def test_settings(self, to: str, settings: dict[str, Any] | None = None) -> dict[str, Any]:
        """The server's test-send (administrators)."""
        body: dict[str, Any] = {"to": to}
        if settings is not None:
            body["settings"] = settings
        result: dict[str, Any] = self._call("POST", "/api/v1/settings/test", json=body)
        return result


# -- what became of an e-mail sent the workstation's way --------------------------------------


@dataclass(frozen=True)
class SendResult:
    """What became of an e-mail sent with :func:`postier.workstation.sending.send`.

    ``status``: ``queued`` (handed to the server; ``id`` is the server's), ``sent``,
    ``kept`` (in the local outbox after a transient failure; ``id`` is the outbox's, and
    the e-mail leaves by itself: see :mod:`postier.workstation.outbox`), ``failed`` (refused for
    good). ``error`` explains anything but success. ``via``: ``server`` or ``smtp`` (this
    workstation's own or profile SMTP settings). ``kept_as``: the outbox id of a kept
    e-mail that was handed to the server later.
    """

    status: str
    id: str
    error: errors.PostierError | None = None
    recipients: list[Recipient] = field(default_factory=list)
    sender_note: str | None = None  # from the server: why the From is not the user's
    via: str = "server"
    kept_as: str | None = None


def client_for(settings: WorkstationSettings, lang: str | None = None,
               timeout: float | httpx.Timeout = 30.0) -> Client:
    """A client for the server the workstation's settings name, with their token."""
    if not settings.server.url or not settings.server.token:
        raise errors.InvalidInput(
            N_("No Postier server is set for this workstation: set server.url and "
               "server.token."),
            hint=N_("Use: postier config set server.url http://SERVER:8025"),
            field="server.url",
        )
    return Client(settings.server.url, settings.server.token, lang=lang, timeout=timeout)
