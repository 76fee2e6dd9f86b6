"""XOAUTH2 against a local token endpoint and a relay that checks the exchange."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from postier.core.relay_warnings import settings_warnings
from postier.core.service import Postier
from postier.core.settings import DeliverySettings, RelaySettings
from postier.delivery import diagnose, oauth2
from postier.ops import alerts
from postier.server.config import ServerConfig
from postier.server.web.forms import field_errors

from support.oauth import ASSERTION_TYPE, TokenEndpoint, make_certificate
from support.relay import FaultRelay


@pytest.fixture
def oauth_relay() -> Iterator[FaultRelay]:
    with FaultRelay(auth={}) as relay:  # AUTH required; only XOAUTH2 tokens succeed
        relay.oauth_tokens = {"secretariat@clg.fr": "tok-1"}
        yield relay
    oauth2._cache.clear()


def _relay(relay: FaultRelay, endpoint: TokenEndpoint, **kw: str) -> RelaySettings:
    return RelaySettings.model_validate({
        "host": relay.host, "port": relay.port, "security": "none", "auth": "oauth2",
        "username": "secretariat@clg.fr", "timeout": 5, "oauth2_provider": "microsoft",
        "oauth2_tenant": "tenant", "oauth2_client_id": "app-id",
        "oauth2_client_secret": "app-secret", "oauth2_token_url": endpoint.url, **kw,
    })


async def _test(settings: RelaySettings, lang: str = "en") -> diagnose.TestReport:
    return await diagnose.test_send(settings, to="p@example.org", sender_name="Collège",
                                    sender_address="secretariat@clg.fr", lang=lang)


async def test_microsoft_client_credentials_then_xoauth2(
    oauth_relay: FaultRelay, token_endpoint: TokenEndpoint
) -> None:
    report = await _test(_relay(oauth_relay, token_endpoint))
    assert report.ok, report.error
    (req,) = token_endpoint.requests
    assert req["grant_type"] == "client_credentials" and req["client_id"] == "app-id"
    assert req["scope"] == "https://outlook.office365.com/.default"
    assert oauth_relay.messages[0].auth_user == "secretariat@clg.fr"
    # The token is cached: a second conversation does not ask again.
    assert (await _test(_relay(oauth_relay, token_endpoint))).ok
    assert len(token_endpoint.requests) == 1


async def test_google_refresh_token(oauth_relay: FaultRelay,
                                    token_endpoint: TokenEndpoint) -> None:
    settings = _relay(oauth_relay, token_endpoint, oauth2_provider="google",
                      oauth2_refresh_token="refresh-1")
    assert (await _test(settings)).ok
    req = token_endpoint.requests[0]
    assert req["grant_type"] == "refresh_token" and req["refresh_token"] == "refresh-1"


async def test_token_refreshed_ahead_of_expiry(oauth_relay: FaultRelay,
                                              token_endpoint: TokenEndpoint) -> None:
    token_endpoint.expires_in = 60  # less than the two minutes kept in hand
    assert (await _test(_relay(oauth_relay, token_endpoint))).ok
    assert (await _test(_relay(oauth_relay, token_endpoint))).ok
    assert len(token_endpoint.requests) == 2


async def test_missing_consent_is_explained(oauth_relay: FaultRelay,
                                            token_endpoint: TokenEndpoint) -> None:
    token_endpoint.error = (400, {
        "error": "invalid_grant",
        "error_description": "AADSTS65001: The user or administrator has not consented "
                             "to use the application.",
    })
    report = await _test(_relay(oauth_relay, token_endpoint), lang="fr")
    assert not report.ok and report.error is not None
    assert report.error["code"] == "oauth2_refused"
    assert "AADSTS65001" in report.error["message"]
    assert "consentement" in (report.error["hint"] or "")
    assert report.steps[-1].step == "auth"


async def test_token_the_relay_refuses(oauth_relay: FaultRelay,
                                       token_endpoint: TokenEndpoint) -> None:
    token_endpoint.token = "revoked"
    report = await _test(_relay(oauth_relay, token_endpoint))
    assert not report.ok and report.error["code"] == "auth_failed"
    # The refused token is forgotten: the next try asks the token service again.
    token_endpoint.token = "tok-1"
    assert (await _test(_relay(oauth_relay, token_endpoint))).ok


def test_secrets_are_write_only() -> None:
    s = RelaySettings(auth="oauth2", oauth2_client_secret="Zq-secret-9",
                      oauth2_refresh_token="Rt-token-7")
    public = s.public()
    assert "oauth2_client_secret" not in public and public["oauth2_client_secret_set"]
    assert "Zq-secret-9" not in str(public) and "Rt-token-7" not in str(public)


# -- Microsoft's certificate credentials (client assertion, RFC 7523) ----------------------


@pytest.fixture(scope="module")
def certificate() -> tuple[str, str]:
    return make_certificate("Postier Collège")


def _cert_relay(relay: FaultRelay, endpoint: TokenEndpoint, pair: tuple[str, str]
                ) -> RelaySettings:
    return _relay(relay, endpoint, oauth2_client_secret="", oauth2_private_key=pair[0],
                  oauth2_certificate=pair[1])


async def test_microsoft_certificate_credentials(
    oauth_relay: FaultRelay, token_endpoint: TokenEndpoint, certificate: tuple[str, str]
) -> None:
    token_endpoint.certificates["app-id"] = certificate[1]
    report = await _test(_cert_relay(oauth_relay, token_endpoint, certificate))
    assert report.ok, report.error
    (req,) = token_endpoint.requests
    assert "client_secret" not in req, "certificate credentials send no secret"
    assert req["client_assertion_type"] == ASSERTION_TYPE
    assert req["grant_type"] == "client_credentials"
    (header, claims), = token_endpoint.assertions  # verified by the endpoint
    assert claims["aud"] == token_endpoint.url and claims["sub"] == "app-id"
    assert 0 < claims["exp"] - claims["nbf"] <= 600, "an assertion lives a few minutes"
    assert header["x5t"], "Entra ID also reads the SHA-1 thumbprint"
    assert oauth_relay.messages[0].auth_user == "secretariat@clg.fr"


async def test_certificate_not_registered_is_explained(
    oauth_relay: FaultRelay, token_endpoint: TokenEndpoint, certificate: tuple[str, str]
) -> None:
    token_endpoint.certificates["app-id"] = make_certificate("Another one")[1]
    settings = _cert_relay(oauth_relay, token_endpoint, certificate)
    report = await _test(settings, lang="fr")
    assert not report.ok and report.error is not None
    assert report.error["code"] == "oauth2_refused" and report.steps[-1].step == "auth"
    assert "AADSTS700027" in report.error["message"]
    hint = report.error["hint"] or ""
    thumbprint = settings.certificate_credentials().thumbprint  # type: ignore[union-attr]
    assert "Entra ID" in hint and "Certificats" in hint and thumbprint in hint, hint
    shown = report.model_dump_json() if hasattr(report, "model_dump_json") else str(report)
    assert "PRIVATE KEY" not in shown and certificate[0].splitlines()[1] not in shown
    assert oauth_relay.messages == []


def test_certificate_pair_checked_when_saved(certificate: tuple[str, str]) -> None:
    _other_key, other_cert = make_certificate("Other")
    ec_key, ec_cert = make_certificate("EC", kind="ec")
    cases = {
        (certificate[0], other_cert): ("ne correspond pas", "does not match"),
        (ec_key, ec_cert): ("pas une clé RSA", "not an RSA key"),
        (certificate[0], ""): ("certificat aussi", "certificate too"),
        ("not a key", certificate[1]): ("pas une clé privée", "not a private key"),
    }
    for (key, cert), (fr, en) in cases.items():
        for lang, words in (("fr", fr), ("en", en)):
            with pytest.raises(ValidationError) as caught:
                DeliverySettings().updated({"relay": {
                    "auth": "oauth2", "oauth2_private_key": key, "oauth2_certificate": cert}})
            errors = field_errors(caught.value, lang)
            assert "relay.oauth2_private_key" in errors, errors
            assert words in errors["relay.oauth2_private_key"], errors
    ok = DeliverySettings().updated({"relay": {
        "auth": "oauth2", "oauth2_private_key": certificate[0],
        "oauth2_certificate": certificate[1]}})
    # Kept when another field changes, removed together with "".
    kept = ok.updated({"relay": {"oauth2_client_id": "new-id"}})
    assert kept.relay.certificate_credentials() is not None
    gone = ok.updated({"relay": {"oauth2_private_key": "", "oauth2_certificate": ""}})
    assert gone.relay.certificate_credentials() is None


def test_certificate_expiry_warned(certificate: tuple[str, str]) -> None:
    key, cert = make_certificate("Soon", days=10)
    settings = DeliverySettings().updated({"relay": {
        "auth": "oauth2", "oauth2_private_key": key, "oauth2_certificate": cert}})
    date = settings.relay.oauth2_expiries()[0][1]
    assert date == dt.date.today() + dt.timedelta(days=10)
    (warning,) = settings_warnings(settings, "fr")
    assert "certificat" in warning and date.isoformat() in warning
    condition = alerts._expiry(settings, time.time())
    assert isinstance(condition, alerts.Firing), "14 days ahead by default"
    later = DeliverySettings().updated({"relay": {
        "auth": "oauth2", "oauth2_private_key": certificate[0],
        "oauth2_certificate": certificate[1]}})
    assert settings_warnings(later) == []


async def test_certificate_write_only_and_encrypted_at_rest(
    tmp_path: Path, certificate: tuple[str, str]
) -> None:
    core = Postier(ServerConfig(data_dir=tmp_path, hostname="clg.fr"))
    await core.open()
    try:
        admin = await core.add_user("direction", "direction@clg.fr", role="admin")
        await core.put_settings(admin, {"relay": {
            "host": "smtp.office365.com", "auth": "oauth2", "oauth2_client_id": "app-id",
            "oauth2_private_key": certificate[0], "oauth2_certificate": certificate[1]}})
        shown = await core.get_settings(admin)
        assert shown["relay"]["oauth2_private_key_set"] is True
        assert shown["relay"]["oauth2_certificate_set"] is True
        body = certificate[0].splitlines()[1]
        assert body not in json.dumps(shown) and "BEGIN CERTIFICATE" not in json.dumps(shown)
        # What GET shows can be PUT back: the pair stays.
        await core.put_settings(admin, {"relay": shown["relay"]})
        stored = await core.stored_settings(admin.establishment_id)
        assert stored.relay.oauth2_private_key == certificate[0]
    finally:
        await core.close()
    raw = _all_bytes(tmp_path)  # the store, its journal, everything on disk
    assert body.encode() not in raw and b"PRIVATE KEY" not in raw


def _all_bytes(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in directory.rglob("*") if p.is_file())
