"""The error hierarchy shared by every refcache layer.

One root, :class:`RefcacheError`, with BuildKit's and containerd's error classes
(``errdefs``) under it. Storage raises these; ``actors`` re-exports them unchanged, so a
caller catches the same class whichever layer raised it. Third-party errors (LMDB,
msgpack, OS errors) are wrapped at the storage boundary with ``raise ... from exc``.

Messages always name the offending id, key or value.

No exception of a library refcache uses (Pykka, ``concurrent.futures``, LMDB) reaches a
caller of the public API: a stopped actor or a cancelled job means the cache was closed
(:class:`ClosedError`), an expired wait is :class:`TimeoutError` (this module's, a
:class:`RefcacheError`; it is not the builtin of the same name, which the modules of refcache
keep using for their own waits and import this class as ``CacheTimeoutError``).
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "AlreadyExistsError",
    "ClosedError",
    "AuthError",
    "CorruptMetadataError",
    "CorruptedError",
    "DiffIDMismatchError",
    "FailedPreconditionError",
    "IncompatibleSchemaError",
    "InvalidError",
    "LockedError",
    "NeedsRemoteProviderError",
    "NotFoundError",
    "PermissionDeniedError",
    "RefcacheError",
    "StoreFullError",
    "TimeoutError",
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


class CorruptedError(RefcacheError):
    """Stored data is damaged: the metadata environment (a truncated or overwritten LMDB
    file, a broken page) or a stored value.

    Raised before the damaged file is mapped wherever that can be checked, so damage is an
    error, never a crash of the process (``SIGBUS``).
    """


class CorruptMetadataError(CorruptedError):
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


class PermissionDeniedError(RefcacheError):
    """The cache cannot be used for lack of rights: a read-only file system (``EROFS``) or
    missing permissions (``EACCES``/``EPERM``) on its files (containerd
    ``ErrPermissionDenied``). The message names the cache root or file."""


class DiffIDMismatchError(InvalidError):
    """A layer blob's uncompressed content does not have the diffID its descriptor claims.

    The descriptor's ``containerd.io/uncompressed`` annotation is what snapshots are shared
    by (chain IDs); a blob that lies about it is refused before anything is committed.

    Attributes:
        blob: The blob's digest.
        expected: The diffID the descriptor claims.
        actual: The diffID of the blob's content.
    """

    def __init__(self, blob: str, expected: str, actual: str) -> None:
        self.blob = blob
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"blob {blob} claims diffID {expected} but its content has diffID {actual}; "
            "refused (nothing was committed)"
        )

    def __reduce__(self) -> tuple[type[DiffIDMismatchError], tuple[str, str, str]]:
        return (DiffIDMismatchError, (self.blob, self.expected, self.actual))


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


class ClosedError(RefcacheError):
    """The cache was closed: a call after :meth:`Cache.close`, or one that close cut short.

    Raised by the manager proxy's methods and futures and by every handle method once the
    cache is closed (or closing), instead of Pykka's ``ActorDeadError`` or
    ``concurrent.futures.CancelledError``.
    """


class TimeoutError(RefcacheError):  # the public name; shadows the builtin only here
    """A wait ran past its bound: the cache's ``timeout`` or the ``timeout`` given to ``get()``.

    Raised instead of ``pykka.Timeout`` and ``concurrent.futures.TimeoutError``, e.g. by a
    descriptor provider or a ``ref_checker`` that does not return. The builtin
    ``TimeoutError`` is not a base class: code that catches ``OSError`` does not catch this.
    """


#: The name the modules of refcache use for :class:`TimeoutError` (the builtin stays visible).
CacheTimeoutError = TimeoutError
