"""Operations pieces without a server: the Prometheus text, the retention settings and
dates, the greeting date the doctor compares clocks with."""

from __future__ import annotations

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from postier.core.settings import DeliverySettings, RetentionSettings
from postier.ops import metrics, retention
from postier.ops.doctor import exit_status, greeting_date
from postier.server.config import ServerConfig


def test_exposition_is_valid_prometheus_text() -> None:
    totals = metrics.Tally(accepted={1: 7, 2: 0}, outcomes={(1, "sent"): 5, (1, "failed"): 2})
    totals.buckets[0], totals.buckets[-1] = 4, 1
    totals.latency_sum = 86400.75
    snap = metrics.Snapshot(
        establishments={1: "default", 2: 'lycée "Jean\\Moulin"\n'},
        totals=totals, queue={"queued": 1, "sending": 0, "deferred": 3},
        oldest_waiting=1000.0, relays={"smtp.ac-lyon.fr:587": True, "10.0.0.1:25": False},
        delivery="running",
    )
    families = {f.name: f for f in text_string_to_metric_families(metrics.render(snap, 1060.5))}
    sample = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for f in families.values() for s in f.samples}
    assert families["postier_messages_accepted"].type == "counter"
    assert families["postier_delivery_latency_seconds"].type == "histogram"
    assert sample[("postier_messages_accepted_total",
                   (("establishment", 'lycée "Jean\\Moulin"\n'),))] == 0
    assert sample[("postier_messages_sent_total", (("establishment", "default"),))] == 5
    assert sample[("postier_messages_deferred_total", (("establishment", "default"),))] == 0
    assert sample[("postier_queue_depth", (("status", "deferred"),))] == 3
    assert sample[("postier_oldest_queued_age_seconds", ())] == 60.5
    assert sample[("postier_relay_up", (("relay", "10.0.0.1:25"),))] == 0
    assert sample[("postier_delivery_latency_seconds_bucket", (("le", "0.25"),))] == 4
    assert sample[("postier_delivery_latency_seconds_bucket", (("le", "432000"),))] == 4
    assert sample[("postier_delivery_latency_seconds_bucket", (("le", "+Inf"),))] == 5
    assert sample[("postier_delivery_latency_seconds_count", ())] == 5
    assert sample[("postier_delivery_latency_seconds_sum", ())] == 86400.75


def test_purge_tallies_from_another_bucket_layout_are_never_undercounted() -> None:
    doc = {"accepted": 3, "sent": 2, "latency": {"le": [0.3, 7200], "counts": [1, 1, 0],
                                                 "sum": 7000.0}}
    tally = metrics.Tally.load(4, doc)
    assert tally.accepted == {4: 3} and tally.outcomes[(4, "sent")] == 2
    les = [*metrics.LATENCY_BUCKETS, math.inf]
    assert les[tally.buckets.index(1)] == 0.5  # 0.3 s goes to the 0.5 s bucket
    assert les[len(tally.buckets) - 1 - tally.buckets[::-1].index(1)] == 4 * 3600


def test_retention_settings() -> None:
    assert DeliverySettings().retention == RetentionSettings(body_days=30, metadata_days=365)
    updated = DeliverySettings().updated({"retention": {"body_days": 7}})
    assert updated.retention.body_days == 7 and updated.retention.metadata_days == 365
    with pytest.raises(ValidationError, match="body_days"):
        DeliverySettings().updated({"retention": {"body_days": 400}})
    with pytest.raises(ValidationError):
        RetentionSettings(metadata_days=0)


def test_retention_dates() -> None:
    r = RetentionSettings(body_days=30, metadata_days=365)
    final = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
    assert retention.body_removal(r, final) == final + 30 * 86400
    removal = retention.metadata_removal(r, final)
    assert removal % 86400 == 0 and removal - final - 365 * 86400 < 86400
    # The purge's cut-off agrees with the date announced to the person.
    assert retention.metadata_cutoff(r, removal) > final
    assert retention.metadata_cutoff(r, removal - 1) <= final


def test_metrics_allow_is_checked_at_start() -> None:
    assert ServerConfig(metrics_allow="10.0.0.0/8, ::1").metrics_allow
    with pytest.raises(ValidationError, match="POSTIER_METRICS_ALLOW"):
        ServerConfig(metrics_allow="10.0.0.0/33")


def test_greeting_date_and_exit_status() -> None:
    when = greeting_date("220 mx.ac-lyon.fr ESMTP Sendmail; Tue, 3 Dec 2024 10:00:00 +0100")
    assert when == 1733216400.0
    assert greeting_date("220 mx.ac-lyon.fr ESMTP Postfix") is None
    from postier.ops.doctor import Check

    assert exit_status([Check("a", "A", "ok", "")]) == 0
    assert exit_status([Check("a", "A", "warn", ""), Check("b", "B", "ok", "")]) == 1
    assert exit_status([Check("a", "A", "warn", ""), Check("b", "B", "fail", "")]) == 2
