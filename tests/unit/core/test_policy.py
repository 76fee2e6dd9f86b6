"""Sender policy: address and domain-pattern validation, matching, and the sender decision."""

from __future__ import annotations

from email.parser import BytesParser
from email.policy import default as default_policy
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postier.core.policy import (
    SenderDecision,
    ascii_address,
    ascii_domain,
    clean_display_name,
    decide_sender,
    matching_pattern,
    normalize_address,
    normalize_domain_pattern,
)
from postier.errors import (
    InvalidAddress,
    InvalidDomainPattern,
    InvalidInput,
    SenderForbidden,
    SenderNotConfigured,
)

ECOLES_ACE = "xn--coles-9ra.fr"  # IDNA form of écoles.fr

# --------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("jean.dupont@ac-lyon.fr", "jean.dupont@ac-lyon.fr"),
        ("Jean.Dupont@AC-Lyon.FR", "Jean.Dupont@ac-lyon.fr"),  # local part kept as given
        ("  jean@ac-lyon.fr\t", "jean@ac-lyon.fr"),
        ("alice@ÉCOLES.fr", "alice@écoles.fr"),
        (f"alice@{ECOLES_ACE}", "alice@écoles.fr"),
        ("jöhn@écoles.fr", "jöhn@écoles.fr"),
        ("a+tag@sub.ac-lyon.fr", "a+tag@sub.ac-lyon.fr"),
        ("ß@straße.de", "ß@straße.de"),
    ],
)
def test_normalize_address_accepts(raw: str, expected: str) -> None:
    assert normalize_address(raw) == expected


@pytest.mark.parametrize(
    ("raw", "reason_part"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("jean@ac-lyon.fr\r\nBcc: victim@x.fr", "line breaks"),
        ("jean@ac-lyon.fr\n", "line breaks"),
        ("jean@ac-lyon.fr\r", "line breaks"),
        ("jean\x00@ac-lyon.fr", "NUL"),
        ("jean@ac-lyon.fr\u2028", "line breaks"),
        ("Bob <b@x.fr>", "without a name"),
        ("<b@x.fr>", "without a name"),
        ("b@x.fr>", "without a name"),
        ("jean", "@"),
        ("jean@", "after the @"),
        ("@ac-lyon.fr", "before the @"),
        ("jean..d@ac-lyon.fr", "two periods"),
        ("jean d@ac-lyon.fr", "SPACE"),
        ('"jean d"@ac-lyon.fr', "Quoting"),
        ("jean@[192.0.2.1]", "IP address"),
        ("jean@localhost", "period"),
        ("a" * 250 + "@ac-lyon.fr", "too long"),
        ("a@" + "b" * 400 + ".fr", "too long"),
    ],
)
def test_normalize_address_refuses(raw: str, reason_part: str) -> None:
    with pytest.raises(InvalidAddress) as info:
        normalize_address(raw)
    err = info.value
    assert reason_part.lower() in str(err.params["reason"]).lower(), err.params["reason"]
    # Pydantic validators may raise it, and doors treat it as a 422.
    assert isinstance(err, ValueError)
    assert isinstance(err, InvalidInput)
    assert err.code == "invalid_address"
    assert not err.message().endswith(".."), "the reason's own full stop is dropped"


def test_normalize_address_message_names_the_address() -> None:
    with pytest.raises(InvalidAddress) as info:
        normalize_address("Bob <b@x.fr>")
    assert "'Bob <b@x.fr>' is not a valid e-mail address" in info.value.message("en")


def test_ascii_forms() -> None:
    assert ascii_domain("ÉCOLES.fr") == ECOLES_ACE
    assert ascii_domain("AC-Lyon.FR") == "ac-lyon.fr"
    assert ascii_address("Jöhn@écoles.fr") == f"Jöhn@{ECOLES_ACE}"
    with pytest.raises(ValueError):
        ascii_domain("bad domain.fr")


