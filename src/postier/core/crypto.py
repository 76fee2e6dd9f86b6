"""Secrets at rest: relay and profile passwords are encrypted with a key kept beside the data.

The key is a Fernet key (AES-128-CBC with HMAC-SHA256) in ``<data dir>/secret.key``,
created on first use with 0600 permissions, or given by ``POSTIER_SECRET_KEY`` /
``POSTIER_SECRET_KEY_FILE`` so several processes or machines share it. A process holding
the wrong key finds out when it opens the store (:meth:`SecretBox.check`), not at the
first delivery.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from postier.errors import PostierError
from postier.i18n import N_

KEY_FILE = "secret.key"
_CHECK_PLAINTEXT = "postier-key-check"


class KeyError_(PostierError):
    code = "secret_key"
    default_template = N_("The secret key cannot be used: {reason}.")


class SecretBox:
    def __init__(self, key: bytes) -> None:
        try:
            self._fernet = Fernet(key)
        except (ValueError, TypeError) as exc:
            raise KeyError_(reason="it is not a valid Fernet key") from exc
        # A separate key for keyed digests (sender verification codes), derived from the
        # Fernet key so that it needs no key file of its own.
        self._mac_key = hashlib.sha256(b"postier-mac\0" + key.strip()).digest()

    @classmethod
    def for_data_dir(cls, data_dir: Path) -> SecretBox:
        env_key = os.environ.get("POSTIER_SECRET_KEY")
        if env_key:
            return cls(env_key.encode())
        path = Path(os.environ.get("POSTIER_SECRET_KEY_FILE") or data_dir / KEY_FILE)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            key = Fernet.generate_key()
            # Created with 0600 from the start: never readable by others, even briefly.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(key)
        return cls(path.read_bytes().strip())

    def encrypt(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode()).decode()

    def decrypt(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken as exc:
            raise KeyError_(
                reason="stored secrets were encrypted with another key "
                "(check POSTIER_SECRET_KEY or the secret.key file)"
            ) from exc

    def mac(self, value: str) -> str:
        """A keyed digest (HMAC-SHA256, hex) of ``value``: what is stored of a short code,
        so that the database alone does not let anybody find it by trying them all."""
        return hmac.new(self._mac_key, value.encode(), hashlib.sha256).hexdigest()

    def fingerprint(self) -> str:
        """A value stored with the settings to detect a wrong key at start-up."""
        return self.encrypt(_CHECK_PLAINTEXT)

    def check(self, fingerprint: str) -> None:
        if self.decrypt(fingerprint) != _CHECK_PLAINTEXT:
            raise KeyError_(reason="the key check failed")


def key_file_problem(data_dir: Path) -> str | None:
    """Why the key file's permissions are unsafe, or None when they are fine."""
    path = Path(os.environ.get("POSTIER_SECRET_KEY_FILE") or data_dir / KEY_FILE)
    if not path.exists():
        return None
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        return f"{path} is readable by other users (mode {oct(mode)}); run chmod 600 {path}"
    return None
