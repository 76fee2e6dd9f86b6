"""Sending the way this workstation is set up, for an application: :func:`send` (what the
``postier send`` command does), :func:`pull_profile`, and the outbox emptied now
(:func:`flush_outbox`) or by a background thread (:class:`OutboxFlusher`).

``import postier`` loads this module, and an application that only uses
:class:`~postier.workstation.client.Client` must not load the server's code. So the two
modules that need it are imported by the functions that use them, when they first run:
the workstation's settings file (:mod:`postier.workstation.settings_file`, whose SMTP part
is the server's relay settings model) and the outbox (:mod:`postier.workstation.outbox`, a
local store with the server's message building and delivery code). A send through the
server that succeeds never loads the outbox.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from postier import errors
from postier.i18n import system_language
from postier.workstation.client import SendResult, client_for, message_payload

if TYPE_CHECKING:
    from postier.workstation.outbox import Report
    from postier.workstation.settings_file import WorkstationSettings


def new_idempotency_key() -> str:
    """The key an e-mail for the server carries from its first attempt to its last."""
    return f"workstation-{uuid.uuid4().hex}"


def send(
    to: Sequence[str],
    subject: str = "",
    text: str | None = None,
    html: str | None = None,
    *,
    settings: WorkstationSettings | None = None,
    lang: str | None = None,
    **options: Any,
) -> SendResult:
    """Send one e-mail the way this workstation is set up: through the server (returns at
    once, ``queued``; ``kept`` in the local outbox when the server cannot take it now), or
    directly with its own or a profile's SMTP settings (the e-mail is first kept in the
    local outbox, so nothing is lost if the relay is down). A refusal raises."""
    from postier.workstation import settings_file

    settings = settings or settings_file.load()
    settings.check_ready()
    payload = message_payload(to, subject, text, html, **options)
    if settings.mode == settings_file.Mode.SERVER:
        return _send_to_server(settings, payload, lang)
    from postier.workstation import outbox

    return asyncio.run(outbox.send_direct(settings, payload, lang or system_language()))


def _send_to_server(
    settings: WorkstationSettings, payload: dict[str, Any], lang: str | None
) -> SendResult:
    # Chosen before the first attempt: if its answer is lost, the next one is recognised.
    payload.setdefault("idempotency_key", new_idempotency_key())
    started = time.time()
    try:
        with client_for(settings, lang) as c:
            sub = c.submit_message(payload)
    except errors.PostierError as exc:
        if not exc.transient:
            raise
        from postier.workstation import outbox

        return asyncio.run(outbox.keep_for_server(settings, payload, exc, started))
    return SendResult(sub.status, sub.id, sender_note=sub.sender_note)


def pull_profile(
    label: str, settings: WorkstationSettings | None = None
) -> WorkstationSettings:
    """Retrieve a server profile into the workstation's settings (not saved: call
    :func:`postier.workstation.settings_file.save`), with the sender identity of the
    account the token belongs to where the workstation has none."""
    from postier.workstation import settings_file

    settings = settings or settings_file.load()
    with client_for(settings) as c:
        profile = c.retrieve_profile(label)
        account = c.me()
    return settings_file.with_identity(settings_file.apply_profile(settings, profile),
                                       str(account.get("name") or ""),
                                       str(account.get("email") or ""))


def flush_outbox(settings: WorkstationSettings | None = None,
                 lang: str | None = None) -> list[SendResult]:
    """Try every e-mail waiting in the outbox now, for a program without an event loop
    (``postier.flush_outbox()``); returns what became of each."""
    from postier.workstation import outbox, settings_file

    return asyncio.run(outbox.flush(settings or settings_file.load(), lang))


class OutboxFlusher:
    """:func:`postier.workstation.outbox.watch` in a background thread, for a host
    application without an event loop.

    >>> with OutboxFlusher(interval=30):
    ...     run_the_application()

    ``stop()`` (or leaving the ``with`` block) ends it after the round in progress.
    """

    def __init__(self, settings: WorkstationSettings | None = None, *,
                 interval: float = 15.0, report: Report | None = None,
                 lang: str | None = None) -> None:
        from postier.workstation import outbox

        self._watch = outbox.watch
        self._args: dict[str, Any] = {"settings": settings, "interval": interval,
                                      "report": report, "lang": lang}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="postier-outbox", daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self._ready.set()
            await self._watch(stop=self._stop, **self._args)

        asyncio.run(main())

    def start(self) -> OutboxFlusher:
        self._thread.start()
        self._ready.wait()
        return self

    def stop(self, timeout: float | None = None) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)

    def __enter__(self) -> OutboxFlusher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
