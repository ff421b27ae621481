"""HTTP exposition of a cache's metrics: a stoppable ``/metrics`` server and a WSGI app.

Both build a fresh :class:`~prometheus_client.CollectorRegistry` holding one
:class:`~metrics._collector.CacheCollector` for ``cache.manager`` unless a registry is
given. They never register into client_python's global ``REGISTRY``: two caches in one
process (or one test after another) would collide on the same metric names there. Their
collector reuses a snapshot for :data:`~metrics._collector.SNAPSHOT_MAX_AGE` seconds and
shares the one in flight, so a burst of scrapers costs the manager one ``statistics()``.

The server is bounded: a connection waits, without a thread, until it has sent something
(one selector thread watches them all) and is dropped if it sends nothing within
``connection_timeout``; requests are served by at most ``workers`` threads, each socket
read and write again bounded by ``connection_timeout``. Hundreds of idle or half-open
connections cost file descriptors, not threads, and go away on their own.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from prometheus_client import make_wsgi_app
from prometheus_client.registry import CollectorRegistry

from ..storage import FailedPreconditionError, InvalidError
from ._collector import (
    SNAPSHOT_MAX_AGE,
    CacheCollector,
    StatisticsSource,
    check_registry,
    check_seconds,
)

__all__ = ["MetricsServer", "serve", "wsgi_app"]

logger = logging.getLogger(__name__)

METRICS_PATH = "/metrics"
# serve_forever() checks for shutdown this often: the upper bound of MetricsServer.stop().
_POLL_INTERVAL = 0.25
_STOP_TIMEOUT = 5.0
#: Seconds a connection may stay silent before it is dropped, and bound of every socket
#: read or write of a request (a half-open or trickling client costs at most this).
CONNECTION_TIMEOUT = 5.0
#: Threads serving requests (a scrape is one snapshot shared by concurrent scrapes).
WORKERS = 4
#: Connections waiting for their first bytes beyond this many: the oldest are dropped.
MAX_WAITING = 512
#: Seconds a scrape waits for an alike scrape's rendering in flight (the collector's own
#: wait for the manager is 2 s; this only guards against a wedged rendering).
_RENDER_TIMEOUT = 30.0


class CacheLike(Protocol):
    """What exposition needs from a cache: ``open_cache(root)`` returns one."""

    @property
    def manager(self) -> StatisticsSource:
        """The manager proxy."""
        ...


def _registry_for(cache: CacheLike, registry: CollectorRegistry | None) -> CollectorRegistry:
    """Returns ``registry``, or a fresh one holding a collector for ``cache.manager``."""
    if registry is not None:
        return check_registry(registry)
    manager = getattr(cache, "manager", None)
    if manager is None:
        msg = f"cannot expose metrics of {cache!r}: it has no manager"
        raise InvalidError(msg)
    fresh = CollectorRegistry()
    CacheCollector(manager, registry=fresh, max_age=SNAPSHOT_MAX_AGE)
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


class _Waiting:
    """Connections accepted but silent so far, watched by one selector thread.

    A connection that becomes readable (a request, or the client closing) is handed to the
    worker pool; one silent for ``timeout`` seconds is closed; beyond ``limit`` waiting
    connections the oldest is closed. Other threads hand connections over through a queue
    and a wake-up socket pair (a selector is not thread-safe).
    """

    def __init__(
        self,
        server: _Server,
        timeout: float,
        limit: int,
    ) -> None:
        self._server = server
        self._timeout = timeout
        self._limit = limit
        self._lock = threading.Lock()
        self._incoming: list[tuple[socket.socket, Any]] = []
        self._closed = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        # fd -> (socket, client address, deadline), oldest first.
        self._waiting: OrderedDict[int, tuple[socket.socket, Any, float]] = OrderedDict()
        self._thread = threading.Thread(
            target=self._run, name="refcache-metrics-conns", daemon=True
        )
        self._thread.start()

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, request: socket.socket, client_address: Any) -> None:
        """Hands a freshly accepted connection over (from the accept thread)."""
        with self._lock:
            if self._closed:
                self._server.shutdown_request(request)
                return
            self._incoming.append((request, client_address))
        with contextlib.suppress(OSError):  # a full wake-up buffer wakes the loop anyway
            self._wake_w.send(b"\0")

    def close(self) -> None:
        """Stops the selector thread and closes every waiting connection."""
        with self._lock:
            self._closed = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")
        self._thread.join(_STOP_TIMEOUT)

    def _run(self) -> None:
        try:
            while not self._closed:
                self._loop_once()
        finally:
            self._close_all()

    def _loop_once(self) -> None:
        now = time.monotonic()
        wait = _POLL_INTERVAL
        if self._waiting:
            first = next(iter(self._waiting.values()))
            wait = min(wait, max(first[2] - now, 0.0))
        for key, _ in self._selector.select(wait):
            if key.fileobj is self._wake_r:
                with contextlib.suppress(OSError):
                    while self._wake_r.recv(4096):
                        pass
                continue
            entry = self._waiting.pop(key.fd, None)
            self._selector.unregister(key.fileobj)
            if entry is not None:
                self._server.dispatch(entry[0], entry[1])
        with self._lock:
            incoming, self._incoming = self._incoming, []
        deadline = time.monotonic() + self._timeout
        for request, client_address in incoming:
            try:
                self._selector.register(request, selectors.EVENT_READ)
            except (OSError, ValueError):
                self._server.shutdown_request(request)
                continue
            self._waiting[request.fileno()] = (request, client_address, deadline)
        now = time.monotonic()
        while self._waiting:
            fd, (request, _, expires) = next(iter(self._waiting.items()))
            if expires > now and len(self._waiting) <= self._limit:
                break
            del self._waiting[fd]
            self._drop(request)

    def _drop(self, request: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(request)
        self._server.shutdown_request(request)

    def _close_all(self) -> None:
        with self._lock:
            incoming, self._incoming = self._incoming, []
        for request, _ in incoming:
            self._server.shutdown_request(request)
        while self._waiting:
            _, (request, _, _) = self._waiting.popitem(last=False)
            self._drop(request)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()


class _Server(WSGIServer):
    """The bounded ``/metrics`` server (see the module docstring)."""

    # Room for a burst of connects: the accept loop hands each one over at once.
    request_queue_size = 128
    connection_timeout = CONNECTION_TIMEOUT
    workers = WORKERS
    max_waiting = MAX_WAITING

    def server_activate(self) -> None:
        """Listens, then starts the connection watcher and the worker pool."""
        super().server_activate()
        self._pool = ThreadPoolExecutor(
            max_workers=self.workers, thread_name_prefix="refcache-metrics-http-worker"
        )
        self._conns = _Waiting(self, self.connection_timeout, self.max_waiting)

    @property
    def waiting_connections(self) -> int:
        """Connections accepted and not yet readable (for tests and debugging)."""
        return len(self._conns)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Parks an accepted connection until it sends something (no thread meanwhile)."""
        self._conns.add(request, client_address)

    def dispatch(self, request: socket.socket, client_address: Any) -> None:
        """Serves a connection that has data on a worker thread (from the watcher)."""
        try:
            self._pool.submit(self._serve, request, client_address)
        except RuntimeError:  # the pool is shut down: the server is stopping
            self.shutdown_request(request)

    def _serve(self, request: socket.socket, client_address: Any) -> None:
        try:
            request.settimeout(self.connection_timeout)
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Logs a failed request at debug level (socketserver prints it to stderr)."""
        logger.debug("metrics request from %s failed", client_address, exc_info=True)

    def server_close(self) -> None:
        """Closes the listening socket, the waiting connections and the worker pool."""
        super().server_close()
        conns = getattr(self, "_conns", None)
        if conns is not None:
            conns.close()
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


class _QuietHandler(WSGIRequestHandler):
    """Logs no access lines to stderr (client_python's ``_SilentHandler``)."""

    def log_message(self, format: str, *args: Any) -> None:
        """Logs nothing."""


class _SharedResponses:
    """A WSGI app that serves one rendering of ``app`` to every request alike for a while.

    Scrapes within ``max_age`` seconds of each other would expose the same snapshot anyway
    (the collector reuses it that long); rendering it once instead of once per scraper
    keeps a burst of scrapers from taking the CPU (and the GIL) from the cache. Requests
    are alike when their method, query string, ``Accept`` and ``Accept-Encoding`` are (what
    client_python's rendering depends on); concurrent alike requests wait for the one
    rendering in flight. Only successful renderings are kept, at most :attr:`LIMIT`.
    """

    LIMIT = 16

    def __init__(self, app: WSGIApplication, max_age: float, timeout: float) -> None:
        self._app = app
        self._max_age = max_age
        self._timeout = timeout
        self._lock = threading.Lock()
        self._done: OrderedDict[tuple[str, ...], tuple[float, str, list[Any], bytes]]
        self._done = OrderedDict()
        self._flights: dict[tuple[str, ...], Future[tuple[str, list[Any], bytes]]] = {}

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Any:
        key = tuple(
            str(environ.get(name, ""))
            for name in ("REQUEST_METHOD", "QUERY_STRING", "HTTP_ACCEPT", "HTTP_ACCEPT_ENCODING")
        )
        now = time.monotonic()
        with self._lock:
            done = self._done.get(key)
            if done is not None and done[0] > now:
                start_response(done[1], list(done[2]))
                return [done[3]]
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = Future()
        if leader:
            status, headers, body = self._render(key, flight, environ)
        else:
            status, headers, body = flight.result(timeout=self._timeout)
        start_response(status, list(headers))
        return [body]

    def _render(
        self,
        key: tuple[str, ...],
        flight: Future[tuple[str, list[Any], bytes]],
        environ: WSGIEnvironment,
    ) -> tuple[str, list[Any], bytes]:
        got: list[Any] = []

        def capture(status: str, headers: list[Any], exc_info: Any = None) -> Any:
            got[:] = [status, headers]
            return lambda data: None

        try:
            parts = self._app(environ, capture)
            try:
                body = b"".join(parts)
            finally:
                close = getattr(parts, "close", None)
                if callable(close):
                    close()
            result = (str(got[0]), list(got[1]), body)
        except BaseException as exc:
            with self._lock:
                self._flights.pop(key, None)
            flight.set_exception(exc)
            raise
        with self._lock:
            self._flights.pop(key, None)
            if result[0].startswith("200"):
                self._done[key] = (time.monotonic() + self._max_age, *result)
                self._done.move_to_end(key)
                while len(self._done) > self.LIMIT:
                    self._done.popitem(last=False)
        flight.set_result(result)
        return result


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

    @property
    def waiting_connections(self) -> int:
        """Connections accepted that have not sent anything yet (they hold no thread)."""
        return int(getattr(self._httpd, "waiting_connections", 0))

    def stop(self) -> None:
        """Stops accepting, closes the socket and every waiting connection, joins the
        accept thread.

        Requests in flight finish on their worker threads (each socket operation bounded by
        the connection timeout). Takes at most about 0.25 s (the loops' poll interval).
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

    def __exit__(self, *exc_info: object) -> None:
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
    workers: int = WORKERS,
    connection_timeout: float = CONNECTION_TIMEOUT,
) -> MetricsServer:
    """Starts an HTTP server exposing the cache's metrics at ``/metrics``.

    Listens on loopback by default: the series name record ids, which are not for the
    network at large (pass ``addr="0.0.0.0"`` or ``"::"`` deliberately).

    Args:
        cache: The cache (its ``manager`` is read).
        port: TCP port; 0 lets the OS choose (read it back from ``MetricsServer.port``).
        addr: Address to listen on (IPv4 or IPv6 literal, or a host name).
        registry: Registry to serve instead of a fresh one with a ``CacheCollector``.
            Either way, alike scrapes (same query, ``Accept`` and ``Accept-Encoding``)
            within :data:`~metrics._collector.SNAPSHOT_MAX_AGE` seconds get one rendering.
        workers: Threads serving requests (at most; started on demand).
        connection_timeout: Seconds a connection may stay silent before it is dropped, and
            the bound of each socket read and write of a request.

    Returns:
        The running server; stop it with ``stop()`` or a ``with`` block.

    Raises:
        InvalidError: A bad port, address, registry, or a cache without a manager
            (nothing is started).
        FailedPreconditionError: The address cannot be listened on (port in use,
            permission denied).
    """
    _check_listen(port, addr, workers)
    connection_timeout = check_seconds(connection_timeout, "connection_timeout")
    rendered = make_wsgi_app(_registry_for(cache, registry))
    app = _only_metrics_path(_SharedResponses(rendered, SNAPSHOT_MAX_AGE, _RENDER_TIMEOUT))
    httpd = _listen(addr, port, workers=workers, connection_timeout=float(connection_timeout))
    httpd.set_app(app)
    thread = threading.Thread(
        target=httpd.serve_forever,
        kwargs={"poll_interval": _POLL_INTERVAL},
        name="refcache-metrics-http",
        daemon=True,
    )
    thread.start()
    return MetricsServer(httpd, thread)


def _check_listen(port: object, addr: object, workers: object) -> None:
    """Refuses a bad port, address or worker count before anything is built."""
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        msg = f"invalid metrics port {port!r}: expected 0..65535"
        raise InvalidError(msg)
    if not isinstance(addr, str) or not addr:
        msg = f"invalid metrics address {addr!r}: expected a host or IP literal"
        raise InvalidError(msg)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        msg = f"invalid metrics workers {workers!r}: expected an int >= 1"
        raise InvalidError(msg)


def _listen(addr: str, port: int, *, workers: int, connection_timeout: float) -> _Server:
    """A server bound to ``addr:port``, in the address family of ``addr``.

    Raises:
        InvalidError: ``addr`` does not resolve.
        FailedPreconditionError: The address cannot be listened on.
    """
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

    _FamilyServer.workers = workers
    _FamilyServer.connection_timeout = connection_timeout
    try:
        return _FamilyServer((str(sockaddr[0]), port), _QuietHandler)
    except OSError as exc:
        msg = f"cannot listen for metrics on {addr}:{port}: {exc.strerror or exc}"
        raise FailedPreconditionError(msg) from exc
