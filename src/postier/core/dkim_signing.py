"""DKIM signing for the establishments' allowed domains (dkimpy).

``postier dkim generate DOMAIN`` makes an RSA key, keeps its private half encrypted with
the installation's key, and prints the DNS TXT record to publish. At delivery, every
e-mail whose From is in a domain with a key is signed (relaxed/relaxed canonicalisation,
the headers a recipient reads), so receiving servers can check it really comes from the
establishment — one of the things that keeps school e-mails out of spam folders.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from postier.core.submitted_message import read_submitted

SIGNED_HEADERS = [b"from", b"reply-to", b"to", b"cc", b"subject", b"date", b"message-id",
                  b"mime-version", b"content-type", b"content-transfer-encoding"]
_SELECTOR = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


@dataclass(frozen=True)
class DkimKey:
    domain: str
    selector: str
    private_pem: bytes
    public_b64: str

    @property
    def record_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    @property
    def record_value(self) -> str:
        return f"v=DKIM1; k=rsa; p={self.public_b64}"


def valid_selector(selector: str) -> bool:
    return bool(_SELECTOR.fullmatch(selector))


def generate(domain: str, selector: str, bits: int = 2048) -> DkimKey:
    private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = private.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    der = private.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    return DkimKey(domain, selector, pem, base64.b64encode(der).decode())


def sign(data: bytes, key: DkimKey) -> bytes:
    """``data`` with a DKIM-Signature header in front."""
    signature = dkim.sign(
        data, key.selector.encode(), key.domain.encode(), key.private_pem,
        canonicalize=(b"relaxed", b"relaxed"), include_headers=SIGNED_HEADERS,
    )
    return bytes(signature) + data


def verify(data: bytes, key: DkimKey) -> bool:
    """Check a signed message against the key's public record, as a receiver would after
    looking up DNS (no network: the record is the one we tell the administrator to
    publish)."""
    record = key.record_value.encode()

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return record if name.decode().rstrip(".") == key.record_name else b""

    return bool(dkim.verify(data, dnsfunc=dnsfunc))


def from_domain(data: bytes) -> str | None:
    """The domain of the From header of stored message bytes."""
    addresses = read_submitted(data).from_addresses
    if not addresses:
        return None
    return addresses[0].rpartition("@")[2].lower() or None
