"""A client of the OCI distribution API (registries): the small adapter over ``httpx``.

Only what a cache image needs, done the way container tools do it:

* ``HEAD``/``GET`` of blobs and manifests; the ``GET`` of a blob streamed (its body read
  with ``http.client``, see :meth:`RegistryClient.open_body`) and *resumed* with
  ``Range: bytes=<offset>-`` when the connection breaks (``_blobstream.py``);
* monolithic uploads (``POST /blobs/uploads/`` then one streamed ``PUT ?digest=`` with a
  ``Content-Length``: accepted by every registry, one round trip less than chunked ``PATCH``
  uploads, and nothing is held in memory), and cross-repository mounts
  (``POST /blobs/uploads/?mount=<digest>&from=<repo>``: 201 means the registry linked the
  blob, 202 hands out an ordinary upload session);
* authentication by challenge (``WWW-Authenticate``): ``Basic``, and ``Bearer`` through the
  token service named in the challenge (anonymous, with the user's password, or with an
  identity token as an OAuth2 refresh token); tokens are kept per scope until they expire;
* credentials passed in, or read as every container tool reads them (``_credentials.py``:
  Docker's ``config.json`` and credential helpers);
* HTTPS by default (system CAs, plus ``ca_file``, plus Docker's
  ``/etc/docker/certs.d/<host>/ca.crt`` when it exists); plain HTTP only with
  ``insecure=True``;
* retries with exponential backoff (``_retry.py``: 0.1 s doubling to 2 s, with jitter) on connection
  errors, 5xx and 429, for as long as the client's ``timeout`` allows since the last
  progress; then :class:`UnavailableError` naming the registry and the operation.

Every error is a refcache error whose message names the registry: :class:`AuthError` for
401/403 (and a token service refusing), :class:`NotFoundError` for 404 of a manifest or
blob, :class:`UnavailableError` when retries ran out or TLS verification failed,
:class:`RefcacheError` for any other refusal (with the registry's error codes).

``on_request(operation, status, seconds)`` is called once per HTTP exchange (``status`` is
the HTTP status code, or ``"error"`` for a transport failure; ``seconds`` runs until the
response headers). Operations: ``ping``, ``token``, ``blob_head``, ``blob_get``,
``blob_upload_start``, ``blob_upload``, ``blob_mount``, ``manifest_head``, ``manifest_get``,
``manifest_put``.

Pure (no pykka, no actors): the caller decides what to do with what it transfers.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import logging
import os
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

import httpx

from ._blobstream import BlobStream, Body
from ._credentials import Credentials, docker_config_dir, load_credentials
from ._errors import AuthError, InvalidError, NotFoundError, RefcacheError, UnavailableError
from ._oci import MANIFEST_ACCEPT, digest_bytes
from ._retry import Retry, backoff
from ._types import Descriptor

__all__ = ["RegistryClient", "RegistryRepository"]

logger = logging.getLogger(__name__)

_CHUNK: Final = 1 << 20
_USER_AGENT: Final = "refcache/0.1 (+OCI distribution)"
#: Socket-level timeouts (each bounded further by what is left of the retry budget).
_CONNECT_TIMEOUT: Final = 10.0
_IO_TIMEOUT: Final = 60.0

OnRequest = Callable[[str, str, float], None]


# -- challenges -----------------------------------------------------------------------------


def _parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="...",service="...",scope="..."`` -> ``("bearer", {...})``."""
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    i, n = 0, len(rest)
    while i < n:
        while i < n and rest[i] in " ,":
            i += 1
        eq = rest.find("=", i)
        if eq < 0:
            break
        key = rest[i:eq].strip().lower()
        i = eq + 1
        if i < n and rest[i] == '"':
            i += 1
            value = []
            while i < n and rest[i] != '"':
                if rest[i] == "\\" and i + 1 < n:
                    i += 1
                value.append(rest[i])
                i += 1
            i += 1
            params[key] = "".join(value)
        else:
            end = rest.find(",", i)
            end = n if end < 0 else end
            params[key] = rest[i:end].strip()
            i = end
    return scheme.lower(), params


@dataclass
class _Token:
    value: str
    expires: float


# -- the client -----------------------------------------------------------------------------


