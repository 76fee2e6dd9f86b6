"""Signing in on a hosted installation (many establishments on one Postier), against the
real server: what one establishment creates never changes how another's people sign in,
a stranger's failures never lock the rightful user out, and signing out ends the session.

The first establishment (``default``) holds admin, alice and bob (tests/support/server.py);
the second, ``lycee-du-parc``, is added here with its own ``alice`` and another account
under alice's e-mail address.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import smtplib
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from postier.core.service import Postier
from postier.core.sign_in_throttle import SignInThrottle
from postier.server.config import ServerConfig

from support.server import PostierServer, ServerProcess

ALICE_A = ("alice", "motdepasse-alice")
ALICE_ADDRESS = "alice.martin@ac-lyon.fr"
B = "lycee-du-parc"


async def _establishment_b(data_dir: Path) -> None:
    core = Postier(ServerConfig(data_dir=data_dir))
    await core.open()
    try:
        est = await core.add_establishment(B, "Lycée du Parc")
        await core.add_user("alice", "alice@lyceeduparc.fr", password="mdp-alice-du-parc",
                            establishment_id=est.id)
        await core.add_user("amartin", ALICE_ADDRESS, password="mdp-amartin-du-parc",
                            establishment_id=est.id)
    finally:
        await core.close()


@pytest.fixture
def hosted(server_factory: Any) -> PostierServer:
    """A running server whose second establishment reuses alice's name and address."""
    s: PostierServer = server_factory()
    asyncio.run(_establishment_b(s.data_dir))
    return s.start()


def web_sign_in(server: PostierServer, login: str, password: str,
                source: str = "127.0.0.1") -> httpx.Response:
    """The sign-in form posted from ``source`` (a loopback address); the answer as is."""
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(base_url=server.url, transport=transport, timeout=10) as web:
        csrf = web.get("/login").cookies["postier_login_csrf"]
        return web.post("/login", data={"username": login, "password": password,
                                        "csrf": csrf})


def smtp_auth(server: PostierServer, login: str, password: str, mechanism: str = "PLAIN",
              source: str = "127.0.0.1") -> int:
    """One AUTH with this mechanism over STARTTLS from ``source``: the reply's code."""
    tls = ssl.create_default_context(cafile=str(server.data_dir / "smtp-cert.pem"))
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10,
                      source_address=(source, 0)) as c:
        c.starttls(context=tls)
        c.ehlo()
        if mechanism == "PLAIN":
            blob = base64.b64encode(f"\0{login}\0{password}".encode()).decode()
            return int(c.docmd("AUTH", "PLAIN " + blob)[0])
        code, _ = c.docmd("AUTH", "LOGIN " + base64.b64encode(login.encode()).decode())
        if code != 334:
            return int(code)
        return int(c.docmd(base64.b64encode(password.encode()).decode())[0])


def console(server: PostierServer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "postier", *args, "--data-dir",
                           str(server.data_dir)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "LANG": "C.UTF-8"})


