"""The quick check of plain addresses gives exactly email-validator's answer: the same
normal form for every address it accepts, and a refusal for every one it refuses."""

from __future__ import annotations

import pytest
from email_validator import EmailNotValidError, validate_email
from hypothesis import given
from hypothesis import strategies as st

from postier.core import policy
from postier.errors import InvalidAddress

ATEXT = "abcXYZ019!#$%&'*+/=?^_`{|}~-."
LABEL = "abcXYZ09-"
local_parts = st.text(ATEXT, min_size=1, max_size=70)
labels = st.text(LABEL, min_size=1, max_size=66)
domains = st.lists(labels, min_size=1, max_size=4).map(".".join)
tlds = st.sampled_from(["fr", "FR", "org", "c", "x1", "test", "local", "Education", "123"])
addresses = st.builds(lambda lp, d, tld: f"{lp}@{d}.{tld}", local_parts, domains, tlds)


def _reference(address: str) -> str | None:
    try:
        return str(validate_email(address, check_deliverability=False,
                                  allow_smtputf8=True).normalized)
    except EmailNotValidError:
        return None


def _ours(address: str) -> str | None:
    try:
        return policy.normalize_address(address)
    except InvalidAddress:
        return None


@given(addresses)
def test_same_answer_as_email_validator(address: str) -> None:
    assert _ours(address) == _reference(address), address


@pytest.mark.parametrize("address", [
    "Jean.Dupont@AC-Lyon.FR", "a@b.co", "a..b@x.fr", ".a@x.fr", "a.@x.fr", "a@x-.fr",
    "a@-x.fr", "a@ab--cd.fr", "a@xn--coles-9ra.fr", "a@x.localhost", "a@x.test",
    "x" * 64 + "@ac-lyon.fr", "x" * 65 + "@ac-lyon.fr", "a@" + "b" * 63 + ".fr",
    "a@" + "b" * 64 + ".fr", "a@" + ("b" * 60 + ".") * 4 + "fr", "parent+2024@gmail.com",
])
def test_known_edges(address: str) -> None:
    assert _ours(address) == _reference(address)