# --------------------------------------------------------------------------- patterns


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("ac-lyon.fr", "ac-lyon.fr"),
        ("AC-Lyon.FR", "ac-lyon.fr"),
        ("  ac-lyon.fr  ", "ac-lyon.fr"),
        ("*.ac-lyon.fr", "*.ac-lyon.fr"),
        ("*.AC-LYON.fr", "*.ac-lyon.fr"),
        ("écoles.fr", "écoles.fr"),
        ("ÉCOLES.FR", "écoles.fr"),
        (ECOLES_ACE, "écoles.fr"),
        (f"*.{ECOLES_ACE}", "*.écoles.fr"),
        ("x。fr", "x.fr"),  # ideographic full stop, as IDNA maps it
        ("fr", "fr"),
        ("a" * 63 + ".fr", "a" * 63 + ".fr"),
    ],
)
def test_domain_pattern_accepts(raw: str, expected: str) -> None:
    assert normalize_domain_pattern(raw) == expected


@pytest.mark.parametrize(
    ("raw", "reason_part"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("*", "followed by a domain"),
        ("*.", "followed by a domain"),
        ("ac lyon.fr", "spaces"),
        ("ac-lyon.fr\r\nX: y", "spaces"),
        ("http://ac-lyon.fr", "web address"),
        ("https://www.ac-lyon.fr/", "web address"),
        ("ac-lyon.fr/", "web address"),
        ("ac-lyon.fr:25", "web address"),
        ("jean@ac-lyon.fr", "after the @"),
        ("@ac-lyon.fr", "after the @"),
        ("ac-lyon.fr.", "final dot"),
        ("*.ac-lyon.fr.", "final dot"),
        (".ac-lyon.fr", "leading dot"),
        ("*..ac-lyon.fr", "leading dot"),
        ("ac..lyon.fr", "two dots"),
        ("ac-lyon.*.fr", "only come first"),
        ("*ac-lyon.fr", "only come first"),
        ("**.ac-lyon.fr", "only come first"),
        ("*.*.ac-lyon.fr", "only come first"),
        ("a" * 64 + ".fr", "63"),
        ("é" * 60 + ".fr", "63"),
        (".".join(["a" * 60] * 5), "253"),
        ("a." * 1000 + "fr", "253"),
        ("ac_lyon.fr", "letters, digits"),
        ("-ac.fr", "hyphen"),
        ("ac-.fr", "hyphen"),
        ("xn--zz.fr", "internationalised"),
        ("☃-⌘.fr", "internationalised"),
    ],
)
def test_domain_pattern_refuses(raw: str, reason_part: str) -> None:
    with pytest.raises(InvalidDomainPattern) as info:
        normalize_domain_pattern(raw)
    err = info.value
    assert reason_part in err.params["reason"], err.params["reason"]
    assert isinstance(err, ValueError)
    assert "*.ac-lyon.fr" in err.message(), "the message shows the expected shape"


@given(st.text(max_size=40))
def test_domain_pattern_is_idempotent(text: str) -> None:
    try:
        normal = normalize_domain_pattern(text)
    except InvalidDomainPattern:
        return
    assert normalize_domain_pattern(normal) == normal
    assert normal == normal.strip()
    bare = normal.removeprefix("*.")
    address = f"x@a.{bare}" if normal.startswith("*.") else f"x@{bare}"
    assert matching_pattern(address, [normal]) == normal


