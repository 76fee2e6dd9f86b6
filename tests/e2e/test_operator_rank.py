"""An establishment's administrator never reaches an operator's account: no token made for
it, no password set, no role or state changed, no data exported, on every door but the
server's console. Operator accounts live in the installation's own establishment only."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from postier import i18n
from postier.core.service import Postier
from postier.server.config import ServerConfig

from support.server import InProcessServer, PostierServer

pytest_plugins = ["support.browser"]

pytestmark = pytest.mark.in_process

OPS_PASSWORD = "mot-de-passe-de-l-exploitant"


async def _operator_and_school(data_dir: Path) -> str:
    """The hosting operator in the installation's own establishment (beside its
    administrator, as on a platform whose `default` also has an administrator), and a
    hosted school."""
    core = Postier(ServerConfig(data_dir=data_dir))
    await core.open()
    try:
        await core.add_establishment("lycee-du-parc", "Lycée du Parc", hosted=True)
        ops = await core.add_user("ops", "ops@hebergeur.fr", role="operator",
                                  password=OPS_PASSWORD)
        token, _ = await core.create_token(ops, "exploitation")
        return token
    finally:
        await core.close()


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PostierServer, str]]:
    """Module-scoped and started before the browser: Playwright's event loop, once open,
    leaves no room for the provisioning's."""
    server = InProcessServer(tmp_path_factory.mktemp("platform"))
    server.provision()
    ops_token = asyncio.run(_operator_and_school(server.data_dir))
    server.start()
    yield server, ops_token
    server.stop()


def _ops_token_id(server: PostierServer, ops_token: str) -> int:
    with httpx.Client(base_url=server.url, timeout=10,
                      headers={"Authorization": f"Bearer {ops_token}"}) as ops:
        return int(ops.get("/api/v1/tokens").json()[0]["id"])


def test_an_administrator_cannot_take_over_an_operator(
    platform: tuple[PostierServer, str]
) -> None:
    server, ops_token = platform
    token_id = _ops_token_id(server, ops_token)
    attempts: list[tuple[str, str, dict[str, Any] | None]] = [
        ("POST", "/api/v1/tokens", {"user": "ops", "name": "prise de contrôle"}),
        ("GET", "/api/v1/tokens?username=ops", None),
        ("DELETE", f"/api/v1/tokens/{token_id}?username=ops", None),
        ("PUT", "/api/v1/users/ops", {"password": "nouveau-mot-de-passe"}),
        ("PUT", "/api/v1/users/ops", {"role": "user"}),
        ("PUT", "/api/v1/users/ops", {"email": "direction@ac-lyon.fr"}),
        ("PUT", "/api/v1/users/ops", {"granted_senders": ["x@ac-lyon.fr"]}),
        ("DELETE", "/api/v1/users/ops", None),
        ("GET", "/api/v1/users/ops/data", None),
        ("POST", "/api/v1/settings/preview", {"user": "ops"}),
    ]
    with server.client("admin", **{"Accept-Language": "fr"}) as admin:
        for method, path, body in attempts:
            r = admin.request(method, path, json=body)
            assert r.status_code == 403, (method, path, r.status_code, r.text)
            assert r.json()["error"]["message"] == i18n.translate(
                "fr", "The account {username} outranks yours: only an operator of the "
                "installation may change it.", username="ops"), r.text
        # Another administrator of the same rank stays within reach, as before.
        assert admin.post("/api/v1/users", json={"username": "adjoint", "role": "admin",
                                                 "email": "adjoint@ac-lyon.fr"}
                          ).status_code == 201
        assert admin.post("/api/v1/tokens", json={"user": "adjoint"}).status_code == 201
    # The operator's account is as it was: its token works, its password is its own.
    with httpx.Client(base_url=server.url, timeout=10,
                      headers={"Authorization": f"Bearer {ops_token}"}) as ops:
        me = ops.get("/api/v1/me")
        assert me.status_code == 200 and me.json()["role"] == "operator"
        assert me.json()["email"] == "ops@hebergeur.fr" and not me.json()["disabled"]
        assert [t["revoked"] for t in ops.get("/api/v1/tokens").json()] == [False]
        # The operator itself still acts on administrators of any establishment.
        assert ops.put("/api/v1/users/admin", json={"name": "Direction"}).status_code == 200
    r = httpx.post(server.url + "/api/v1/me/password", timeout=10,
                   headers={"Authorization": f"Bearer {ops_token}"},
                   json={"current": OPS_PASSWORD, "new": "encore-un-autre-mot"})
    assert r.status_code == 204, "the operator's password was changed by someone else"


