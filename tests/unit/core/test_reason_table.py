"""Every failure code has words for the sender, and those words never carry the
administrator's remedy nor a Python exception's text."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import aiosmtplib

import postier
from postier.core import reasons
from postier.core.settings import RelaySettings
from postier.delivery.classify import classify
from postier.i18n import translate

DELIVERY = Path(postier.__file__).parent / "delivery"


def _literals(node: ast.expr) -> list[str]:
    """``"timeout"`` or ``"smtp_error" if ... else "rejected"``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value] if node.value else []
    if isinstance(node, ast.IfExp):
        return _literals(node.body) + _literals(node.orelse)
    return []


def _codes_in_the_source() -> dict[str, str]:
    """Every literal ``code=`` given to an error raised by the delivery code."""
    found: dict[str, str] = {}
    for path in sorted(DELIVERY.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                for kw in node.keywords:
                    if kw.arg == "code":
                        found.update(dict.fromkeys(_literals(kw.value),
                                                   f"{path.name}:{node.lineno}"))
    return found


def test_every_failure_code_has_words_for_the_sender() -> None:
    codes = _codes_in_the_source()
    assert {"refused", "timeout", "recipient_refused", "expired", "relay_limit"} <= set(codes)
    missing = [f"{where}: {code}" for code, where in codes.items() if code not in reasons.SENDER]
    assert not missing, ("no sender wording in postier.core.reasons.SENDER for:\n"
                         + "\n".join(missing))


def _relay() -> RelaySettings:
    return RelaySettings(host="smtp.ac-lyon.fr", port=587, timeout=30)


def _stored(exc: BaseException, step: str) -> str:
    return json.dumps(classify(exc, step, _relay()).dump())


def test_a_refused_connection_reads_without_remedy_or_python_text() -> None:
    stored = _stored(ConnectionRefusedError(111, "Connect call failed ('10.0.0.1', 587)"),
                     "connect")
    teacher = reasons.explain(stored, "fr", admin=False)
    assert teacher is not None and teacher["code"] == "refused"
    assert teacher["sender"] == ("Le serveur d'envoi de l'établissement ne répond pas ; "
                                 "Postier réessaie. Vous n'avez rien à faire.")
    assert "message" not in teacher and "hint" not in teacher
    assert teacher["reply"] is None and "reply" not in teacher["params"]
    assert "Connect call" not in json.dumps(teacher)
    admin = reasons.explain(stored, "fr", admin=True)
    assert admin is not None and admin["hint"] == translate(
        "fr", "Check the port number and that the SMTP server is running.")


def test_a_timeout_asks_nothing_of_the_sender() -> None:
    teacher = reasons.explain(_stored(TimeoutError(), "greeting"), "fr", admin=False)
    assert teacher is not None and teacher["code"] == "timeout"
    assert "délai" not in teacher["sender"].lower()
    assert teacher["params"]["timeout"] == 30 and teacher["params"]["step"] == "greeting"


def test_a_refused_recipient_shows_the_relays_reply() -> None:
    stored = _stored(aiosmtplib.SMTPRecipientRefused(550, "5.1.1 No such user", "x@y.fr"),
                     "rcpt_to")
    teacher = reasons.explain(stored, "en", admin=False)
    assert teacher is not None and teacher["reply"] == "550 5.1.1 No such user"
    assert teacher["sender"].startswith("A recipient's address was refused")
    assert teacher["params"]["reply"] == "5.1.1 No such user"


def test_nothing_stored_or_unreadable_is_no_reason() -> None:
    assert reasons.explain(None, "fr", admin=True) is None
    assert reasons.explain("Nothing answers at x:25 (connection refused).", "fr",
                           admin=True) is None
