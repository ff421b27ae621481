"""Layer compression: sniffing, decompressing and compressing layer blob streams.

Detection is by content (magic bytes), as containerd and BuildKit do, not by media type.
Used by the applier (``_applier.py``), the layer blob writer (``_differ.py``) and the blob
conversions of the record layer.
"""

from __future__ import annotations

import gzip
import io
from typing import IO, BinaryIO, Final, Literal, Protocol, cast

import zstandard

from ._errors import InvalidError

__all__ = [
    "COMPRESSIONS",
    "Compression",
    "check_compression",
    "compressed_writer",
    "decompressed_stream",
    "detect_compression",
]

Compression = Literal["uncompressed", "gzip", "zstd"]

#: The compressions :func:`compressed_writer` and the differ accept.
COMPRESSIONS: Final[tuple[str, ...]] = ("uncompressed", "gzip", "zstd")

_GZIP_MAGIC: Final = b"\x1f\x8b\x08"
_ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"


class _Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes | None: ...


class _Writable(Protocol):
    def write(self, data: bytes, /) -> object: ...


def detect_compression(head: bytes) -> Compression:
    """Sniffs a layer's compression from its first bytes (containerd ``DetectCompression``).

    Args:
        head: At least the first 4 bytes of the blob (fewer only when the blob is shorter).

    Returns:
        ``"gzip"`` for ``1f 8b 08``, ``"zstd"`` for a zstd frame (``28 b5 2f fd``) or a
        skippable frame (``5? 2a 4d 18``), else ``"uncompressed"``.
    """
    if head[:3] == _GZIP_MAGIC:
        return "gzip"
    if head[:4] == _ZSTD_MAGIC:
        return "zstd"
    if len(head) >= 4 and head[0] & 0xF0 == 0x50 and head[1:4] == b"\x2a\x4d\x18":
        return "zstd"
    return "uncompressed"


class _PrefixedReader(io.RawIOBase):
    """Replays the sniffed head bytes, then reads the rest of the source."""

    def __init__(self, head: bytes, source: _Readable) -> None:
        super().__init__()
        self._head = head
        self._source = source

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self._head:
            if size < 0:
                data = self._head + (self._source.read() or b"")
                self._head = b""
                return data
            data, self._head = self._head[:size], self._head[size:]
            return data
        return self._source.read(size) or b""

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _open_decompressed(fileobj: _Readable) -> tuple[Compression, BinaryIO]:
    head = b""
    while len(head) < 4:
        chunk = fileobj.read(4 - len(head))
        if not chunk:
            break
        head += chunk
    kind = detect_compression(head)
    source = _PrefixedReader(head, fileobj)
    if kind == "gzip":
        # GzipFile reads concatenated members (multi-member gzip) to the end by itself.
        return kind, cast(BinaryIO, gzip.GzipFile(fileobj=source, mode="rb"))
    if kind == "zstd":
        # zstd:chunked / estargz-style layers are many frames (and skippable frames).
        reader = zstandard.ZstdDecompressor().stream_reader(
            cast(IO[bytes], source), read_across_frames=True, closefd=False
        )
        return kind, cast(BinaryIO, reader)
    return kind, cast(BinaryIO, source)


def decompressed_stream(fileobj: BinaryIO) -> BinaryIO:
    """Wraps a layer blob stream in the decompressor its magic bytes call for.

    Detection is by content, not media type, as BuildKit and containerd do. Multi-member gzip
    and multi-frame zstd (with skippable frames) decode to the end.

    Args:
        fileobj: The blob, positioned at its start. It is not closed by the returned stream.

    Returns:
        A readable stream of the uncompressed bytes.
    """
    return _open_decompressed(fileobj)[1]


class _NonClosing(io.RawIOBase):
    """Passes writes through; ``close`` does not close the sink (uncompressed output)."""

    def __init__(self, sink: _Writable) -> None:
        super().__init__()
        self._sink = sink

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self._sink.write(data)
        return len(data)


def check_compression(value: object) -> str:
    """Returns ``value`` if it names a compression of :data:`COMPRESSIONS`.

    Raises:
        InvalidError: Anything else (``"estargz"`` is out of scope here).
    """
    if not isinstance(value, str) or value not in COMPRESSIONS:
        msg = f"unknown compression {value!r}: expected one of {', '.join(COMPRESSIONS)}"
        if value == "estargz":
            msg += " (estargz needs a stargz snapshotter, which refcache does not have)"
        raise InvalidError(msg)
    return value


def compressed_writer(
    fileobj: BinaryIO | IO[bytes], compression: str, *, level: int | None = None
) -> BinaryIO:
    """Returns a writer that compresses into ``fileobj``.

    Closing the writer finishes the compressed stream (gzip trailer, zstd frame end) but does
    not close ``fileobj``. gzip output is deterministic (mtime 0, no file name).

    Args:
        fileobj: Where the compressed bytes go.
        compression: ``"gzip"``, ``"zstd"`` or ``"uncompressed"``.
        level: Compression level (gzip default 6, zstd default 3).

    Returns:
        A writable binary stream.

    Raises:
        InvalidError: Unknown compression.
    """
    if compression == "gzip":
        return cast(
            BinaryIO,
            gzip.GzipFile(
                filename="",
                mode="wb",
                fileobj=fileobj,
                mtime=0,
                compresslevel=6 if level is None else level,
            ),
        )
    if compression == "zstd":
        cctx = zstandard.ZstdCompressor(level=3 if level is None else level)
        return cast(BinaryIO, cctx.stream_writer(fileobj, closefd=False, write_return_read=True))
    if check_compression(compression) == "uncompressed":
        return cast(BinaryIO, _NonClosing(fileobj))
    raise AssertionError(compression)  # check_compression accepts nothing else
