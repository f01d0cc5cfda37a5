"""The compressed streams nsqd negotiates with IDENTIFY: snappy and deflate, for both ends of a connection.

Each stream object is one direction pair of one connection: ``compress``
turns what one write sends into bytes the peer decodes at once (everything
given is flushed out: one write per loop iteration stays one compressed
write), ``decompress`` turns what a read brought into what it decodes to so
far, keeping an incomplete tail for the next read. Corrupt input raises
``CompressionError`` (a ``ProtocolError``): the connection cannot go on.

``SnappyStream``
    The snappy framing format (github.com/google/snappy's framing_format.txt)
    as nsqd speaks it with Go's github.com/golang/snappy ``NewWriter`` and
    ``NewReader``: a stream identifier chunk first, then compressed or
    uncompressed chunks of at most 64 KiB, each with the masked CRC-32C of
    its data. The chunks are made and checked by cramjam (Rust's snap crate),
    an optional dependency: ``pip install 'almanet[snappy]'``. Only the
    splitting of the incoming stream at chunk boundaries is done here.

``DeflateStream``
    Raw deflate (RFC 1951, no zlib header: wbits -15) at the negotiated
    level, each write ended with a sync flush as Go's ``flate.Writer.Flush``
    does; zlib from the standard library.
"""

from __future__ import annotations

import zlib
from typing import Final

from almanet.wire.errors import CompressionError

try:
    import cramjam
except ImportError:  # pragma: no cover - the [snappy] extra is not installed
    cramjam = None  # type: ignore[assignment]

SNAPPY_MISSING: Final = "snappy compression needs cramjam: pip install 'almanet[snappy]' (or cramjam)"

# The framing format's chunk types and limits, as golang/snappy reads them.
_STREAM_IDENTIFIER: Final = b"\xff\x06\x00\x00sNaPpY"
_CHUNK_COMPRESSED: Final = 0x00
_CHUNK_UNCOMPRESSED: Final = 0x01
_CHUNK_STREAM_IDENTIFIER: Final = 0xFF
_LAST_UNSKIPPABLE: Final = 0x7F
# golang/snappy's Reader refuses a chunk longer than its buffer: the largest
# encoding of a 64 KiB block, and its checksum.
_MAX_CHUNK_LENGTH: Final = 76490 + 4


def snappy_available() -> bool:
    """Whether snappy streams can be made (cramjam is installed)."""
    return cramjam is not None


class SnappyStream:
    """One connection's snappy framing format, both ways (see the module docstring)."""

    __slots__ = ("_compressor", "_pending", "_started")

    def __init__(self) -> None:
        if cramjam is None:
            raise ImportError(SNAPPY_MISSING)
        self._compressor = cramjam.snappy.Compressor()
        self._pending = bytearray()  # received bytes of a chunk not complete yet
        self._started = False  # the peer's stream identifier was received

    def compress(self, data: bytes) -> bytes:
        """The chunks of ``data`` (after the stream identifier, the first time)."""
        self._compressor.compress(data)
        return bytes(self._compressor.flush())

    def decompress(self, data: bytes) -> bytes:
        """What the complete chunks received so far hold; ``CompressionError`` on a corrupt stream."""
        pending = self._pending
        pending += data
        end = len(pending)
        position = 0
        while end - position >= 4:
            kind = pending[position]
            length = pending[position + 1] | pending[position + 2] << 8 | pending[position + 3] << 16
            if not self._started:
                if kind != _CHUNK_STREAM_IDENTIFIER:
                    raise CompressionError(f"snappy stream does not begin with a stream identifier (chunk type {kind})")
                self._started = True
            if length > _MAX_CHUNK_LENGTH:
                raise CompressionError(f"snappy chunk of {length} bytes exceeds {_MAX_CHUNK_LENGTH}")
            if _CHUNK_UNCOMPRESSED < kind <= _LAST_UNSKIPPABLE:
                raise CompressionError(f"snappy chunk of reserved unskippable type {kind}")
            if end - position - 4 < length:
                break
            position += 4 + length
        if not position:
            return b""
        chunks = bytes(pending[:position])
        del pending[:position]
        try:
            # The chunks, checksums included, decoded as a stream of their own (a stream
            # identifier may repeat anywhere in a stream).
            decoded = cramjam.snappy.decompress(_STREAM_IDENTIFIER + chunks)
        except Exception as error:  # cramjam's DecompressionError, OSError or ValueError: a corrupt stream
            raise CompressionError(f"corrupt snappy stream: {error}") from None
        return bytes(decoded)


# What one read may inflate to unless told more: deflate expands up to about
# 1000-fold, and a peer could make a few reads weigh gigabytes.
MAX_INFLATED_READ: Final = 16 * 1024 * 1024


class DeflateStream:
    """One connection's raw deflate at ``level`` (1 to 9), both ways (see the module docstring).

    ``max_inflated``: what one read may decode to, at most; more is a
    ``CompressionError`` (give at least the biggest frame or command the
    connection takes, twice over).
    """

    __slots__ = ("_compressor", "_decompressor", "level", "max_inflated")

    def __init__(self, level: int = 6, max_inflated: int = MAX_INFLATED_READ) -> None:
        if not 1 <= level <= 9:
            raise ValueError(f"deflate level must be 1 to 9, not {level}")
        self.level = level
        self.max_inflated = max_inflated
        self._compressor = zlib.compressobj(level, zlib.DEFLATED, -15)
        self._decompressor = zlib.decompressobj(-15)

    def compress(self, data: bytes) -> bytes:
        """``data`` compressed and sync-flushed: the peer decodes all of it from these bytes."""
        compressor = self._compressor
        return compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)

    def decompress(self, data: bytes) -> bytes:
        """What the stream received so far decodes to; ``CompressionError`` on a corrupt stream."""
        decompressor = self._decompressor
        if decompressor.eof:
            raise CompressionError("deflate data after the end of the stream")
        try:
            decoded = decompressor.decompress(data, self.max_inflated)
        except zlib.error as error:
            raise CompressionError(f"corrupt deflate stream: {error}") from None
        if decompressor.unconsumed_tail:
            raise CompressionError(f"one read inflates to more than {self.max_inflated} bytes")
        if decompressor.eof and decompressor.unused_data:
            raise CompressionError("deflate data after the end of the stream")
        return decoded
