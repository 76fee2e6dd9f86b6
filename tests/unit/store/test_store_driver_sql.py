"""The delivery path's statements written for the driver: placeholders per backend."""

from __future__ import annotations

from postier.core.settings import DeliverySettings
from postier.delivery.attempt import _retry_policy
from postier.store.sql import _driver_sql


def test_sqlite_keeps_question_marks() -> None:
    sql = "UPDATE messages SET status = ? WHERE id = ? AND lease_owner = ?"
    assert _driver_sql(sql, "sqlite") == sql


def test_postgresql_numbers_each_parameter_in_order() -> None:
    assert _driver_sql("UPDATE m SET a = ?, b = ? WHERE id = ANY(?)", "postgresql") == (
        "UPDATE m SET a = $1, b = $2 WHERE id = ANY($3)"
    )
    assert _driver_sql("SELECT 1", "postgresql") == "SELECT 1"


def test_retry_policy_follows_the_settings_values() -> None:
    settings = DeliverySettings()
    first = _retry_policy(settings)
    assert _retry_policy(settings) is first
    settings.retry.max_age = 3600
    changed = _retry_policy(settings)
    assert changed.max_age == 3600.0
    assert changed.first_delay == float(settings.retry.first_delay)
