"""The API reads JSON bodies with pydantic-core's parser (``JSONRequest``): for every body
it must give what the standard library's ``json.loads`` gave, or fail the same way."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postier.server.api.deps import JSONRequest


def _read(body: bytes) -> Any:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    request = JSONRequest({"type": "http", "method": "POST", "headers": []}, receive)
    return asyncio.run(request.json())


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None)
@given(values, st.booleans())
def test_valid_bodies_read_as_the_standard_library_reads_them(value: Any, ascii: bool) -> None:
    body = json.dumps(value, ensure_ascii=ascii).encode("utf-8", "surrogatepass")
    expected = json.loads(body)
    assert _same(_read(body), expected)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=60)
       | st.text(max_size=40).map(lambda s: s.encode("utf-8", "surrogatepass")))
def test_any_body_reads_or_fails_as_the_standard_library(body: bytes) -> None:
    try:
        expected: Any = json.loads(body)
    except Exception as exc:
        with pytest.raises(type(exc)):
            _read(body)
    else:
        assert _same(_read(body), expected)


@pytest.mark.parametrize("body", [
    b'"\\ud800"',                      # a lone surrogate: json.loads keeps it
    b'\xef\xbb\xbf{"a": 1}',           # a UTF-8 byte order mark
    '{"a": "é"}'.encode("utf-16"),     # UTF-16, which json.loads detects
    b'{"a": 1, "a": 2}',               # the last of two equal keys
    b"[NaN, Infinity, -Infinity]",
    b"123456789012345678901234567890",
])
def test_the_standard_librarys_edge_cases_are_kept(body: bytes) -> None:
    assert _same(_read(body), json.loads(body))


@pytest.mark.parametrize("body", [b"[1,]", b'{"a": 1}x', b"\xff", b""])
def test_malformed_bodies_raise_the_standard_librarys_error(body: bytes) -> None:
    with pytest.raises((json.JSONDecodeError, UnicodeDecodeError)):
        _read(body)
