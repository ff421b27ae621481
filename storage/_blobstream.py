"""Reading a blob from a registry: the streamed ``GET`` body and its resumption.

:class:`BlobStream` reads ``GET /v2/<repo>/blobs/<digest>`` from the socket (through
:meth:`RegistryClient.open_body <storage._registry.RegistryClient.open_body>`) and resumes
with ``Range: bytes=<offset>-`` when the connection breaks.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Final

from ._errors import RefcacheError
from ._retry import Retry, backoff
from ._types import Descriptor, validate_digest

if TYPE_CHECKING:
    from ._registry import RegistryRepository

__all__ = ["BlobStream", "Body"]

logger = logging.getLogger(__name__)

_CHUNK: Final = 1 << 20


class Body:
    """An open ``GET`` response read from its socket (see :meth:`RegistryClient.open_body`)."""

    def __init__(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> None:
        self.conn = conn
        self.resp = resp
        self.status = resp.status

    def header(self, name: str) -> str:
        return self.resp.getheader(name, "") or ""

    def chunks(self) -> Iterator[bytes]:
        """The body in pieces as the socket delivers them (up to 1 MiB); ends early (no
        error) when the connection breaks: the caller compares with the expected size."""
        while chunk := self.resp.read1(_CHUNK):
            yield chunk

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.resp.close()
        self.conn.close()


class BlobStream(io.RawIOBase):
    """A blob read from a registry, resumed with ``Range`` requests when a connection breaks.

    The first read sends ``GET /v2/<repo>/blobs/<digest>`` (redirects followed, as registries
    backed by object stores answer with one). When the body stops early (reset, timeout,
    truncated), the stream reconnects with ``Range: bytes=<offset>-`` and goes on, backing
    off between attempts, for as long as the client's ``timeout`` allows since the last byte
    arrived. A server that ignores ``Range`` (200) is read from the start and the bytes
    already delivered are skipped. Reading stops at ``desc.size`` bytes; the digest is not
    checked here (the content store's verified write does it, while the bytes stream in).

    Raises (from ``read``):
        UnavailableError: retries ran out; the message names the registry and the digest.
        NotFoundError: the registry has no such blob.
    """

    def __init__(
        self,
        repo: RegistryRepository,
        desc: Descriptor,
        on_bytes: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__()
        validate_digest(desc.digest)
        self._repo = repo
        self._desc = desc
        self._on_bytes = on_bytes
        self._offset = 0
        self._resp: Body | None = None
        self._chunks: Iterator[bytes] | None = None
        self._pending = b""
        self._attempts = 0
        self.reconnects = 0

    @property
    def offset(self) -> int:
        """Bytes delivered so far."""
        return self._offset

    def readable(self) -> bool:
        return True

    def _what(self) -> str:
        return f"fetch of blob {self._desc.digest} from repository {self._repo.name}"

    def _connect(self, deadline: float) -> None:
        client = self._repo.client
        headers = {}
        if self._offset:
            headers["Range"] = f"bytes={self._offset}-"
        body = client.open_body(
            "blob_get",
            f"/v2/{self._repo.name}/blobs/{self._desc.digest}",
            scope=self._repo._scope(),
            what=self._what(),
            headers=headers,
            budget=deadline - time.monotonic(),
        )
        skip = 0
        if body.status == 200:
            skip = self._offset  # Range ignored: the whole blob again
        elif self._offset:
            start = _content_range_start(body.header("Content-Range"))
            if start != self._offset:
                body.close()
                msg = (
                    f"{client.description} answered a range from {start} for "
                    f"{self._what()} at offset {self._offset}"
                )
                raise RefcacheError(msg)
        self._resp = body
        self._chunks = body.chunks()
        while skip:
            chunk = next(self._chunks, b"")
            if not chunk:
                raise Retry("connection closed before the resume offset")
            if len(chunk) > skip:
                self._pending = chunk[skip:]
                skip = 0
            else:
                skip -= len(chunk)

    def _drop(self) -> None:
        if self._resp is not None:
            with contextlib.suppress(Exception):
                self._resp.close()
        self._resp = None
        self._chunks = None

    def _next_chunk(self) -> bytes:
        if self._pending:
            chunk, self._pending = self._pending, b""
            return chunk
        client = self._repo.client
        deadline = time.monotonic() + client.timeout
        started = time.monotonic()
        while True:
            try:
                return self._pull_chunk(deadline)
            except (OSError, http.client.HTTPException, Retry) as exc:
                self._drop()
                reason = exc.reason if isinstance(exc, Retry) else f"{type(exc).__name__}: {exc}"
                self._attempts += 1
                self.reconnects += 1
                logger.info("%s: %s; resuming at byte %d", self._what(), reason, self._offset)
                if not backoff(min(self._attempts, 8), deadline):
                    raise client._unavailable(
                        self._what(), reason, self._attempts, started
                    ) from exc

    def _pull_chunk(self, deadline: float) -> bytes:
        """The next piece of the body (``b""`` at the end); ``Retry`` when it broke off."""
        if self._chunks is None:
            self._connect(deadline)
        assert self._chunks is not None
        if self._pending:
            chunk, self._pending = self._pending, b""
        else:
            chunk = next(self._chunks, b"")
        if chunk or self._desc.size <= 0 or self._offset >= self._desc.size:
            return chunk
        raise Retry(f"connection closed at byte {self._offset} of {self._desc.size}")

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = len(view)
        if want == 0:
            return 0
        if self._desc.size > 0:
            want = min(want, self._desc.size - self._offset)
            if want <= 0:
                return 0
        chunk = self._next_chunk()
        if not chunk:
            return 0
        n = min(len(chunk), want)
        view[:n] = chunk[:n]
        if n < len(chunk):
            self._pending = chunk[n:]
        self._offset += n
        self._attempts = 0  # progress: the retry budget starts again
        if self._on_bytes is not None:
            self._on_bytes(n)
        return n

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (one network chunk at most); ``b""`` at the end."""
        if size is None or size < 0:
            return self.readall()
        buf = bytearray(min(size, _CHUNK))
        n = self.readinto(buf)
        return bytes(buf[:n])

    def close(self) -> None:
        self._drop()
        super().close()


def _content_range_start(value: str) -> int:
    # "bytes 100-199/200"
    try:
        return int(value.split(" ", 1)[1].split("-", 1)[0])
    except (IndexError, ValueError):
        return -1
