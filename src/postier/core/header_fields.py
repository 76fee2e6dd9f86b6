"""Header fields written by hand, in the exact bytes the ``email`` package would give.

``EmailMessage``'s header registry parses and refolds every header, which costs more than
the rest of an acceptance: addresses, RFC 2047 encoded words and folding are written here
instead, and each header line is checked once more before use
(:func:`assert_safe_header`: Python 3.11.7 has no ``verify_generated_headers``), the
second wall against header injection.
"""

from __future__ import annotations

import base64
import functools
import re
from collections.abc import Sequence

from postier.core.message_input import MAX_HEADER_NAME, MAX_LINE

FOLD_AT = 78  # RFC 5322's "SHOULD" line length for headers


def unchanged(value: str) -> str:
    """An address as it is (SMTPUTF8: Unicode domains may travel as they are)."""
    return value


_ATEXT = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+")
# Characters that stand for themselves in a Q encoded word, in every context (RFC 2047 5(3)).
_Q_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!*+-/")
# An encoded word plus the space before it stays within the 78-character line.
_EW_MAX = 68
_EW_OVERHEAD = len("=?utf-8?q??=")
_WORDS = re.compile(r"[ \t]*[^ \t]+")


def address_header(name: str, mailboxes: Sequence[tuple[str, str]]) -> str:
    if len(mailboxes) == 1 and not mailboxes[0][0]:
        # One bare address (a mass mailing's To): what _fold gives for its single token.
        return f"{name}: {mailboxes[0][1]}\r\n"
    tokens: list[str] = []
    for index, (display, address) in enumerate(mailboxes):
        words = [*_phrase(display), f"<{address}>"] if display else [address]
        if index < len(mailboxes) - 1:
            words[-1] += ","
        tokens.extend(" " + word for word in words)
    return _fold(name, tokens)


def unstructured_header(name: str, value: str) -> str:
    if not value:
        return f"{name}:\r\n"
    words = _WORDS.findall(value) if value.isascii() and "=?" not in value else None
    if words is None or any(len(word) > MAX_LINE - MAX_HEADER_NAME - 2 for word in words):
        # Non-ASCII text, text a reader could mistake for an encoded word, or a word too
        # long to fold: encoded words carry it exactly (the spaces between them are
        # ignored by readers, the text's own spaces are inside them).
        tokens = [" " + word for word in _encoded_words(value)]
    else:
        # Plain ASCII: fold before existing spaces only, so unfolding gives the value back
        # exactly. Each word carries the spaces that precede it.
        tokens = [" " + words[0], *words[1:]]
    return _fold(name, tokens)


def _phrase(name: str) -> list[str]:
    """A display name as words to be separated by single spaces."""
    if name.isascii() and "=?" not in name:
        words = name.split(" ")
        if all(_ATEXT.fullmatch(word) for word in words):
            return words
        quoted = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if len(quoted) <= MAX_LINE - 100:
            return [quoted]
        return _encoded_words(name)
    words = name.split(" ")
    if "" in words:
        # Irregular spacing would be lost between plain words: encode all of it.
        return _encoded_words(name)
    out: list[str] = []
    run: list[str] = []
    # Plain words stay readable; runs of words that need encoding share encoded words so
    # that the spaces between them are kept inside (RFC 2047 readers drop the spaces
    # between two encoded words).
    for word in words:
        if _ATEXT.fullmatch(word) and "=?" not in word:
            if run:
                out.extend(_encoded_words(" ".join(run)))
                run = []
            out.append(word)
        else:
            run.append(word)
    if run:
        out.extend(_encoded_words(" ".join(run)))
    return out


