"""HTTP exposition of a cache's metrics: a stoppable ``/metrics`` server and a WSGI app.

Both build a fresh :class:`~prometheus_client.CollectorRegistry` holding one
:class:`~metrics._collector.CacheCollector` for ``cache.manager`` unless a registry is
given. They never register into client_python's global ``REGISTRY``: two caches in one
process (or one test after another) would collide on the same metric names there.
"""

from __future__ import annotations

import socket
import threading
from socketserver import ThreadingMixIn
from types import TracebackType
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from prometheus_client import make_wsgi_app
from prometheus_client.registry import CollectorRegistry

from ..storage import FailedPreconditionError, InvalidError
from ._collector import CacheCollector, StatisticsSource

__all__ = ["MetricsServer", "serve", "wsgi_app"]

METRICS_PATH = "/metrics"
# serve_forever() checks for shutdown this often: the upper bound of MetricsServer.stop().
_POLL_INTERVAL = 0.25
_STOP_TIMEOUT = 5.0


class CacheLike(Protocol):
    """What exposition needs from a cache: ``open_cache(root)`` returns one."""

    @property
    def manager(self) -> StatisticsSource:
        """The manager proxy."""
        ...


def _registry_for(cache: CacheLike, registry: CollectorRegistry | None) -> CollectorRegistry:
    """Returns ``registry``, or a fresh one holding a collector for ``cache.manager``."""
    if registry is not None:
        if not isinstance(registry, CollectorRegistry):
            msg = f"invalid metrics registry {registry!r}: expected a CollectorRegistry"
            raise InvalidError(msg)
        return registry
    manager = getattr(cache, "manager", None)
    if manager is None:
        msg = f"cannot expose metrics of {cache!r}: it has no manager"
        raise InvalidError(msg)
    fresh = CollectorRegistry()
    CacheCollector(manager, registry=fresh)
    return fresh


def wsgi_app(cache: CacheLike, *, registry: CollectorRegistry | None = None) -> WSGIApplication:
    """Returns a WSGI app serving the cache's metrics, for embedding in another server.

    The app is client_python's ``make_wsgi_app`` (content negotiation, gzip, ``name[]``
    filters); the embedding server decides the path it is mounted at.

    Args:
        cache: The cache (its ``manager`` is read).
        registry: Registry to serve instead of a fresh one with a ``CacheCollector``.

    Returns:
        The WSGI application.

    Raises:
        InvalidError: ``cache`` has no manager, or ``registry`` is not a registry.
    """
    app: WSGIApplication = make_wsgi_app(_registry_for(cache, registry))
    return app


class _Server(ThreadingMixIn, WSGIServer):
    """One thread per request, so a slow scrape does not hold the next one."""

    # Request threads never keep the process alive (client_python's ThreadingWSGIServer).
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    """Logs no access lines to stderr (client_python's ``_SilentHandler``)."""

    def log_message(self, format: str, *args: Any) -> None:
        """Logs nothing."""


def _only_metrics_path(app: WSGIApplication) -> WSGIApplication:
    """Serves ``app`` at ``/metrics`` and 404 elsewhere (client_python serves any path)."""

    def routed(environ: WSGIEnvironment, start_response: StartResponse) -> Any:
        if environ.get("PATH_INFO", "") == METRICS_PATH:
            return app(environ, start_response)
        body = f"not found: refcache metrics are at {METRICS_PATH}\n".encode()
        start_response(
            "404 Not Found",
            [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
        )
        return [body]

    return routed


class MetricsServer:
    """A running ``/metrics`` HTTP server (returned by :func:`serve`).

    A context manager: leaving the ``with`` block stops it. ``stop()`` is idempotent.
    The accept loop runs on a daemon thread named ``refcache-metrics-http``.
    """

    def __init__(self, httpd: WSGIServer, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread
        self._stop_lock = threading.Lock()
        self._stopped = False
        host, port = httpd.server_address[:2]
        self._addr = str(host)
        self._port = int(port)

    @property
    def addr(self) -> str:
        """The address listened on."""
        return self._addr

    @property
    def port(self) -> int:
        """The port listened on (the one the OS chose when 0 was asked for)."""
        return self._port

    @property
    def url(self) -> str:
        """The metrics URL, e.g. ``http://127.0.0.1:9464/metrics``."""
        host = f"[{self._addr}]" if ":" in self._addr else self._addr
        return f"http://{host}:{self._port}{METRICS_PATH}"

    @property
    def running(self) -> bool:
        """Whether the server still accepts connections."""
        return not self._stopped

    def stop(self) -> None:
        """Stops accepting, closes the socket and joins the accept thread.

        Requests in flight finish on their own (daemon) threads. Takes at most about
        0.25 s (the accept loop's poll interval).
        """
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(_STOP_TIMEOUT)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<MetricsServer {self.url} {state}>"


def serve(
    cache: CacheLike,
    port: int,
    addr: str = "127.0.0.1",
    *,
    registry: CollectorRegistry | None = None,
) -> MetricsServer:
    """Starts an HTTP server exposing the cache's metrics at ``/metrics``.

    Listens on loopback by default: the series name record ids, which are not for the
    network at large (pass ``addr="0.0.0.0"`` or ``"::"`` deliberately).

    Args:
        cache: The cache (its ``manager`` is read).
        port: TCP port; 0 lets the OS choose (read it back from ``MetricsServer.port``).
        addr: Address to listen on (IPv4 or IPv6 literal, or a host name).
        registry: Registry to serve instead of a fresh one with a ``CacheCollector``.

    Returns:
        The running server; stop it with ``stop()`` or a ``with`` block.

    Raises:
        InvalidError: A bad port, address, registry, or a cache without a manager
            (nothing is started).
        FailedPreconditionError: The address cannot be listened on (port in use,
            permission denied).
    """
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        msg = f"invalid metrics port {port!r}: expected 0..65535"
        raise InvalidError(msg)
    if not isinstance(addr, str) or not addr:
        msg = f"invalid metrics address {addr!r}: expected a host or IP literal"
        raise InvalidError(msg)
    app = _only_metrics_path(make_wsgi_app(_registry_for(cache, registry)))
    try:
        # HTTPServer is AF_INET only; pick the family from the address, as client_python
        # (and CPython's http.server) do, so that "::1" works.
        family, *_, sockaddr = socket.getaddrinfo(
            addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        msg = f"invalid metrics address {addr!r}: {exc.strerror}"
        raise InvalidError(msg) from exc

    class _FamilyServer(_Server):
        address_family = family

    try:
        httpd = make_server(
            str(sockaddr[0]), port, app, server_class=_FamilyServer, handler_class=_QuietHandler
        )
    except OSError as exc:
        msg = f"cannot listen for metrics on {addr}:{port}: {exc.strerror or exc}"
        raise FailedPreconditionError(msg) from exc
    thread = threading.Thread(
        target=httpd.serve_forever,
        kwargs={"poll_interval": _POLL_INTERVAL},
        name="refcache-metrics-http",
        daemon=True,
    )
    thread.start()
    return MetricsServer(httpd, thread)
