"""Certificate credentials for Microsoft's client-credentials flow (RFC 7523).

Instead of a client secret, the application registered in Entra ID may hold the public part
of a certificate; Postier then proves who it is with a short-lived JWT (the "client
assertion") signed RS256 with the certificate's private key. The administrator pastes the
key and the certificate (PEM); they are checked to belong together when saved, and the
certificate's end of validity is warned about like a client secret's expiry date.

Built on ``cryptography`` (already used for the secrets at rest) rather than a JWT library:
signing one compact token needs nothing more.
"""

from __future__ import annotations

import base64
import datetime
import functools
import json
import time
import uuid
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from postier.errors import InvalidSetting
from postier.i18n import N_

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_LIFETIME = 300  # seconds: long enough for one token request, short if stolen
PEM_MAX = 20_000


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class ClientCertificate:
    """A checked private key and its certificate."""

    key: rsa.RSAPrivateKey
    certificate: x509.Certificate

    @property
    def not_after(self) -> datetime.date:
        return self.certificate.not_valid_after_utc.date()

    @property
    def thumbprint(self) -> str:
        """The SHA-1 thumbprint in hexadecimal, as Entra ID lists its certificates."""
        return self.certificate.fingerprint(hashes.SHA1()).hex().upper()  # noqa: S303

    def assertion(self, client_id: str, audience: str, now: float | None = None) -> str:
        """A client assertion for the token endpoint ``audience``: iss = sub = the
        application (client) id, a unique jti, valid for a few minutes."""
        now = time.time() if now is None else now
        header = {
            "alg": "RS256", "typ": "JWT",
            "x5t": b64url(self.certificate.fingerprint(hashes.SHA1())),  # noqa: S303
            "x5t#S256": b64url(self.certificate.fingerprint(hashes.SHA256())),
        }
        claims = {
            "aud": audience, "iss": client_id, "sub": client_id, "jti": str(uuid.uuid4()),
            "nbf": int(now) - 30, "iat": int(now), "exp": int(now) + ASSERTION_LIFETIME,
        }
        signing_input = ".".join(
            b64url(json.dumps(part, separators=(",", ":")).encode())
            for part in (header, claims))
        signature = self.key.sign(signing_input.encode("ascii"), padding.PKCS1v15(),
                                  hashes.SHA256())
        return f"{signing_input}.{b64url(signature)}"


def check_private_key(pem: str) -> str:
    """``pem`` if it is an unencrypted RSA private key in PEM form (raises otherwise)."""
    _private_key(pem.strip())
    return pem


def _private_key(pem: str) -> rsa.RSAPrivateKey:
    if "ENCRYPTED" in pem:
        raise InvalidSetting(N_(
            "This private key is protected by a passphrase: paste it without one (for "
            "example: openssl rsa -in key.pem -out key-clear.pem). Postier keeps it "
            "encrypted itself."))
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise InvalidSetting(N_(
            "This is not a private key in PEM form: paste the whole text from "
            "-----BEGIN PRIVATE KEY----- to -----END PRIVATE KEY-----.")) from exc
    if not isinstance(key, rsa.RSAPrivateKey):
        raise InvalidSetting(N_(
            "This private key is not an RSA key: Microsoft accepts certificates with an RSA "
            "key only (for example: openssl req -x509 -newkey rsa:2048 ...)."))
    return key


def _certificate(pem: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem.encode())
    except ValueError as exc:
        raise InvalidSetting(N_(
            "This is not a certificate in PEM form: paste the whole text from "
            "-----BEGIN CERTIFICATE----- to -----END CERTIFICATE-----.")) from exc


def check_certificate(pem: str) -> str:
    """``pem`` if it is an X.509 certificate in PEM form (raises otherwise)."""
    _certificate(pem.strip())
    return pem


@functools.lru_cache(maxsize=32)
def load(key_pem: str, certificate_pem: str) -> ClientCertificate:
    """The pair, checked: an RSA key and the certificate of that very key. Cached, since
    settings are validated again every time they are read."""
    key = _private_key(key_pem.strip())
    certificate = _certificate(certificate_pem.strip())
    public = certificate.public_key()
    if not isinstance(public, rsa.RSAPublicKey) or \
            public.public_numbers() != key.public_key().public_numbers():
        raise InvalidSetting(N_(
            "This private key does not match the certificate: paste the key the "
            "certificate was made with."))
    return ClientCertificate(key, certificate)