def _encoded_words(text: str) -> list[str]:
    """RFC 2047 encoded words for ``text``, each at most 68 characters, split only between
    characters. Q encoding when it is not longer than base64 (mostly Latin text), base64
    otherwise."""
    raw = text.encode("utf-8")
    q_text = text.translate(_Q_TABLE)
    if len(q_text) <= (len(raw) + 2) // 3 * 4:
        if len(q_text) <= _EW_MAX - _EW_OVERHEAD:
            # One encoded word holds it all (a usual subject): what _chunk_q would give.
            return [f"=?utf-8?q?{q_text}?="] if q_text else []
        return _chunk_q([_Q_TABLE[ord(c)] for c in text])
    return _chunk_b64(raw)


class _QTable(dict[int, str]):
    """Code point -> its Q encoding, for str.translate; filled as characters are met, up
    to a bound (beyond it, computed each time: a hostile text cannot grow it forever)."""

    def __missing__(self, code: int) -> str:
        encoded = _q_char(chr(code))
        if len(self) < 4096:
            self[code] = encoded
        return encoded


_Q_TABLE = _QTable()


@functools.lru_cache(maxsize=4096)
def _q_char(char: str) -> str:
    if char in _Q_SAFE:
        return char
    if char == " ":
        return "_"
    return "".join(f"={byte:02X}" for byte in char.encode("utf-8"))


def _chunk_q(parts: list[str]) -> list[str]:
    room = _EW_MAX - _EW_OVERHEAD
    words: list[str] = []
    current = ""
    for part in parts:
        if len(current) + len(part) > room:
            words.append(f"=?utf-8?q?{current}?=")
            current = ""
        current += part
    if current:
        words.append(f"=?utf-8?q?{current}?=")
    return words


def _chunk_b64(raw: bytes) -> list[str]:
    room = (_EW_MAX - _EW_OVERHEAD) // 4 * 3
    words: list[str] = []
    start = 0
    while start < len(raw):
        end = min(start + room, len(raw))
        # Never cut a UTF-8 sequence: each encoded word must decode on its own.
        while end < len(raw) and raw[end] & 0xC0 == 0x80:
            end -= 1
        words.append("=?utf-8?b?" + base64.b64encode(raw[start:end]).decode("ascii") + "?=")
        start = end
    return words


def _fold(name: str, tokens: Sequence[str]) -> str:
    """Join ``tokens`` (each starting with the whitespace that precedes it) after
    ``name:``, breaking the line before a token when the line would exceed 78 characters."""
    lines: list[str] = []
    line = name + ":" + tokens[0] if tokens else name + ":"
    for token in tokens[1:]:
        # The first token stays on the name line: a reader strips the spaces after the
        # colon, not those of a continuation line.
        if len(line) + len(token) > FOLD_AT:
            lines.append(line)
            line = token
        else:
            line += token
    lines.append(line)
    return "\r\n".join(lines) + "\r\n"


# What no header line may hold: the characters of _LINE_BREAK and _CONTROL together.
_UNSAFE = r"\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff"
# One header field: a name line with a colon that does not start with a space, then
# continuation lines that start with one and hold something else than spaces (\s and
# str.strip() agree on what a space is), each ended by CRLF. Possessive, so that a bad
# line is refused in linear time.
_SAFE_HEADER = re.compile(
    rf"(?=[^{_UNSAFE}]*:)[^ \t{_UNSAFE}][^{_UNSAFE}]*+\r\n"
    rf"(?:[ \t][^\S{_UNSAFE}]*+[^\s{_UNSAFE}][^{_UNSAFE}]*+\r\n)*+"
)


def assert_safe_header(header: str) -> None:
    """Refuse to emit anything but one header: a name line and continuation lines that
    start with a space and hold some text, within 998 octets each."""
    # One expression for the shape, then the length: a header of at most 998 octets in
    # all (the usual one) cannot have a longer line. tests/unit/test_message_fast_paths.py
    # holds this to the line-by-line reading.
    if _SAFE_HEADER.fullmatch(header) and (
        len(header.encode("utf-8")) <= MAX_LINE + 2
        or all(len(line.encode("utf-8")) <= MAX_LINE for line in header[:-2].split("\r\n"))
    ):
        return
    raise ValueError(f"refusing to write an unsafe header: {header!r}")
