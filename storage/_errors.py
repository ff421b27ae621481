"""The error hierarchy shared by every refcache layer.

One root, :class:`RefcacheError`, with BuildKit's and containerd's error classes
(``errdefs``) under it. Storage raises these; ``actors`` re-exports them unchanged, so a
caller catches the same class whichever layer raised it. Third-party errors (LMDB,
msgpack, OS errors) are wrapped at the storage boundary with ``raise ... from exc``.

Messages always name the offending id, key or value.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "AlreadyExistsError",
    "AuthError",
    "CorruptMetadataError",
    "FailedPreconditionError",
    "IncompatibleSchemaError",
    "InvalidError",
    "LockedError",
    "NeedsRemoteProviderError",
    "NotFoundError",
    "RefcacheError",
    "StoreFullError",
    "UnavailableError",
]


class RefcacheError(Exception):
    """Root of every error refcache raises on purpose."""


class NotFoundError(RefcacheError):
    """A record, snapshot, blob, lease or key does not exist (containerd ``ErrNotFound``)."""


class LockedError(RefcacheError):
    """The record is held in a way that forbids the request (BuildKit ``ErrLocked``)."""


class InvalidError(RefcacheError):
    """The request itself is malformed: wrong type, bad digest, bad filter, used handle."""


class AlreadyExistsError(RefcacheError):
    """The object being created exists already (containerd ``ErrAlreadyExists``)."""


class FailedPreconditionError(RefcacheError):
    """The object is in the wrong state for the request (containerd ``ErrFailedPrecondition``)."""


class IncompatibleSchemaError(FailedPreconditionError):
    """The metadata on disk was written by a newer or unknown schema version."""


class CorruptMetadataError(RefcacheError):
    """A stored value cannot be decoded or has the wrong type.

    Attributes:
        record_id: The record whose metadata is corrupt.
        key: The metadata key, or ``None`` when the whole record could not be decoded.
    """

    def __init__(self, message: str, *, record_id: str, key: str | None = None) -> None:
        super().__init__(message)
        self.record_id = record_id
        self.key = key


class AuthError(RefcacheError):
    """A registry refused the request: no, wrong or insufficient credentials (containerd
    ``ErrUnauthenticated``/``ErrPermissionDenied``). The message names the registry."""


class UnavailableError(RefcacheError):
    """A registry (or an OCI layout) could not be reached, even after retrying within the
    cache's timeout (containerd ``ErrUnavailable``). The message names the registry and what
    was being transferred (the blob digest for a fetch)."""


class StoreFullError(RefcacheError):
    """The metadata store (or the disk under it) has no room left, even after growing."""


class NeedsRemoteProviderError(RefcacheError):
    """A lazy record's blob is neither local nor covered by a descriptor handler.

    Attributes:
        digests: The blob digests that need a remote provider, in chain order.
    """

    def __init__(self, digests: Iterable[str]) -> None:
        self.digests: tuple[str, ...] = tuple(digests)
        super().__init__(f"missing descriptor handlers for lazy blobs {list(self.digests)}")

    def __reduce__(self) -> tuple[type[NeedsRemoteProviderError], tuple[tuple[str, ...]]]:
        return (NeedsRemoteProviderError, (self.digests,))
