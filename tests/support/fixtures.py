"""Pytest fixtures for the fault-injecting SMTP relay.

Enabled project-wide with ``pytest_plugins = ["support.fixtures"]`` in
``tests/conftest.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .certs import make_self_signed
from .relay import FaultRelay, blackhole_port
from .relay import closed_port as _closed_port

AUTH_USERS = {"teacher": "s3cret"}


@pytest.fixture(scope="session")
def relay_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(cert_path, key_path)`` of the session's self-signed localhost/127.0.0.1 cert."""
    return make_self_signed(tmp_path_factory.mktemp("relay-certs"))


def _running(relay: FaultRelay) -> Iterator[FaultRelay]:
    with relay:
        yield relay


@pytest.fixture
def relay(relay_cert: tuple[Path, Path]) -> Iterator[FaultRelay]:
    """Plain SMTP relay (no TLS, no AUTH)."""
    yield from _running(FaultRelay(cert=relay_cert))


@pytest.fixture
def tls_relay(relay_cert: tuple[Path, Path]) -> Iterator[FaultRelay]:
    """Relay requiring STARTTLS before MAIL; trust ``tls_relay.cert_path``."""
    yield from _running(FaultRelay(tls="starttls", cert=relay_cert))


@pytest.fixture
def implicit_tls_relay(relay_cert: tuple[Path, Path]) -> Iterator[FaultRelay]:
    """Relay speaking TLS from the first byte (SMTPS)."""
    yield from _running(FaultRelay(tls="implicit", cert=relay_cert))


@pytest.fixture
def auth_relay(relay_cert: tuple[Path, Path]) -> Iterator[FaultRelay]:
    """Plain relay requiring AUTH (PLAIN/LOGIN) as teacher / s3cret."""
    yield from _running(FaultRelay(auth=dict(AUTH_USERS), cert=relay_cert))


@pytest.fixture
def blackhole() -> Iterator[int]:
    """Port that accepts TCP connections and never answers."""
    with blackhole_port() as port:
        yield port


@pytest.fixture
def closed_port() -> int:
    """Port on 127.0.0.1 where nothing listens."""
    return _closed_port()
