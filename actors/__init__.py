"""The actor layer of refcache: manager and record actors, ref handles, ``open_cache``.

Re-exports every error class of :mod:`storage`, so that callers catch one hierarchy.
"""

from ..storage import (
    AlreadyExistsError,
    AuthError,
    ClosedError,
    CorruptedError,
    CorruptMetadataError,
    Credentials,
    Descriptor,
    DiffIDMismatchError,
    FailedPreconditionError,
    IncompatibleSchemaError,
    InvalidError,
    LockedError,
    Mount,
    NeedsRemoteProviderError,
    NotFoundError,
    PermissionDeniedError,
    RefcacheError,
    StoreFullError,
    TimeoutError,
    UnavailableError,
)
from ._cache import Cache, open_cache
from ._cliutil import cli_main
from ._core import LATENCY_BUCKETS
from ._distribution import ProgressEvent, PushResult
from ._listeners import CacheListener
from ._manager import CacheManager
from ._proxy import CacheManagerProxy, ManagerFuture
from ._refs import ImmutableRef, Mountable, MutableRef, RefList, RefMetadata
from ._runtime import ActorPool, PooledActor, PoolStats, current_pool, default_pool
from ._types import (
    CacheStatistics,
    DescHandler,
    PrunePolicy,
    RecordInfo,
    Remote,
    UsageInfo,
)

__all__ = [
    # opening
    "open_cache",
    "Cache",
    "CacheManager",
    "CacheManagerProxy",
    "ManagerFuture",
    "CacheListener",
    "cli_main",
    # handles
    "ImmutableRef",
    "MutableRef",
    "RefList",
    "RefMetadata",
    "Mountable",
    # values
    "Descriptor",
    "DescHandler",
    "Mount",
    "RecordInfo",
    "UsageInfo",
    "PrunePolicy",
    "Remote",
    "CacheStatistics",
    "LATENCY_BUCKETS",
    "PushResult",
    "ProgressEvent",
    "Credentials",
    # runtime
    "ActorPool",
    "PooledActor",
    "PoolStats",
    "current_pool",
    "default_pool",
    # errors
    "RefcacheError",
    "NotFoundError",
    "LockedError",
    "InvalidError",
    "AlreadyExistsError",
    "FailedPreconditionError",
    "IncompatibleSchemaError",
    "CorruptedError",
    "CorruptMetadataError",
    "DiffIDMismatchError",
    "NeedsRemoteProviderError",
    "PermissionDeniedError",
    "StoreFullError",
    "ClosedError",
    "TimeoutError",
    "UnavailableError",
    "AuthError",
]
