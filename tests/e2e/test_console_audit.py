"""What the server's console changes is in the audit log, as the same change made through
the API would be: the real ``postier`` command, then the installation's audit log."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from postier.core.service import Postier
from postier.server.config import ServerConfig
from postier.store.base import AuditEntry


def postier(data_dir: Path, *args: str, stdin: str | None = None
            ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "POSTIER_DATA_DIR": str(data_dir), "LANG": "C", "COLUMNS": "200"}
    env.pop("LANGUAGE", None)
    env.pop("LC_ALL", None)
    return subprocess.run([sys.executable, "-m", "postier", *args], input=stdin,
                          capture_output=True, text=True, env=env, timeout=60)


def audit_of(data_dir: Path, slug: str) -> list[tuple[str, str, str]]:
    """Who did what to whom, in an establishment's audit log."""

    async def read() -> list[AuditEntry]:
        core = Postier(ServerConfig(data_dir=data_dir))
        await core.open()
        try:
            est = await core.establishment(slug)
            assert est is not None, f"no establishment {slug}"
            return await core.store.list_audit(est.id)
        finally:
            await core.close()

    return [(e.actor, e.action, e.target) for e in asyncio.run(read())]


def test_disabling_an_establishment_is_audited(tmp_path: Path) -> None:
    r = postier(tmp_path, "establishments", "add", "lycee-du-parc", "--name", "Lycée du Parc")
    assert r.returncode == 0, r.stderr
    r = postier(tmp_path, "establishments", "disable", "lycee-du-parc")
    assert r.returncode == 0, r.stderr
    assert "Establishment lycee-du-parc disabled." in r.stdout
    assert ("console", "establishment.disable", "lycee-du-parc") in \
        audit_of(tmp_path, "lycee-du-parc"), "the console's disabling left no audit entry"
    listing = postier(tmp_path, "establishments", "list").stdout
    assert "lycee-du-parc" in listing and "disabled" in listing


def test_disabling_an_unknown_establishment_changes_nothing(tmp_path: Path) -> None:
    r = postier(tmp_path, "establishments", "disable", "inconnu")
    assert r.returncode == 1 and "There is no establishment inconnu" in r.stderr, r.stderr


def test_a_password_set_at_the_console_is_audited(tmp_path: Path) -> None:
    r = postier(tmp_path, "establishments", "add", "clg-moulin")
    assert r.returncode == 0, r.stderr
    r = postier(tmp_path, "users", "add", "zoe", "--email", "zoe@clg-moulin.fr",
                "--establishment", "clg-moulin")
    assert r.returncode == 0, r.stderr
    r = postier(tmp_path, "users", "set-password", "zoe", "--establishment", "clg-moulin",
                "--password-stdin", stdin="une-longue-phrase\n")
    assert r.returncode == 0, r.stderr
    assert ("console", "user.password", "zoe") in audit_of(tmp_path, "clg-moulin")
