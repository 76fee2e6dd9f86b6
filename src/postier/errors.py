"""One tree of exceptions for everything Postier reports to a person or a program.

Each error carries a stable ``code`` (for programs), an English message template and an
optional remedy (``hint``) template; both are translated when rendered for a person
(:meth:`PostierError.message` / :meth:`PostierError.render`), so the same error reads in
French or English depending on who asks. ``transient`` says whether trying again later may
succeed, which is what the delivery engine needs to choose between deferring and failing.
"""

from __future__ import annotations

from typing import Any

from postier.i18n import N_, translate


class PostierError(Exception):
    """Base of every error Postier raises on purpose."""

    code: str = "unexpected"
    http_status: int = 500
    transient: bool = False
    default_template: str = N_("An unexpected error occurred.")

    def __init__(
        self,
        template: str | None = None,
        *,
        hint: str | None = None,
        field: str | None = None,
        code: str | None = None,
        transient: bool | None = None,
        smtp_code: int | None = None,
        **params: Any,
    ) -> None:
        self.template = template or self.default_template
        self.hint_template = hint
        self.field = field
        self.params = params
        self.smtp_code = smtp_code
        if code is not None:
            self.code = code
        if transient is not None:
            self.transient = transient
        super().__init__(self.message("en"))

    def message(self, lang: str = "en") -> str:
        params = self.params
        if isinstance(params.get("reason"), str):
            # Reasons are fixed phrases marked for translation where they are raised.
            params = {**params, "reason": translate(lang, params["reason"])}
        return translate(lang, self.template, **params)

    def hint(self, lang: str = "en") -> str | None:
        if self.hint_template is None:
            return None
        return translate(lang, self.hint_template, **self.params)

    def dump(self) -> dict[str, Any]:
        """A JSON-able form that can be rendered later in any language (see :func:`load`)."""
        return {
            "code": self.code,
            "template": self.template,
            "hint": self.hint_template,
            "params": {k: v for k, v in self.params.items() if _jsonable(v)},
            "smtp_code": self.smtp_code,
            "transient": self.transient,
        }

    def render(self, lang: str = "en") -> dict[str, Any]:
        """The JSON shape every door uses for an error."""
        out: dict[str, Any] = {"code": self.code, "message": self.message(lang)}
        hint = self.hint(lang)
        if hint:
            out["hint"] = hint
        if self.field:
            out["field"] = self.field
        return out


def _jsonable(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def load(doc: dict[str, Any]) -> PostierError:
    """Rebuild an error saved with :meth:`PostierError.dump`."""
    return PostierError(
        doc.get("template") or PostierError.default_template,
        hint=doc.get("hint"),
        code=doc.get("code", "unexpected"),
        transient=bool(doc.get("transient", False)),
        smtp_code=doc.get("smtp_code"),
        **dict(doc.get("params") or {}),
    )


class InvalidInput(PostierError):
    """The request itself is wrong; nothing was stored."""

    code = "invalid"
    http_status = 422
    default_template = N_("The request is not valid.")


class AuthenticationRequired(PostierError):
    code = "unauthenticated"
    http_status = 401
    default_template = N_("Authentication required: give a valid API token.")


class Forbidden(PostierError):
    code = "forbidden"
    http_status = 403
    default_template = N_("You are not allowed to do this.")


class SenderForbidden(Forbidden):
    code = "sender_forbidden"
    default_template = N_("You may not send as {address}: you can only send as yourself ({own}).")


class NotFound(PostierError):
    code = "not_found"
    http_status = 404
    default_template = N_("Not found.")


class Conflict(PostierError):
    code = "conflict"
    http_status = 409
    default_template = N_("This conflicts with the current state.")


class DelegationOff(Conflict):
    code = "delegation_off"
    default_template = N_(
        "Central sending is off for this establishment: the server does not accept e-mails."
    )


class StoreUnavailable(PostierError):
    """The queue cannot take the message now (disk full, database locked or down)."""

    code = "store_unavailable"
    http_status = 503
    transient = True
    default_template = N_(
        "The server cannot store e-mails right now ({reason}); nothing was accepted. "
        "Try again later."
    )


class DeliveryError(PostierError):
    """A relay conversation failed; ``smtp_code`` and ``reply`` say what the relay said."""

    code = "unexpected"
    http_status = 502

    def __init__(
        self,
        template: str | None = None,
        *,
        reply: str = "",
        step: str = "",
        **kwargs: Any,
    ) -> None:
        self.reply = reply
        self.step = step
        kwargs.setdefault("reply", reply)
        kwargs.setdefault("step", step)
        super().__init__(template, **kwargs)


class InvalidAddress(InvalidInput, ValueError):
    """An e-mail address that cannot be used; also a ValueError so pydantic reports it."""

    code = "invalid_address"
    default_template = N_("{address!r} is not a valid e-mail address: {reason}.")


class InvalidDomainPattern(InvalidInput, ValueError):
    code = "invalid_domain"
    default_template = N_(
        "{pattern!r} is not a valid allowed domain: {reason}. "
        "Write a domain such as ac-lyon.fr, or *.ac-lyon.fr for all its subdomains."
    )


class InvalidSetting(InvalidInput, ValueError):
    """A setting the settings models refuse, said in the reader's language; also a
    ValueError so pydantic reports it on its field."""

    code = "invalid_setting"


class TooLarge(InvalidInput):
    code = "too_large"
    http_status = 413
    default_template = N_(
        "The e-mail is too large ({size} bytes); the limit is {limit} bytes. "
        "Send smaller attachments or share them through a link."
    )


class SenderNotConfigured(Conflict):
    code = "sender_not_configured"
    default_template = N_(
        "{address} is outside the allowed domains and the establishment's sender address "
        "is not set."
    )
