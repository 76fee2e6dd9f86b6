"""A wrong password costs the same work whoever is named: an unknown name, an account
without a password and a known account each cost one argon2 verification, at every door
where a password is given (the sign-in page, SMTP AUTH PLAIN and LOGIN); a name shared by
two establishments costs one per account, even when the first one matches. Counted with a
real argon2 hasher that counts its verifications, not by timing. The doors run in this
process, on a real SQLite store."""

from __future__ import annotations

import asyncio
import base64
import smtplib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from argon2 import PasswordHasher

from postier.core import accounts
from postier.core.service import Postier
from postier.errors import AuthenticationRequired
from postier.server.api import create_app
from postier.server.config import ServerConfig
from postier.server.smtp import SubmissionConfig, self_signed, server_tls_context, start_submission

from support.server import free_port


class CountingHasher(PasswordHasher):
    """argon2id as Postier uses it, counting the verifications it does."""

    verified = 0

    def verify(self, hash: str | bytes, password: str | bytes) -> bool:
        CountingHasher.verified += 1
        return bool(super().verify(hash, password))


@dataclass
class Doors:
    core: Postier
    web: httpx.AsyncClient
    smtp_port: int
    tls: ssl.SSLContext


@pytest.fixture
async def doors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Doors]:
    monkeypatch.setattr(accounts, "_hasher", CountingHasher())
    core = Postier(ServerConfig(data_dir=tmp_path, hostname="localhost"))
    await core.open()
    await core.add_user("alice", "alice.martin@ac-lyon.fr", password="motdepasse-alice")
    await core.add_user("copieur", "copieur@ac-lyon.fr")  # a token-only account
    parc = await core.add_establishment("lycee-du-parc", "Lycée du Parc")
    await core.add_user("alice", "alice@lyceeduparc.fr", password="mdp-alice-du-parc",
                        establishment_id=parc.id)
    await core.add_user("bob", "bob.durand@gmail.com", password="motdepasse-bob")
    cert, key = self_signed(tmp_path, "localhost")
    port = free_port()
    smtp = await start_submission(core, host="127.0.0.1", port=port, implicit_tls=False,
                                  tls=server_tls_context(cert, key), config=SubmissionConfig())
    web = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(core)),
                            base_url="http://localhost", timeout=30)
    try:
        yield Doors(core, web, port, ssl.create_default_context(cafile=str(cert)))
    finally:
        await web.aclose()
        smtp.close()
        await core.close()


def _smtp_auth(port: int, tls: ssl.SSLContext, mechanism: str, login: str,
               password: str) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.starttls(context=tls)
        c.ehlo()
        if mechanism == "PLAIN":
            blob = base64.b64encode(f"\0{login}\0{password}".encode()).decode()
            return int(c.docmd("AUTH", "PLAIN " + blob)[0])
        c.docmd("AUTH", "LOGIN " + base64.b64encode(login.encode()).decode())
        return int(c.docmd(base64.b64encode(password.encode()).decode())[0])


async def _web_sign_in(d: Doors, login: str, password: str) -> int:
    csrf = (await d.web.get("/login")).cookies["postier_login_csrf"]
    r = await d.web.post("/login", data={"username": login, "password": password,
                                         "csrf": csrf})
    return r.status_code


async def _verifications(action: Any) -> tuple[Any, int]:
    """What ``action`` answers (None for a refused password), and the verifications done."""
    before = CountingHasher.verified
    try:
        result = await action
    except AuthenticationRequired:
        result = None
    return result, CountingHasher.verified - before


# (name given, password, argon2 verifications expected): the first four are refused alike.
CASES = [("nobody", "devine-1", 1), ("bob", "devine-2", 1), ("copieur", "devine-3", 1),
         ("alice", "devine-4", 2), ("alice", "motdepasse-alice", 2)]


async def test_every_name_costs_one_verification_per_account_at_every_door(
    doors: Doors,
) -> None:
    for login, password, expected in CASES:
        opens = password.startswith("motdepasse")
        user, work = await _verifications(doors.core.authenticate_password(login, password))
        assert (user is not None) == opens, login
        assert work == expected, f"authenticate_password({login!r}): {work} verifications"

        code, work = await _verifications(_web_sign_in(doors, login, password))
        assert code == (303 if opens else 401), (login, code)
        assert work == expected, f"sign-in page, {login!r}: {work} verifications"

        for mechanism in ("PLAIN", "LOGIN"):
            code, work = await _verifications(asyncio.to_thread(
                _smtp_auth, doors.smtp_port, doors.tls, mechanism, login, password))
            assert code == (235 if opens else 535), (mechanism, login, code)
            assert work == expected, f"SMTP AUTH {mechanism}, {login!r}: {work} verifications"
