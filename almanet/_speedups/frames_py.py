"""NSQ TCP protocol V2 frame codec, pure Python (twin of ``frames_c.pyx``).

Client direction: ``FrameReader`` turns the bytes nsqd sends into frames, and
the ``encode_*`` command functions build what a client sends.
Server direction (the embedded broker): ``CommandParser`` turns the bytes a
client sends into ``Command`` objects, and ``encode_response``,
``encode_error`` and ``encode_message`` build frames.

Both readers are incremental: ``feed()`` any chunking of the stream, then
iterate to take the complete frames or commands; iteration stops when the next
one is not complete yet and raises ``ProtocolError`` at the first malformed
one (and again on every later use). ``feed_eof()`` raises when the stream
ended in the middle of one.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Generic, TypeVar

from almanet.wire.errors import CommandError, FrameError, ProtocolError, go_quote, wire_text
from almanet.wire.protocol import (
    DEFAULT_MAX_BODY_SIZE,
    DEFAULT_MAX_FRAME_SIZE,
    DEFAULT_MAX_MSG_SIZE,
    DEFAULT_MAX_REQ_TIMEOUT_MS,
    EPHEMERAL_SUFFIX,
    MAGIC_V2,
    MAX_COMMAND_LINE,
    MAX_NAME_LENGTH,
    MESSAGE_HEADER_SIZE,
    MESSAGE_ID_SIZE,
)

__all__ = [
    "Command",
    "CommandParser",
    "ErrorFrame",
    "FrameReader",
    "MessageFrame",
    "ResponseFrame",
    "check_name",
    "encode_auth",
    "encode_dpub",
    "encode_error",
    "encode_fin",
    "encode_identify",
    "encode_message",
    "encode_mpub",
    "encode_pub",
    "encode_rdy",
    "encode_req",
    "encode_response",
    "encode_sub",
    "encode_touch",
    "is_valid_name",
    "parse_base10",
    "split_mpub",
]

_Item = TypeVar("_Item")
_INT32 = struct.Struct(">i")
_UINT32 = struct.Struct(">I")
_FRAME_HEADER = struct.Struct(">ii")
_MESSAGE_HEADER = struct.Struct(">qH16s")
_MESSAGE_FRAME_HEADER = struct.Struct(">iiqH16s")
_INT32_MAX = 0x7FFFFFFF
_NAME_CHARS = b".-_0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_DIGITS = b"0123456789"


def is_valid_name(name: bytes) -> bool:
    """Whether nsqd accepts ``name`` as a topic or channel name."""
    if not 0 < len(name) <= MAX_NAME_LENGTH:
        return False
    if name.endswith(EPHEMERAL_SUFFIX):
        name = name[: -len(EPHEMERAL_SUFFIX)]
    return len(name) > 0 and not name.translate(None, _NAME_CHARS)


def parse_base10(raw: bytes) -> int | None:
    """A decimal parameter as nsqd reads it: ASCII digits only, empty is 0; else None."""
    if raw.translate(None, _DIGITS):
        return None
    return int(raw) if raw else 0


# --- frames (server -> client) ---------------------------------------------


class _DataFrame:
    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _DataFrame) and type(other) is type(self) and other.data == self.data

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.data!r})"


class ResponseFrame(_DataFrame):
    """Frame type 0: ``OK``, ``_heartbeat_``, ``CLOSE_WAIT``, IDENTIFY's JSON, ..."""

    __slots__ = ()


class ErrorFrame(_DataFrame):
    """Frame type 1: ``E_CODE description``."""

    __slots__ = ()


class MessageFrame:
    """Frame type 2: a message, ``timestamp`` in nanoseconds since the epoch."""

    __slots__ = ("attempts", "body", "id", "timestamp")

    def __init__(self, timestamp: int, attempts: int, id: bytes, body: bytes) -> None:  # noqa: A002
        self.timestamp = timestamp
        self.attempts = attempts
        self.id = id
        self.body = body

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, MessageFrame)
            and other.timestamp == self.timestamp
            and other.attempts == self.attempts
            and other.id == self.id
            and other.body == self.body
        )

    def __repr__(self) -> str:
        return f"MessageFrame({self.timestamp}, {self.attempts}, {self.id!r}, {self.body!r})"


