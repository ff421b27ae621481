"""A real OCI registry for the push/pull tests: Debian's ``docker-registry`` (CNCF distribution).

Each :class:`RegistryServer` runs the real binary on 127.0.0.1 with a free port and a storage
directory under ``tmp_path`` (its ``config.yml`` is written here). One variant serves HTTPS
with a certificate from a test CA made by the test (``cryptography``) and checks htpasswd
credentials (bcrypt entries from the ``bcrypt`` package).

:class:`CountingProxy` is a plain HTTP proxy in front of a registry: it forwards every request
to the real registry, records ``(method, path, status)``, and can cut a blob's body after a
number of bytes (a broken connection, to test resumed downloads). It never answers for the
registry.

Without the binary the tests skip, except under CI (``CI`` set), where they fail: CI installs
the ``docker-registry`` package (see .ci/run).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import http.client
import http.server
import ipaddress
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 10.0


def registry_binary() -> str:
    """The distribution registry binary, or skip (fail under CI)."""
    path = shutil.which("docker-registry") or (
        "/usr/bin/docker-registry" if Path("/usr/bin/docker-registry").exists() else None
    )
    if path is None:
        reason = "the docker-registry binary is not installed (Debian package 'docker-registry')"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must install it (see .ci/run)")
        pytest.skip(reason)
    return path


def free_port() -> int:
    """A port free right now on 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class TLSFiles:
    """A test CA and a server certificate for 127.0.0.1 signed by it."""

    ca: Path
    cert: Path
    key: Path


def make_tls(directory: Path) -> TLSFiles:
    """Makes a CA and a server certificate (SAN IP 127.0.0.1, DNS localhost) with it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "refcache test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    files = TLSFiles(directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


def htpasswd_line(user: str, password: str) -> str:
    """One htpasswd entry with a bcrypt hash (what ``htpasswd -B`` writes)."""
    import bcrypt

    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    return f"{user}:{hashed}\n"


@dataclass
class RegistryServer:
    """One real registry process (start, stop, restart on the same port and storage)."""

    root: Path
    port: int = field(default_factory=free_port)
    tls: TLSFiles | None = None
    users: dict[str, str] = field(default_factory=dict)
    #: ``auth.token`` settings (realm, service, issuer, rootcertbundle) for bearer tokens.
    token: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def storage(self) -> Path:
        return self.root / "storage"

    @property
    def log(self) -> Path:
        return self.root / "registry.log"

    def blob_data(self, digest: str) -> Path:
        """Where the filesystem driver keeps a blob's bytes."""
        hexa = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexa[:2] / hexa / "data"

    def _config(self) -> Path:
        lines = [
            "version: 0.1",
            "log:",
            "  level: info",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.storage}",
            "  delete:",
            "    enabled: true",
            "http:",
            f"  addr: 127.0.0.1:{self.port}",
            "  secret: refcache-test-secret",
        ]
        if self.tls is not None:
            lines += ["  tls:", f"    certificate: {self.tls.cert}", f"    key: {self.tls.key}"]
        if self.token:
            lines += ["auth:", "  token:"] + [f"    {k}: {v}" for k, v in self.token.items()]
        elif self.users:
            htpasswd = self.root / "htpasswd"
            htpasswd.write_text("".join(htpasswd_line(u, p) for u, p in self.users.items()))
            lines += ["auth:", "  htpasswd:", "    realm: refcache-test", f"    path: {htpasswd}"]
        path = self.root / "config.yml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        config = self._config()
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [registry_binary(), "serve", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        import ssl

        ctx = ssl.create_default_context(cafile=str(self.tls.ca)) if self.tls else None
        url = f"{'https' if self.tls else 'http'}://{self.host}/v2/"
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"docker-registry exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(url, timeout=1, context=ctx):
                    return
            except urllib.error.HTTPError:
                return  # 401: up, and asking for credentials
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.05)  # sleep-ok: polling another process until it listens
        pytest.fail(f"docker-registry did not answer within {_START_TIMEOUT} s")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=_STOP_TIMEOUT)
        self.proc = None


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[RegistryServer]:
    """A plain-HTTP registry on 127.0.0.1 (clients pass ``insecure=True``)."""
    server = RegistryServer(tmp_path / "registry")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def secure_registry(tmp_path: Path) -> Iterator[RegistryServer]:
    """An HTTPS registry (test CA) with htpasswd auth: user ``builder``, password
    ``s3cret``."""
    tls = make_tls(tmp_path / "tls")
    server = RegistryServer(tmp_path / "secure-registry", tls=tls, users={"builder": "s3cret"})
    server.start()
    try:
        yield server
    finally:
        server.stop()


# -- a counting proxy in front of the real registry -------------------------------------------


@dataclass
class _Cut:
    digest: str
    after: int
    times: int


