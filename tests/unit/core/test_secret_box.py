"""SecretBox: the installation's secrets at rest (relay and profile passwords)."""

from __future__ import annotations

import base64

import pytest
from cryptography.fernet import Fernet

from postier.core.crypto import KeyError_, SecretBox


def test_a_secret_comes_back_as_it_was_put_in() -> None:
    box = SecretBox(Fernet.generate_key())
    for secret in ("", "mot de passe", "pässwörd ✉", "x" * 10_000):
        assert box.decrypt(box.encrypt(secret)) == secret


def test_the_same_secret_is_stored_differently_each_time() -> None:
    box = SecretBox(Fernet.generate_key())
    stored = {box.encrypt("the relay's password") for _ in range(20)}
    assert len(stored) == 20, "two encryptions of one secret gave the same value (no nonce)"
    assert not any("relay" in s for s in stored), "the secret shows through its encryption"


def test_another_key_cannot_read_a_secret_and_says_so() -> None:
    stored = SecretBox(Fernet.generate_key()).encrypt("s3cret")
    with pytest.raises(KeyError_) as refused:
        SecretBox(Fernet.generate_key()).decrypt(stored)
    message = refused.value.message("en")
    assert "another key" in message and "POSTIER_SECRET_KEY" in message, message


def test_a_tampered_value_is_refused_with_the_same_clear_error() -> None:
    box = SecretBox(Fernet.generate_key())
    raw = bytearray(base64.urlsafe_b64decode(box.encrypt("s3cret")))
    raw[-40] ^= 0x01  # one bit of the ciphertext
    with pytest.raises(KeyError_, match="another key"):
        box.decrypt(base64.urlsafe_b64encode(bytes(raw)).decode())


def test_a_wrong_key_is_found_by_the_start_up_check() -> None:
    key = Fernet.generate_key()
    fingerprint = SecretBox(key).fingerprint()
    SecretBox(key).check(fingerprint)  # the same key, in another process: accepted
    with pytest.raises(KeyError_):
        SecretBox(Fernet.generate_key()).check(fingerprint)


def test_a_malformed_key_is_refused() -> None:
    with pytest.raises(KeyError_, match="not a valid Fernet key"):
        SecretBox(b"not a key")