@pytest.mark.parametrize(
    ("address", "patterns", "expected"),
    [
        ("jean@ac-lyon.fr", ["ac-lyon.fr"], "ac-lyon.fr"),
        ("jean@AC-LYON.FR", ["ac-lyon.fr"], "ac-lyon.fr"),
        ("jean@ac-lyon.fr", ["AC-Lyon.fr"], "AC-Lyon.fr"),
        ("jean@college.ac-lyon.fr", ["ac-lyon.fr"], None),  # exact is exact
        ("jean@college.ac-lyon.fr", ["*.ac-lyon.fr"], "*.ac-lyon.fr"),
        ("jean@a.b.ac-lyon.fr", ["*.ac-lyon.fr"], "*.ac-lyon.fr"),
        ("jean@ac-lyon.fr", ["*.ac-lyon.fr"], None),  # the wildcard excludes the domain
        ("jean@notac-lyon.fr", ["ac-lyon.fr", "*.ac-lyon.fr"], None),
        ("jean@evil-ac-lyon.fr", ["*.ac-lyon.fr"], None),
        ("jean@ac-lyon.fr.evil.com", ["ac-lyon.fr", "*.ac-lyon.fr"], None),
        ("jean@ac-lyon.fr", ["*.ac-lyon.fr", "ac-lyon.fr"], "ac-lyon.fr"),
        ("jean@x.ac-lyon.fr", ["ac-lyon.fr", "*.ac-lyon.fr"], "*.ac-lyon.fr"),
        ("jean@gmail.com", ["ac-lyon.fr", "*.ac-lyon.fr"], None),
        ("jean@gmail.com", [], None),
        # IDNA-insensitive both ways
        ("a@écoles.fr", [ECOLES_ACE], ECOLES_ACE),
        (f"a@{ECOLES_ACE}", ["écoles.fr"], "écoles.fr"),
        ("a@ÉCOLES.FR", ["écoles.fr"], "écoles.fr"),
        ("a@lycée.écoles.fr", [f"*.{ECOLES_ACE}"], f"*.{ECOLES_ACE}"),
        ("a@ecoles.fr", ["écoles.fr"], None),
        # first match wins, in the administrator's order
        ("a@x.fr", ["y.fr", "x.fr", "*.fr"], "x.fr"),
        ("a@x.fr", ["*.fr", "x.fr"], "*.fr"),
        ("not-an-address", ["x.fr"], None),
    ],
)
def test_matching_pattern(address: str, patterns: list[str], expected: str | None) -> None:
    assert matching_pattern(address, patterns) == expected


def test_matching_pattern_reports_a_broken_pattern() -> None:
    with pytest.raises(InvalidDomainPattern):
        matching_pattern("a@x.fr", ["http://x.fr"])


# --------------------------------------------------------------------------- decision

ALLOWED = ["ac-lyon.fr", "*.ac-lyon.fr"]
SCHOOL = {
    "establishment_name": "Collège Jean Moulin",
    "establishment_address": "ne-pas-repondre@ac-lyon.fr",
}
SCHOOL_FROM = ("Collège Jean Moulin", "ne-pas-repondre@ac-lyon.fr")