class CountingProxy:
    """Forwards HTTP to ``upstream`` (a real registry) and records what passed.

    ``requests`` holds ``(method, path, status, range header)`` per request, in order.
    :meth:`cut` makes the next ``times`` GETs of a blob stop after ``after`` body bytes
    (the connection is closed), like a network failure mid-download.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.requests: list[tuple[str, str, int, str]] = []
        self._cuts: list[_Cut] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in ("connection", "keep-alive")
                }
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    cut = proxy._take_cut(self.command, self.path, resp.status)
                    with proxy._lock:
                        proxy.requests.append(
                            (self.command, self.path, resp.status, self.headers.get("Range", ""))
                        )
                    self.send_response(resp.status)
                    for k, v in resp.getheaders():
                        if k.lower() not in ("connection", "transfer-encoding"):
                            self.send_header(k, v)
                    self.end_headers()
                    if self.command == "HEAD":
                        return
                    sent = 0
                    while chunk := resp.read(64 * 1024):
                        if cut is not None and sent + len(chunk) >= cut.after:
                            self.wfile.write(chunk[: cut.after - sent])
                            self.wfile.flush()
                            self.close_connection = True
                            self.connection.shutdown(socket.SHUT_RDWR)
                            return
                        self.wfile.write(chunk)
                        sent += len(chunk)
                finally:
                    conn.close()

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _forward  # noqa: N815 (http.server names)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> CountingProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def cut(self, digest: str, after: int, times: int = 1) -> None:
        with self._lock:
            self._cuts.append(_Cut(digest, after, times))

    def _take_cut(self, method: str, path: str, status: int) -> _Cut | None:
        if method != "GET" or status not in (200, 206):
            return None
        with self._lock:
            for c in self._cuts:
                if c.times > 0 and path.endswith(f"/blobs/{c.digest}"):
                    c.times -= 1
                    return c
        return None

    def blob_gets(self) -> list[str]:
        """Digests of blob GETs that succeeded, in order."""
        with self._lock:
            return [
                p.rsplit("/", 1)[1]
                for m, p, s, _ in self.requests
                if m == "GET" and "/blobs/sha256:" in p and s in (200, 206)
            ]

    def uploads(self) -> list[str]:
        """Digests of blob PUTs (finished uploads)."""
        with self._lock:
            out = []
            for m, p, _s, _ in self.requests:
                if m == "PUT" and "digest=" in p:
                    out.append(p.split("digest=", 1)[1].split("&", 1)[0].replace("%3A", ":"))
            return out


@pytest.fixture
def proxy(registry: RegistryServer) -> Iterator[CountingProxy]:
    """A counting proxy in front of ``registry``."""
    p = CountingProxy(registry.host).start()
    try:
        yield p
    finally:
        p.stop()


# -- building records --------------------------------------------------------------------------


def write_tree(path: Path, seed: str, files: int = 6, size: int = 20_000) -> None:
    """Deterministic files under ``path`` (random bytes: they do not compress)."""
    import random

    rng = random.Random(seed)
    (path / seed).mkdir(parents=True, exist_ok=True)
    for i in range(files):
        data = rng.randbytes(int(size * rng.uniform(0.5, 1.5)))
        (path / seed / f"f{i}.bin").write_bytes(data)
    (path / seed / "link").symlink_to("f0.bin")
    (path / seed / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (path / seed / "run.sh").chmod(0o755)


def build_chain(cache: Any, seeds: list[str], parent: Any = None, timeout: float = 30) -> Any:
    """Commits one layer per seed on ``parent``; returns the top ref (others released)."""
    ref = parent.clone() if parent is not None else None
    for seed in seeds:
        m = cache.manager.new(ref, description=f"layer {seed}").get(timeout=timeout)
        with m.mount().local() as path:
            write_tree(path, seed)
        nxt = m.commit()
        if ref is not None:
            ref.release()
        ref = nxt
    return ref


def tree_digest(path: Path) -> dict[str, str]:
    """Relative path -> what the file is (mode, and the content hash or link target)."""
    out: dict[str, str] = {}
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path))
        st = p.lstat()
        if p.is_symlink():
            out[rel] = f"link {os.readlink(p)}"
        elif p.is_dir():
            out[rel] = f"dir {oct(st.st_mode & 0o7777)}"
        else:
            out[rel] = (
                f"file {oct(st.st_mode & 0o7777)} {hashlib.sha256(p.read_bytes()).hexdigest()}"
            )
    return out


def docker_config(directory: Path, host: str, user: str, password: str) -> Path:
    """A Docker client config with ``auths[host]`` (what ``docker login`` writes)."""
    import json

    directory.mkdir(parents=True, exist_ok=True)
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    (directory / "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    return directory


@contextlib.contextmanager
def watchdog(seconds: float, what: str) -> Iterator[None]:
    """Dumps every thread's stack if the block takes longer than ``seconds``."""
    import faulthandler

    faulthandler.dump_traceback_later(seconds, exit=False)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


ProgressCallback = Callable[[Any], None]


@pytest.fixture
def helpers() -> Any:
    """The helpers above, for test modules (conftest modules are not importable by name)."""
    import types

    return types.SimpleNamespace(
        build_chain=build_chain,
        tree_digest=tree_digest,
        write_tree=write_tree,
        docker_config=docker_config,
        watchdog=watchdog,
        CountingProxy=CountingProxy,
        RegistryServer=RegistryServer,
    )


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[Any]:
    """A real cache (native snapshotter) in ``tmp_path/cache``."""
    from refcache.actors import open_cache

    c = open_cache(tmp_path / "cache", snapshotter="native", timeout=60)
    try:
        yield c
    finally:
        c.close()
