"""The sender policy when the establishment asks for verified sender addresses: an address
inside the allowed domains is the From only once verified; outside them nothing changes."""

from __future__ import annotations

from typing import Any

import pytest

from postier.core.policy import decide_sender, sendable
from postier.errors import SenderForbidden

SCHOOL = {"allowed_domains": ["ac-lyon.fr"], "establishment_name": "Collège Jean Moulin",
          "establishment_address": "ne-pas-repondre@ac-lyon.fr"}


def decide(address: str, **kw: Any) -> Any:
    return decide_sender(user_address=address, user_name="Jean Dupont", **SCHOOL, **kw)


def test_without_verification_nothing_changes() -> None:
    d = decide("jean@ac-lyon.fr", verified_addresses=None)
    assert (d.rule, d.from_address) == ("inside_allowed", "jean@ac-lyon.fr")


def test_unverified_address_is_treated_as_outside() -> None:
    d = decide("jean@ac-lyon.fr", verified_addresses=())
    assert d.rule == "unverified_sender"
    assert d.from_address == d.envelope_from == "ne-pas-repondre@ac-lyon.fr"
    assert d.reply_to == ("jean@ac-lyon.fr",)
    assert "not verified" in d.explain("en") and "My account" in d.explain("en")
    assert "n'est pas vérifiée" in d.explain("fr") and "Mon compte" in d.explain("fr")


def test_verified_address_is_used_as_is_whatever_its_case() -> None:
    d = decide("Jean@ac-lyon.fr", verified_addresses=("jean@AC-LYON.fr",))
    assert (d.rule, d.from_address, d.reply_to) == ("inside_allowed", "Jean@ac-lyon.fr", ())


def test_another_verified_address_does_not_count() -> None:
    d = decide("jean@ac-lyon.fr", verified_addresses=("paul@ac-lyon.fr",))
    assert d.rule == "unverified_sender"


def test_verified_granted_address_is_used() -> None:
    d = decide("jean@ac-lyon.fr", requested_from="vie-scolaire@ac-lyon.fr",
               granted_addresses=("vie-scolaire@ac-lyon.fr",),
               verified_addresses=("vie-scolaire@ac-lyon.fr",))
    assert (d.rule, d.from_address) == ("inside_allowed", "vie-scolaire@ac-lyon.fr")


@pytest.mark.parametrize("verified", [(), ("jean@gmail.com",)])
def test_outside_the_allowed_domains_verification_changes_nothing(
    verified: tuple[str, ...]
) -> None:
    d = decide("jean@gmail.com", verified_addresses=verified)
    assert d.rule == "outside_allowed"
    assert d.from_address == "ne-pas-repondre@ac-lyon.fr"


def test_no_allowed_domain_stays_its_own_rule() -> None:
    d = decide_sender(user_address="jean@ac-lyon.fr", user_name="", allowed_domains=[],
                      establishment_name="", establishment_address="x@ac-lyon.fr",
                      verified_addresses=())
    assert d.rule == "no_allowed_domains"


def test_sendable_is_own_or_granted() -> None:
    assert sendable("jean@ac-lyon.fr", "JEAN@ac-lyon.fr", ()) == "JEAN@ac-lyon.fr"
    assert sendable("jean@ac-lyon.fr", "cdi@ac-lyon.fr", ("cdi@ac-lyon.fr",)) == (
        "cdi@ac-lyon.fr")
    with pytest.raises(SenderForbidden) as exc:
        sendable("jean@ac-lyon.fr", "paul@ac-lyon.fr", (), field="address")
    assert exc.value.field == "address"
