"""A real OAuth2 token endpoint on 127.0.0.1 for the XOAUTH2 tests (client credentials and
refresh tokens), told what to answer and recording what it was asked.

A client assertion (Microsoft's certificate credentials, RFC 7523) is verified as Entra ID
does, independently of Postier's code: the RS256 signature with the public key of the
certificate registered for the client id, the thumbprint header, aud, iss, sub, the time
claims and a jti never seen before; anything wrong is refused with Entra ID's error codes.
"""

from __future__ import annotations

import base64
import datetime
import json
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def make_certificate(name: str = "Postier", days: int = 365, kind: str = "rsa"
                     ) -> tuple[str, str]:
    """A new self-signed certificate and its private key, as an administrator makes them
    for Entra ID: ``(key PEM, certificate PEM)``; ``kind="ec"`` for a key Microsoft
    refuses."""
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048) if kind == "rsa"
        else ec.generate_private_key(ec.SECP256R1()))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=days))
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    return key_pem, cert.public_bytes(serialization.Encoding.PEM).decode()


def _unb64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


class TokenEndpoint:
    def __init__(self) -> None:
        self.requests: list[dict[str, str]] = []
        self.token = "tok-1"
        self.expires_in = 3600
        self.error: tuple[int, dict[str, Any]] | None = None
        # Certificates registered per client id (PEM), and the assertions accepted.
        self.certificates: dict[str, str] = {}
        self.assertions: list[tuple[dict[str, Any], dict[str, Any]]] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
                endpoint.requests.append(form)
                refused = endpoint.check_assertion(form) if "client_assertion" in form \
                    else None
                status, body = refused or endpoint.error or (
                    200, {"access_token": endpoint.token, "token_type": "Bearer",
                          "expires_in": endpoint.expires_in})
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/tenant/token"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def check_assertion(self, form: dict[str, str]) -> tuple[int, dict[str, Any]] | None:
        """``None`` when the client assertion is good, else Entra ID's refusal."""
        def refuse(code: str, text: str) -> tuple[int, dict[str, Any]]:
            return 401, {"error": "invalid_client",
                         "error_description": f"{code}: {text}\r\nTrace ID: 0"}

        if form.get("client_assertion_type") != ASSERTION_TYPE or "client_secret" in form:
            return refuse("AADSTS7000216", "'client_assertion_type' is missing or wrong.")
        client_id = form.get("client_id", "")
        try:
            head, body, sig = form["client_assertion"].split(".")
            header = json.loads(_unb64(head))
            claims = json.loads(_unb64(body))
        except ValueError:
            return refuse("AADSTS50027", "JWT token is invalid or malformed.")
        registered = self.certificates.get(client_id)
        if registered is None:
            return refuse("AADSTS700016", f"Application with identifier '{client_id}' "
                          "was not found in the directory.")
        cert = x509.load_pem_x509_certificate(registered.encode())
        s256 = base64.urlsafe_b64encode(cert.fingerprint(hashes.SHA256())).rstrip(b"=")
        if header.get("alg") != "RS256" or header.get("x5t#S256") != s256.decode():
            return refuse("AADSTS700027", "The certificate with identifier used to sign the "
                          "client assertion is not registered on application. [Reason - "
                          "The key was not found.]")
        public = cert.public_key()
        assert isinstance(public, rsa.RSAPublicKey)
        try:
            public.verify(_unb64(sig), f"{head}.{body}".encode(), padding.PKCS1v15(),
                          hashes.SHA256())
        except InvalidSignature:
            return refuse("AADSTS700027", "Client assertion failed signature validation.")
        now = time.time()
        if claims.get("aud") != self.url:
            return refuse("AADSTS700023", "Client assertion audience claim does not match.")
        if claims.get("iss") != client_id or claims.get("sub") != client_id:
            return refuse("AADSTS700021", "Client assertion application identifier does "
                          "not match 'client_id' parameter.")
        if not (claims["nbf"] - 300 <= now < claims["exp"]) or \
                claims["exp"] - claims["iat"] > 3600:
            return refuse("AADSTS700024", "Client assertion is not within its valid time "
                          "range.")
        if not claims.get("jti") or any(c["jti"] == claims["jti"]
                                        for _, c in self.assertions):
            return refuse("AADSTS700025", "The client assertion was already used (jti).")
        self.assertions.append((header, claims))
        return None

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def token_endpoint() -> Iterator[TokenEndpoint]:
    endpoint = TokenEndpoint()
    yield endpoint
    endpoint.close()
