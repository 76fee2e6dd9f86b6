"""The first hour of a school: a new server prints a one-time setup address where the first
administrator is created, or the administrator gets a password at the console; either way
they end signed in to the web pages. Real ``postier serve`` processes, the real console
command (in French), and the pages in a real Chromium."""

from __future__ import annotations

import asyncio
import html
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import httpx

from postier.core import first_run
from postier.core.service import Postier
from postier.core.sign_in_throttle import SetupThrottle
from postier.server.config import ServerConfig

from support.browser import Web
from support.server import ServerProcess

pytest_plugins = ["support.browser"]

FR = {"Accept-Language": "fr-FR,fr;q=0.9"}
SETUP = re.compile(r"http://127\.0\.0\.1:\d+/setup\?token=[A-Za-z0-9_-]+")
T = TypeVar("T")


def _in_store(data_dir: Path, action: Callable[[Postier], Awaitable[T]]) -> T:
    """Run ``action`` on the installation's store, in a thread of its own (Playwright's
    synchronous API keeps an event loop running in the test's thread)."""

    async def main() -> T:
        core = Postier(ServerConfig(data_dir=data_dir))
        await core.open()
        try:
            return await action(core)
        finally:
            await core.close()

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, main()).result()


def _start(server: ServerProcess) -> list[str]:
    """Start the server; the setup addresses it printed during this start."""
    before = len(server.log())
    server.start()
    return SETUP.findall(server.log()[before:])


def postier(data_dir: Path, *args: str,
            stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "POSTIER_DATA_DIR": str(data_dir), "LANG": "fr_FR.UTF-8",
           "COLUMNS": "200"}
    for var in ("LANGUAGE", "LC_ALL", "LC_MESSAGES"):
        env.pop(var, None)
    return subprocess.run([sys.executable, "-m", "postier", *args], input=stdin,
                          capture_output=True, text=True, env=env, timeout=60)


def test_setup_address_creates_the_administrator_who_lands_signed_in(
    browser: Any, server_factory: Any
) -> None:
    server: ServerProcess = server_factory(provision=False)
    printed = _start(server)
    # Printed twice: on standard output and in the log.
    assert len(set(printed)) == 1 and len(printed) == 2, server.log()
    address = printed[0]
    assert "No administrator can sign in yet" in server.log()

    web = Web(browser, server.url)
    try:
        page = web.page("fr-FR")
        page.goto(address)
        assert page.locator("h1").inner_text() == "Créer l'administrateur"
        page.fill("#f-username", "direction")
        page.fill("#f-name", "Direction")
        page.fill("#f-email", "direction@ac-lyon.fr")
        page.fill("#f-password", "Une-phrase-longue")
        page.fill("#f-confirm", "Une-phrase-autre")
        page.click("button:has-text('Créer l\\'administrateur')")
        assert page.locator("#e-confirm").inner_text() == "Les deux mots de passe sont différents."
        assert page.get_attribute("#f-confirm", "aria-describedby") == "e-confirm"
        assert page.input_value("#f-email") == "direction@ac-lyon.fr", "what was typed stays"

        page.fill("#f-password", "Une-phrase-longue")
        page.fill("#f-confirm", "Une-phrase-longue")
        page.click("button:has-text('Créer l\\'administrateur')")
        page.wait_for_url("**/queue")
        assert page.locator("h1").inner_text() == "File d'attente"
        page.goto("/users")
        assert page.locator("h1").count() == 1 and "direction@ac-lyon.fr" in page.content()
    finally:
        web.close()

    used = httpx.get(address, headers=FR)
    assert used.status_code == 410
    assert "Cette adresse d'installation a déjà servi" in html.unescape(used.text)
    assert "Une-phrase" not in html.unescape(used.text)
    wrong = httpx.get(address[:-4] + "AAAA", headers=FR)
    assert wrong.status_code == 404
    assert "Aucune page d'installation à cette adresse" in html.unescape(wrong.text)
    again = httpx.post(server.url + "/setup", data={"token": address.split("=", 1)[1],
                                                    "username": "intrus",
                                                    "email": "intrus@example.org",
                                                    "password": "12345678",
                                                    "confirm": "12345678"})
    assert again.status_code == 410, "a used address creates nobody"

    server.stop()
    assert _start(server) == [], "an administrator exists: no setup address"
    audit = _in_store(server.data_dir, lambda core: core.store.list_audit(1))
    assert [(a.actor, a.action, a.target) for a in audit] == [
        ("setup", "user.create", "direction")]


def test_an_expired_address_is_refused_and_a_restart_prints_a_new_one(
    server_factory: Any
) -> None:
    server: ServerProcess = server_factory(provision=False)
    (first, _) = _start(server)

    async def age(core: Postier) -> None:
        doc = json.loads(await core.store.get_meta(first_run.SETUP_KEY) or "{}")
        doc["issued_at"] = time.time() - first_run.LIFETIME - 1
        await core.store.set_meta(first_run.SETUP_KEY, json.dumps(doc))

    assert httpx.get(first).status_code == 200
    _in_store(server.data_dir, age)
    expired = httpx.get(first, headers=FR)
    assert expired.status_code == 410
    assert "Cette adresse d'installation a expiré" in html.unescape(expired.text)
    assert "Redémarrez le serveur" in html.unescape(expired.text)

    server.stop()
    (second, _) = _start(server)
    assert second != first
    assert httpx.get(first).status_code == 404, "the previous address is forgotten"
    assert httpx.get(second).status_code == 200

    # Guessing is held back, like failed sign-ins: after ten wrong tokens from this
    # address (the forgotten one above was the first), even the right one waits.
    for i in range(SetupThrottle.SETUP_LIMIT - 1):
        assert httpx.get(f"{server.url}/setup?token=guess{i}").status_code == 404
    held = httpx.get(second, headers=FR)
    assert held.status_code == 429 and "Attendez" in held.text


def test_console_password_then_web_sign_in(browser: Any, server_factory: Any) -> None:
    server: ServerProcess = server_factory(provision=False)
    data_dir = server.data_dir
    r = postier(data_dir, "users", "add", "admin", "--email", "direction@ac-lyon.fr",
                "--role", "admin")
    assert r.returncode == 0, r.stderr
    address = _start(server)
    assert address, "an administrator without a password cannot sign in: setup is offered"
    server.stop()

    short = postier(data_dir, "users", "set-password", "admin", "--password-stdin",
                    stdin="court\n")
    assert short.returncode == 1
    assert "Un mot de passe compte au moins 8 caractères" in short.stderr, short.stderr
    unknown = postier(data_dir, "users", "set-password", "personne", "--password-stdin",
                      stdin="motdepasse-admin\n")
    assert unknown.returncode == 1 and "personne" in unknown.stderr
    done = postier(data_dir, "users", "set-password", "admin", "--password-stdin",
                   stdin="motdepasse-admin\n")
    assert done.returncode == 0, done.stderr
    assert "Le mot de passe de admin est enregistré" in done.stdout
    audit = _in_store(data_dir, lambda core: core.store.list_audit(1))
    assert [(a.actor, a.action, a.target) for a in audit][:1] == [
        ("console", "user.password", "admin")]

    assert _start(server) == [], "an administrator can sign in: no setup address"
    assert httpx.get(address[0]).status_code == 410
    web = Web(browser, server.url)
    try:
        page = web.sign_in("admin")
        assert page.url.endswith("/queue")
        assert page.locator("h1").inner_text() == "File d'attente"
    finally:
        web.close()
