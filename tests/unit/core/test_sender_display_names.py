"""sender.display "user_via": the establishment's sender named "<user> via <establishment>"
when it replaces the user's address, quoted and encoded as readers expect."""

from __future__ import annotations

from email.parser import BytesParser
from email.policy import default as default_policy
from typing import Any

import pytest

from postier.core.message import MessageIn, build_message, make_message_id
from postier.core.policy import decide_sender

ESTABLISHMENT = {"establishment_name": "Collège Jean Moulin",
                 "establishment_address": "ne-pas-repondre@ac-lyon.fr",
                 "allowed_domains": ["ac-lyon.fr"]}


def _from_header(name: str, address: str, display: str) -> Any:
    decision = decide_sender(user_address=address, user_name=name, display=display,
                             **ESTABLISHMENT)  # type: ignore[arg-type]
    msg = MessageIn.model_validate({"to": ["parent@example.org"], "subject": "s", "text": "t"})
    built = build_message(msg, decision, message_id=make_message_id("ac-lyon.fr"))
    parsed = BytesParser(policy=default_policy).parsebytes(built.data)
    return decision, parsed["From"], built.data


@pytest.mark.parametrize("name", ["Bob Durand", "Hélène Dupré-Œuvre", 'Durand, "Bob"',
                                  "Zoë (prof. de SVT)"])
def test_user_via_names_the_user_and_the_establishment(name: str) -> None:
    decision, header, data = _from_header(name, "bob.durand@gmail.com", "user_via")
    assert decision.from_name == f"{name} via Collège Jean Moulin"
    assert header.addresses[0].display_name == f"{name} via Collège Jean Moulin"
    assert header.addresses[0].addr_spec == "ne-pas-repondre@ac-lyon.fr"
    assert data.split(b"\r\n\r\n")[0].isascii(), "a non-ASCII header left unencoded"
    assert decision.reply_to == ("bob.durand@gmail.com",)


def test_establishment_display_is_todays_behaviour() -> None:
    decision, header, _ = _from_header("Bob Durand", "bob.durand@gmail.com", "establishment")
    assert header.addresses[0].display_name == "Collège Jean Moulin"
    assert decision.from_name == "Collège Jean Moulin"


def test_user_via_leaves_an_address_inside_the_allowed_domains_alone() -> None:
    decision, header, _ = _from_header("Alice Martin", "alice.martin@ac-lyon.fr", "user_via")
    assert decision.rule == "inside_allowed"
    assert header.addresses[0].display_name == "Alice Martin"
    assert header.addresses[0].addr_spec == "alice.martin@ac-lyon.fr"


def test_a_user_without_a_name_gets_the_establishments_name() -> None:
    decision, _, _ = _from_header("", "bob.durand@gmail.com", "user_via")
    assert decision.from_name == "Collège Jean Moulin"


def test_an_establishment_without_a_name_is_named_by_its_domain() -> None:
    decision = decide_sender(user_address="bob@gmail.com", user_name="Bob Durand",
                             establishment_name="", allowed_domains=["ac-lyon.fr"],
                             establishment_address="ne-pas-repondre@ac-lyon.fr",
                             display="user_via")
    assert decision.from_name == "Bob Durand via ac-lyon.fr"
