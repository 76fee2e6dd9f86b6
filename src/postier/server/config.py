"""Server configuration: one typed model fed by defaults, environment and command line.

Every option can be set as ``POSTIER_<NAME>`` (e.g. ``POSTIER_DATA_DIR``); command-line
flags override the environment.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from postier.core.settings import RelaySettings


class ServerConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="POSTIER_", extra="ignore")

    data_dir: Path = Field(Path("postier-data"), description="Where the queue and keys live")
    database_url: str | None = Field(None, description="Default: SQLite in the data dir")
    http: str = Field("127.0.0.1:8025", description="HOST:PORT of the HTTP API")
    hostname: str = Field(default_factory=socket.getfqdn, description="Name used in Message-IDs")
    max_message_size: int = Field(25 * 1024 * 1024, ge=1024)
    max_request_size: int | None = Field(
        None, ge=1024,
        description="Largest HTTP request body accepted (bytes); larger ones get 413 before "
        "they are read. Default: a message of max_message_size in JSON (base64: 4/3) plus "
        "2 MiB",
    )
    delivery: bool = Field(True, description="Run delivery workers in this process")
    delivery_processes: int | None = Field(
        None, ge=0, le=32,
        description="Deliver in this many child processes of postier serve (0: in its own "
        "process). Default: 1 on a machine with two cores or more, so that acceptance and "
        "delivery each have one; else 0",
    )
    http_processes: int = Field(
        1, ge=1, le=64,
        description="Processes answering the HTTP API and the web pages on the same port "
        "(postier serve); SMTP submission, delivery, alerts and retention stay in the first",
    )
    relay_concurrency: int = Field(4, ge=1, le=100, description="Connections per relay")
    claim_batch: int = Field(64, ge=1, le=1000)
    # A worker renews its leases every quarter of this (its heartbeat): a dead one's
    # e-mails go back to the queue this long after its last renewal.
    lease_seconds: float = Field(20.0, ge=2)
    poll_interval: float = Field(1.0, gt=0, description="Seconds between queue polls")
    idle_timeout: float = Field(30.0, gt=0, description="Close idle relay connections after")
    smtp: str = Field("127.0.0.1:2587", description="SMTP submission (STARTTLS), or off")
    smtps: str = Field("off", description="SMTP submission with implicit TLS, or off")
    tls_cert: Path | None = Field(None, description="Certificate for SMTP submission")
    tls_key: Path | None = Field(None, description="Its private key")
    smtp_trusted_networks: str = Field(
        "", description="Networks that may submit without AUTH, comma-separated CIDR"
    )
    smtp_trusted_account: str | None = Field(
        None, description="The account trusted networks submit for"
    )
    bounce_smtp: str = Field(
        "off", description="HOST:PORT of the bounce SMTP door (mail for return addresses), "
        "or off")
    dns_servers: str = Field(
        "", description="DNS servers of the domain check (host:port, comma-separated); "
        "default: the system's resolvers")
    smtp_max_recipients: int = Field(100, ge=1, le=10000)
    smtp_max_connections: int = Field(200, ge=1)
    smtp_rate_per_minute: int = Field(600, ge=1, description="Messages per account")
    # The submission pace (pace.py): recipients queued through the HTTP API and SMTP
    # submission together, counted by every process of the installation; 0: no limit.
    pace_account_per_minute: int = Field(
        1000, ge=0, description="Recipients an account may queue per clock minute")
    pace_account_per_day: int = Field(
        10_000, ge=0, description="Recipients an account may queue per UTC day")
    pace_establishment_per_minute: int = Field(
        5000, ge=0, description="Recipients an establishment may queue per clock minute")
    pace_establishment_per_day: int = Field(
        50_000, ge=0, description="Recipients an establishment may queue per UTC day")
    platform_relay: RelaySettings | None = Field(
        None, description="Hosting: the relay hosted establishments send through (JSON)"
    )
    platform_sender_domain: str = Field(
        "", description="Hosting: domain of hosted establishments' default sender address"
    )
    hosted_allowed_networks: str = Field(
        "", description="Hosting: networks (CIDR, comma-separated) a hosted establishment's "
        "relay, OAuth2 token URL and webhook may lead to although loopback or private "
        "(refused otherwise); 0.0.0.0/0,::/0 allows every address"
    )

    @field_validator("hosted_allowed_networks")
    @classmethod
    def _hosted_allowed_networks(cls, value: str) -> str:
        networks(value, "POSTIER_HOSTED_ALLOWED_NETWORKS")  # a bad CIDR stops the start-up
        return value

    # -- operations: metrics access and background retention ---------------------------
    metrics_token: str | None = Field(
        None, description="Bearer token that may read GET /metrics from any address"
    )
    metrics_allow: str = Field(
        "127.0.0.1/32,::1/128",
        description="Addresses (CIDR, comma-separated) that may read GET /metrics without "
        "the token",
    )
    retention_interval: float = Field(
        3600.0, ge=1, description="Seconds between two background purges of old e-mails"
    )

    @field_validator("metrics_allow")
    @classmethod
    def _metrics_allow(cls, value: str) -> str:
        metrics_networks(value)  # refuse a bad CIDR at start-up, not at the first scrape
        return value

    # -- end of operations -------------------------------------------------------------

    def delivery_process_count(self) -> int:
        """How many delivery processes ``postier serve`` starts (``delivery_processes``,
        else one when this process may run on two cores or more)."""
        if self.delivery_processes is not None:
            return self.delivery_processes
        return 1 if usable_cores() >= 2 else 0

    def request_size_limit(self) -> int:
        """The largest request body the HTTP server reads (``max_request_size``, else the
        largest legitimate request: an e-mail of ``max_message_size`` in JSON, where base64
        makes its bytes 4/3 larger, with its envelope and up to 1,000 recipients)."""
        if self.max_request_size is not None:
            return self.max_request_size
        return self.max_message_size * 4 // 3 + 2 * 1024 * 1024

    def http_host_port(self) -> tuple[str, int]:
        return split_host_port(self.http, 8025)


def networks(value: str, name: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """The networks of a setting of comma- or space-separated CIDR (``name`` for the error)."""
    try:
        return [ipaddress.ip_network(part, strict=False)
                for part in value.replace(",", " ").split()]
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from exc


def metrics_networks(value: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """The networks of ``POSTIER_METRICS_ALLOW`` (comma- or space-separated CIDR)."""
    try:
        return [ipaddress.ip_network(part, strict=False)
                for part in value.replace(",", " ").split()]
    except ValueError as exc:
        raise ValueError(f"POSTIER_METRICS_ALLOW: {exc}") from exc


def split_host_port(value: str, default_port: int) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host:
        return value or "127.0.0.1", default_port
    return host.strip("[]"), int(port)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and
    ``taskset`` narrow), not merely those of the machine."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1
