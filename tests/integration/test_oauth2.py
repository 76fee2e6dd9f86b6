"""XOAUTH2 against a local token endpoint and a relay that checks the exchange."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from postier import diagnose
from postier.delivery import oauth2
from postier.settings import RelaySettings

from support.oauth import TokenEndpoint
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
