"""The configuration part of the store: each establishment's settings, sending profiles,
DKIM keys and the domains they hold, the audit log and the installation's own values
(``meta``)."""

from __future__ import annotations

from typing import Any, Protocol

from postier.store.records import AuditEntry, ProfileRecord


class ConfigurationStore(Protocol):
    """What administrators set, and the trace of what they did."""

    # -- settings --------------------------------------------------------------------------
    async def load_settings(self, establishment_id: int) -> tuple[dict[str, Any], float] | None:
        """The stored settings document and its update time, or None."""

    async def save_settings(self, establishment_id: int, data: dict[str, Any]) -> None: ...

    async def all_settings(self) -> dict[int, dict[str, Any]]:
        """Every establishment's stored settings document (secrets still encrypted)."""

    # -- sending profiles ------------------------------------------------------------------
    async def create_profile(
        self, establishment_id: int, label: str, data: dict[str, Any]
    ) -> ProfileRecord:
        """Raises Conflict when the label is taken in the establishment."""

    async def update_profile(self, profile_id: int, label: str, data: dict[str, Any]) -> None: ...

    async def delete_profile(self, profile_id: int) -> bool: ...

    async def get_profile(self, profile_id: int) -> ProfileRecord | None: ...

    async def list_profiles(self, establishment_id: int) -> list[ProfileRecord]: ...

    async def record_retrieval(self, profile_id: int, user_id: int) -> None: ...

    # -- audit log -------------------------------------------------------------------------
    async def audit(
        self,
        establishment_id: int,
        actor: str,
        action: str,
        target: str = "",
        details: dict[str, Any] | None = None,
    ) -> None:
        """Append to the audit log (never give it a secret's value)."""

    async def list_audit(self, establishment_id: int, limit: int = 200) -> list[AuditEntry]: ...

    # -- the installation's own values -----------------------------------------------------
    async def get_meta(self, key: str) -> str | None: ...

    async def set_meta(self, key: str, value: str) -> None: ...

    async def swap_meta(self, key: str, expected: str, value: str) -> bool:
        """Set ``key`` to ``value`` only if it still holds ``expected``, in one step:
        whether it did (of two processes swapping the same value, one wins)."""

    # -- DKIM keys -------------------------------------------------------------------------
    async def save_dkim_key(
        self, establishment_id: int, domain: str, selector: str, private_enc: str,
        public_b64: str,
    ) -> None:
        """Create or replace the key of a domain."""

    async def list_dkim_keys(self, establishment_id: int) -> list[dict[str, Any]]: ...

    async def delete_dkim_key(self, establishment_id: int, domain: str) -> bool: ...

    # -- domains of a hosted installation: see postier.core.domains ------------------------
    async def all_dkim_domains(self) -> list[tuple[int, str]]:
        """(establishment id, domain) of every DKIM key of the installation."""

    async def move_dkim_key(self, from_id: int, to_id: int, domain: str) -> bool:
        """Give ``from_id``'s key of ``domain`` to ``to_id``, unless ``to_id`` has one (then
        ``from_id``'s is deleted); True when ``from_id`` had one."""
