"""Durable storage: one interface (:mod:`postier.store.base`), one module per backend."""

from __future__ import annotations

from pathlib import Path

from postier.store.base import ROLES, Store


def database_url(data_dir: Path, url: str | None = None) -> str:
    """The URL to use: an explicit one, else the embedded SQLite file in ``data_dir``."""
    if url:
        if url.startswith("postgresql://") or url.startswith("postgres://"):
            return "postgresql+asyncpg://" + url.split("://", 1)[1]
        if url.startswith("sqlite:///"):
            return "sqlite+aiosqlite:///" + url[len("sqlite:///") :]
        return url
    return f"sqlite+aiosqlite:///{data_dir / 'postier.db'}"


def create_store(url: str, role: str = "all") -> Store:
    """The store at ``url``, for a process that does ``role`` with it (``base.ROLES``)."""
    if role not in ROLES:
        raise ValueError(f"unknown store role {role!r}: one of {', '.join(ROLES)}")
    if url.startswith("sqlite"):
        from postier.store.sqlite import SQLiteStore

        return SQLiteStore(url, role)
    if url.startswith("postgresql"):
        from postier.store.postgres import PostgresStore

        return PostgresStore(url)
    raise ValueError(f"unsupported database URL {url!r}: use sqlite:/// or postgresql://")
