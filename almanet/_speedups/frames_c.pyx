# cython: language_level=3
"""NSQ TCP protocol V2 frame codec, compiled (twin of ``frames_py.py``).

The hot paths are here: reading frames, parsing commands, and encoding PUB,
MPUB, FIN and frames. Every other name is the pure twin's own function, and
every error path calls the pure twin's helper that builds the error, so both
twins refuse the same bytes with the same text. ``frames_py.py`` documents
the API.

Memory safety: all reads go through ``self._data[self._start:self._end]``;
each read is preceded by a check that the bytes it touches are there.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_Check, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_SIZE
from cpython.pyport cimport PY_SSIZE_T_MAX
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, realloc
from libc.string cimport memchr, memcmp, memcpy, memmove

from almanet.wire.errors import CommandError, ProtocolError
from almanet.wire.protocol import (
    DEFAULT_MAX_BODY_SIZE,
    DEFAULT_MAX_FRAME_SIZE,
    DEFAULT_MAX_MSG_SIZE,
    DEFAULT_MAX_REQ_TIMEOUT_MS,
)

from almanet._speedups.frames_py import (
    _COMMANDS,
    _check_body,
    _check_body_size,
    _check_size,
    _check_message_id,
    _check_prelude,
    _frame,
    _frame_header_error,
    _line_too_long_error,
    _name_bytes,
    check_name,
    split_mpub,
    _truncated_command_error,
    _truncated_frame_error,
    encode_auth,
    encode_dpub,
    encode_identify,
    encode_message as pure_encode_message,
    encode_rdy,
    encode_req,
    encode_sub,
    encode_touch,
    parse_base10,
    wire_text,
)
from almanet._speedups.frames_py import __all__  # the same API, by construction


cdef enum:
    MESSAGE_ID_SIZE = 16
    MESSAGE_HEADER_SIZE = 26
    MAX_NAME_LENGTH = 64
    MAX_COMMAND_LINE = 16384
    EPHEMERAL_LENGTH = 10
    INITIAL_CAPACITY = 64 * 1024
    # An idle buffer larger than this is shrunk back, so one large MPUB
    # does not pin megabytes to a connection for its lifetime.
    RETAINED_CAPACITY = 256 * 1024

cdef int64_t INT32_MAX = 0x7FFFFFFF


cdef inline uint32_t read_u32(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | <uint32_t>p[3]


cdef inline uint64_t read_u64(const uint8_t* p) noexcept nogil:
    return (<uint64_t>read_u32(p) << 32) | <uint64_t>read_u32(p + 4)


cdef inline void write_u32(uint8_t* p, uint32_t value) noexcept nogil:
    p[0] = <uint8_t>(value >> 24)
    p[1] = <uint8_t>(value >> 16)
    p[2] = <uint8_t>(value >> 8)
    p[3] = <uint8_t>value


cdef inline void write_u64(uint8_t* p, uint64_t value) noexcept nogil:
    write_u32(p, <uint32_t>(value >> 32))
    write_u32(p + 4, <uint32_t>value)


cdef bint name_ok(const uint8_t* p, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef uint8_t c
    if n <= 0 or n > MAX_NAME_LENGTH:
        return False
    if n >= EPHEMERAL_LENGTH and memcmp(p + n - EPHEMERAL_LENGTH, b"#ephemeral", EPHEMERAL_LENGTH) == 0:
        n -= EPHEMERAL_LENGTH
    if n == 0:
        return False
    for i in range(n):
        c = p[i]
        if not (
            (c >= b'a' and c <= b'z') or (c >= b'A' and c <= b'Z') or (c >= b'0' and c <= b'9')
            or c == b'.' or c == b'_' or c == b'-'
        ):
            return False
    return True


def is_valid_name(bytes name not None):
    return name_ok(<const uint8_t*>PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name))


# --- frames (server -> client) ---------------------------------------------


cdef class _DataFrame:
    cdef readonly bytes data

    def __init__(self, bytes data):
        self.data = data

    def __eq__(self, other):
        return type(other) is type(self) and (<_DataFrame>other).data == self.data

    def __repr__(self):
        return f"{type(self).__name__}({self.data!r})"


@cython.final
@cython.freelist(64)
cdef class ResponseFrame(_DataFrame):
    pass


@cython.final
@cython.freelist(64)
cdef class ErrorFrame(_DataFrame):
    pass


@cython.final
@cython.freelist(256)
cdef class MessageFrame:
    cdef readonly int64_t timestamp
    cdef readonly uint16_t attempts
    cdef readonly bytes id
    cdef readonly bytes body

    def __init__(self, int64_t timestamp, uint16_t attempts, bytes id, bytes body):
        self.timestamp = timestamp
        self.attempts = attempts
        self.id = id
        self.body = body

    def __eq__(self, other):
        if not isinstance(other, MessageFrame):
            return False
        cdef MessageFrame that = <MessageFrame>other
        return (
            that.timestamp == self.timestamp and that.attempts == self.attempts
            and that.id == self.id and that.body == self.body
        )

    def __repr__(self):
        return f"MessageFrame({self.timestamp}, {self.attempts}, {self.id!r}, {self.body!r})"


cdef class _StreamBuffer:
    """Bytes fed but not yet consumed, in a buffer this object owns."""

    cdef uint8_t* _data
    cdef Py_ssize_t _start
    cdef Py_ssize_t _end
    cdef Py_ssize_t _capacity
    cdef object _error
    # Set while a frame or command is being read, which holds pointers into
    # the buffer: code that runs meanwhile (Python helpers, a finalizer,
    # another thread) must not move it.
    cdef bint _reading

    def __dealloc__(self):
        free(self._data)

    def feed(self, data):
        cdef Py_buffer view
        if self._reading:
            raise BufferError("cannot feed a reader while it is reading")
        if self._error is not None:
            raise self._error
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            self._append(<const uint8_t*>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)

    @property
    def buffered(self):
        return self._end - self._start

    cdef int _append(self, const uint8_t* source, Py_ssize_t length) except -1:
        cdef Py_ssize_t pending = self._end - self._start
        cdef Py_ssize_t needed, capacity
        cdef uint8_t* grown
        if length == 0:
            return 0
        if self._start:
            # Only what is left of a partial frame moves, once per feed.
            memmove(self._data, self._data + self._start, pending)
            self._start = 0
            self._end = pending
        if length > PY_SSIZE_T_MAX - pending:
            raise MemoryError()
        needed = pending + length
        if needed > self._capacity or (self._capacity > RETAINED_CAPACITY and needed <= RETAINED_CAPACITY):
            capacity = INITIAL_CAPACITY
            while capacity < needed:
                capacity = needed if capacity > PY_SSIZE_T_MAX // 2 else capacity * 2
            grown = <uint8_t*>realloc(self._data, capacity)
            if grown == NULL:
                raise MemoryError()
            self._data = grown
            self._capacity = capacity
        memcpy(self._data + self._end, source, length)
        self._end = needed
        return 0

    def __iter__(self):
        return self

    def __next__(self):
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

    cdef object _read(self):
        """The next complete item, None while it is incomplete."""
        raise NotImplementedError

    cdef object _fail(self, error):
        self._error = error
        return error


@cython.final
cdef class FrameReader(_StreamBuffer):
    cdef int64_t _max_frame_size

    def __init__(self, max_frame_size=DEFAULT_MAX_FRAME_SIZE):
        self._max_frame_size = max_frame_size

    cdef object _read(self):
        cdef const uint8_t* p
        cdef Py_ssize_t available
        cdef int64_t size, frame_type
        cdef MessageFrame message
        available = self._end - self._start
        if available < 4:
            return None
        p = self._data + self._start
        size = <int32_t>read_u32(p)
        if size < 4 or size > self._max_frame_size:
            raise _frame_header_error(size, None, self._max_frame_size)
        if available < 8:
            return None
        frame_type = <int32_t>read_u32(p + 4)
        if not (frame_type == 0 or frame_type == 1 or (frame_type == 2 and size >= 4 + MESSAGE_HEADER_SIZE)):
            raise _frame_header_error(size, frame_type, self._max_frame_size)
        if available - 4 < size:
            return None
        # From here the whole frame, p[0 : 4 + size], is in the buffer.
        self._start += 4 + size
        if frame_type == 2:
            message = MessageFrame.__new__(MessageFrame)
            message.timestamp = <int64_t>read_u64(p + 8)
            message.attempts = <uint16_t>((p[16] << 8) | p[17])
            message.id = PyBytes_FromStringAndSize(<const char*>p + 18, MESSAGE_ID_SIZE)
            message.body = PyBytes_FromStringAndSize(<const char*>p + 8 + MESSAGE_HEADER_SIZE, size - 4 - MESSAGE_HEADER_SIZE)
            return message
        data_frame = ResponseFrame.__new__(ResponseFrame) if frame_type == 0 else ErrorFrame.__new__(ErrorFrame)
        (<_DataFrame>data_frame).data = PyBytes_FromStringAndSize(<const char*>p + 8, size - 4)
        return data_frame

    def feed_eof(self):
        if self._error is not None:
            raise self._error
        if self._end > self._start:
            raise self._fail(_truncated_frame_error(self._end - self._start))


# --- commands (client -> server) -------------------------------------------


@cython.final
@cython.freelist(64)
cdef class Command:
    cdef readonly bytes name
    cdef readonly list params
    cdef readonly object body
    cdef readonly object messages

    def __init__(self, bytes name, list params, body=None, messages=None):
        self.name = name
        self.params = params
        self.body = body
        self.messages = messages

    def __eq__(self, other):
        if not isinstance(other, Command):
            return False
        cdef Command that = <Command>other
        return (
            that.name == self.name and that.params == self.params
            and that.body == self.body and that.messages == self.messages
        )

    def __repr__(self):
        return f"Command({self.name!r}, {self.params!r}, {self.body!r}, {self.messages!r})"


cdef inline Command make_command(bytes name, list params, object body, object messages):
    cdef Command command = Command.__new__(Command)
    command.name = name
    command.params = params
    command.body = body
    command.messages = messages
    return command


# Commands nsqd knows; True for those followed by a size-prefixed body.
cdef dict COMMANDS = _COMMANDS


@cython.final
cdef class CommandParser(_StreamBuffer):
    cdef int64_t _max_msg_size
    cdef int64_t _max_body_size
    cdef object _max_req_timeout
    cdef bint _magic_seen
    cdef Py_ssize_t _scanned

    def __init__(
        self,
        max_msg_size=DEFAULT_MAX_MSG_SIZE,
        max_body_size=DEFAULT_MAX_BODY_SIZE,
        max_req_timeout=DEFAULT_MAX_REQ_TIMEOUT_MS,
    ):
        self._max_msg_size = max_msg_size
        self._max_body_size = max_body_size
        self._max_req_timeout = max_req_timeout

    def feed_eof(self):
        if self._error is not None:
            raise self._error
        if self._end > self._start:
            raise self._fail(_truncated_command_error(self._end - self._start))

    cdef object _read(self):
        cdef const uint8_t* data = self._data
        cdef Py_ssize_t pos = self._start
        cdef Py_ssize_t end = self._end
        cdef Py_ssize_t search_from, search_end, newline, line_end, size_at, body_end
        cdef const void* found
        cdef int64_t size
        cdef list parts
        cdef bytes name, topic
        if not self._magic_seen:
            if end - pos < 4:
                return None
            if memcmp(data + pos, b"  V2", 4) != 0:
                raise CommandError("E_BAD_PROTOCOL", "")
            pos += 4
            self._start = pos
            self._magic_seen = True
        search_from = pos + self._scanned
        search_end = end if end - pos < MAX_COMMAND_LINE else pos + MAX_COMMAND_LINE
        found = NULL
        if search_end > search_from:
            found = memchr(data + search_from, b'\n', search_end - search_from)
        if found == NULL:
            if end - pos >= MAX_COMMAND_LINE:
                raise _line_too_long_error()
            self._scanned = end - pos
            return None
        newline = <const uint8_t*>found - data
        line_end = newline
        if line_end > pos and data[line_end - 1] == b'\r':
            line_end -= 1
        parts = PyBytes_FromStringAndSize(<const char*>data + pos, line_end - pos).split(b" ")
        name = parts[0]
        has_body = COMMANDS.get(name)
        if has_body is None:
            raise CommandError("E_INVALID", f"invalid command {wire_text(name)}")
        if not has_body:
            self._start = newline + 1
            self._scanned = 0
            return make_command(name, parts[1:], None, None)
        self._scanned = newline - pos  # the line is complete: do not search it again
        if (name == b"PUB" or name == b"MPUB") and PyList_GET_SIZE(parts) >= 2:
            topic = parts[1]
            if not name_ok(<const uint8_t*>PyBytes_AS_STRING(topic), PyBytes_GET_SIZE(topic)):
                _check_prelude(name, parts, self._max_req_timeout)
        else:
            _check_prelude(name, parts, self._max_req_timeout)
        size_at = newline + 1
        if end - size_at < 4:
            return None
        size = <int32_t>read_u32(data + size_at)
        if not (size > 0 and size <= (self._max_body_size if name == b"MPUB" else self._max_msg_size)
                and (name == b"PUB" or name == b"MPUB")):
            _check_body_size(name, size, self._max_msg_size, self._max_body_size)
        if end - size_at - 4 < size:
            return None
        # From here the whole body, data[size_at + 4 : body_end], is in the buffer.
        body_end = size_at + 4 + size
        self._start = body_end
        self._scanned = 0
        if name == b"MPUB":
            return make_command(name, parts[1:], None, self._split_mpub(data + size_at + 4, size))
        return make_command(name, parts[1:], PyBytes_FromStringAndSize(<const char*>data + size_at + 4, size), None)

    cdef list _split_mpub(self, const uint8_t* body, Py_ssize_t length):
        cdef list messages = []
        cdef Py_ssize_t offset = 4
        cdef int64_t count, index, size
        if length >= 4:
            count = <int32_t>read_u32(body)
            if count > 0 and count <= (self._max_body_size - 4) // 5:
                for index in range(count):
                    if length - offset < 4:
                        break
                    size = <int32_t>read_u32(body + offset)
                    if size <= 0 or size > self._max_msg_size or length - offset - 4 < size:
                        break
                    messages.append(PyBytes_FromStringAndSize(<const char*>body + offset + 4, size))
                    offset += 4 + size
                else:
                    if offset == length:
                        return messages
        # Something is wrong: the pure twin names it.
        split_mpub(
            PyBytes_FromStringAndSize(<const char*>body, length), 0, length, self._max_msg_size, self._max_body_size
        )
        raise AssertionError("MPUB body refused by the compiled parser but not by the pure one")


# --- command encoders (client -> server): the hot ones -----------------------


cdef bytes topic_bytes(object topic):
    if type(topic) is str and (<str>topic).isascii():
        raw = (<str>topic).encode("ascii")
        if name_ok(<const uint8_t*>PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw)):
            return raw
    raw = _name_bytes("topic", topic)  # raises the pure twin's error
    if not PyBytes_CheckExact(raw):
        raise TypeError("an NSQ topic name must encode to bytes")
    return raw


cdef inline Py_ssize_t body_size(object body) except -1:
    if type(body) is not bytes or PyBytes_GET_SIZE(body) == 0:
        _check_body(body)  # raises the pure twin's error
        if not PyBytes_Check(body):  # never trust Python code with a C-level type
            raise TypeError(f"a message body must be bytes, not {type(body).__name__}")
    return PyBytes_GET_SIZE(body)


def encode_pub(topic, body):
    cdef bytes name = topic_bytes(topic)
    cdef Py_ssize_t size = body_size(body)
    cdef Py_ssize_t name_length = PyBytes_GET_SIZE(name)
    if size > INT32_MAX:
        _check_size(size)
    out = PyBytes_FromStringAndSize(NULL, 4 + name_length + 1 + 4 + size)
    cdef uint8_t* p = <uint8_t*>PyBytes_AS_STRING(out)
    memcpy(p, b"PUB ", 4)
    memcpy(p + 4, PyBytes_AS_STRING(name), name_length)
    p += 4 + name_length
    p[0] = b'\n'
    write_u32(p + 1, <uint32_t>size)
    memcpy(p + 5, PyBytes_AS_STRING(body), size)
    return out


def encode_mpub(topic, bodies):
    cdef bytes name = topic_bytes(topic)
    # Measured and written from one private list, so nothing bodies does
    # between the two passes can change what is copied.
    cdef list items = list(bodies)
    cdef Py_ssize_t count = len(items)
    cdef Py_ssize_t payload = 4
    cdef Py_ssize_t name_length = PyBytes_GET_SIZE(name)
    cdef Py_ssize_t size
    if count == 0:
        raise ValueError("MPUB needs at least one message")
    for body in items:
        payload += 4 + body_size(body)
    if payload > INT32_MAX:
        _check_size(payload)
    out = PyBytes_FromStringAndSize(NULL, 5 + name_length + 1 + 4 + payload)
    cdef uint8_t* p = <uint8_t*>PyBytes_AS_STRING(out)
    memcpy(p, b"MPUB ", 5)
    memcpy(p + 5, PyBytes_AS_STRING(name), name_length)
    p += 5 + name_length
    p[0] = b'\n'
    write_u32(p + 1, <uint32_t>payload)
    write_u32(p + 5, <uint32_t>count)
    p += 9
    for body in items:
        size = PyBytes_GET_SIZE(body)
        write_u32(p, <uint32_t>size)
        memcpy(p + 4, PyBytes_AS_STRING(body), size)
        p += 4 + size
    return out


def encode_fin(message_id):
    if type(message_id) is not bytes or PyBytes_GET_SIZE(message_id) != MESSAGE_ID_SIZE:
        _check_message_id(message_id)  # raises the pure twin's error
        if not PyBytes_Check(message_id) or PyBytes_GET_SIZE(message_id) != MESSAGE_ID_SIZE:
            raise TypeError(f"a message id must be bytes, not {type(message_id).__name__}")
    out = PyBytes_FromStringAndSize(NULL, 4 + MESSAGE_ID_SIZE + 1)
    cdef uint8_t* p = <uint8_t*>PyBytes_AS_STRING(out)
    memcpy(p, b"FIN ", 4)
    memcpy(p + 4, PyBytes_AS_STRING(message_id), MESSAGE_ID_SIZE)
    p[4 + MESSAGE_ID_SIZE] = b'\n'
    return out


# --- frame encoders (server -> client) -------------------------------------


cdef bytes frame(int32_t frame_type, object data):
    if type(data) is not bytes or PyBytes_GET_SIZE(data) > INT32_MAX - 4:
        return _frame(frame_type, data)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(data)
    out = PyBytes_FromStringAndSize(NULL, 8 + size)
    cdef uint8_t* p = <uint8_t*>PyBytes_AS_STRING(out)
    write_u32(p, <uint32_t>(size + 4))
    write_u32(p + 4, <uint32_t>frame_type)
    memcpy(p + 8, PyBytes_AS_STRING(data), size)
    return out


def encode_response(data):
    return frame(0, data)


def encode_error(data):
    return frame(1, data)


def encode_message(timestamp, attempts, message_id, body):
    cdef int64_t timestamp_value
    cdef long attempts_value
    cdef Py_ssize_t size
    cdef uint8_t* p
    if not (
        type(timestamp) is int and type(attempts) is int
        and type(message_id) is bytes and PyBytes_GET_SIZE(message_id) == MESSAGE_ID_SIZE
        and type(body) is bytes and PyBytes_GET_SIZE(body) <= INT32_MAX - 4 - MESSAGE_HEADER_SIZE
    ):
        return pure_encode_message(timestamp, attempts, message_id, body)
    try:
        timestamp_value = timestamp
        attempts_value = attempts
    except OverflowError:
        return pure_encode_message(timestamp, attempts, message_id, body)
    if attempts_value < 0 or attempts_value > 0xFFFF:
        return pure_encode_message(timestamp, attempts, message_id, body)
    size = PyBytes_GET_SIZE(body)
    out = PyBytes_FromStringAndSize(NULL, 8 + MESSAGE_HEADER_SIZE + size)
    p = <uint8_t*>PyBytes_AS_STRING(out)
    write_u32(p, <uint32_t>(4 + MESSAGE_HEADER_SIZE + size))
    write_u32(p + 4, 2)
    write_u64(p + 8, <uint64_t>timestamp_value)
    p[16] = <uint8_t>(attempts_value >> 8)
    p[17] = <uint8_t>attempts_value
    memcpy(p + 18, PyBytes_AS_STRING(message_id), MESSAGE_ID_SIZE)
    memcpy(p + 8 + MESSAGE_HEADER_SIZE, PyBytes_AS_STRING(body), size)
    return out
