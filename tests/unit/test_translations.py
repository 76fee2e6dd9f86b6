"""Every message a person may read exists in French, with the same placeholders.

Source strings are marked with ``N_()`` (or passed to ``translate``/``gettext`` as
literals); this test finds them all in ``src/postier`` and checks the French catalogue,
so a new English message without its French twin fails the build.
"""

from __future__ import annotations

import ast
import string
from pathlib import Path

import postier
from postier import i18n

SRC = Path(postier.__file__).parent
_MARKERS = {"N_"}


def _marked() -> dict[str, str]:
    found: dict[str, str] = {}
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in _MARKERS
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                found[node.args[0].value] = f"{path.relative_to(SRC)}:{node.lineno}"
    return found


def _fields(template: str) -> set[str]:
    return {f.split("!")[0] for _, f, _, _ in string.Formatter().parse(template) if f}


def test_strings_are_found() -> None:
    marked = _marked()
    assert len(marked) > 50, "the scan must see the project's messages"
    assert "The request is not valid." in marked


def test_every_message_has_a_french_translation() -> None:
    catalog = i18n._catalog("fr")
    missing = [f"{where}: {msgid!r}" for msgid, where in _marked().items() if msgid not in catalog]
    assert not missing, "no French translation for:\n" + "\n".join(missing)


def test_translations_keep_the_placeholders() -> None:
    catalog = i18n._catalog("fr")
    wrong = [
        msgid
        for msgid in _marked()
        if msgid in catalog and _fields(catalog[msgid]) != _fields(msgid)
    ]
    assert not wrong, f"placeholders differ in: {wrong}"


def test_french_is_served_to_french_speakers() -> None:
    assert i18n.negotiate("fr-FR,fr;q=0.9,en;q=0.8") == "fr"
    assert i18n.negotiate("en-GB,en;q=0.9,fr;q=0.5") == "en"
    assert i18n.negotiate("de-DE") == "en"
    assert i18n.negotiate(None) == "en"
    assert i18n.translate("fr", "The request is not valid.") != "The request is not valid."