@pytest.mark.parametrize(
    ("case", "kwargs", "expected"),
    [
        (
            "inside, exact domain",
            {"user_address": "jean@ac-lyon.fr", "allowed_domains": ALLOWED},
            (
                "Jean Dupont",
                "jean@ac-lyon.fr",
                (),
                "jean@ac-lyon.fr",
                "inside_allowed",
                "ac-lyon.fr",
            ),
        ),
        (
            "inside, subdomain",
            {"user_address": "jean@college.ac-lyon.fr", "allowed_domains": ALLOWED},
            (
                "Jean Dupont",
                "jean@college.ac-lyon.fr",
                (),
                "jean@college.ac-lyon.fr",
                "inside_allowed",
                "*.ac-lyon.fr",
            ),
        ),
        (
            "inside, case differs",
            {"user_address": "Jean@AC-LYON.FR", "allowed_domains": ALLOWED},
            (
                "Jean Dupont",
                "Jean@ac-lyon.fr",
                (),
                "Jean@ac-lyon.fr",
                "inside_allowed",
                "ac-lyon.fr",
            ),
        ),
        (
            "inside, message Reply-To kept",
            {
                "user_address": "jean@ac-lyon.fr",
                "allowed_domains": ALLOWED,
                "message_reply_to": ["secretariat@ac-lyon.fr"],
            },
            (
                "Jean Dupont",
                "jean@ac-lyon.fr",
                ("secretariat@ac-lyon.fr",),
                "jean@ac-lyon.fr",
                "inside_allowed",
                "ac-lyon.fr",
            ),
        ),
        (
            "outside",
            {"user_address": "alice@gmail.com", "allowed_domains": ALLOWED},
            (*SCHOOL_FROM, ("alice@gmail.com",), SCHOOL_FROM[1], "outside_allowed", None),
        ),
        (
            "outside, wildcard does not cover the bare domain",
            {"user_address": "jean@ac-lyon.fr", "allowed_domains": ["*.ac-lyon.fr"]},
            (*SCHOOL_FROM, ("jean@ac-lyon.fr",), SCHOOL_FROM[1], "outside_allowed", None),
        ),
        (
            "outside, message Reply-To replaces the user's address",
            {
                "user_address": "alice@gmail.com",
                "allowed_domains": ALLOWED,
                "message_reply_to": ["Vie.Scolaire@ac-lyon.fr", "vie.scolaire@AC-LYON.fr"],
            },
            (*SCHOOL_FROM, ("Vie.Scolaire@ac-lyon.fr",), SCHOOL_FROM[1], "outside_allowed", None),
        ),
        (
            "empty list: establishment sender even inside the academy",
            {"user_address": "jean@ac-lyon.fr", "allowed_domains": []},
            (*SCHOOL_FROM, ("jean@ac-lyon.fr",), SCHOOL_FROM[1], "no_allowed_domains", None),
        ),
        (
            "IDN user domain, ASCII pattern",
            {"user_address": "prof@écoles.fr", "allowed_domains": [ECOLES_ACE]},
            ("Jean Dupont", "prof@écoles.fr", (), "prof@écoles.fr", "inside_allowed", "écoles.fr"),
        ),
        (
            "punycode user domain, Unicode pattern",
            {"user_address": f"prof@{ECOLES_ACE}", "allowed_domains": ["*.ÉCOLES.fr", "écoles.fr"]},
            ("Jean Dupont", "prof@écoles.fr", (), "prof@écoles.fr", "inside_allowed", "écoles.fr"),
        ),
        (
            "requested own address, other case",
            {
                "user_address": "jean@ac-lyon.fr",
                "requested_from": "JEAN@ac-lyon.fr",
                "allowed_domains": ALLOWED,
            },
            (
                "Jean Dupont",
                "JEAN@ac-lyon.fr",
                (),
                "JEAN@ac-lyon.fr",
                "inside_allowed",
                "ac-lyon.fr",
            ),
        ),
        (
            "granted address inside",
            {
                "user_address": "jean@ac-lyon.fr",
                "requested_from": "secretariat@ac-lyon.fr",
                "granted_addresses": ["Secretariat@AC-LYON.FR"],
                "allowed_domains": ALLOWED,
            },
            (
                "Jean Dupont",
                "secretariat@ac-lyon.fr",
                (),
                "secretariat@ac-lyon.fr",
                "inside_allowed",
                "ac-lyon.fr",
            ),
        ),
        (
            "granted address outside",
            {
                "user_address": "jean@ac-lyon.fr",
                "requested_from": "club.theatre@gmail.com",
                "granted_addresses": ["not an address", "club.theatre@gmail.com"],
                "allowed_domains": ALLOWED,
            },
            (*SCHOOL_FROM, ("club.theatre@gmail.com",), SCHOOL_FROM[1], "outside_allowed", None),
        ),
        (
            "empty requested_from means none",
            {"user_address": "jean@ac-lyon.fr", "requested_from": " ", "allowed_domains": ALLOWED},
            (
                "Jean Dupont",
                "jean@ac-lyon.fr",
                (),
                "jean@ac-lyon.fr",
                "inside_allowed",
                "ac-lyon.fr",
            ),
        ),
    ],
)
def test_decide_sender(case: str, kwargs: dict[str, Any], expected: tuple[Any, ...]) -> None:
    args: dict[str, Any] = {"user_name": "Jean Dupont", **SCHOOL, **kwargs}
    d = decide_sender(**args)
    got = (d.from_name, d.from_address, d.reply_to, d.envelope_from, d.rule, d.matched_pattern)
    assert got == expected, case
    assert d.allowed_domains == tuple(normalize_domain_pattern(p) for p in args["allowed_domains"])


@pytest.mark.parametrize(
    ("requested", "granted"),
    [
        ("directeur@ac-lyon.fr", []),
        ("directeur@ac-lyon.fr", ["secretariat@ac-lyon.fr"]),
        ("jean@ac-grenoble.fr", []),  # same local part, other domain
        ("jean@college.ac-lyon.fr", []),
        ("jean2@ac-lyon.fr", []),
    ],
)
def test_sending_as_someone_else_is_refused(requested: str, granted: list[str]) -> None:
    with pytest.raises(SenderForbidden) as info:
        decide_sender(
            user_address="jean@ac-lyon.fr",
            user_name="Jean",
            allowed_domains=ALLOWED,
            requested_from=requested,
            granted_addresses=granted,
            **SCHOOL,
        )
    err = info.value
    assert err.params == {"address": requested, "own": "jean@ac-lyon.fr"}
    assert err.field == "from"
    assert err.http_status == 403
    assert requested in err.message() and "jean@ac-lyon.fr" in err.message()


