"""Translations: gettext catalogues (``locale/<lang>/LC_MESSAGES/postier.po``) read with Babel.

Source strings are English and are marked with :func:`N_` where they are defined, so that
``pybabel extract`` finds them; they are translated only when rendered for a person, with
the language of that person (``Accept-Language`` for HTTP, ``LANG`` for the CLI).
Catalogues are read once per process from the ``.po`` files shipped in the package, so no
compile step can be forgotten at install time.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

LANGUAGES = ("fr", "en")
DEFAULT_LANGUAGE = "en"
_LOCALE_DIR = Path(__file__).parent / "locale"


def N_(text: str) -> str:
    """Mark a string for extraction; it is translated later, when rendered."""
    return text


@functools.cache
def _catalog(lang: str) -> dict[str, str]:
    """Every catalogue of the language merged (``postier.po`` for the core, ``web.po`` for
    the pages, ...), so each part of the code keeps its own file."""
    from babel.messages.pofile import read_po

    out: dict[str, str] = {}
    for path in sorted((_LOCALE_DIR / lang / "LC_MESSAGES").glob("*.po")):
        with path.open("rb") as fh:
            catalog = read_po(fh, locale=lang)
        for msg in catalog:
            if msg.id and msg.string and not msg.fuzzy and isinstance(msg.id, str):
                out[msg.id] = str(msg.string)
    return out


def gettext(lang: str, text: str) -> str:
    if lang == DEFAULT_LANGUAGE:
        return text
    return _catalog(lang).get(text, text)


def translate(lang: str, template: str, **params: Any) -> str:
    """Translate ``template`` into ``lang`` and fill in its ``{placeholders}``."""
    text = gettext(normalize(lang), template)
    if not params:
        return text
    try:
        return text.format(**params)
    except (KeyError, IndexError, ValueError):
        # A translation with a wrong placeholder must never hide the error itself.
        return template.format(**params)


def normalize(lang: str | None) -> str:
    if not lang:
        return DEFAULT_LANGUAGE
    short = lang.strip().lower().replace("_", "-").split("-")[0].split(".")[0]
    return short if short in LANGUAGES else DEFAULT_LANGUAGE


def negotiate(accept_language: str | None) -> str:
    """Pick ``fr`` or ``en`` from an ``Accept-Language`` header (highest q wins)."""
    if not accept_language:
        return DEFAULT_LANGUAGE
    best, best_q = DEFAULT_LANGUAGE, -1.0
    for position, part in enumerate(accept_language.split(",")):
        pieces = part.strip().split(";")
        tag = pieces[0].strip()
        q = 1.0
        for p in pieces[1:]:
            p = p.strip()
            if p.startswith("q="):
                try:
                    q = float(p[2:])
                except ValueError:
                    q = 0.0
        short = tag.lower().split("-")[0]
        # Earlier entries win ties, as browsers list preferences in order.
        score = q - position * 1e-6
        if short in LANGUAGES and score > best_q:
            best, best_q = short, score
    return best


def system_language() -> str:
    """The language of the person at the terminal, from the usual environment variables."""
    for var in ("LANGUAGE", "LC_ALL", "LC_MESSAGES", "LANG"):
        value = os.environ.get(var)
        if value:
            return normalize(value.split(":")[0])
    return DEFAULT_LANGUAGE