Frame = ResponseFrame | ErrorFrame | MessageFrame


class _StreamBuffer(Generic[_Item]):
    """Bytes fed but not yet consumed; consumed bytes are dropped on the next feed.

    Dropping a bytearray's prefix is O(1) in CPython and appends are amortised,
    so a stream costs linear time whatever its chunking.
    """

    __slots__ = ("_buf", "_error", "_pos", "_reading")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._error: ProtocolError | None = None
        # Set while a frame or command is being read: code that runs meanwhile
        # (another thread, a finalizer) must not move the buffer.
        self._reading = False

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append a chunk of the stream."""
        if self._reading:
            raise BufferError("cannot feed a reader while it is reading")
        if self._error is not None:
            raise self._error
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        """How many bytes are fed and not yet consumed."""
        return len(self._buf) - self._pos

    def __iter__(self) -> Iterator[_Item]:
        return self

    def __next__(self) -> _Item:
        if self._reading:  # a nested next() must not clear the outer read's flag
            raise BufferError("cannot read from a reader while it is reading")
        if self._error is not None:
            raise self._error
        self._reading = True
        try:
            item = self._read()
        except ProtocolError as error:
            raise self._fail(error) from None
        finally:
            self._reading = False
        if item is None:
            raise StopIteration
        return item

    def _read(self) -> _Item | None:
        """The next complete item, None while it is incomplete."""
        raise NotImplementedError

    def _fail(self, error: ProtocolError) -> ProtocolError:
        self._error = error
        return error


class FrameReader(_StreamBuffer[Frame]):
    """Incremental reader of the frames nsqd sends to a client."""

    __slots__ = ("_max_frame_size",)

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        super().__init__()
        self._max_frame_size = max_frame_size

    def _read(self) -> Frame | None:
        buf = self._buf
        pos = self._pos
        available = len(buf) - pos
        # Every check is made as soon as the bytes it needs are there, so the
        # outcome depends on the stream, not on how it was chunked.
        if available < 8:
            if available >= 4:
                size = _INT32.unpack_from(buf, pos)[0]
                if not 4 <= size <= self._max_frame_size:
                    raise _frame_header_error(size, None, self._max_frame_size)
            return None
        size, frame_type = _FRAME_HEADER.unpack_from(buf, pos)
        if not 4 <= size <= self._max_frame_size or not (
            frame_type == 0 or frame_type == 1 or (frame_type == 2 and size >= 4 + MESSAGE_HEADER_SIZE)
        ):
            raise _frame_header_error(size, frame_type, self._max_frame_size)
        end = pos + 4 + size
        if len(buf) < end:
            return None
        self._pos = end
        if frame_type == 2:
            timestamp, attempts, message_id = _MESSAGE_HEADER.unpack_from(buf, pos + 8)
            return MessageFrame(timestamp, attempts, message_id, bytes(buf[pos + 8 + MESSAGE_HEADER_SIZE : end]))
        if frame_type == 0:
            return ResponseFrame(bytes(buf[pos + 8 : end]))
        return ErrorFrame(bytes(buf[pos + 8 : end]))

    def feed_eof(self) -> None:
        """The connection closed: raise ``FrameError`` if it cut a frame short."""
        if self._error is not None:
            raise self._error
        if len(self._buf) > self._pos:
            raise self._fail(_truncated_frame_error(self.buffered))


# The error paths below are shared by both twins: the compiled one calls them
# once its fast checks fail, so each error text is written once.


def _frame_header_error(size: int, frame_type: int | None, max_frame_size: int) -> FrameError:
    """What is wrong with a frame header; ``frame_type`` is None while not received."""
    if size < 4:
        return FrameError(f"invalid frame size {size}")
    if size > max_frame_size:
        return FrameError(f"frame size {size} exceeds the limit of {max_frame_size}")
    if frame_type == 2:
        return FrameError(f"message frame of {size - 4} bytes is shorter than its header")
    return FrameError(f"unknown frame type {frame_type}")


def _truncated_frame_error(pending: int) -> FrameError:
    return FrameError(f"connection closed in the middle of a frame ({pending} bytes pending)")


# --- commands (client -> server) -------------------------------------------


class Command:
    """A client command: ``name``, the ``params`` after it, and its body.

    ``body`` is the body of IDENTIFY, AUTH, PUB and DPUB; ``messages`` the
    message bodies of MPUB; both are None for commands without one.
    """

    __slots__ = ("body", "messages", "name", "params")

    def __init__(
        self, name: bytes, params: list[bytes], body: bytes | None = None, messages: list[bytes] | None = None
    ) -> None:
        self.name = name
        self.params = params
        self.body = body
        self.messages = messages

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Command)
            and other.name == self.name
            and other.params == self.params
            and other.body == self.body
            and other.messages == self.messages
        )

    def __repr__(self) -> str:
        return f"Command({self.name!r}, {self.params!r}, {self.body!r}, {self.messages!r})"


# Commands nsqd knows; True for those followed by a size-prefixed body.
_COMMANDS = {
    b"IDENTIFY": True,
    b"AUTH": True,
    b"PUB": True,
    b"MPUB": True,
    b"DPUB": True,
    b"SUB": False,
    b"RDY": False,
    b"FIN": False,
    b"REQ": False,
    b"TOUCH": False,
    b"CLS": False,
    b"NOP": False,
}


class CommandParser(_StreamBuffer["Command"]):
    """Incremental parser of what a client sends to nsqd, magic first.

    It applies nsqd's checks that come before a body is read (parameters,
    topic name, body sizes against ``max_msg_size`` and ``max_body_size``,
    DPUB's defer against ``max_req_timeout`` in ms) with nsqd's error codes
    and texts; the broker makes the checks that depend on connection state.
    """

    __slots__ = ("_magic_seen", "_max_body_size", "_max_msg_size", "_max_req_timeout", "_scanned")

    def __init__(
        self,
        max_msg_size: int = DEFAULT_MAX_MSG_SIZE,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        max_req_timeout: int = DEFAULT_MAX_REQ_TIMEOUT_MS,
    ) -> None:
        super().__init__()
        self._max_msg_size = max_msg_size
        self._max_body_size = max_body_size
        self._max_req_timeout = max_req_timeout
        self._magic_seen = False
        self._scanned = 0  # bytes of the pending line already searched for "\n"

    def feed_eof(self) -> None:
        """The connection closed: raise ``ProtocolError`` if it cut a command short."""
        if self._error is not None:
            raise self._error
        if len(self._buf) > self._pos:
            raise self._fail(_truncated_command_error(self.buffered))

    def _read(self) -> Command | None:
        buf = self._buf
        pos = self._pos
        if not self._magic_seen:
            if len(buf) - pos < 4:
                return None
            if buf[pos : pos + 4] != MAGIC_V2:
                raise CommandError("E_BAD_PROTOCOL", "")
            pos += 4
            self._pos = pos
            self._magic_seen = True
        line_limit = pos + MAX_COMMAND_LINE
        newline = buf.find(b"\n", pos + self._scanned, line_limit)
        if newline < 0:
            if len(buf) >= line_limit:
                raise _line_too_long_error()
            self._scanned = len(buf) - pos
            return None
        line_end = newline
        if line_end > pos and buf[line_end - 1] == 13:  # optional "\r"
            line_end -= 1
        parts = bytes(buf[pos:line_end]).split(b" ")
        name = parts[0]
        has_body = _COMMANDS.get(name)
        if has_body is None:
            raise CommandError("E_INVALID", f"invalid command {wire_text(name)}")
        if not has_body:
            self._pos = newline + 1
            self._scanned = 0
            return Command(name, parts[1:])
        self._scanned = newline - pos  # the line is complete: do not search it again
        _check_prelude(name, parts, self._max_req_timeout)
        size_at = newline + 1
        if len(buf) - size_at < 4:
            return None
        size = _INT32.unpack_from(buf, size_at)[0]
        _check_body_size(name, size, self._max_msg_size, self._max_body_size)
        end = size_at + 4 + size
        if len(buf) < end:
            return None
        self._pos = end
        self._scanned = 0
        if name == b"MPUB":
            return Command(
                name, parts[1:], None, split_mpub(buf, size_at + 4, end, self._max_msg_size, self._max_body_size)
            )
        return Command(name, parts[1:], bytes(buf[size_at + 4 : end]))


def _truncated_command_error(pending: int) -> ProtocolError:
    return ProtocolError(f"connection closed in the middle of a command ({pending} bytes pending)")


def _line_too_long_error() -> ProtocolError:
    return ProtocolError(f"command line longer than {MAX_COMMAND_LINE} bytes")


def _check_prelude(name: bytes, parts: list[bytes], max_req_timeout: int) -> None:
    """nsqd's checks of a body command's line, in nsqd's order."""
    if name == b"IDENTIFY":
        return
    if name == b"AUTH":
        if len(parts) != 1:
            raise CommandError("E_INVALID", "AUTH invalid number of parameters")
        return
    label = name.decode()
    if len(parts) < (3 if name == b"DPUB" else 2):
        raise CommandError("E_INVALID", f"{label} insufficient number of parameters")
    if not is_valid_name(parts[1]):
        # nsqd repeats the code in MPUB's description; clients see the same text.
        prefix = "E_BAD_TOPIC " if name == b"MPUB" else ""
        raise CommandError("E_BAD_TOPIC", f"{prefix}{label} topic name {go_quote(parts[1])} is not valid")
    if name == b"DPUB":
        defer = parse_base10(parts[2])
        if defer is None:
            raise CommandError("E_INVALID", f"DPUB could not parse timeout {wire_text(parts[2])}")
        if defer > max_req_timeout:
            raise CommandError("E_INVALID", f"DPUB timeout {defer} out of range 0-{max_req_timeout}")