def test_case_folding_does_not_merge_different_mailboxes() -> None:
    # casefold() would make "straße" and "strasse" equal; they are different mailboxes.
    with pytest.raises(SenderForbidden):
        decide_sender(
            user_address="strasse@ac-lyon.fr",
            user_name="S",
            allowed_domains=ALLOWED,
            requested_from="straße@ac-lyon.fr",
            **SCHOOL,
        )


def test_sender_not_configured_only_when_needed() -> None:
    kwargs: dict[str, Any] = {
        "user_name": "Alice",
        "allowed_domains": ALLOWED,
        "establishment_name": "",
        "establishment_address": "",
    }
    inside = decide_sender(user_address="jean@ac-lyon.fr", **kwargs)
    assert inside.rule == "inside_allowed"
    with pytest.raises(SenderNotConfigured) as info:
        decide_sender(user_address="alice@gmail.com", **kwargs)
    err = info.value
    assert err.params["address"] == "alice@gmail.com"
    assert err.hint("en") == (
        "An administrator must set the sender address in Paramètres d'envoi des e-mails."
    )
    assert err.http_status == 409


def test_invalid_addresses_name_their_field() -> None:
    base: dict[str, Any] = {"user_name": "J", "allowed_domains": ALLOWED, **SCHOOL}
    with pytest.raises(InvalidAddress) as info:
        decide_sender(user_address="jean@ac-lyon.fr", requested_from="a\r\nb@x.fr", **base)
    assert info.value.field == "from"
    with pytest.raises(InvalidAddress) as info:
        decide_sender(user_address="jean@ac-lyon.fr", message_reply_to=["ok@x.fr", "bad"], **base)
    assert info.value.field == "reply_to.1"
    with pytest.raises(InvalidAddress) as info:
        decide_sender(user_address="", **base)
    assert info.value.field == "user_address"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Jean Dupont", "Jean Dupont"),
        ("  Jean   Dupont ", "Jean Dupont"),
        ("Jean\r\nBcc: victim@x.fr", "Jean Bcc: victim@x.fr"),
        ("Jean\nDupont\x00", "Jean Dupont"),
        ("Jean\u2028Dupont\u0085", "Jean Dupont"),
        ("Jean\tDupont\x1b[31m", "Jean Dupont [31m"),
        ("\r\n", ""),
    ],
)
def test_display_names_are_cleaned(name: str, expected: str) -> None:
    assert clean_display_name(name) == expected
    for user_address, allowed in (("jean@ac-lyon.fr", ALLOWED), ("alice@gmail.com", ALLOWED)):
        d = decide_sender(
            user_address=user_address,
            user_name=name,
            allowed_domains=allowed,
            establishment_name=name,
            establishment_address="ne-pas-repondre@ac-lyon.fr",
        )
        assert d.from_name == expected


@given(st.text(max_size=60))
def test_hostile_names_never_make_a_header(name: str) -> None:
    d = decide_sender(
        user_address="jean@ac-lyon.fr",
        user_name=name,
        allowed_domains=ALLOWED,
        **SCHOOL,
    )
    raw = f"From: {d.formatted_from}\r\n\r\n".encode()
    parsed = BytesParser(policy=default_policy).parsebytes(raw)
    assert parsed.keys() == ["From"]
    assert [a.addr_spec for a in parsed["From"].addresses] == ["jean@ac-lyon.fr"]


@pytest.mark.parametrize(
    "field", ["from_name", "from_address", "envelope_from", "user_address", "reply_to"]
)
def test_decision_refuses_line_breaks(field: str) -> None:
    values: dict[str, Any] = {
        "from_name": "Jean",
        "from_address": "jean@ac-lyon.fr",
        "reply_to": (),
        "envelope_from": "jean@ac-lyon.fr",
        "rule": "inside_allowed",
        "user_address": "jean@ac-lyon.fr",
        "matched_pattern": "ac-lyon.fr",
        "allowed_domains": ("ac-lyon.fr",),
    }
    values[field] = ("x@y.fr\r\nBcc: v@x.fr",) if field == "reply_to" else "x\r\nBcc: v@x.fr"
    with pytest.raises(ValueError):
        SenderDecision(**values)


