"""Prometheus exposition of refcache (reads the manager's statistics; never mutates)."""

__all__: list[str] = []