def _check_body_size(name: bytes, size: int, max_msg_size: int, max_body_size: int) -> None:
    """nsqd's checks of a body's declared size, in nsqd's order."""
    label = name.decode()
    if name == b"PUB" or name == b"DPUB":
        if size <= 0:
            raise CommandError("E_BAD_MESSAGE", f"{label} invalid message body size {size}")
        if size > max_msg_size:
            raise CommandError("E_BAD_MESSAGE", f"{label} message too big {size} > {max_msg_size}")
    elif name == b"MPUB":
        if size <= 0:
            raise CommandError("E_BAD_BODY", f"MPUB invalid body size {size}")
        if size > max_body_size:
            raise CommandError("E_BAD_BODY", f"MPUB body too big {size} > {max_body_size}")
    else:  # IDENTIFY, AUTH
        if size > max_body_size:
            raise CommandError("E_BAD_BODY", f"{label} body too big {size} > {max_body_size}")
        if size <= 0:
            raise CommandError("E_BAD_BODY", f"{label} invalid body size {size}")


def split_mpub(buf: bytes | bytearray, start: int, end: int, max_msg_size: int, max_body_size: int) -> list[bytes]:
    """The messages of the MPUB body ``buf[start:end]``, checked as nsqd does.

    Also the body of the broker's ``/mpub?binary=true``.

    nsqd reads the messages from the stream whatever size the body declared;
    here they must fill the declared body exactly, so a client whose sizes
    disagree is refused instead of being read out of step.
    """
    if end - start < 4:
        raise CommandError("E_BAD_BODY", "MPUB failed to read message count")
    count = _INT32.unpack_from(buf, start)[0]
    if count <= 0 or count > (max_body_size - 4) // 5:
        raise CommandError("E_BAD_BODY", f"MPUB invalid message count {count}")
    messages = []
    offset = start + 4
    for index in range(count):
        if end - offset < 4:
            raise CommandError("E_BAD_MESSAGE", f"MPUB failed to read message({index}) body size")
        size = _INT32.unpack_from(buf, offset)[0]
        if size <= 0:
            raise CommandError("E_BAD_MESSAGE", f"MPUB invalid message({index}) body size {size}")
        if size > max_msg_size:
            raise CommandError("E_BAD_MESSAGE", f"MPUB message too big {size} > {max_msg_size}")
        offset += 4
        if end - offset < size:
            raise CommandError("E_BAD_MESSAGE", "MPUB failed to read message body")
        messages.append(bytes(buf[offset : offset + size]))
        offset += size
    if offset != end:
        raise CommandError("E_BAD_BODY", f"MPUB body size {end - start} does not match its {count} messages")
    return messages


