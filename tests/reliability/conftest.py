"""The reliability campaign prints the figures of its scenarios at the end of the run."""

from __future__ import annotations

import json
from typing import Any

import pytest
from reliability_kit import FIGURES


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: Any) -> None:
    if not FIGURES:
        return
    terminalreporter.section("reliability figures")
    for entry in FIGURES:
        numbers = {k: v for k, v in entry.items() if k != "scenario"}
        terminalreporter.write_line(f"{entry['scenario']}: {json.dumps(numbers, sort_keys=True)}")


@pytest.fixture
def sqlite_busy_fast() -> dict[str, str]:
    """Environment for a server that gives up on a locked database after 300 ms."""
    return {"POSTIER_SQLITE_BUSY_TIMEOUT_MS": "300"}