class RegistryClient:
    """One registry host: connection pool, authentication state, retry policy.

    Thread-safe (``httpx.Client`` pools connections across threads; the token table has its
    own lock). Close it when done (:meth:`close`).

    Args:
        host: ``HOST[:PORT]``.
        insecure: Plain HTTP (never HTTPS) to this host.
        ca_file: PEM file of extra CA certificates to trust for this host.
        credentials: Use these instead of Docker's configuration.
        docker_config: Directory of ``config.json`` (default ``$DOCKER_CONFIG`` or
            ``~/.docker``).
        timeout: Seconds retries may go on without progress before a transfer fails.
        on_request: ``(operation, status, seconds)`` hook, called per HTTP exchange.

    Raises:
        InvalidError: an unreadable ``ca_file`` or Docker configuration.
    """

    def __init__(
        self,
        host: str,
        *,
        insecure: bool = False,
        ca_file: str | os.PathLike[str] | None = None,
        credentials: Credentials | None = None,
        docker_config: str | os.PathLike[str] | None = None,
        timeout: float = 300.0,
        on_request: OnRequest | None = None,
    ) -> None:
        if not isinstance(insecure, bool):
            msg = f"insecure must be a bool, not {insecure!r}"
            raise InvalidError(msg)
        self.host = host
        self.insecure = insecure
        self.timeout = float(timeout)
        self.base = f"{'http' if insecure else 'https'}://{host}"
        self._on_request = on_request
        self._config_file = docker_config_dir(docker_config) / "config.json"
        self._credentials = (
            credentials
            if credentials is not None
            else load_credentials(host, config_dir=docker_config)
        )
        verify: ssl.SSLContext | bool = False
        if not insecure:
            verify = self._ssl_context(ca_file)
        self._verify = verify
        self._http = httpx.Client(
            verify=verify,
            headers={"User-Agent": _USER_AGENT},
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=16),
            timeout=httpx.Timeout(_IO_TIMEOUT, connect=_CONNECT_TIMEOUT),
            trust_env=False,  # a cache talks to its registry directly, never via $HTTP_PROXY
        )
        self._lock = threading.Lock()
        self._scheme = ""  # "basic" / "bearer" once a challenge was seen
        self._challenge: dict[str, str] = {}
        self._tokens: dict[str, _Token] = {}

    def _ssl_context(self, ca_file: str | os.PathLike[str] | None) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        files = [Path(ca_file)] if ca_file is not None else []
        docker_ca = Path("/etc/docker/certs.d") / self.host / "ca.crt"
        if docker_ca.is_file():
            files.append(docker_ca)
        for f in files:
            try:
                ctx.load_verify_locations(cafile=str(f))
            except (OSError, ssl.SSLError) as exc:
                msg = f"cannot load CA certificates {str(f)!r} for registry {self.host}: {exc}"
                raise InvalidError(msg) from exc
        return ctx

    def __repr__(self) -> str:
        return f"RegistryClient({self.base!r})"

    @property
    def description(self) -> str:
        """``registry HOST`` (what error messages say)."""
        return f"registry {self.host}"

    def close(self) -> None:
        """Closes the connection pool (idempotent)."""
        self._http.close()

    def repository(self, name: str) -> RegistryRepository:
        """The repository ``name`` on this registry."""
        return RegistryRepository(self, name)

    # -- auth ---------------------------------------------------------------------------

    def _authorize(self, headers: dict[str, str], scope: str) -> None:
        with self._lock:
            scheme = self._scheme
        creds = self._credentials
        if scheme == "basic" and creds is not None and creds.username:
            raw = f"{creds.username}:{creds.password}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(raw).decode()
        elif scheme == "bearer":
            token = self._token(scope)
            if token:
                headers["Authorization"] = "Bearer " + token

    def _token(self, scope: str, *, refresh: bool = False) -> str:
        with self._lock:
            cached = self._tokens.get(scope)
            challenge = dict(self._challenge)
        if cached is not None and not refresh and cached.expires > time.monotonic():
            return cached.value
        key = scope
        scope = scope or challenge.get("scope", "")
        realm = challenge.get("realm", "")
        if not realm:
            msg = f"{self.description} asked for a bearer token without naming a token realm"
            raise AuthError(msg)
        token = self._fetch_token(realm, challenge.get("service", ""), scope)
        with self._lock:
            self._tokens[key] = token
        return token.value

    def _fetch_token(self, realm: str, service: str, scope: str) -> _Token:
        creds = self._credentials
        scopes = [s for s in scope.split(" ") if s]
        start = time.perf_counter()
        try:
            if creds is not None and creds.identity_token:
                form = {
                    "grant_type": "refresh_token",
                    "refresh_token": creds.identity_token,
                    "service": service,
                    "client_id": "refcache",
                    "scope": " ".join(scopes),
                }
                resp = self._http.post(realm, data=form, timeout=self._timeouts(60.0))
            else:
                params: list[tuple[str, str | int | float | bool | None]] = (
                    [("service", service)] if service else []
                )
                params += [("scope", s) for s in scopes]
                auth = None
                if creds is not None and creds.username:
                    auth = httpx.BasicAuth(creds.username, creds.password)
                resp = self._http.get(realm, params=params, auth=auth, timeout=self._timeouts(60.0))
        except httpx.TransportError as exc:
            self._observe("token", "error", time.perf_counter() - start)
            msg = f"{self.description}: token service {realm} unreachable: {exc}"
            raise UnavailableError(msg) from exc
        self._observe("token", str(resp.status_code), time.perf_counter() - start)
        if resp.status_code in (401, 403):
            raise AuthError(self._refused(f"token service {realm}"))
        if resp.status_code != 200:
            msg = f"{self.description}: token service {realm} answered {resp.status_code}"
            raise AuthError(msg)
        try:
            doc = resp.json()
            value = doc.get("token") or doc.get("access_token")
            expires_in = int(doc.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError) as exc:
            msg = f"{self.description}: token service {realm} sent no token"
            raise AuthError(msg) from exc
        if not isinstance(value, str) or not value:
            msg = f"{self.description}: token service {realm} sent no token"
            raise AuthError(msg)
        # Renew a little early: a token that expires in flight costs a 401 round trip.
        return _Token(value, time.monotonic() + max(expires_in - 10, 5))

    def _refused(self, by: str = "") -> str:
        creds = self._credentials
        who = by or self.description
        if creds is None:
            return (
                f"{who} needs credentials and none were given or found for {self.host} "
                f"(Docker config {self._config_file}); pass them in "
                "or run docker login"
            )
        user = creds.username or "(identity token)"
        return f"{who} refused the credentials of {user!r} from {creds.source} for {self.host}"

    def _on_challenge(self, header: str, scope: str, had_auth: bool) -> None:
        scheme, params = _parse_challenge(header)
        if scheme not in ("basic", "bearer"):
            msg = f"{self.description} asks for unsupported authentication {header!r}"
            raise AuthError(msg)
        if scheme == "basic" and (self._credentials is None or had_auth):
            raise AuthError(self._refused())
        with self._lock:
            known = self._scheme == scheme and self._challenge.get("realm") == params.get("realm")
            self._scheme = scheme
            self._challenge = params
        if scheme == "bearer" and known and had_auth:
            # Our token for this scope was refused: a fresh one, or insufficient rights.
            self._token(scope or params.get("scope", ""), refresh=True)

    # -- requests -------------------------------------------------------------------------

    def _observe(self, operation: str, status: str, seconds: float) -> None:
        if self._on_request is not None:
            with contextlib.suppress(Exception):
                self._on_request(operation, status, seconds)

    def _timeouts(self, remaining: float) -> httpx.Timeout:
        left = max(remaining, 0.5)
        return httpx.Timeout(min(_IO_TIMEOUT, left), connect=min(_CONNECT_TIMEOUT, left))

    def url(self, path: str) -> str:
        """Absolute URL of an API path (``/v2/...``) or of a ``Location`` header value."""
        if path.startswith(("http://", "https://")):
            return path
        return self.base + path

    def send(
        self,
        operation: str,
        method: str,
        url: str,
        *,
        scope: str,
        what: str,
        headers: Mapping[str, str] | None = None,
        body: Callable[[], Iterator[bytes] | bytes] | None = None,
        stream: bool = False,
        retry: bool = True,
        follow_redirects: bool = False,
        budget: float | None = None,
    ) -> httpx.Response:
        """One API exchange, with authentication and (with ``retry``) retries.

        ``body`` is called again for each attempt (a streamed upload must start over).
        Statuses other than 401, 5xx and 429 are returned as they are: the caller decides.

        Raises:
            AuthError: 401 after authenticating, or 403.
            UnavailableError: retries ran out (or TLS verification failed).
            Retry: a transient failure with ``retry=False`` (internal).
        """
        deadline = time.monotonic() + (self.timeout if budget is None else budget)
        attempt = 0
        challenged = False
        started = time.monotonic()
        while True:
            h = dict(headers or {})
            self._authorize(h, scope)
            had_auth = "Authorization" in h
            try:
                resp = self._send_once(
                    operation,
                    method,
                    url,
                    h,
                    body() if body is not None else None,
                    stream=stream,
                    follow_redirects=follow_redirects,
                    deadline=deadline,
                    what=what,
                )
                if resp.status_code != 401:
                    self._check_status(resp, what)
                    return resp
            except Retry as exc:
                if not retry:
                    raise
                attempt += 1
                if not backoff(attempt, deadline):
                    raise self._unavailable(what, exc.reason, attempt, started) from exc
                continue
            resp.close()
            if challenged:
                raise AuthError(self._refused())
            challenged = True
            self._on_challenge(resp.headers.get("WWW-Authenticate", ""), scope, had_auth)

    def _send_once(
        self,
        operation: str,
        method: str,
        url: str,
        headers: dict[str, str],
        content: Iterator[bytes] | bytes | None,
        *,
        stream: bool,
        follow_redirects: bool,
        deadline: float,
        what: str,
    ) -> httpx.Response:
        """One HTTP exchange, observed; a transport failure is a :class:`Retry`."""
        start = time.perf_counter()
        try:
            request = self._http.build_request(
                method,
                self.url(url),
                headers=headers,
                content=content,
                timeout=self._timeouts(deadline - time.monotonic()),
            )
            resp = self._http.send(request, stream=stream, follow_redirects=follow_redirects)
        except httpx.TransportError as exc:
            self._observe(operation, "error", time.perf_counter() - start)
            self._check_tls(what, exc)
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise Retry(reason) from exc
        self._observe(operation, str(resp.status_code), time.perf_counter() - start)
        return resp

    def _check_status(self, resp: httpx.Response, what: str) -> None:
        """403 is an :class:`AuthError`, 5xx and 429 a :class:`Retry` (the response is
        closed); any other status is the caller's to judge."""
        status = resp.status_code
        if status == 403:
            detail = _error_detail(resp)
            resp.close()
            msg = f"{self.description} denied {what}{detail}"
            if self._credentials is None:
                msg += " (no credentials were given or found)"
            raise AuthError(msg)
        if status >= 500 or status == 429:
            detail = _error_detail(resp)
            resp.close()
            raise Retry(f"HTTP {status}{detail}", status)

    def open_body(
        self,
        operation: str,
        path: str,
        *,
        scope: str,
        what: str,
        headers: Mapping[str, str],
        budget: float,
    ) -> Body:
        """A ``GET`` whose body is read straight from the socket (``http.client``).

        Blob downloads take this path: ``httpx``'s HTTP/1.1 parser (h11) copies every
        piece of a body through Python and tops out at a fraction of what the standard
        library's buffered reader does on the same connection (docs/DISTRIBUTED.md). The
        exchange is otherwise the same as :meth:`send`: credentials and challenges (a 401
        is answered once), redirects followed (up to 5; ``Authorization`` only to this
        registry), 5xx/429 and connection errors reported as transient (``Retry``).

        Raises:
            AuthError / UnavailableError (TLS) / NotFoundError / RefcacheError; Retry.
        """
        url = self.url(path)
        challenged = False
        for _ in range(6):
            h = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity", **headers}
            if url.startswith(self.base + "/"):
                self._authorize(h, scope)
            had_auth = "Authorization" in h
            conn, resp = self._get_once(operation, url, h, budget=budget, what=what)
            status = resp.status
            if status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
                url = urllib.parse.urljoin(url, resp.getheader("Location", ""))
                conn.close()
                continue
            if status == 401:
                header = resp.getheader("WWW-Authenticate", "")
                conn.close()
                if challenged:
                    raise AuthError(self._refused())
                challenged = True
                self._on_challenge(header, scope, had_auth)
                continue
            if status in (200, 206):
                return Body(conn, resp)
            conn.close()
            raise self._body_refused(status, what)
        msg = f"{self.description}: too many redirects for {what}"
        raise RefcacheError(msg)

    def _get_once(
        self, operation: str, url: str, headers: dict[str, str], *, budget: float, what: str
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """One ``GET`` on a new ``http.client`` connection, observed; a transport failure
        is a :class:`Retry`."""
        parts = urllib.parse.urlsplit(url)
        timeout = min(_IO_TIMEOUT, max(budget, 0.5))
        conn: http.client.HTTPConnection
        if parts.scheme == "https":
            ctx = self._verify if isinstance(self._verify, ssl.SSLContext) else None
            conn = http.client.HTTPSConnection(
                parts.hostname or "", parts.port, timeout=timeout, context=ctx
            )
        else:
            conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        start = time.perf_counter()
        try:
            conn.request("GET", target, headers=headers)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            self._observe(operation, "error", time.perf_counter() - start)
            self._check_tls(what, exc)
            raise Retry(f"{type(exc).__name__}: {exc}") from exc
        self._observe(operation, str(resp.status), time.perf_counter() - start)
        return conn, resp

    def _body_refused(self, status: int, what: str) -> Exception:
        """The error of a ``GET`` answered with neither a body, a redirect nor a challenge."""
        if status == 403:
            return AuthError(f"{self.description} denied {what}")
        if status >= 500 or status == 429:
            return Retry(f"HTTP {status}")
        if status == 404:
            return NotFoundError(f"{what}: not found in {self.description}")
        return RefcacheError(f"{self.description} refused {what}: HTTP {status}")

    def _check_tls(self, what: str, exc: BaseException) -> None:
        """Raises an :class:`UnavailableError` when ``exc`` is a failed TLS verification
        (no retry helps; the message says what to pass)."""
        if _tls_failure(exc):
            msg = (
                f"TLS verification failed for {self.description} ({what}): {exc}; "
                "pass ca_file= with its CA (or insecure=True for plain HTTP)"
            )
            raise UnavailableError(msg) from exc

    def _unavailable(self, what: str, reason: str, attempts: int, started: float) -> RefcacheError:
        took = time.monotonic() - started
        msg = (
            f"{self.description} unavailable: {what} failed: {reason} "
            f"(gave up after {attempts} attempt(s) in {took:.1f} s)"
        )
        return UnavailableError(msg)

    def fail(self, resp: httpx.Response, what: str) -> RefcacheError:
        """The error for an unexpected status (the response is closed)."""
        detail = _error_detail(resp)
        status = resp.status_code
        resp.close()
        if status == 404:
            return NotFoundError(f"{what}: not found in {self.description}{detail}")
        return RefcacheError(f"{self.description} refused {what}: HTTP {status}{detail}")

    def ping(self) -> None:
        """``GET /v2/``: checks reachability and credentials.

        Raises:
            AuthError / UnavailableError / RefcacheError: as :meth:`send`.
        """
        resp = self.send("ping", "GET", "/v2/", scope="", what="GET /v2/")
        if resp.status_code != 200:
            raise self.fail(resp, "the API version check")
        resp.close()


def _tls_failure(exc: BaseException) -> bool:
    cur: BaseException | None = exc
    while cur is not None:
        if isinstance(cur, ssl.SSLCertVerificationError):
            return True
        if isinstance(cur, ssl.SSLError) and "CERTIFICATE" in str(cur).upper():
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _error_detail(resp: httpx.Response) -> str:
    """`` (CODE: message; ...)`` from a registry's JSON error body, if any."""
    try:
        doc = json.loads(resp.read()[:65536])
        errors = doc.get("errors") if isinstance(doc, dict) else None
        parts = [
            f"{e.get('code', '?')}: {e.get('message', '')}".strip()
            for e in errors or []
            if isinstance(e, dict)
        ]
        return f" ({'; '.join(parts)})" if parts else ""
    except Exception:
        return ""


# -- one repository -------------------------------------------------------------------------


class RegistryRepository:
    """One repository of a registry: the operations a cache image needs.

    Args:
        client: The registry.
        name: Repository path (``team/cache``).
    """

    def __init__(self, client: RegistryClient, name: str) -> None:
        self.client = client
        self.name = name

    def __repr__(self) -> str:
        return f"RegistryRepository({self.client.host!r}, {self.name!r})"

    @property
    def description(self) -> str:
        """``registry HOST (repository REPO)``."""
        return f"registry {self.client.host} (repository {self.name})"

    def _scope(self, push: bool = False) -> str:
        return f"repository:{self.name}:{'pull,push' if push else 'pull'}"

    # -- blobs ----------------------------------------------------------------------------

    def has_blob(self, digest: str, *, push: bool = False) -> bool:
        """``HEAD`` of a blob: whether this repository has it.

        When pushing, a registry that answers the ``HEAD`` with a server error (HTTP 5xx:
        e.g. distribution's "invalid checksum digest format" for a link file a crash left
        empty) is taken as not having the blob: the upload that follows rewrites it, and a
        registry that is really down fails that upload with :class:`UnavailableError`.
        """
        what = f"HEAD of blob {digest}"
        path = f"/v2/{self.name}/blobs/{digest}"
        try:
            resp = self.client.send(
                "blob_head", "HEAD", path, scope=self._scope(push), what=what,
                follow_redirects=True, retry=not push,
            )  # fmt: skip
        except Retry as exc:
            if exc.status >= 500:
                logger.warning("%s: %s answered %s; uploading it", self.description, what, exc)
                return False
            resp = self.client.send(
                "blob_head", "HEAD", path, scope=self._scope(push), what=what,
                follow_redirects=True,
            )  # fmt: skip
        resp.close()
        if resp.status_code == 200:
            return True
        if resp.status_code == 404:
            return False
        raise self.client.fail(resp, f"HEAD of blob {digest} in {self.name}")

    def open_blob(
        self, desc: Descriptor, *, on_bytes: Callable[[int], None] | None = None
    ) -> BlobStream:
        """A stream of blob ``desc`` that resumes after a broken connection (see
        :class:`BlobStream`); nothing is sent before the first read."""
        return BlobStream(self, desc, on_bytes)

    def mount_blob(self, digest: str, source: str) -> str | None:
        """Asks the registry to link ``digest`` from repository ``source`` into this one.

        Returns:
            ``None`` when mounted (201); otherwise the upload session URL it opened instead
            (202), to upload into.
        """
        resp = self.client.send(
            "blob_mount",
            "POST",
            f"/v2/{self.name}/blobs/uploads/?mount={digest}&from={source}",
            # The token must allow pulling from the source repository too.
            scope=f"{self._scope(True)} repository:{source}:pull",
            what=f"mount of blob {digest} from {source}",
            headers={"Content-Length": "0"},
        )
        resp.close()
        if resp.status_code == 201:
            return None
        if resp.status_code == 202 and resp.headers.get("Location"):
            return resp.headers["Location"]
        raise self.client.fail(resp, f"mount of blob {digest} from {source}")

    def _start_upload(self, digest: str, budget: float) -> str:
        resp = self.client.send(
            "blob_upload_start",
            "POST",
            f"/v2/{self.name}/blobs/uploads/",
            scope=self._scope(True),
            what=f"upload of blob {digest}",
            headers={"Content-Length": "0"},
            budget=budget,
        )
        resp.close()
        location = resp.headers.get("Location")
        if resp.status_code != 202 or not location:
            raise self.client.fail(resp, f"upload of blob {digest}")
        return location

    def put_blob(
        self,
        desc: Descriptor,
        opener: Callable[[], BinaryIO],
        *,
        session: str | None = None,
        on_bytes: Callable[[int], None] | None = None,
    ) -> None:
        """Uploads blob ``desc`` (monolithic: one streamed ``PUT``), reading ``opener()``.

        A failed attempt (connection, 5xx, a lost upload session) starts over with a new
        session and a new ``opener()`` stream, within the retry budget. ``on_bytes`` sees
        the bytes sent (again after a restart: it counts traffic, not progress).

        Raises:
            UnavailableError: retries ran out.
            RefcacheError: the registry rejected the blob (e.g. digest mismatch).
        """
        client = self.client
        started = time.monotonic()
        deadline = started + client.timeout
        attempt = 0
        what = f"upload of blob {desc.digest}"
        while True:
            try:
                location = session or self._start_upload(desc.digest, deadline - time.monotonic())
                session = None
                url = httpx.URL(client.url(location)).copy_merge_params({"digest": desc.digest})

                def body() -> Iterator[bytes]:
                    return _read_chunks(opener, on_bytes)

                resp = client.send(
                    "blob_upload",
                    "PUT",
                    str(url),
                    scope=self._scope(True),
                    what=what,
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Length": str(desc.size),
                    },
                    body=body,
                    retry=False,
                    budget=deadline - time.monotonic(),
                )
            except Retry as exc:
                attempt += 1
                if not backoff(attempt, deadline):
                    raise client._unavailable(what, exc.reason, attempt, started) from exc
                continue
            if resp.status_code in (201, 204):
                resp.close()
                return
            if resp.status_code == 404:  # BLOB_UPLOAD_UNKNOWN: the session was lost
                resp.close()
                attempt += 1
                if not backoff(attempt, deadline):
                    raise client._unavailable(what, "upload session lost", attempt, started)
                continue
            raise client.fail(resp, what)

    # -- manifests ------------------------------------------------------------------------

    def has_manifest(self, digest: str) -> bool:
        """``HEAD`` of a manifest by digest."""
        resp = self.client.send(
            "manifest_head",
            "HEAD",
            f"/v2/{self.name}/manifests/{digest}",
            scope=self._scope(True),
            what=f"HEAD of manifest {digest}",
            headers={"Accept": MANIFEST_ACCEPT},
        )
        resp.close()
        if resp.status_code == 200:
            return True
        if resp.status_code == 404:
            return False
        raise self.client.fail(resp, f"HEAD of manifest {digest} in {self.name}")

    def get_manifest(self, reference: str) -> tuple[str, bytes, str]:
        """``GET`` of a manifest or index by tag or digest.

        Returns:
            ``(media type, bytes, digest)``; fetched by digest, the bytes are verified.

        Raises:
            NotFoundError: no such tag or manifest.
            InvalidError: the bytes do not match the digest asked for.
        """
        what = (
            f"manifest {self.name}:{reference}"
            if ":" not in reference
            else (f"manifest {self.name}@{reference}")
        )
        resp = self.client.send(
            "manifest_get",
            "GET",
            f"/v2/{self.name}/manifests/{reference}",
            scope=self._scope(),
            what=f"GET of {what}",
            headers={"Accept": MANIFEST_ACCEPT},
        )
        if resp.status_code != 200:
            raise self.client.fail(resp, what)
        data = resp.content
        media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
        digest = digest_bytes(data)
        if reference.startswith("sha256:") and digest != reference:
            msg = f"{what} from {self.client.description} has digest {digest}"
            raise InvalidError(msg)
        return media_type, data, digest

    def put_manifest(self, reference: str, media_type: str, data: bytes) -> str:
        """``PUT`` of a manifest or index under a tag or its digest; returns its digest."""
        what = f"manifest {self.name}:{reference}"
        resp = self.client.send(
            "manifest_put",
            "PUT",
            f"/v2/{self.name}/manifests/{reference}",
            scope=self._scope(True),
            what=f"PUT of {what}",
            headers={"Content-Type": media_type},
            body=lambda: data,
        )
        if resp.status_code not in (200, 201):
            raise self.client.fail(resp, what)
        resp.close()
        return digest_bytes(data)


def _read_chunks(
    opener: Callable[[], BinaryIO], on_bytes: Callable[[int], None] | None
) -> Iterator[bytes]:
    with opener() as f:
        while chunk := f.read(_CHUNK):
            if on_bytes is not None:
                on_bytes(len(chunk))
            yield chunk
