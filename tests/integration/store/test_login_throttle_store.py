"""Failed sign-ins are counted in the store, so two servers (or two processes of one
server, ``--http-processes``) on the same database throttle the same guesser, and the web
pages' and SMTP AUTH's failures add up under one rule: few per account from one address,
many per account from anywhere, some per address. Both backends."""

from __future__ import annotations

import time
from pathlib import Path

from postier.core.service import Postier
from postier.core.sign_in_throttle import SignInThrottle as Throttle
from postier.server.config import ServerConfig
from postier.store.base import account_key, address_key


async def _two_servers(store_url: str, tmp_path: Path) -> tuple[Postier, Postier]:
    a = Postier(ServerConfig(data_dir=tmp_path, database_url=store_url))
    await a.open()
    b = Postier(ServerConfig(data_dir=tmp_path, database_url=store_url))
    await b.open()
    return a, b


async def test_failures_count_across_servers_and_doors(store_url: str, tmp_path: Path) -> None:
    a, b = await _two_servers(store_url, tmp_path)
    try:
        await a.add_user("alice", "alice.martin@ac-lyon.fr", password="motdepasse-alice")
        alice = await a.login_candidates("alice")
        web_a, smtp_b = Throttle(a.store, "web"), Throttle(b.store, "smtp")
        now = time.time()
        for i in range(Throttle.SOURCE_LIMIT - 1):
            # Alternating, as connections spread over processes and doors.
            await (web_a if i % 2 else smtp_b).failed("alice", alice, "10.0.0.7", now=now + i)
            assert (await web_a.admit("alice", alice, "10.0.0.7", now=now + i)).wait == 0
        await smtp_b.failed("ALICE.Martin@ac-lyon.fr", alice, "10.0.0.7", now=now + 4)
        # The fifth failure from that address, at either door, holds it back 30 s at both...
        for door in (web_a, smtp_b):
            held = await door.admit("alice", alice, "10.0.0.7", now=now + 5)
            assert held.wait == 29.0 and held.accounts == []
        # ...and not alice from elsewhere.
        free = await smtp_b.admit("alice", alice, "10.0.0.8", now=now + 5)
        assert free.wait == 0 and [u.username for u in free.accounts] == ["alice"]
        # Failures older than the window no longer count.
        later = now + Throttle.WINDOW + 10
        assert (await web_a.admit("alice", alice, "10.0.0.7", now=later)).wait == 0
        # A success clears alice's count from that address only.
        await web_a.succeeded(alice[0], "10.0.0.7",
                              await web_a.admit("alice", alice, "10.0.0.7", now=now + 5))
        assert (await web_a.admit("alice", alice, "10.0.0.7", now=now + 5)).wait == 0
        recent = await a.store.recent_failures(
            [account_key("web", 1, "alice"), account_key("smtp", 1, "alice"),
             address_key("web", "10.0.0.7"), address_key("smtp", "10.0.0.7")], now - 1)
        assert sum(map(len, recent.values())) == 2 * Throttle.SOURCE_LIMIT
    finally:
        await a.close()
        await b.close()


async def test_a_guesser_spread_over_many_addresses_is_still_slowed(
    store_url: str, tmp_path: Path
) -> None:
    a, b = await _two_servers(store_url, tmp_path)
    try:
        await a.add_user("bob", "bob.durand@gmail.com", password="motdepasse-bob")
        bob = await a.login_candidates("bob")
        web, smtp = Throttle(a.store, "web"), Throttle(b.store, "smtp")
        now = time.time()
        for i in range(Throttle.ACCOUNT_LIMIT - 1):
            await (web if i % 2 else smtp).failed("bob", bob, f"198.51.100.{i}", now=now)
        assert (await web.admit("bob", bob, "192.0.2.1", now=now + 1)).wait == 0
        await smtp.failed("bob", bob, "203.0.113.9", now=now + 1)
        held = await web.admit("bob", bob, "192.0.2.1", now=now + 2)
        assert held.wait == 29.0, "past the account's ceiling, every address waits"
        # Another account from these addresses is not held back.
        assert (await web.admit("nobody", [], "198.51.100.1", now=now + 2)).wait == 0
    finally:
        await a.close()
        await b.close()


async def test_an_address_trying_many_names_is_held_back(store_url: str, tmp_path: Path) -> None:
    a, b = await _two_servers(store_url, tmp_path)
    try:
        web, smtp = Throttle(a.store, "web"), Throttle(b.store, "smtp")
        now = time.time()
        for i in range(Throttle.ADDRESS_LIMIT):
            await (web if i % 2 else smtp).failed(f"user{i}", [], "192.0.2.5", now=now)
        assert (await smtp.admit("someone", [], "192.0.2.5", now=now + 1)).wait == 29.0
        assert (await smtp.admit("someone", [], "192.0.2.6", now=now + 1)).wait == 0
        # A name that names no account is held back like an account.
        for _ in range(Throttle.SOURCE_LIMIT):
            await web.failed("Ghost", [], "192.0.2.7", now=now)
        assert (await smtp.admit("ghost", [], "192.0.2.7", now=now + 1)).wait == 29.0
        # A name of any length is counted, not refused by the database.
        await smtp.failed("x" * 2000, [], "192.0.2.8")
        assert (await smtp.admit("x" * 2000, [], "192.0.2.8")).wait == 0
    finally:
        await a.close()
        await b.close()


async def test_a_name_of_two_establishments_opens_only_the_accounts_not_held_back(
    store_url: str, tmp_path: Path
) -> None:
    a, b = await _two_servers(store_url, tmp_path)
    try:
        await a.add_user("alice", "alice.martin@ac-lyon.fr", password="motdepasse-alice")
        parc = await a.add_establishment("lycee-du-parc", "Lycée du Parc")
        await a.add_user("alice", "alice@lyceeduparc.fr", password="mdp-alice-du-parc",
                         establishment_id=parc.id)
        theirs = await a.login_candidates("lycee-du-parc:alice")
        web = Throttle(a.store, "web")
        now = time.time()
        for _ in range(Throttle.SOURCE_LIMIT):
            await web.failed("lycee-du-parc:alice", theirs, "10.1.0.1", now=now)
        both = await a.login_candidates("alice")
        assert len(both) == 2
        admitted = await web.admit("alice", both, "10.1.0.1", now=now + 1)
        # The first establishment's alice still signs in from there; the held-back account
        # cannot be opened through the shared name.
        assert admitted.wait == 0 and [u.establishment_id for u in admitted.accounts] == [1]
    finally:
        await a.close()
        await b.close()
