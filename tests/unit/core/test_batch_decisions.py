"""A batch decides the sender once per (From, Reply-To) pair: every e-mail of it leaves
with what deciding it alone would give, and errors still name the message."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postier.core.message import MessageIn
from postier.core.service import Postier
from postier.core.settings import DeliverySettings
from postier.errors import PostierError
from postier.server.config import ServerConfig
from postier.store.base import NewMessage, User

SETTINGS = DeliverySettings.model_validate({
    "delegation": True,
    "sender": {"name": "Collège Jean Moulin", "address": "ne-pas-repondre@ac-lyon.fr"},
    "allowed_domains": ["ac-lyon.fr"],
})
USER = User(7, 1, "jean", "jean@ac-lyon.fr", "Jean Dupont", "user", False,
            granted_senders=("vie-scolaire@ac-lyon.fr", "club@gmail.com"))
FROMS = [None, "jean@ac-lyon.fr", "JEAN@AC-LYON.FR", "vie-scolaire@ac-lyon.fr",
         "club@gmail.com"]
REPLIES = [[], ["secretariat@ac-lyon.fr"], ["a@x.fr", "b@x.fr"]]
VERIFIED = [None, ("jean@ac-lyon.fr",), ()]


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> Postier:
    return Postier(ServerConfig(data_dir=Path(tmp_path_factory.mktemp("core"))))


def _comparable(new: NewMessage) -> dict[str, Any]:
    # Message-ID and Date differ from one rendering to the next; nothing else may.
    data = re.sub(rb"(?m)^(Message-ID|Date): .*\r\n", b"", new.data)
    return {"data": data, "envelope_from": new.envelope_from, "header_from": new.header_from,
            "recipients": tuple(new.recipients), "sender_rule": new.sender_rule,
            "subject": new.subject}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(FROMS), st.sampled_from(REPLIES)), min_size=1,
                max_size=8),
       st.sampled_from(VERIFIED))
def test_shared_decisions_give_the_same_messages(
    core: Postier, senders: list[tuple[str | None, list[str]]],
    verified: tuple[str, ...] | None,
) -> None:
    msgs = [MessageIn.model_validate({"from": f, "reply_to": r, "to": [f"p{i}@example.org"],
                                      "subject": "Réunion", "text": "Bonjour"})
            for i, (f, r) in enumerate(senders)]
    decisions: dict[Any, Any] = {}
    shared = [core.submission._prepare(USER, SETTINGS, m, i, verified, decisions)
              for i, m in enumerate(msgs)]
    alone = [core.submission._prepare(USER, SETTINGS, m, i, verified) for i, m in enumerate(msgs)]
    assert [_comparable(n) for n in shared] == [_comparable(n) for n in alone]


def test_a_refused_sender_names_its_message_each_time(core: Postier) -> None:
    good = MessageIn.model_validate({"to": ["p@example.org"], "text": "x"})
    bad = MessageIn.model_validate({"from": "autre@ac-lyon.fr", "to": ["p@example.org"]})
    decisions: dict[Any, Any] = {}
    core.submission._prepare(USER, SETTINGS, good, 0, None, decisions)
    for index in (1, 2):  # a refusal is not remembered as a decision
        with pytest.raises(PostierError) as exc:
            core.submission._prepare(USER, SETTINGS, bad, index, None, decisions)
        assert exc.value.code == "sender_forbidden"
        assert exc.value.field == f"messages.{index}.from"
