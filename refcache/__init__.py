"""refcache: BuildKit's layer-cache ref manager as an embeddable actor service.

The front door. ``from refcache import open_cache`` opens a cache; the error classes, handle
types and value types an embedder needs are re-exported here from :mod:`refcache.actors`.
The layers live in :mod:`refcache.storage` (metadata and backends), :mod:`refcache.actors`
(manager, records, handles) and :mod:`refcache.metrics` (Prometheus exposition).
"""

from .actors import (
    AlreadyExistsError,
    Cache,
    CacheStatistics,
    ClosedError,
    CorruptMetadataError,
    DescHandler,
    Descriptor,
    FailedPreconditionError,
    ImmutableRef,
    IncompatibleSchemaError,
    InvalidError,
    LockedError,
    Mount,
    Mountable,
    MutableRef,
    NeedsRemoteProviderError,
    NotFoundError,
    PrunePolicy,
    RecordInfo,
    RefcacheError,
    RefList,
    RefMetadata,
    Remote,
    StoreFullError,
    TimeoutError,
    UsageInfo,
    open_cache,
)

__all__ = [
    "open_cache",
    "Cache",
    "ImmutableRef",
    "MutableRef",
    "RefList",
    "RefMetadata",
    "Mountable",
    "Descriptor",
    "DescHandler",
    "Mount",
    "RecordInfo",
    "UsageInfo",
    "PrunePolicy",
    "Remote",
    "CacheStatistics",
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
    "ClosedError",
    "TimeoutError",
]
