"""Bearer tokens: the registry's ``token`` auth with a token service made by the test.

The registry (real) verifies ES256 JWTs whose ``x5c`` certificate is in its root bundle; the
token service (a small HTTP server here, like Docker's auth server or Harbor's core) checks
Basic credentials and grants the scopes asked for. The client does the challenge flow.
"""

from __future__ import annotations

import base64
import datetime
import http.server
import json
import secrets
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from refcache.actors import AuthError, open_cache

pytestmark = pytest.mark.integration

SERVICE = "refcache-test-registry"
ISSUER = "refcache-test-issuer"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenService:
    """Grants tokens for user ``builder`` / ``s3cret``; anonymous callers get no access."""

    def __init__(self, directory: Path) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        now = datetime.datetime.now(datetime.UTC)
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "refcache token signer")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        directory.mkdir(parents=True, exist_ok=True)
        self.bundle = directory / "token-root.pem"
        self.bundle.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
        self.requests: list[tuple[str, str]] = []  # (user or "", scope)
        service = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                user = ""
                auth = self.headers.get("Authorization", "")
                if auth.startswith("Basic "):
                    user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
                    if (user, password) != ("builder", "s3cret"):
                        self.send_response(401)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                scopes = query.get("scope", [])
                service.requests.append((user, " ".join(scopes)))
                access = []
                for scope in scopes if user else []:
                    kind, name, actions = scope.split(":")
                    access.append({"type": kind, "name": name, "actions": actions.split(",")})
                body = json.dumps({"token": service.sign(user, access), "expires_in": 300})
                data = body.encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                # OAuth2 refresh-token grant (what clients with an identity token use).
                length = int(self.headers.get("Content-Length") or 0)
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                if form.get("grant_type") != ["refresh_token"] or form.get("refresh_token") != [
                    "refresh-me"
                ]:
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                scopes = " ".join(form.get("scope", [])).split()
                service.requests.append(("refresh", " ".join(scopes)))
                access = []
                for scope in scopes:
                    kind, name, actions = scope.split(":")
                    access.append({"type": kind, "name": name, "actions": actions.split(",")})
                data = json.dumps({"access_token": service.sign("builder", access)}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/token"

    def sign(self, user: str, access: list[dict[str, Any]]) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        now = int(time.time())
        header = {"typ": "JWT", "alg": "ES256", "x5c": [self.x5c]}
        claims = {
            "iss": ISSUER,
            "sub": user,
            "aud": SERVICE,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        der = self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return f"{signing_input}.{_b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


@pytest.fixture
def token_registry(tmp_path: Path, helpers: Any) -> Iterator[tuple[Any, TokenService]]:
    tokens = TokenService(tmp_path / "token")
    tokens.thread.start()
    server = helpers.RegistryServer(
        tmp_path / "token-registry",
        token={
            "realm": tokens.realm,
            "service": SERVICE,
            "issuer": ISSUER,
            "rootcertbundle": str(tokens.bundle),
        },
    )
    server.start()
    try:
        yield server, tokens
    finally:
        server.stop()
        tokens.server.shutdown()
        tokens.server.server_close()


def test_bearer_token_flow(token_registry: Any, helpers: Any, tmp_path: Path) -> None:
    server, tokens = token_registry
    target = f"registry://{server.host}/team/tokens:v1"
    empty = tmp_path / "no-docker-config"
    with open_cache(tmp_path / "a", snapshotter="native", timeout=10) as cache:
        ref = helpers.build_chain(cache, ["t0", "t1"])
        with pytest.raises(AuthError) as err:  # the token service refuses the password
            cache.push(target, {"x": ref}, insecure=True, credentials=("builder", "bad"))
        assert server.host in str(err.value)
        assert "token service" in str(err.value)
        with pytest.raises(AuthError) as err:  # anonymous: a token without access
            cache.push(target, {"x": ref}, insecure=True, docker_config=empty)
        assert server.host in str(err.value)
        assert "needs credentials" in str(err.value)
        tokens.requests.clear()
        result = cache.push(target, {"x": ref}, insecure=True, credentials=("builder", "s3cret"))
        assert result.blobs_uploaded == 3
        # Tokens are kept per scope: a handful of token requests for the whole push.
        assert 1 <= len(tokens.requests) <= 3
        assert all(user == "builder" for user, _ in tokens.requests)
        assert any("repository:team/tokens:pull,push" in scope for _, scope in tokens.requests)
        expected = None
        with ref.mount().local() as path:
            expected = helpers.tree_digest(path)
        ref.release()
    config = helpers.docker_config(tmp_path / "docker", server.host, "builder", "s3cret")
    with open_cache(tmp_path / "b", snapshotter="native", timeout=10) as other:
        refs = other.pull(target, insecure=True, docker_config=config)
        with refs["x"].mount().local() as path:
            assert helpers.tree_digest(path) == expected
        refs["x"].release()


def test_identity_token_from_docker_config(
    token_registry: Any, helpers: Any, tmp_path: Path
) -> None:
    server, tokens = token_registry
    target = f"registry://{server.host}/team/identity:v1"
    config = tmp_path / "docker"
    config.mkdir()
    (config / "config.json").write_text(
        json.dumps({"auths": {server.host: {"identitytoken": "refresh-me"}}})
    )
    with open_cache(tmp_path / "a", snapshotter="native", timeout=10) as cache:
        ref = helpers.build_chain(cache, ["id0"])
        result = cache.push(target, {"x": ref}, insecure=True, docker_config=config)
        assert result.blobs_uploaded == 2
        assert tokens.requests
        assert all(user == "refresh" for user, _ in tokens.requests)
        ref.release()