# --- command encoders (client -> server) -----------------------------------


# Type checks use type(), not isinstance(): an object can fake its __class__,
# and the compiled twin must not be told a fake is bytes.


def check_name(kind: str, name: str) -> str:
    """``name`` if it is a valid NSQ ``kind`` (``topic`` or ``channel``) name, else ``ValueError`` (``TypeError``)."""
    _name_bytes(kind, name)
    return name


def _name_bytes(kind: str, name: str) -> bytes:
    if not issubclass(type(name), str):
        raise TypeError(f"an NSQ {kind} name must be str, not {type(name).__name__}")
    # str's own methods: a subclass cannot make them return something else.
    raw = str.encode(name, "utf-8", "surrogateescape")
    if not (str.isascii(name) and is_valid_name(raw)):
        raise ValueError(
            f"invalid NSQ {kind} name {name!r}: 1 to 64 characters of [.a-zA-Z0-9_-], optionally ending in #ephemeral"
        )
    return raw


def _check_body(body: bytes) -> None:
    if not issubclass(type(body), bytes):
        raise TypeError(f"a message body must be bytes, not {type(body).__name__}")
    if _byte_size(body) == 0:
        raise ValueError("a message body must not be empty (nsqd refuses it)")


def _check_message_id(message_id: bytes) -> None:
    if not issubclass(type(message_id), bytes):
        raise TypeError(f"a message id must be bytes, not {type(message_id).__name__}")
    if len(message_id) != MESSAGE_ID_SIZE:
        raise ValueError(f"a message id is {MESSAGE_ID_SIZE} bytes, not {len(message_id)}")