def test_operator_accounts_live_in_the_installations_own_establishment(
    platform: tuple[PostierServer, str]
) -> None:
    server, ops_token = platform
    school = {"Authorization": f"Bearer {ops_token}",
              "X-Postier-Establishment": "lycee-du-parc", "Accept-Language": "fr"}
    with httpx.Client(base_url=server.url, timeout=10, headers=school) as ops:
        r = ops.post("/api/v1/users", json={"username": "ops2", "role": "operator",
                                            "email": "ops2@hebergeur.fr"})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["message"] == i18n.translate(
            "fr", "Operator accounts live in the installation's own establishment (default), "
            "never in a school's."), r.text
        assert ops.post("/api/v1/users", json={"username": "proviseur", "role": "admin",
                                               "email": "proviseur@lyceeduparc.fr"}
                        ).status_code == 201
        r = ops.put("/api/v1/users/proviseur", json={"role": "operator"})
        assert r.status_code == 422, r.text
        assert {u["role"] for u in ops.get("/api/v1/users").json()} == {"admin"}
    # The console keeps to the same placement.
    done = subprocess.run(
        [sys.executable, "-m", "postier", "users", "add", "ops3", "--email", "o@hebergeur.fr",
         "--role", "operator", "--establishment", "lycee-du-parc",
         "--data-dir", str(server.data_dir)],
        capture_output=True, text=True, timeout=60, env={**server.env, "LANG": "C.UTF-8"})
    assert done.returncode != 0
    assert "installation's own establishment" in done.stdout + done.stderr, done.stderr


def test_the_users_page_offers_nothing_on_an_operator(
    platform: tuple[PostierServer, str], browser: Any
) -> None:
    server, _ops_token = platform
    context = browser.new_context(base_url=server.url, locale="fr-FR")
    context.set_default_timeout(10_000)
    page = context.new_page()
    page.goto("/login")
    page.fill("#f-username", "admin")
    page.fill("#f-password", "motdepasse-admin")
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"/(queue|mine)"))
    page.goto("/users")
    row = page.locator("tr", has_text="ops@hebergeur.fr")
    assert row.count() == 1 and row.locator("a").count() == 0, "a link to change the operator"
    token = page.get_attribute("meta[name=csrf-token]", "content")
    assert page.goto("/users/ops").status == 403
    r = page.request.post("/users/ops/password",
                          form={"password": "nouveau-mot-de-passe", "csrf": token})
    assert r.status == 403
    r = page.request.post("/users/ops/tokens", form={"name": "prise", "csrf": token})
    assert r.status == 403
    r = page.request.post("/users/ops", form={"email": "ops@hebergeur.fr", "name": "x",
                                              "role": "user", "disabled": "on", "csrf": token})
    assert r.status == 403
    context.close()


def test_doctor_reports_an_operator_account_left_in_a_school(
    platform: tuple[PostierServer, str]
) -> None:
    """An installation made before operators lived only in `default` may have one in a
    school: the doctor names it, with what to do."""
    server, _ops_token = platform

    def doctor() -> dict[str, Any]:
        done = subprocess.run(
            [sys.executable, "-m", "postier", "doctor", "--json", "--data-dir",
             str(server.data_dir)], capture_output=True, text=True, timeout=120,
            env={**server.env, "LANG": "C.UTF-8"})
        assert done.stdout, done.stderr
        checks = {c["key"]: c for c in json.loads(done.stdout)["checks"]}
        return dict(checks["operators"])

    assert doctor()["level"] == "ok"
    with sqlite3.connect(server.data_dir / "postier.db", timeout=10) as db:
        db.execute("INSERT INTO users (establishment_id, username, email, role, created_at) "
                   "SELECT id, 'ancien-ops', 'ops@lyceeduparc.fr', 'operator', 0 "
                   "FROM establishments WHERE slug = 'lycee-du-parc'")
    try:
        found = doctor()
        assert found["level"] == "warn", found
        assert "lycee-du-parc:ancien-ops" in found["result"], found
    finally:
        with sqlite3.connect(server.data_dir / "postier.db", timeout=10) as db:
            db.execute("DELETE FROM users WHERE username = 'ancien-ops'")
