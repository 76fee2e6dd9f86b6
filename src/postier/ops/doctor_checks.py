"""The results of ``postier doctor``'s checks, and the helpers that word them: levels,
durations and sizes as a person reads them, the date in a relay's greeting, the encrypted
values of a stored document.
"""

from __future__ import annotations

import email.utils
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from postier.i18n import N_, translate

OK, WARN, FAIL = "ok", "warn", "fail"
_RANK = {OK: 0, WARN: 1, FAIL: 2}



@dataclass
class Check:
    key: str  # stable name, for programs (--json)
    label: str
    level: str
    result: str
    remedy: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def exit_status(checks: list[Check]) -> int:
    return max((_RANK[c.level] for c in checks), default=0)


def duration_text(seconds: float, lang: str) -> str:
    seconds = abs(seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return translate(lang, N_("{days} days"), days=f"{seconds / 86400:.0f}")


def greeting_date(text: str) -> float | None:
    """The date some relays put in their greeting (``220 host ESMTP; Tue, 3 Dec 2024
    10:00:00 +0100``), as a timestamp."""
    match = re.search(
        r"(?:(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun),\s*)?\d{1,2}\s+[A-Z][a-z]{2}\s+\d{4}\s+"
        r"\d{1,2}:\d{2}(?::\d{2})?\s*(?:[+-]\d{4}|[A-Z]{1,5})?",
        text,
    )
    if not match:
        return None
    try:
        return email.utils.parsedate_to_datetime(match.group(0)).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc: the process exists, trust it
    return b"postier" in cmdline


def encrypted_values(doc: Any) -> list[str]:
    """The values of every ``*_enc`` key in a JSON document."""
    found: list[str] = []
    if isinstance(doc, dict):
        for key, value in doc.items():
            if key.endswith("_enc") and isinstance(value, str) and value:
                found.append(value)
            else:
                found.extend(encrypted_values(value))
    elif isinstance(doc, list):
        for value in doc:
            found.extend(encrypted_values(value))
    return found


def decrypted(doc: Any, decrypt: Callable[[Any], str | None]) -> Any:
    """A JSON document with every ``*_enc`` key, at any depth, replaced by its name
    without the suffix and its value decrypted (the settings as the models take them)."""
    if not isinstance(doc, dict):
        return doc
    return {(k.removesuffix("_enc") if k.endswith("_enc") else k):
            (decrypt(v) if k.endswith("_enc") else decrypted(v, decrypt))
            for k, v in doc.items()}


def short_reason(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig or exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def size_text(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