def _check_count(what: str, value: int) -> None:
    if not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{what} must not be negative, got {value}")


def _byte_size(data: bytes) -> int:
    """The real size: a bytes subclass may lie in its __len__."""
    return bytes.__len__(data)


def _check_size(size: int) -> None:
    if size > _INT32_MAX:
        raise ValueError(f"a body of {size} bytes does not fit a 32-bit size")


def _sized(data: bytes) -> bytes:
    size = _byte_size(data)
    _check_size(size)
    return _UINT32.pack(size) + data


def encode_identify(config: Mapping[str, Any]) -> bytes:
    """``IDENTIFY`` with ``config`` as its JSON body."""
    return b"IDENTIFY\n" + _sized(json.dumps(dict(config), separators=(",", ":")).encode())


def encode_auth(secret: bytes) -> bytes:
    """``AUTH`` with ``secret`` as its body."""
    if not isinstance(secret, bytes):
        raise TypeError(f"an AUTH secret must be bytes, not {type(secret).__name__}")
    if not secret:
        raise ValueError("an AUTH secret must not be empty (nsqd refuses it)")
    return b"AUTH\n" + _sized(secret)


def encode_sub(topic: str, channel: str) -> bytes:
    """``SUB <topic> <channel>``."""
    return b"SUB " + _name_bytes("topic", topic) + b" " + _name_bytes("channel", channel) + b"\n"


