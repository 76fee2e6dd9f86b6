"""The SMTP submission reads the common ``<dot-atom@domain>`` paths of MAIL and RCPT with a
fast path of its own: for every input it must give what aiosmtpd's parser gives (the
address the e-mail is accepted from or for, and the parameters such as SIZE)."""

from __future__ import annotations

from typing import Any

import pytest
from aiosmtpd.smtp import SMTP

from postier.server.smtp import CappedSMTP

CASES = [
    "<alice.martin@ac-lyon.fr>",
    "<alice.martin@ac-lyon.fr> SIZE=2048",
    "<alice.martin@ac-lyon.fr>  SIZE=2048  BODY=8BITMIME SMTPUTF8",
    "<alice.martin@ac-lyon.fr> ",
    "  <p+tag@example.org>",
    "<p@example.org>SIZE=10",
    "<o'brien!x#y$z%&*/=?^_`{|}~-@a-b.example.org>",
    "<a..b@example.org>",
    "<.a@example.org>",
    "<a.@example.org>",
    "<a@b>",
    "<a@-b.org>",
    "<a@b..org>",
    "<\"jean dupont\"@example.org>",
    "<@relay.example:p@example.org>",
    "< p@example.org >",
    "<p@example.org",
    "p@example.org",
    "<>",
    "",
    "<élève@école.fr>",
    "<p@[127.0.0.1]>",
    "<p@example.org> SIZE=1\r\nRCPT TO:<x@example.org>",
    "<" + "l" * 65 + "@example.org>",
    "<" + "l" * 64 + "@example.org>",
]


def _door() -> Any:
    door = CappedSMTP.__new__(CappedSMTP)
    door.local_part_limit = 64  # RFC 5321's limit, as aiosmtpd's option
    return door


@pytest.mark.parametrize("arg", CASES)
def test_simple_paths_read_as_aiosmtpd_reads_them(arg: str) -> None:
    door = _door()
    assert CappedSMTP._getaddr(door, arg) == SMTP._getaddr(door, arg)
