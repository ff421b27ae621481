"""Prometheus exposition of refcache (reads the manager's statistics; never mutates)."""

from ._collector import LATENCY_BUCKETS, CacheCollector
from ._exposition import MetricsServer, serve, wsgi_app

__all__ = [
    "CacheCollector",
    "LATENCY_BUCKETS",
    "serve",
    "wsgi_app",
    "MetricsServer",
]
