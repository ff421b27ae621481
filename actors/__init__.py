"""The actor layer of refcache: manager and record actors, ref handles, ``open_cache``.

Re-exports every error class of :mod:`storage`, so that callers catch one hierarchy.
"""

from actors._cache import Cache, open_cache
from actors._manager import CacheManager, CacheManagerProxy
from actors._prune import CacheListener
from actors._refs import ImmutableRef, Mountable, MutableRef, RefList, RefMetadata
from actors._runtime import ActorPool, PooledActor, PoolStats, current_pool, default_pool
from actors._types import (
    CacheStatistics,
    DescHandler,
    PrunePolicy,
    RecordInfo,
    Remote,
    UsageInfo,
)
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
    # opening
    "open_cache",
    "Cache",
    "CacheManager",
    "CacheManagerProxy",
    "CacheListener",
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
    "CorruptMetadataError",
    "NeedsRemoteProviderError",
    "StoreFullError",
]
