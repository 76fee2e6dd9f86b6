"""The console in the reader's language (``LANG``): Typer's own words, help texts, input errors.

Typer carries its own copy of Click whose messages ("Usage:", "Missing argument", "No such
option", ...) are English literals, and it checks option values with pydantic, whose
messages are English too. For another language than English, :func:`speak` rewrites them
once, before the command runs: the help panels' titles, the usage line, every command's and
option's help text (looked up in the catalogue by its English text), and the usage errors,
rebuilt from what the exception knows. English needs none of it and is left untouched.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails
from typer import _click, rich_utils
from typer._click import exceptions as click_errors
from typer._click.formatting import HelpFormatter
from typer.core import TyperArgument, TyperGroup, TyperOption

from postier.i18n import DEFAULT_LANGUAGE, N_, gettext, translate

# Typer's words shown around help texts and errors, by the name Typer gives them.
_TYPER_WORDS = {
    "ARGUMENTS_PANEL_TITLE": N_("Arguments"),
    "OPTIONS_PANEL_TITLE": N_("Options"),
    "COMMANDS_PANEL_TITLE": N_("Commands"),
    "ERRORS_PANEL_TITLE": N_("Error"),
    "ABORTED_TEXT": N_("Aborted."),
    "DEFAULT_STRING": N_("[default: {}]"),
    "ENVVAR_STRING": N_("[env var: {}]"),
    "REQUIRED_LONG_STRING": N_("[required]"),
    "DEPRECATED_STRING": N_("(deprecated) "),
}
_RICH_HELP = N_("Try [blue]'{command_path} {help_option}'[/] for help.")
_USAGE = N_("Usage:")
_SUBCOMMANDS = N_("COMMAND [ARGS]...")
_HELP_OPTION = N_("Show this message and exit.")

# What pydantic says of a value, by its error type; the ctx of the error fills the blanks.
PYDANTIC_PROBLEMS = {
    "missing": N_("is required"),
    "less_than_equal": N_("should be at most {le}"),
    "less_than": N_("should be less than {lt}"),
    "greater_than_equal": N_("should be at least {ge}"),
    "greater_than": N_("should be more than {gt}"),
    "int_parsing": N_("should be a whole number"),
    "int_type": N_("should be a whole number"),
    "int_from_float": N_("should be a whole number"),
    "float_parsing": N_("should be a number"),
    "float_type": N_("should be a number"),
    "bool_parsing": N_("should be yes or no (true or false)"),
    "bool_type": N_("should be yes or no (true or false)"),
    "string_too_short": N_("should have at least {min_length} characters"),
    "string_too_long": N_("should have at most {max_length} characters"),
    "too_short": N_("should have at least {min_length} items"),
    "too_long": N_("should have at most {max_length} items"),
    "string_type": N_("should be a text"),
    "url_parsing": N_("is not a valid address (URL)"),
    "url_type": N_("is not a valid address (URL)"),
    "url_scheme": N_("should start with {expected_schemes}"),
    "enum": N_("should be one of {expected}"),
    "literal_error": N_("should be one of {expected}"),
    "extra_forbidden": N_("is not a known setting"),
    "dict_type": N_("should be a group of settings"),
    "list_type": N_("should be a list"),
}
_INVALID_FOR = N_("Invalid value for {name}: {problem}")
_MISSING = {
    "argument": N_("Missing argument {name}."),
    "option": N_("Missing option {name}."),
}
_MISSING_VALUE = N_("Missing value {name}.")
_NO_SUCH_OPTION = N_("No such option: {name}")
_POSSIBLE_OPTIONS = N_("(Possible options: {options})")

# Typer's other usage errors: its English message, as a pattern, and ours.
_USAGE_ERRORS = (
    (re.compile(r"Option '(?P<name>.+)' requires (?:an argument|\d+ arguments)\."),
     N_("The option '{name}' needs a value.")),
    (re.compile(r"Option '(?P<name>.+)' does not take a value\."),
     N_("The option '{name}' takes no value.")),
    (re.compile(r"Got unexpected extra argument\(s\) \((?P<extra>.*)\)"),
     N_("Unexpected extra argument(s): {extra}.")),
    (re.compile(r"No such command '(?P<name>.*)'\. Did you mean (?P<ideas>.*)\?"),
     N_("No such command '{name}'. Did you mean {ideas}?")),
    (re.compile(r"No such command '(?P<name>.*)'\."), N_("No such command '{name}'.")),
    (re.compile(r"Missing command\."), N_("Missing command.")),
    (re.compile(r"Argument '(?P<name>.+)' takes (?P<count>\d+) values\."),
     N_("The argument '{name}' takes {count} values.")),
)


def help_text(lang: str, text: str | None) -> str | None:
    """A help text in ``lang``: looked up by its English words, whatever its line breaks
    (docstrings are wrapped in the code, the catalogue holds them on one line)."""
    if not text or lang == DEFAULT_LANGUAGE:
        return text
    return gettext(lang, " ".join(text.split()))


def pydantic_problem(error: ErrorDetails, lang: str) -> str:
    """What is wrong with one value, in ``lang`` (without the field's name)."""
    template = PYDANTIC_PROBLEMS.get(error["type"])
    ctx: dict[str, Any] = dict(error.get("ctx") or {})
    if template is not None:
        try:
            return translate(lang, template, **ctx)
        except (KeyError, IndexError):
            pass
    if error["type"] == "value_error" and "error" in ctx:
        return translate(lang, str(ctx["error"]))
    return translate(lang, str(error["msg"]).removeprefix("Value error, "))


def field_name(error: ErrorDetails, strip: Sequence[str] = ()) -> str:
    return ".".join(str(part) for part in error["loc"] if part not in strip)


def pydantic_problems(exc: ValidationError, lang: str, prefix: str = "",
                      strip: Sequence[str] = ()) -> str:
    """Every problem of a validation, each after the name of its field: ``relay.port :
    doit être au plus 65535``."""
    lines = []
    for error in exc.errors():
        name = ".".join(p for p in (prefix, field_name(error, strip)) if p)
        problem = pydantic_problem(error, lang)
        lines.append(translate(lang, N_("{name}: {problem}"), name=name, problem=problem)
                     if name else problem)
    return "; ".join(lines)


def usage_error(exc: click_errors.ClickException, lang: str) -> str:
    """The message of a usage error, rebuilt in ``lang`` from what the exception knows."""
    if isinstance(exc, click_errors.MissingParameter):
        name = _hint(exc)
        template = _MISSING.get(exc.param.param_type_name if exc.param else "", _MISSING_VALUE)
        return translate(lang, template, name=name)
    if isinstance(exc, click_errors.BadParameter):
        cause = exc.__cause__
        problem = (pydantic_problems(cause, lang) if isinstance(cause, ValidationError)
                   else translate(lang, exc.message))
        return translate(lang, _INVALID_FOR, name=_hint(exc), problem=problem)
    if isinstance(exc, click_errors.NoSuchOption):
        text = translate(lang, _NO_SUCH_OPTION, name=exc.option_name)
        if exc.possibilities:
            text += " " + translate(lang, _POSSIBLE_OPTIONS,
                                    options=", ".join(sorted(exc.possibilities)))
        return text
    for pattern, template in _USAGE_ERRORS:
        found = pattern.fullmatch(exc.message)
        if found:
            return translate(lang, template, **found.groupdict())
    return translate(lang, exc.format_message())


def _hint(exc: click_errors.BadParameter) -> str:
    if exc.param_hint is not None:
        hints = exc.param_hint
        return hints if isinstance(hints, str) else " / ".join(repr(x) for x in hints)
    return exc.param.get_error_hint() if exc.param is not None else ""


def speak(command: _click.Command, lang: str) -> None:
    """Make Typer and the command tree speak ``lang`` (nothing to do for English)."""
    if lang == DEFAULT_LANGUAGE:
        return
    for name, text in _TYPER_WORDS.items():
        setattr(rich_utils, name, translate(lang, text))
    rich_utils.RICH_HELP = translate(lang, _RICH_HELP)
    _translate_usage(lang)
    _translate_errors(lang)
    _translate_tree(command, lang, _click.Context(command))


def _translate_usage(lang: str) -> None:
    english = HelpFormatter.write_usage
    word = translate(lang, _USAGE) + " "

    def write_usage(self: HelpFormatter, prog: str, args: str = "",
                    prefix: str | None = None) -> None:
        english(self, prog, args, word if prefix is None else prefix)

    HelpFormatter.write_usage = write_usage  # type: ignore[method-assign]


def _translate_errors(lang: str) -> None:
    english: Callable[[click_errors.ClickException], None] = rich_utils.rich_format_error

    def show(self: click_errors.ClickException) -> None:
        exc = self
        if exc.__class__.__name__ == "NoArgsIsHelpError":
            english(exc)  # shows the help, already translated
            return
        text = usage_error(exc, lang)
        ctx = getattr(exc, "ctx", None)
        english(click_errors.UsageError(text, ctx) if ctx is not None
                else click_errors.ClickException(text))

    rich_utils.rich_format_error = show


def _translate_tree(command: _click.Command, lang: str, ctx: _click.Context) -> None:
    command.help = help_text(lang, command.help)
    command.short_help = help_text(lang, command.short_help)
    for param in command.params:
        if isinstance(param, TyperArgument | TyperOption):
            param.help = help_text(lang, param.help)
    option = command.get_help_option(ctx)
    if option is not None:
        option.help = translate(lang, _HELP_OPTION)
    if isinstance(command, TyperGroup):
        command.subcommand_metavar = translate(lang, _SUBCOMMANDS)
        for sub in command.commands.values():
            _translate_tree(sub, lang, _click.Context(sub, parent=ctx, info_name=sub.name))
