"""OAuth2 access tokens for XOAUTH2 (Microsoft 365, Google Workspace), whose basic SMTP
authentication is being retired.

Microsoft 365 uses the client-credentials flow (tenant, application id, and a secret or a
certificate: see :mod:`postier.delivery.client_certificate`; the application needs the
SMTP.SendAsApp permission with an administrator's consent, and the mailbox must allow it);
Google Workspace a refresh token (client id and secret). Tokens are cached per process and
refreshed two minutes before they expire, so a relay conversation never waits for the token
service when it does not have to.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import httpx

from postier.core.settings import OAuth2Provider, RelaySettings
from postier.delivery.client_certificate import ASSERTION_TYPE
from postier.delivery.tls import tls_context
from postier.errors import DeliveryError
from postier.i18n import N_

MICROSOFT_SCOPE = "https://outlook.office365.com/.default"
GOOGLE_TOKEN_URL = "https://oauth2.googleapis.com/token"  # noqa: S105 - an address
REFRESH_AHEAD = 120.0

_cache: dict[str, tuple[str, float]] = {}
# Entra ID's answers to an assertion signed with a certificate it does not know (700027:
# not registered on the application; 50012: invalid signature).
_ASSERTION_REFUSED = ("AADSTS700027", "AADSTS50012")


def token_url(relay: RelaySettings) -> str:
    if relay.oauth2_token_url:
        return relay.oauth2_token_url
    if relay.oauth2_provider == OAuth2Provider.GOOGLE:
        return GOOGLE_TOKEN_URL
    return f"https://login.microsoftonline.com/{relay.oauth2_tenant}/oauth2/v2.0/token"


def _form(relay: RelaySettings) -> dict[str, str]:
    if relay.oauth2_provider == OAuth2Provider.GOOGLE:
        return {"grant_type": "refresh_token", "client_id": relay.oauth2_client_id,
                "client_secret": relay.oauth2_client_secret or "",
                "refresh_token": relay.oauth2_refresh_token or ""}
    form = {"grant_type": "client_credentials", "client_id": relay.oauth2_client_id,
            "scope": MICROSOFT_SCOPE}
    pair = relay.certificate_credentials()
    if pair is not None:  # certificate credentials: a signed assertion, no secret sent
        form["client_assertion_type"] = ASSERTION_TYPE
        form["client_assertion"] = pair.assertion(relay.oauth2_client_id, token_url(relay))
    else:
        form["client_secret"] = relay.oauth2_client_secret or ""
    return form


def _key(relay: RelaySettings) -> str:
    parts = [token_url(relay), relay.oauth2_client_id, relay.oauth2_client_secret or "",
             relay.oauth2_refresh_token or "", relay.oauth2_private_key or "",
             relay.oauth2_certificate or ""]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _refused(relay: RelaySettings, doc: dict[str, Any], status: int) -> DeliveryError:
    error = str(doc.get("error") or f"HTTP {status}")
    description = str(doc.get("error_description") or "").split("\r\n")[0][:300]
    pair = (relay.certificate_credentials()
            if relay.oauth2_provider == OAuth2Provider.MICROSOFT else None)
    if pair is not None and any(code in description for code in _ASSERTION_REFUSED):
        hint = N_("The certificate Postier signs with is not registered on the application: "
                  "in Entra ID, open App registrations, the application, Certificates & "
                  "secrets, Certificates, and upload this certificate (its thumbprint is "
                  "{thumbprint}); or paste here the key and certificate of the one "
                  "registered there.")
    elif pair is not None and "AADSTS700024" in description:
        hint = N_("The certificate's signature was refused as out of its time range: set "
                  "this server's clock right (NTP).")
    elif "consent" in description.lower() or "AADSTS65001" in description \
            or error == "unauthorized_client":
        hint = N_("An administrator of the tenant must grant consent to the application "
                  "(permission SMTP.SendAsApp) and allow it on the mailbox.")
    elif error == "invalid_grant":
        hint = N_("The refresh token was revoked or has expired: create a new one.")
    elif pair is not None:
        hint = N_("Check the application (client) id and that the certificate registered "
                  "on it in Entra ID is this one (thumbprint {thumbprint}) and still "
                  "valid.")
    else:
        hint = N_("Check the application (client) id and its secret; a client secret "
                  "expires and must then be renewed.")
    extra = {"thumbprint": pair.thumbprint} if pair is not None else {}
    return DeliveryError(
        N_("The OAuth2 token service refused this server's credentials: {error} "
           "{description}"),
        hint=hint, code="oauth2_refused", transient=True, step="auth",
        reply=f"{error} {description}".strip(), error=error, description=description,
        **extra,
    )


async def access_token(relay: RelaySettings) -> str:
    """A valid access token for ``relay`` (cached until shortly before it expires)."""
    key = _key(relay)
    cached = _cache.get(key)
    now = time.time()
    if cached is not None and cached[1] - REFRESH_AHEAD > now:
        return cached[0]
    url = token_url(relay)
    try:
        async with httpx.AsyncClient(timeout=float(relay.timeout),
                                     verify=tls_context(relay)) as client:
            r = await client.post(url, data=_form(relay))
    except httpx.HTTPError as exc:
        raise DeliveryError(
            N_("The OAuth2 token service {url} cannot be reached: {reason}."),
            hint=N_("Check this server's connection to the Internet and the token URL."),
            code="oauth2_unreachable", transient=True, step="auth",
            reply=str(exc), url=url, reason=str(exc) or type(exc).__name__,
        ) from exc
    try:
        doc = r.json()
    except ValueError:
        doc = {}
    if r.status_code != 200 or "access_token" not in doc:
        raise _refused(relay, doc if isinstance(doc, dict) else {}, r.status_code)
    token = str(doc["access_token"])
    _cache[key] = (token, now + float(doc.get("expires_in", 3600)))
    return token


def forget(relay: RelaySettings) -> None:
    """Drop a token the relay refused (it may have been revoked before it expired)."""
    _cache.pop(_key(relay), None)
