"""From HTML forms to the service's payloads, and from its validation errors back to the
fields: each problem is shown next to the field it concerns, in the reader's language.

Numbers are passed on as typed (pydantic reads "587" as 587 and reports "abc" itself), so
the settings models stay the one place where a value is judged.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

from pydantic import ValidationError
from starlette.datastructures import FormData

from postier.core.settings import RELAY_SECTIONS, SECRET_FIELDS, RelaySettings
from postier.errors import PostierError
from postier.i18n import N_, translate
from postier.server.web.context import text

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
    "string_too_short_n": N_("Enter at least {min_length} characters."),
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
    N_("the server address starts with http:// or https://"),
)
# Checks whose own words name the model rather than the form: said the form's way, on the
# field the reader changes.
_CLEARER = {
    "body_days cannot be longer than metadata_days: the body goes with its record": N_(
        "The content of an e-mail cannot be kept longer than its record: enter at most "
        "the number of days the records are kept."),
}
_MODEL_ERRORS_ON = {"retention": "retention.body_days"}
_FIELD_VALUE_MESSAGES = {
    "oauth2_secret_expires": N_("Enter a date as YYYY-MM-DD (for example 2027-06-30)."),
}
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
            if cause.field and "." in cause.field:  # a model's check names its field
                name = cause.field
        elif kind == "value_error" and loc and loc[-1] in _FIELD_VALUE_MESSAGES:
            message = translate(lang, _FIELD_VALUE_MESSAGES[loc[-1]])
        elif kind == "value_error":
            raw = str(err.get("msg", "")).removeprefix("Value error, ")
            message = _sentence(translate(lang, _CLEARER.get(raw, raw)))
        elif name in DURATION_FIELDS and kind in _DURATION_BOUNDS:
            bound, template = _DURATION_BOUNDS[kind]
            message = translate(lang, template,
                                duration=duration_text(lang, int(ctx.get(bound, 0))))
        else:
            if kind == "string_too_short" and int(ctx.get("min_length", 1)) > 1:
                kind = "string_too_short_n"
            template = _TYPE_MESSAGES.get(kind, _INVALID)
            params = {k: v for k, v in ctx.items() if isinstance(v, int | str | float)}
            message = translate(lang, template, **params)
        if line is not None:
            message = translate(lang, _LINE, line=line + 1, problem=message)
        name = _MODEL_ERRORS_ON.get(name, name)
        out.setdefault(name or "form", message)
    return out


def postier_field_errors(exc: PostierError, lang: str, known: set[str]) -> dict[str, str]:
    """A service error on one field, or on the whole form when no field is named."""
    field = exc.field or "form"
    if field not in known:
        field = field.split(".")[0] if field.split(".")[0] in known else "form"
    return {field: error_text(exc, lang)}


# Durations of the settings form are typed as a number and a unit; the API keeps seconds.
DURATION_UNITS = {"seconds": 1, "minutes": 60, "hours": 3600, "days": 86400}
DURATION_FIELDS = ("failover_after", "retry.first_delay", "retry.max_delay", "retry.max_age",
                   "retry.delay_warning", "alerts.relay_failing_after",
                   "alerts.oldest_deferred_after")


def duration(form: FormData, name: str) -> str:
    """A duration field in seconds, from its number and its unit (``NAME.unit``). What
    is not a number of whole seconds is passed on as typed, for the model to refuse."""
    typed = text(form, name).strip()
    factor = DURATION_UNITS.get(text(form, name + ".unit", "seconds"), 1)
    try:
        seconds = Decimal(typed.replace(",", ".")) * factor
    except InvalidOperation:
        return typed
    if not seconds.is_finite() or seconds != seconds.to_integral_value():
        return typed
    return str(int(seconds))


def duration_parts(value: Any) -> tuple[str, str]:
    """``(number, unit)`` to show a duration in seconds: the largest unit that divides it
    exactly (259200 is 3 days). A value that is not a whole number is shown as it is."""
    raw = str(value if value is not None else "").strip()
    if not raw.isdigit():
        return raw, ""
    seconds = int(raw)
    for unit, factor in sorted(DURATION_UNITS.items(), key=lambda x: -x[1]):
        if seconds % factor == 0:
            return str(seconds // factor), unit
    return raw, "seconds"  # pragma: no cover - one divides every number


_UNIT_WORDS = {
    "seconds": (N_("1 second"), N_("{n} seconds")),
    "minutes": (N_("1 minute"), N_("{n} minutes")),
    "hours": (N_("1 hour"), N_("{n} hours")),
    "days": (N_("1 day"), N_("{n} days")),
}
_DURATION_BOUNDS = {
    "greater_than_equal": ("ge", N_("Enter a duration of at least {duration}.")),
    "less_than_equal": ("le", N_("Enter a duration of at most {duration}.")),
}


def duration_text(lang: str, seconds: int) -> str:
    """A duration in seconds said exactly, in its largest whole unit ("3 days")."""
    number, unit = duration_parts(seconds)
    one, many = _UNIT_WORDS[unit or "seconds"]
    return translate(lang, one) if number == "1" else translate(lang, many, n=number)


def duration_units(form: FormData) -> dict[str, str]:
    """The units typed with the duration fields, to show a refused value as typed."""
    return {f"{name}.unit": text(form, f"{name}.unit") for name in DURATION_FIELDS
            if f"{name}.unit" in form}


def checkbox(form: FormData, name: str) -> bool:
    return text(form, name) in ("on", "true", "1", "yes")


def _limit_fields() -> tuple[str, ...]:
    """The relay's sending limits (``max_per_minute``...): optional numbers, blank for none."""
    return tuple(name for name in RelaySettings.model_fields if name.startswith("max_"))


