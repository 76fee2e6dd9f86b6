"""Why an e-mail is late or was not sent, said to whoever reads it.

A delivery failure is kept as its error's code and parameters (``PostierError.dump``, in
``messages.last_error`` and in each attempt's ``reason``). Two people read it: the
administrator, who can change the relay settings, reads the error's own message and
remedy; the sender (a teacher), who cannot, reads what happens to the e-mail and whether
anything is asked of them — :data:`SENDER` holds that wording for every code. The relay's
reply is shown only when a relay actually replied (an SMTP code), never a Python
exception's text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from postier.errors import load
from postier.i18n import N_, translate


@dataclass(frozen=True)
class SenderWording:
    """What the sender reads: ``waiting`` while Postier keeps trying, ``final`` when the
    e-mail will not leave (None: the same as ``waiting``)."""

    waiting: str
    final: str | None = None


_NOT_ANSWERING = SenderWording(N_(
    "The establishment's sending server does not answer; Postier tries again. You have "
    "nothing to do."))
_SETUP = SenderWording(
    N_("The establishment's sending server does not accept Postier's connection yet: an "
       "administrator must correct its settings. Postier keeps your e-mail and tries again. "
       "You have nothing to do."),
    N_("The establishment's sending server refused this e-mail: it was not sent. Tell your "
       "administrator."),
)
_CANNOT_TAKE = SenderWording(
    N_("The sending server cannot take the e-mail right now; Postier tries again. You have "
       "nothing to do."),
    N_("The sending server refused this e-mail: it was not sent. Tell your administrator, "
       "giving the e-mail's date and subject."),
)
_UNKNOWN = SenderWording(
    N_("Not sent yet because of an unexpected problem; Postier tries again. You have "
       "nothing to do."),
    N_("The e-mail could not be sent. Tell your administrator, giving the e-mail's date and "
       "subject."),
)

# Every code a delivery failure may carry (the relay's classify, the sending limits, the
# worker, the upstream server); a unit test holds this table to the codes in the source.
SENDER: dict[str, SenderWording] = {
    **dict.fromkeys(("dns", "refused", "timeout", "disconnected", "upstream_unreachable",
                     "oauth2_unreachable"), _NOT_ANSWERING),
    **dict.fromkeys(("tls_certificate", "tls_unexpected", "tls_failed", "tls_expected",
                     "tls_required", "starttls_unavailable", "auth_failed", "auth_required",
                     "auth_unsupported", "not_configured", "oauth2_refused",
                     "upstream_refused"), _SETUP),
    "rate_limited": SenderWording(N_(
        "The sending server asks Postier to slow down; your e-mail leaves by itself a little "
        "later. You have nothing to do.")),
    "relay_limit": SenderWording(N_(
        "The establishment's sending limit is reached for now; your e-mail leaves by itself "
        "as soon as it allows. You have nothing to do.")),
    "store_unavailable": SenderWording(N_(
        "Postier is unavailable for a moment; your e-mail is kept and leaves as soon as it "
        "is back. You have nothing to do.")),
    "sender_refused": SenderWording(
        N_("The sending server does not accept the sender address for now; Postier tries "
           "again. You have nothing to do."),
        N_("The sending server refuses to send from this sender address: the e-mail was not "
           "sent. Tell your administrator."),
    ),
    "recipient_refused": SenderWording(
        N_("The recipient's server does not accept the e-mail for now; Postier tries again. "
           "You have nothing to do."),
        N_("A recipient's address was refused: the e-mail did not reach it. Check the "
           "address, then send the e-mail again."),
    ),
    "smtputf8_unsupported": SenderWording(N_(
        "The sending server does not accept addresses with accents or other non-ASCII "
        "characters: the e-mail was not sent. Write the address without them if it has "
        "such a form, or tell your administrator.")),
    "smtp_error": _CANNOT_TAKE,
    "rejected": _CANNOT_TAKE,
    "expired": SenderWording(N_(
        "Postier tried to send this e-mail for {days} days without success: it was not sent. "
        "Send it again later, or tell your administrator.")),
    "upstream_pending": SenderWording(N_(
        "Handed on to the next server, which sends it. You have nothing to do.")),
    "unexpected": _UNKNOWN,
}


def sender_wording(code: str, transient: bool, params: dict[str, Any], lang: str) -> str:
    wording = SENDER.get(code, _UNKNOWN)
    template = wording.waiting if transient or wording.final is None else wording.final
    try:
        return translate(lang, template, **params)
    except (KeyError, IndexError, ValueError):  # a damaged row must not break a listing
        return translate(lang, (_UNKNOWN.waiting if transient else _UNKNOWN.final) or "")


def server_reply(doc: dict[str, Any]) -> str | None:
    """The relay's own reply ("550 5.1.1 unknown user"), only when a relay replied."""
    code = doc.get("smtp_code")
    if not isinstance(code, int):
        return None
    reply = (doc.get("params") or {}).get("reply")
    return f"{code} {reply}".strip() if isinstance(reply, str) else str(code)


def public_params(doc: dict[str, Any]) -> dict[str, Any]:
    """The parameters a program may read: without the text of a Python exception, which
    ``reply`` holds when no relay replied."""
    params = dict(doc.get("params") or {})
    if not isinstance(doc.get("smtp_code"), int):
        params.pop("reply", None)
    return params


def parse(stored: str | None) -> dict[str, Any] | None:
    """A stored reason (JSON), or None when there is none or it cannot be read."""
    if not stored:
        return None
    try:
        doc = json.loads(stored)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("code"), str) else None


def explain(stored: str | None, lang: str, *, admin: bool) -> dict[str, Any] | None:
    """A stored reason for one reader: ``code`` and ``params`` for programs, ``sender``
    (what happens, what is asked of the sender), and for an administrator ``message`` and
    ``hint`` (what to change); ``reply`` when a relay replied."""
    doc = parse(stored)
    if doc is None:
        return None
    params = public_params(doc)
    out: dict[str, Any] = {
        "code": doc["code"],
        "params": params,
        "transient": bool(doc.get("transient")),
        "sender": sender_wording(doc["code"], bool(doc.get("transient")), params, lang),
        "reply": server_reply(doc),
    }
    if admin:
        error = load(doc).render(lang)
        out["message"] = error["message"]
        out["hint"] = error.get("hint")
    return out


def explain_error(last_error: str | None, lang: str) -> dict[str, Any] | None:
    """Render a stored error in the reader's language."""
    if not last_error:
        return None
    try:
        return load(json.loads(last_error)).render(lang)
    except (ValueError, TypeError, AttributeError):  # a damaged row must not break a listing
        return {"code": "unexpected", "message": last_error}
