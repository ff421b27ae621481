"""The actor layer of refcache: manager and record actors, ref handles, the CLI.

Re-exports every error class of :mod:`storage`, so that callers catch one hierarchy.
"""

from storage import (
    AlreadyExistsError,
    CorruptMetadataError,
    Descriptor,
    FailedPreconditionError,
    IncompatibleSchemaError,
    InvalidError,
    LockedError,
    Mount,
    NeedsRemoteProviderError,
    NotFoundError,
    RefcacheError,
    StoreFullError,
)

__all__ = [
    "RefcacheError",
    "NotFoundError",
    "LockedError",
    "InvalidError",
    "AlreadyExistsError",
    "FailedPreconditionError",
    "IncompatibleSchemaError",
    "CorruptMetadataError",
    "NeedsRemoteProviderError",
    "StoreFullError",
    "Descriptor",
    "Mount",
]
