"""Self-signed TLS certificate for the test SMTP relay.

The key pair and certificate are generated once per test session (process) and
written into whatever directory callers ask for. The certificate is valid for
``localhost``, ``127.0.0.1`` and ``::1``, so clients can verify it with a context
that trusts only ``cert_path``::

    ctx = ssl.create_default_context(cafile=cert_path)
"""

from __future__ import annotations

import atexit
import datetime as dt
import ipaddress
import os
import shutil
import tempfile
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CERT_FILENAME = "relay-cert.pem"
KEY_FILENAME = "relay-key.pem"

_lock = threading.Lock()
_pem: tuple[bytes, bytes] | None = None
_default_dir: Path | None = None


def _generate() -> tuple[bytes, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "localhost"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Postier test relay"),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert_pem, key_pem


def _pem_pair() -> tuple[bytes, bytes]:
    global _pem
    with _lock:
        if _pem is None:
            _pem = _generate()
        return _pem


def make_self_signed(tmpdir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write the session's self-signed cert and key into ``tmpdir``.

    Returns ``(cert_path, key_path)``. The key pair is generated only once per
    process; later calls just (re)write the same PEM files.
    """
    cert_pem, key_pem = _pem_pair()
    directory = Path(tmpdir)
    directory.mkdir(parents=True, exist_ok=True)
    cert_path = directory / CERT_FILENAME
    key_path = directory / KEY_FILENAME
    with _lock:
        if not cert_path.exists() or cert_path.read_bytes() != cert_pem:
            cert_path.write_bytes(cert_pem)
        if not key_path.exists() or key_path.read_bytes() != key_pem:
            key_path.write_bytes(key_pem)
            key_path.chmod(0o600)
    return cert_path, key_path


def default_cert_dir() -> Path:
    """A per-process temporary directory (removed at exit) for relays built outside pytest."""
    global _default_dir
    with _lock:
        if _default_dir is None:
            _default_dir = Path(tempfile.mkdtemp(prefix="postier-relay-certs-"))
            atexit.register(shutil.rmtree, _default_dir, ignore_errors=True)
        return _default_dir
