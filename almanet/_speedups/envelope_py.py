"""RPC envelope codec, pure Python (twin of ``envelope_c.pyx``).

An envelope is the body of an NSQ message that carries an RPC invocation or
its reply. It is itself one msgpack array, so any msgpack library can read it
(``docs/PROTOCOL.md`` describes it byte by byte):

- invocation: ``[1, 0, call_id, reply_to, deadline, headers, payload]``
- reply: ``[1, 1, call_id, payload]`` (ok) or ``[1, 2, call_id, payload]`` (error)
- batch: ``[1, 3, [item, ...]]``, each item a bin holding one invocation or
  reply envelope: several calls, or several replies, in one NSQ message

The encoders write the canonical layout: call id and deadline as uint64
(``0xcf``), the reply topic as str8 (``0xd9``), headers and payload exactly as
``msgpack.packb`` writes them. The decoder accepts any msgpack encoding of the
fields, as another language's encoder may use the smallest forms.

Payloads are any object msgpack encodes (``bytes`` come back as ``bytes``,
``str`` as ``str``, tuples as lists). Map keys may be any msgpack value, except
in headers, whose names are str.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from types import GenericAlias
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import msgpack

from almanet.wire.errors import AlmanetError

__all__ = [
    "ENVELOPE_VERSION",
    "EnvelopeError",
    "Invocation",
    "Reply",
    "batch_items",
    "decode",
    "encode_batch",
    "encode_invocation",
    "encode_reply",
]

ENVELOPE_VERSION = 1

_INVOCATION = 0
_REPLY_OK = 1
_REPLY_ERROR = 2
_BATCH = 3
_INVOCATION_LENGTH = 7
_REPLY_LENGTH = 4
_UINT64_MAX = 2**64 - 1
_MAX_REPLY_TO_BYTES = 255

# fixarray 7, version 1, kind 0 / fixarray 4, version 1
_INVOCATION_START = bytes([0x97, ENVELOPE_VERSION, _INVOCATION])
_REPLY_START = bytes([0x94, ENVELOPE_VERSION])
_NIL = b"\xc0"
_BATCH_START = bytes([0x93, ENVELOPE_VERSION, _BATCH])  # fixarray 3, version 1, kind 3
_UINT64_FIELD = struct.Struct(">BQ")  # 0xcf, then the value
_STR8_HEADER = struct.Struct(">BB")  # 0xd9, then the length


class EnvelopeError(AlmanetError, ValueError):
    """A body is not a valid envelope; the message says why.

    ``call_id`` and ``reply_to`` are set when the body is an invocation whose
    first four elements could be read (whatever its version, and even if a
    later element is bad), so the receiver can still send an error reply;
    both are None otherwise (``reply_to`` is None too for a nil reply topic).
    """

    def __init__(self, message: str, call_id: int | None = None, reply_to: str | None = None) -> None:
        super().__init__(message)
        self.call_id = call_id
        self.reply_to = reply_to


@dataclass(frozen=True, slots=True)
class Invocation:
    """A call of a procedure.

    ``reply_to`` is the topic to publish the reply to (None: no reply wanted);
    ``deadline`` is in ms since the Unix epoch, 0 for none.
    """

    call_id: int
    reply_to: str | None
    deadline: int
    headers: dict[str, Any] | None
    payload: Any


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Reply(Generic[T]):
    """The outcome of a call: its result (``ok``) or ``[name, args, payload]`` of its error.

    ``Reply[T]`` in annotations: a reply whose payload is a ``T``.
    """

    call_id: int
    ok: bool
    payload: T

    if not TYPE_CHECKING:
        # Reply[T] is a types.GenericAlias, as the compiled twin's: typing's alias would set
        # __orig_class__ on the instances it makes, which a frozen slots dataclass refuses.
        __class_getitem__ = classmethod(GenericAlias)


# --- encoding ----------------------------------------------------------------

# Each field helper returns the field's encoding or raises the field's error;
# the compiled twin calls them for every value its fast paths do not take, so
# both twins refuse the same arguments in the same order with the same text.


def _uint64_field(what: str, value: int) -> bytes:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if not 0 <= value <= _UINT64_MAX:
        raise ValueError(f"{what} must be in 0..2**64-1, got {value}")
    return _UINT64_FIELD.pack(0xCF, value)


def _reply_to_field(reply_to: str | None) -> bytes:
    if reply_to is None:
        return _NIL
    if not isinstance(reply_to, str):
        raise TypeError(f"the reply topic must be a str or None, not {type(reply_to).__name__}")
    raw = str.encode(reply_to, "utf-8")  # str's own method: a subclass cannot change what is written
    if len(raw) > _MAX_REPLY_TO_BYTES:
        raise ValueError(f"the reply topic must be at most {_MAX_REPLY_TO_BYTES} bytes of UTF-8, got {len(raw)}")
    return _STR8_HEADER.pack(0xD9, len(raw)) + raw


def _headers_field(headers: dict[str, Any] | None) -> bytes:
    if headers is None:
        return _NIL
    if not isinstance(headers, dict):
        raise TypeError(f"the headers must be a dict or None, not {type(headers).__name__}")
    for name in headers:
        if not isinstance(name, str):
            raise TypeError(f"a header name must be a str, not {type(name).__name__}")
    return _packed("the headers", headers)


def _packed(what: str, value: Any) -> bytes:
    # msgpack raises TypeError, ValueError or OverflowError for what it cannot
    # encode; callers get one type for all of them.
    try:
        packed: bytes = msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as error:
        raise TypeError(f"{what} cannot be encoded as msgpack: {error}") from error
    return packed


def _ok_kind(ok: bool) -> int:
    if not isinstance(ok, bool):
        raise TypeError(f"ok must be a bool, not {type(ok).__name__}")
    return _REPLY_OK if ok else _REPLY_ERROR


def encode_invocation(
    call_id: int, reply_to: str | None, deadline: int, headers: dict[str, Any] | None, payload: Any
) -> bytes:
    """The envelope of an invocation.

    Raises TypeError for an argument of the wrong type (``headers`` must have
    str names; ``payload`` and header values must be msgpack-encodable) and
    ValueError for ``call_id`` or ``deadline`` outside 0..2**64-1, or a
    ``reply_to`` longer than 255 bytes of UTF-8 (UnicodeEncodeError for one
    that has no UTF-8 form).
    """
    return b"".join(
        (
            _INVOCATION_START,
            _uint64_field("the call id", call_id),
            _reply_to_field(reply_to),
            _uint64_field("the deadline", deadline),
            _headers_field(headers),
            _packed("the payload", payload),
        )
    )


def encode_reply(call_id: int, ok: bool, payload: Any) -> bytes:
    """The envelope of a reply: ``payload`` is the result if ``ok``, else the error's ``[name, args, payload]``.

    Raises TypeError or ValueError as ``encode_invocation`` does.
    """
    call_id_field = _uint64_field("the call id", call_id)
    return b"".join((_REPLY_START, bytes((_ok_kind(ok),)), call_id_field, _packed("the payload", payload)))


def encode_batch(items: Sequence[bytes]) -> bytes:
    """The batch envelope of ``items``, each the bytes of an envelope (not checked), in order.

    Raises TypeError for an item that is not ``bytes`` and ValueError for no items.
    """
    if not items:
        raise ValueError("a batch holds one item at least")
    parts = [_BATCH_START, _array_header(len(items))]
    for item in items:
        if type(item) is not bytes:
            raise TypeError(f"a batch item must be bytes, not {type(item).__name__}")
        parts.append(_bin_header(len(item)))
        parts.append(item)
    return b"".join(parts)


def _array_header(count: int) -> bytes:
    if count < 16:
        return bytes((0x90 | count,))
    if count <= 0xFFFF:
        return struct.pack(">BH", 0xDC, count)
    return struct.pack(">BI", 0xDD, count)


def _bin_header(size: int) -> bytes:
    if size <= 0xFF:
        return bytes((0xC4, size))
    if size <= 0xFFFF:
        return struct.pack(">BH", 0xC5, size)
    return struct.pack(">BI", 0xC6, size)


# --- decoding ----------------------------------------------------------------


def batch_items(body: bytes | bytearray | memoryview) -> list[bytes] | None:
    """The items of the batch envelope ``body``; None if ``body`` is no batch (its kind is not 3).

    EnvelopeError for a body whose kind is 3 that is not a valid batch: the
    array must have 3 elements, the last an array of one bin at least, and
    nothing may follow it. The items themselves are not checked: each is
    decoded (``decode``) on its own.
    """
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=max(memoryview(body).nbytes, 1))
    unpacker.feed(body)
    try:
        count = unpacker.read_array_header()
        version, kind = unpacker.unpack(), unpacker.unpack()
    except (ValueError, TypeError, msgpack.OutOfData):
        return None
    if type(version) is not int or version != ENVELOPE_VERSION or type(kind) is not int or kind != _BATCH:
        return None
    if count != 3:
        raise EnvelopeError(f"a batch has 3 elements, not {count}")
    try:
        items = unpacker.unpack()
    except msgpack.OutOfData:
        raise EnvelopeError("the batch is truncated") from None
    except (ValueError, TypeError) as error:
        raise EnvelopeError(f"the batch is not valid msgpack: {error}") from None
    if type(items) is not list or not items:
        raise EnvelopeError(f"a batch's items are an array of one bin at least, not {_describe(items)}")
    for item in items:
        if type(item) is not bytes:
            raise EnvelopeError(f"a batch item must be a bin, not {_describe(item)}")
    extra = len(unpacker.read_bytes(memoryview(body).nbytes))
    if extra:
        raise EnvelopeError(f"{extra} byte{'s' if extra > 1 else ''} after the end of the batch")
    return items


def decode(body: bytes | bytearray | memoryview) -> Invocation | Reply[Any]:
    """The invocation or reply in ``body``; EnvelopeError if it is not a valid envelope."""
    fields = _read_fields(body)
    if fields[1] == _INVOCATION:
        return Invocation(*fields[2:])
    return Reply(fields[2], fields[1] == _REPLY_OK, fields[3])


def _read_fields(body: bytes | bytearray | memoryview) -> list[Any]:
    """The elements of a valid envelope (the compiled twin's fallback too)."""
    try:
        fields = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except (ValueError, TypeError) as error:  # TypeError: an unhashable map key, or a body that is not bytes
        raise _unreadable(body, error) from None
    return _checked(fields)


def _unreadable(body: bytes | bytearray | memoryview, error: Exception) -> EnvelopeError:
    """Why msgpack could not read ``body`` as one object."""
    size = memoryview(body).nbytes  # raises TypeError for what is not bytes-like
    if size == 0:
        return EnvelopeError("the envelope is empty")
    if isinstance(error, msgpack.ExtraData):
        extra = len(error.extra)
        return EnvelopeError(
            f"{extra} byte{'s' if extra > 1 else ''} after the end of the envelope", *_reply_route(error.unpacked)
        )
    route = _reply_route(_first_four(body, size))
    if isinstance(error, msgpack.StackError):
        problem = "nested too deeply"
    elif isinstance(error, msgpack.FormatError):
        problem = "reserved type byte 0xc1"
    elif _CUT_SHORT.fullmatch(str(error)):
        return EnvelopeError("the envelope is truncated", *route)
    else:
        problem = str(error)
    return EnvelopeError(f"the envelope is not valid msgpack: {problem}", *route)


# What msgpack says of input that ends before its last object. Its length
# limits default to the body's size, so a longer string, or more elements
# than bytes, cannot be there either.
_CUT_SHORT = re.compile(r"Unpack failed: incomplete input|\d+ exceeds max_\w+_len\(\d+\)")


def _first_four(body: bytes | bytearray | memoryview, size: int) -> list[Any] | None:
    """The first four elements of a broken envelope, if they can be read on their own."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=size)
    unpacker.feed(body)
    try:
        if unpacker.read_array_header() < 4:
            return None
        return [unpacker.unpack() for _ in range(4)]
    except (ValueError, TypeError, msgpack.OutOfData):
        return None


def _reply_route(fields: object) -> tuple[int | None, str | None]:
    """``call_id, reply_to`` of anything that starts as an invocation, else ``None, None``.

    Every envelope version keeps an invocation's first four elements as
    ``[version, 0, call_id, reply_to]``.
    """
    if type(fields) is list and len(fields) >= 4:
        kind, call_id, reply_to = fields[1:4]
        if type(kind) is int and kind == _INVOCATION and _is_uint(call_id) and _is_nil_or_str(reply_to):
            return call_id, reply_to
    return None, None


def _is_uint(value: object) -> bool:
    # msgpack reads no int above 2**64-1: only the sign needs checking.
    return type(value) is int and value >= 0


def _is_nil_or_str(value: object) -> bool:
    return value is None or type(value) is str


def _checked(fields: object) -> list[Any]:
    """``fields`` (what msgpack read) if they are a valid envelope, else EnvelopeError."""
    if type(fields) is not list:
        raise EnvelopeError(f"an envelope is a msgpack array, not {_describe(fields)}")
    if not fields:
        raise EnvelopeError("the envelope array is empty")
    # The version comes first: a later version may change everything after it.
    version = fields[0]
    if not (type(version) is int and version == ENVELOPE_VERSION):
        raise _invalid(f"unsupported envelope version {_describe(version)}", fields)
    if len(fields) < 2:
        raise _invalid("the envelope has no kind", fields)
    kind = fields[1]
    if type(kind) is not int or kind not in (_INVOCATION, _REPLY_OK, _REPLY_ERROR):
        raise _invalid(f"unknown envelope kind {_describe(kind)}", fields)
    if kind == _INVOCATION:
        if len(fields) != _INVOCATION_LENGTH:
            raise _invalid(f"an invocation has {_INVOCATION_LENGTH} elements, not {len(fields)}", fields)
    elif len(fields) != _REPLY_LENGTH:
        raise _invalid(f"a reply has {_REPLY_LENGTH} elements, not {len(fields)}", fields)
    if not _is_uint(fields[2]):
        raise _invalid(f"the call id must be an unsigned int, not {_describe(fields[2])}", fields)
    if kind != _INVOCATION:
        return fields
    reply_to, deadline, headers = fields[3:6]
    if not _is_nil_or_str(reply_to):
        raise _invalid(f"the reply topic must be nil or a str, not {_describe(reply_to)}", fields)
    if not _is_uint(deadline):
        raise _invalid(f"the deadline must be an unsigned int, not {_describe(deadline)}", fields)
    if headers is not None:
        if type(headers) is not dict:
            raise _invalid(f"the headers must be nil or a map, not {_describe(headers)}", fields)
        for name in headers:
            if type(name) is not str:
                raise _invalid(f"a header name must be a str, not {_describe(name)}", fields)
    return fields


def _invalid(message: str, fields: list[Any]) -> EnvelopeError:
    return EnvelopeError(message, *_reply_route(fields))


_TYPE_NAMES: dict[type, str] = {str: "a str", bytes: "a bin", list: "an array", dict: "a map"}


def _describe(value: object) -> str:
    """A decoded value as error texts show it: a scalar by its value, the rest by its msgpack type."""
    if value is None:
        return "nil"
    if type(value) is bool:
        return "true" if value else "false"
    if type(value) is int or type(value) is float:
        return repr(value)
    return _TYPE_NAMES.get(type(value), "an ext")  # ExtType and Timestamp are all msgpack reads besides
