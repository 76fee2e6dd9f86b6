"""The workstation settings file and what the SDK exposes to build a settings dialog."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from postier.errors import InvalidInput
from postier.workstation import settings_file as workstation
from postier.workstation.settings_file import Mode, WorkstationSettings


def test_round_trip_with_private_permissions(tmp_path: Path) -> None:
    s = WorkstationSettings()
    s.set("mode", "own")
    s.set("smtp.host", "smtp.ac-lyon.fr")
    s.set("smtp.port", "465")
    s.set("smtp.security", "tls")
    s.set("smtp.auth", "password")
    s.set("smtp.password", "secret")
    s.set("identity.address", "Alice.Martin@AC-Lyon.fr")
    path = workstation.save(s, tmp_path / "sub" / "w.toml")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    back = workstation.load(path)
    assert back == s and back.smtp.port == 465 and back.mode is Mode.OWN
    assert back.identity.address == "Alice.Martin@ac-lyon.fr"
    public = back.public()
    assert "password" not in public["smtp"] and public["smtp"]["password_set"] is True


@pytest.mark.parametrize(
    ("key", "value", "expect"),
    [("mode", "partout", "server, own or profile"), ("smtp.port", "0", "smtp.port"),
     ("smtp.security", "ssl", "smtp.security"), ("smtp.timeout", "601", "smtp.timeout"),
     ("server.url", "serveur:8025", "http://"), ("nope", "x", "smtp.host"),
     ("identity.address", "x@", "identity.address")],
)
def test_bad_values_say_what_is_allowed(key: str, value: str, expect: str) -> None:
    s = WorkstationSettings()
    with pytest.raises(InvalidInput) as info:
        s.set(key, value)
    assert expect in info.value.message()
    assert s == WorkstationSettings(), "nothing changed"


def test_incomplete_settings_name_what_to_set() -> None:
    s = WorkstationSettings(mode=Mode.OWN)
    with pytest.raises(InvalidInput) as info:
        s.check_ready()
    assert "smtp.host" in info.value.message() and "identity.address" in info.value.message()


def test_profile_keeps_own_credentials_when_it_has_none() -> None:
    s = WorkstationSettings()
    s.set("smtp.username", "alice")
    s.set("smtp.password", "own-secret")
    shared = {"id": 3, "label": "Académie", "host": "smtp.ac-lyon.fr", "port": 587,
              "security": "starttls", "auth": "password", "username": "", "password": None,
              "timeout": 20}
    new = workstation.apply_profile(s, shared)
    assert new.mode is Mode.PROFILE and new.profile.label == "Académie"
    assert new.smtp.host == "smtp.ac-lyon.fr" and new.smtp.timeout == 20
    assert (new.smtp.username, new.smtp.password) == ("alice", "own-secret")
    with_shared = workstation.apply_profile(s, {**shared, "username": "college",
                                                "password": "shared"})
    assert (with_shared.smtp.username, with_shared.smtp.password) == ("college", "shared")
    assert s.mode is Mode.SERVER, "the original settings are untouched"


def test_unreadable_file_is_explained(tmp_path: Path) -> None:
    path = tmp_path / "w.toml"
    path.write_text("mode = [oops")
    with pytest.raises(InvalidInput) as info:
        workstation.load(path)
    assert str(path) in info.value.message()
