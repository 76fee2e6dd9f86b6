"""From HTML forms to the service's payloads, and from its validation errors back to the
fields: each problem is shown next to the field it concerns, in the reader's language.

Numbers are passed on as typed (pydantic reads "587" as 587 and reports "abc" itself), so
the settings models stay the one place where a value is judged.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from starlette.datastructures import FormData

from postier.errors import PostierError
from postier.i18n import N_, translate
from postier.web.context import text

# Messages of pydantic's own checks, by error type.
_TYPE_MESSAGES = {
    "int_parsing": N_("Enter a whole number."),
    "int_type": N_("Enter a whole number."),
    "int_from_float": N_("Enter a whole number."),
    "greater_than_equal": N_("Enter a number of at least {ge}."),
    "greater_than": N_("Enter a number greater than {gt}."),
    "less_than_equal": N_("Enter a number of at most {le}."),
    "less_than": N_("Enter a number less than {lt}."),
    "string_too_long": N_("Enter at most {max_length} characters."),
    "string_too_short": N_("This field cannot be empty."),
    "too_long": N_("Enter at most {max_length} lines."),
    "enum": N_("Choose one of the proposed values."),
    "literal_error": N_("Choose one of the proposed values."),
    "bool_parsing": N_("Choose yes or no."),
}
_INVALID = N_("This value is not valid.")

# The settings models' own checks raise these (plain ValueError, English); marked here so
# that their French twins live in the pages' catalogue.
_VALUE_MESSAGES = (
    N_("a host name has no spaces or slashes (example: smtp.ac-lyon.fr)"),
    N_("the sender name cannot contain line breaks"),
    N_("the label cannot be empty"),
)
_LINE = N_("Line {line}: {problem}")


def _sentence(message: str) -> str:
    message = message.strip()
    if not message:
        return message
    message = message[0].upper() + message[1:]
    return message if message.endswith((".", "!", "?", ")")) else message + "."


def error_text(exc: PostierError, lang: str) -> str:
    body = exc.render(lang)
    hint = body.get("hint")
    return f"{body['message']} {hint}" if hint else str(body["message"])


def field_errors(exc: ValidationError, lang: str, prefix: str = "") -> dict[str, str]:
    """``{field name: message}`` for a pydantic error; list items (an allowed domain) are
    reported on the list's field with their line number."""
    out: dict[str, str] = {}
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ())]
        line = next((int(x) for x in loc if x.isdigit()), None)
        name = prefix + ".".join(x for x in loc if not x.isdigit())
        ctx = err.get("ctx") or {}
        cause = ctx.get("error")
        kind = str(err.get("type", ""))
        if isinstance(cause, PostierError):
            message = error_text(cause, lang)
        elif kind == "value_error":
            raw = str(err.get("msg", "")).removeprefix("Value error, ")
            message = _sentence(translate(lang, raw))
        else:
            template = _TYPE_MESSAGES.get(kind, _INVALID)
            params = {k: v for k, v in ctx.items() if isinstance(v, int | str | float)}
            message = translate(lang, template, **params)
        if line is not None:
            message = translate(lang, _LINE, line=line + 1, problem=message)
        out.setdefault(name or "form", message)
    return out


def postier_field_errors(exc: PostierError, lang: str, known: set[str]) -> dict[str, str]:
    """A service error on one field, or on the whole form when no field is named."""
    field = exc.field or "form"
    if field not in known:
        field = field.split(".")[0] if field.split(".")[0] in known else "form"
    return {field: error_text(exc, lang)}


def checkbox(form: FormData, name: str) -> bool:
    return text(form, name) in ("on", "true", "1", "yes")


def relay_payload(form: FormData, prefix: str = "") -> dict[str, Any]:
    """The SMTP server part of a form (settings ``relay.*`` or a profile's fields).

    The password is write-only: left blank it is kept (omitted), the "remove" box sends ""
    which removes it, anything typed replaces it.
    """
    payload: dict[str, Any] = {
        "host": text(form, prefix + "host").strip(),
        "port": text(form, prefix + "port").strip(),
        "security": text(form, prefix + "security", "starttls"),
        "auth": text(form, prefix + "auth", "none"),
        "username": text(form, prefix + "username").strip(),
        "timeout": text(form, prefix + "timeout").strip(),
        "verify_tls": checkbox(form, prefix + "verify_tls"),
    }
    password = text(form, prefix + "password")
    if checkbox(form, prefix + "remove_password"):
        payload["password"] = ""
    elif password:
        payload["password"] = password
    return payload


def settings_payload(form: FormData) -> dict[str, Any]:
    """The whole "Paramètres d'envoi des e-mails" form as PUT /api/v1/settings takes it."""
    domains = [line.strip() for line in text(form, "allowed_domains").splitlines()]
    return {
        "delegation": checkbox(form, "delegation"),
        "sender": {"name": text(form, "sender.name"), "address": text(form, "sender.address")},
        "allowed_domains": [d for d in domains if d],
        "relay": relay_payload(form, "relay."),
        "retry": {
            "first_delay": text(form, "retry.first_delay").strip(),
            "max_delay": text(form, "retry.max_delay").strip(),
            "max_age": text(form, "retry.max_age").strip(),
        },
    }


def settings_values(payload: dict[str, Any]) -> dict[str, Any]:
    """Flat ``{field name: value}`` to fill the form again (never a password)."""
    relay = {k: v for k, v in payload["relay"].items() if k != "password"}
    return {
        "delegation": payload["delegation"],
        "sender.name": payload["sender"]["name"],
        "sender.address": payload["sender"]["address"],
        "allowed_domains": "\n".join(payload["allowed_domains"]),
        **{f"relay.{k}": v for k, v in relay.items()},
        **{f"retry.{k}": v for k, v in payload["retry"].items()},
    }