def me(server: PostierServer, token: str) -> dict[str, Any]:
    r = httpx.get(server.url + "/api/v1/me", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    return dict(r.json())


# -- one establishment's names never disturb another's sign-in --------------------------------


@pytest.mark.in_process
def test_same_name_in_another_establishment_changes_nothing_for_alice(
    hosted: PostierServer,
) -> None:
    # On the web, by username and by e-mail address: her pages, not a refusal.
    for login in ("alice", ALICE_ADDRESS):
        r = web_sign_in(hosted, login, ALICE_A[1])
        assert r.status_code == 303 and r.headers["location"] == "/mine", (login, r.text[:300])
    # The other establishment's alice signs in with her own password, and the explicit
    # form still names one account.
    assert web_sign_in(hosted, "alice", "mdp-alice-du-parc").status_code == 303
    assert web_sign_in(hosted, f"{B}:alice", ALICE_A[1]).status_code == 401
    assert web_sign_in(hosted, "default:alice", ALICE_A[1]).status_code == 303

    # SMTP AUTH, both mechanisms, by username and by address; her token as the password.
    for mechanism in ("PLAIN", "LOGIN"):
        for login in ("alice", ALICE_ADDRESS):
            assert smtp_auth(hosted, login, ALICE_A[1], mechanism) == 235, (mechanism, login)
    assert smtp_auth(hosted, "alice", hosted.tokens["alice"]) == 235
    assert smtp_auth(hosted, "amartin", "mdp-amartin-du-parc", "LOGIN") == 235

    # The console finds the user in the establishment it is given (the first by default).
    r = console(hosted, "tokens", "create", "alice")
    assert r.returncode == 0, r.stderr
    assert me(hosted, r.stdout.strip().splitlines()[-1])["email"] == ALICE_ADDRESS
    r = console(hosted, "tokens", "create", ALICE_ADDRESS)
    assert r.returncode == 0, r.stderr
    assert me(hosted, r.stdout.strip().splitlines()[-1])["username"] == "alice"
    r = console(hosted, "tokens", "create", "alice", "--establishment", B)
    assert r.returncode == 0, r.stderr
    assert me(hosted, r.stdout.strip().splitlines()[-1])["email"] == "alice@lyceeduparc.fr"
    r = console(hosted, "tokens", "list", "amartin")
    assert r.returncode == 1 and "no user named amartin" in r.stderr, r.stderr
    assert "--establishment" in r.stderr, "the hint says how to name the establishment"


# -- a stranger's failures never lock the rightful user out -----------------------------------

STRANGER, ALICE_HOME = "127.0.0.2", "127.0.0.1"


@pytest.mark.in_process
def test_a_stranger_failing_holds_back_the_stranger_not_alice(hosted: PostierServer) -> None:
    tries = SignInThrottle.SOURCE_LIMIT + 2
    answers = [web_sign_in(hosted, "alice", f"devine-{i}", STRANGER).status_code
               for i in range(tries)]
    assert answers[:SignInThrottle.SOURCE_LIMIT] == [401] * SignInThrottle.SOURCE_LIMIT
    assert set(answers[SignInThrottle.SOURCE_LIMIT:]) == {429}, answers
    # The stranger is held back even with the right password, on the web and at SMTP AUTH
    # (one rule for both doors: their failures add up)...
    assert web_sign_in(hosted, "alice", ALICE_A[1], STRANGER).status_code == 429
    assert smtp_auth(hosted, "alice", ALICE_A[1], "PLAIN", STRANGER) == 454
    # ...while alice, from her own address, signs in on both.
    r = web_sign_in(hosted, "alice", ALICE_A[1], ALICE_HOME)
    assert r.status_code == 303 and r.headers["location"] == "/mine"
    assert smtp_auth(hosted, ALICE_ADDRESS, ALICE_A[1], "LOGIN", ALICE_HOME) == 235

    # The same at SMTP AUTH, for bob, whatever the mechanism.
    codes = [smtp_auth(hosted, "bob", f"devine-{i}", ("PLAIN", "LOGIN")[i % 2], STRANGER)
             for i in range(tries)]
    assert codes[:SignInThrottle.SOURCE_LIMIT] == [535] * SignInThrottle.SOURCE_LIMIT
    assert set(codes[SignInThrottle.SOURCE_LIMIT:]) == {454}, codes
    assert smtp_auth(hosted, "bob", "motdepasse-bob", "PLAIN", STRANGER) == 454
    assert smtp_auth(hosted, "bob", "motdepasse-bob", "PLAIN", ALICE_HOME) == 235
    assert web_sign_in(hosted, "bob", "motdepasse-bob", ALICE_HOME).status_code == 303


# -- signing out ends the session --------------------------------------------------------------


def _signed_in(server: PostierServer, login: str, password: str) -> httpx.Client:
    web = httpx.Client(base_url=server.url, timeout=10)
    csrf = web.get("/login").cookies["postier_login_csrf"]
    r = web.post("/login", data={"username": login, "password": password, "csrf": csrf})
    assert r.status_code == 303, r.text[:300]
    return web


def _page_csrf(web: httpx.Client) -> str:
    page = web.get("/mine")
    assert page.status_code == 200, page.status_code
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found is not None
    return found.group(1)


def _opens(server: PostierServer, cookie: str) -> bool:
    """Whether a copy of a session cookie, replayed from elsewhere, opens the pages."""
    with httpx.Client(base_url=server.url, timeout=10,
                      cookies={"postier_session": cookie}) as replay:
        r = replay.get("/mine")
    assert r.status_code in (200, 303), r.status_code
    return r.status_code == 200


def test_signing_out_ends_the_session_for_every_process(server_factory: Any) -> None:
    server: ServerProcess = server_factory(POSTIER_HTTP_PROCESSES="2").start()
    deadline = time.monotonic() + 20
    while "HTTP process 1 answering" not in server.log():
        assert time.monotonic() < deadline, "the second HTTP process did not start"
        time.sleep(0.1)
    web = _signed_in(server, *ALICE_A)
    cookie = web.cookies["postier_session"]
    other_device = _signed_in(server, *ALICE_A)
    assert _opens(server, cookie)

    r = web.post("/logout", data={"csrf": _page_csrf(web)})
    assert r.status_code == 303 and r.headers["location"].startswith("/login")
    web.close()
    # Whichever process answers, the copy opens nothing: the sign-in page instead.
    for _ in range(6):
        assert not _opens(server, cookie), "a session cookie outlived its sign-out"
    with httpx.Client(base_url=server.url, cookies={"postier_session": cookie}) as replay:
        r = replay.get("/mine")
        assert r.status_code == 303 and r.headers["location"].startswith("/login")
    # Signing out here leaves alice's other device signed in...
    assert _opens(server, other_device.cookies["postier_session"])
    # ...and changing her password there ends every other session, as before.
    third = _signed_in(server, *ALICE_A)
    r = other_device.post("/account/password", data={
        "csrf": _page_csrf(other_device), "current": ALICE_A[1], "new": "nouveau-mdp-alice",
        "confirm": "nouveau-mdp-alice"})
    assert r.status_code == 303, r.text[:300]
    assert not _opens(server, third.cookies["postier_session"])
    assert _opens(server, other_device.cookies["postier_session"])
    third.close()
    other_device.close()
