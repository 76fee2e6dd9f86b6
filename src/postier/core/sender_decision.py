"""The sender policy (:mod:`postier.core.policy`) applied to an account and its
establishment's settings, and the Message-ID that goes with the decision."""

from __future__ import annotations

import functools
from collections.abc import Sequence

from postier.core import policy
from postier.core.message import make_message_id
from postier.core.settings import DeliverySettings
from postier.store.base import User


# The sender policy is a pure function of these values, and the same few come back for
# every e-mail (a teacher's, a copier's, a mass mailing's): its decisions are remembered,
# since deciding again costs a noticeable part of an acceptance. A refusal (an exception)
# is not cached.
@functools.lru_cache(maxsize=2048)
def _decide(user_address: str, user_name: str, allowed_domains: tuple[str, ...],
            establishment_name: str, establishment_address: str, requested_from: str | None,
            reply_to: tuple[str, ...], granted: tuple[str, ...],
            verified: tuple[str, ...] | None, display: str) -> policy.SenderDecision:
    return policy.decide_sender(
        user_address=user_address, user_name=user_name, allowed_domains=allowed_domains,
        establishment_name=establishment_name, establishment_address=establishment_address,
        requested_from=requested_from, message_reply_to=reply_to,
        granted_addresses=granted, verified_addresses=verified, display=display)


def decide_sender(
    user: User,
    settings: DeliverySettings,
    requested_from: str | None = None,
    reply_to: Sequence[str] = (),
    verified: Sequence[str] | None = None,
) -> policy.SenderDecision:
    """The sender policy for ``user``; ``verified`` is what
    :meth:`SenderAddresses.verified` returned (``None``: no verification asked)."""
    granted = user.granted_senders
    if user.role == "relay" and requested_from:
        granted = (*granted, requested_from)
    # Hashable: the arguments are _decide's cache key.
    return _decide(user.email, user.display_name, tuple(settings.allowed_domains),
                   settings.sender.name, settings.sender.address, requested_from,
                   tuple(reply_to), granted,
                   None if verified is None else tuple(verified), settings.sender.display)


def message_id_for(decision: policy.SenderDecision, hostname: str) -> str:
    """A new Message-ID at the From's domain, as mail programs do: a Message-ID from
    another domain (or from "localhost") is one more reason for a filter to doubt the
    e-mail. ``hostname`` when the From has no usable domain."""
    domain = policy.ascii_domain(decision.from_address.rpartition("@")[2])
    return make_message_id(domain or hostname)