@pytest.mark.parametrize(
    ("name", "address", "expected"),
    [
        (
            "Collège Jean Moulin",
            "ne-pas-repondre@ac-lyon.fr",
            "Collège Jean Moulin <ne-pas-repondre@ac-lyon.fr>",
        ),
        ("", "ne-pas-repondre@ac-lyon.fr", "ne-pas-repondre@ac-lyon.fr"),
        ("Dupont, Jean", "jean@ac-lyon.fr", '"Dupont, Jean" <jean@ac-lyon.fr>'),
        ('Jean "JD" Dupont', "jean@ac-lyon.fr", '"Jean \\"JD\\" Dupont" <jean@ac-lyon.fr>'),
    ],
)
def test_formatted_from(name: str, address: str, expected: str) -> None:
    d = SenderDecision(name, address, (), address, "inside_allowed", address, None, ())
    assert d.formatted_from == expected


# --------------------------------------------------------------------------- explain


def _decision(
    user_address: str, allowed: list[str], reply_to: tuple[str, ...] = ()
) -> SenderDecision:
    return decide_sender(
        user_address=user_address,
        user_name="Jean Dupont",
        allowed_domains=allowed,
        message_reply_to=reply_to,
        **SCHOOL,
    )


@pytest.mark.parametrize(
    ("user_address", "allowed", "reply_to", "expected"),
    [
        (
            "alice@gmail.com",
            ALLOWED,
            (),
            "alice@gmail.com is outside the allowed domains ac-lyon.fr, *.ac-lyon.fr: the "
            "establishment's sender (Collège Jean Moulin <ne-pas-repondre@ac-lyon.fr>) is used "
            "and replies go to alice@gmail.com.",
        ),
        (
            "alice@gmail.com",
            ["ac-lyon.fr"],
            (),
            "alice@gmail.com is outside the allowed domain ac-lyon.fr: the establishment's "
            "sender (Collège Jean Moulin <ne-pas-repondre@ac-lyon.fr>) is used and replies go "
            "to alice@gmail.com.",
        ),
        (
            "jean@ac-lyon.fr",
            ALLOWED,
            (),
            "jean@ac-lyon.fr is inside the allowed domain ac-lyon.fr: it is used as the sender.",
        ),
        (
            "jean@ac-lyon.fr",
            ALLOWED,
            ("vie.scolaire@ac-lyon.fr",),
            "jean@ac-lyon.fr is inside the allowed domain ac-lyon.fr: it is used as the sender "
            "and replies go to vie.scolaire@ac-lyon.fr.",
        ),
        (
            "alice@gmail.com",
            [],
            (),
            "No allowed domain is set: the establishment's sender (Collège Jean Moulin "
            "<ne-pas-repondre@ac-lyon.fr>) is used for every user and replies go to "
            "alice@gmail.com.",
        ),
    ],
)
def test_explain_en(
    user_address: str, allowed: list[str], reply_to: tuple[str, ...], expected: str
) -> None:
    assert _decision(user_address, allowed, reply_to).explain("en") == expected


def test_explain_fr() -> None:
    outside = _decision("alice@gmail.com", ALLOWED).explain("fr")
    assert outside == (
        "alice@gmail.com est hors des domaines autorisés ac-lyon.fr, *.ac-lyon.fr : "
        "l'expéditeur de l'établissement (Collège Jean Moulin <ne-pas-repondre@ac-lyon.fr>) "
        "est utilisé et les réponses vont à alice@gmail.com."
    )
    inside = _decision("jean@ac-lyon.fr", ALLOWED).explain("fr-FR")
    assert inside == (
        "jean@ac-lyon.fr fait partie du domaine autorisé ac-lyon.fr : cette adresse est "
        "utilisée comme expéditeur."
    )
    none = _decision("alice@gmail.com", []).explain("fr")
    assert none.startswith("Aucun domaine autorisé n'est défini")