# Fields of the relay a form may leave out (the profiles' form has no OAuth2 part): sent
# only when the form has them, so what it does not show stays as it is.
_OPTIONAL_RELAY_FIELDS = ("oauth2_provider", "oauth2_tenant", "oauth2_client_id",
                          "oauth2_token_url", "oauth2_secret_expires")


def relay_payload(form: FormData, prefix: str = "") -> dict[str, Any]:
    """The SMTP server part of a form (settings ``relay.*``/``backup_relay.*`` or a
    profile's fields).

    Secrets (the password, the OAuth2 client secret and refresh token) are write-only:
    left blank they are kept (omitted), their "remove" box sends "" which removes them,
    anything typed replaces them.
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
    if prefix + "pipelining_shown" in form:  # an unticked box is not sent: was it there?
        payload["pipelining"] = checkbox(form, prefix + "pipelining")
    for name in _OPTIONAL_RELAY_FIELDS:
        if prefix + name in form:
            payload[name] = text(form, prefix + name).strip()
    for name in _limit_fields():
        if prefix + name in form:
            payload[name] = text(form, prefix + name).strip() or None
    for name in SECRET_FIELDS:
        typed = text(form, prefix + name)
        if checkbox(form, f"{prefix}remove_{name}"):
            payload[name] = ""
        elif typed:
            payload[name] = typed
    return payload


def settings_payload(form: FormData) -> dict[str, Any]:
    """The whole "Paramètres d'envoi des e-mails" form as PUT /api/v1/settings takes it.

    The backup relay's fields are read only when its box is ticked; unticked, the backup
    relay is removed (with its secrets).
    """
    domains = [line.strip() for line in text(form, "allowed_domains").splitlines()]
    payload: dict[str, Any] = {
        "delegation": checkbox(form, "delegation"),
        "sender": {"name": text(form, "sender.name"), "address": text(form, "sender.address"),
                   **({"display": text(form, "sender.display")}
                      if "sender.display" in form else {})},
        "allowed_domains": [d for d in domains if d],
        "relay": relay_payload(form, "relay."),
        "retry": {
            name: duration(form, f"retry.{name}")
            for name in ("first_delay", "max_delay", "max_age", "delay_warning")
            if f"retry.{name}" in form
        },
    }
    if "retention.body_days" in form:
        payload["retention"] = {name: text(form, f"retention.{name}").strip()
                                for name in ("body_days", "metadata_days")}
    if "failover_after" in form:
        payload["failover_after"] = duration(form, "failover_after")
    if "verify_sender_addresses_shown" in form:
        payload["verify_sender_addresses"] = checkbox(form, "verify_sender_addresses")
    if "alerts.relay_failing_after" in form:
        payload["alerts"] = alerts_payload(form)
    if "backup_relay.host" in form:
        payload["backup_relay"] = (relay_payload(form, "backup_relay.")
                                   if checkbox(form, "backup_relay") else None)
    return payload


def alerts_payload(form: FormData) -> dict[str, Any]:
    """The alerts part of the settings form; the webhook's secret is write-only like the
    relay's."""
    alerts: dict[str, Any] = {
        name: duration(form, f"alerts.{name}")
        for name in ("relay_failing_after", "oldest_deferred_after")
    }
    alerts["credential_expiry_days"] = text(form, "alerts.credential_expiry_days").strip()
    alerts["email"] = checkbox(form, "alerts.email")
    alerts["webhook_url"] = text(form, "alerts.webhook_url").strip()
    alerts["webhook_events"] = [e for e in form.getlist("alerts.webhook_events")
                                if isinstance(e, str)]
    secret = text(form, "alerts.webhook_secret")
    if checkbox(form, "alerts.remove_webhook_secret"):
        alerts["webhook_secret"] = ""
    elif secret:
        alerts["webhook_secret"] = secret
    return alerts


def settings_values(payload: dict[str, Any]) -> dict[str, Any]:
    """Flat ``{field name: value}`` to fill the form again (never a secret)."""
    out: dict[str, Any] = {
        "delegation": payload["delegation"],
        "sender.name": payload["sender"]["name"],
        "sender.address": payload["sender"]["address"],
        "sender.display": payload["sender"].get("display", "establishment"),
        "allowed_domains": "\n".join(payload["allowed_domains"]),
        "backup_relay": payload.get("backup_relay") is not None,
    }
    for section in ("retry", "retention", "alerts"):
        out.update({f"{section}.{k}": v for k, v in (payload.get(section) or {}).items()
                    if k not in ("webhook_secret", "webhook_secret_set")})
    if "failover_after" in payload:
        out["failover_after"] = payload["failover_after"]
    out["verify_sender_addresses"] = bool(payload.get("verify_sender_addresses"))
    defaults = RelaySettings().public()
    for section in RELAY_SECTIONS:
        relay = {**defaults, **(payload.get(section) or {})}
        out.update({f"{section}.{k}": v for k, v in relay.items()
                    if k not in SECRET_FIELDS and not k.endswith("_set")})
    return out