def encode_pub(topic: str, body: bytes) -> bytes:
    """``PUB <topic>`` with one message."""
    name = _name_bytes("topic", topic)
    _check_body(body)
    return b"PUB " + name + b"\n" + _sized(body)


def encode_mpub(topic: str, bodies: Sequence[bytes]) -> bytes:
    """``MPUB <topic>`` with several messages, published all or nothing."""
    name = _name_bytes("topic", topic)
    items = list(bodies)  # what is measured is what is written, whatever bodies does
    if not items:
        raise ValueError("MPUB needs at least one message")
    payload = 4
    for body in items:
        _check_body(body)
        payload += 4 + _byte_size(body)
    _check_size(payload)
    parts = [b"MPUB ", name, b"\n", _UINT32.pack(payload), _UINT32.pack(len(items))]
    for body in items:
        parts.append(_UINT32.pack(_byte_size(body)))
        parts.append(body)
    return b"".join(parts)


def encode_dpub(topic: str, defer_ms: int, body: bytes) -> bytes:
    """``DPUB <topic> <defer_ms>`` with one message, delivered after ``defer_ms``."""
    name = _name_bytes("topic", topic)
    _check_count("a DPUB defer", defer_ms)
    _check_body(body)
    return b"DPUB %s %d\n" % (name, defer_ms) + _sized(body)


def encode_rdy(count: int) -> bytes:
    """``RDY <count>``."""
    _check_count("a RDY count", count)
    return b"RDY %d\n" % count


def encode_fin(message_id: bytes) -> bytes:
    """``FIN <message_id>``."""
    _check_message_id(message_id)
    return b"FIN " + message_id + b"\n"


def encode_req(message_id: bytes, delay_ms: int) -> bytes:
    """``REQ <message_id> <delay_ms>``."""
    _check_message_id(message_id)
    _check_count("a REQ delay", delay_ms)
    return b"REQ %s %d\n" % (message_id, delay_ms)


def encode_touch(message_id: bytes) -> bytes:
    """``TOUCH <message_id>``."""
    _check_message_id(message_id)
    return b"TOUCH " + message_id + b"\n"


# --- frame encoders (server -> client) -------------------------------------


def _frame(frame_type: int, data: bytes) -> bytes:
    if not isinstance(data, bytes):
        raise TypeError(f"frame data must be bytes, not {type(data).__name__}")
    if len(data) > _INT32_MAX - 4:
        raise ValueError(f"frame data of {len(data)} bytes does not fit a 32-bit size")
    return _FRAME_HEADER.pack(len(data) + 4, frame_type) + data


def encode_response(data: bytes) -> bytes:
    """A response frame (type 0)."""
    return _frame(0, data)


def encode_error(data: bytes) -> bytes:
    """An error frame (type 1); ``data`` is ``E_CODE description``."""
    return _frame(1, data)


def encode_message(timestamp: int, attempts: int, message_id: bytes, body: bytes) -> bytes:
    """A message frame (type 2)."""
    if not isinstance(timestamp, int) or not -(2**63) <= timestamp < 2**63:
        raise ValueError(f"a timestamp is a signed 64-bit int of nanoseconds, got {timestamp!r}")
    if not isinstance(attempts, int) or not 0 <= attempts <= 0xFFFF:
        raise ValueError(f"attempts is an unsigned 16-bit int, got {attempts!r}")
    _check_message_id(message_id)
    if not isinstance(body, bytes):
        raise TypeError(f"a message body must be bytes, not {type(body).__name__}")
    size = 4 + MESSAGE_HEADER_SIZE + len(body)
    if size > _INT32_MAX:
        raise ValueError(f"frame data of {size - 4} bytes does not fit a 32-bit size")
    return _MESSAGE_FRAME_HEADER.pack(size, 2, timestamp, attempts, message_id) + body
