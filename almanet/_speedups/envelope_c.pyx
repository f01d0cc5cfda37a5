# cython: language_level=3
"""RPC envelope codec, compiled (twin of ``envelope_py.py``, which documents the API).

Encoding writes the fixed fields in C and inlines msgpack's encoding of the
common payload types (nil, bool, int, float, str, bin, and lists, tuples and
dicts of them, not nested deeper than MAX_INLINE_DEPTH), byte for byte as
``msgpack.packb`` writes them. Any other value, and any argument the pure twin
would refuse, goes to the pure twin's field helper, so both write the same
bytes and raise the same errors in the same order.

Decoding reads any msgpack encoding of the envelope's fields in C, for the
same types. Anything else (ext types, deeper nesting, non-scalar map keys,
invalid UTF-8, any bad or unexpected byte) hands the whole body to the pure
twin, which returns the same result or raises the EnvelopeError: both twins
accept and refuse the same bodies with the same text.

Memory safety: the reader only reads ``data[pos:end]`` and checks that the
bytes it is about to read are there; it never trusts a length in the data
beyond that (an array claiming more elements than bytes left is not read).
The writer reserves room before every write.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.exc cimport PyErr_Clear
from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.long cimport (
    PyLong_AsLongLongAndOverflow,
    PyLong_AsUnsignedLongLong,
    PyLong_FromLongLong,
    PyLong_FromUnsignedLongLong,
)
from cpython.pyport cimport PY_SSIZE_T_MAX
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport int8_t, int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy

from types import GenericAlias

from almanet._speedups.envelope_py import (
    ENVELOPE_VERSION,
    EnvelopeError,
    _headers_field,
    _ok_kind,
    _packed,
    _read_fields,
    _reply_to_field,
    _uint64_field,
)
from almanet._speedups.envelope_py import __all__  # the same API, by construction
from almanet._speedups.envelope_py import batch_items as _batch_items_py
from almanet._speedups.envelope_py import encode_batch as _encode_batch_py


cdef extern from "Python.h":
    # Declared here without an exception check: NULL (a str with lone
    # surrogates) sends the value to the pure twin, which raises its error.
    const char* PyUnicode_AsUTF8AndSize(object unicode, Py_ssize_t* size)


cdef enum:
    KIND_INVOCATION = 0
    KIND_REPLY_OK = 1
    KIND_REPLY_ERROR = 2
    INVOCATION_LENGTH = 7
    REPLY_LENGTH = 4
    KIND_BATCH = 3
    BATCH_LENGTH = 3
    MAX_REPLY_TO_BYTES = 255
    # Far below msgpack's own nesting limits, so what is inlined never
    # reaches them; deeper values take the pure path.
    MAX_INLINE_DEPTH = 32
    INLINE_CAPACITY = 512

cdef uint64_t VERSION = ENVELOPE_VERSION
cdef uint64_t UINT32_MAX = 0xFFFFFFFF
cdef object UINT64_MAX = 2**64 - 1


# --- records -----------------------------------------------------------------


@cython.final
@cython.freelist(64)
cdef class Invocation:
    cdef readonly object call_id
    cdef readonly object reply_to
    cdef readonly object deadline
    cdef readonly object headers
    cdef readonly object payload

    __match_args__ = ("call_id", "reply_to", "deadline", "headers", "payload")

    def __init__(self, call_id, reply_to, deadline, headers, payload):
        self.call_id = call_id
        self.reply_to = reply_to
        self.deadline = deadline
        self.headers = headers
        self.payload = payload

    def __eq__(self, other):
        if type(other) is not Invocation:
            return NotImplemented
        cdef Invocation that = <Invocation>other
        return (self.call_id, self.reply_to, self.deadline, self.headers, self.payload) == (
            that.call_id, that.reply_to, that.deadline, that.headers, that.payload
        )

    def __hash__(self):
        return hash((self.call_id, self.reply_to, self.deadline, self.headers, self.payload))

    def __repr__(self):
        return (
            f"Invocation(call_id={self.call_id!r}, reply_to={self.reply_to!r}, deadline={self.deadline!r}, "
            f"headers={self.headers!r}, payload={self.payload!r})"
        )


@cython.final
@cython.freelist(64)
cdef class Reply:
    cdef readonly object call_id
    cdef readonly object ok
    cdef readonly object payload

    __match_args__ = ("call_id", "ok", "payload")
    __class_getitem__ = classmethod(GenericAlias)  # Reply[T] in annotations, as the pure twin's Generic

    def __init__(self, call_id, ok, payload):
        self.call_id = call_id
        self.ok = ok
        self.payload = payload

    def __eq__(self, other):
        if type(other) is not Reply:
            return NotImplemented
        cdef Reply that = <Reply>other
        return (self.call_id, self.ok, self.payload) == (that.call_id, that.ok, that.payload)

    def __hash__(self):
        return hash((self.call_id, self.ok, self.payload))

    def __repr__(self):
        return f"Reply(call_id={self.call_id!r}, ok={self.ok!r}, payload={self.payload!r})"


cdef Invocation make_invocation(object call_id, object reply_to, object deadline, object headers, object payload):
    cdef Invocation invocation = Invocation.__new__(Invocation)
    invocation.call_id = call_id
    invocation.reply_to = reply_to
    invocation.deadline = deadline
    invocation.headers = headers
    invocation.payload = payload
    return invocation


cdef Reply make_reply(object call_id, bint ok, object payload):
    cdef Reply reply = Reply.__new__(Reply)
    reply.call_id = call_id
    reply.ok = ok
    reply.payload = payload
    return reply


# --- writing -----------------------------------------------------------------


cdef struct Writer:
    uint8_t* data  # inline_data until it outgrows it, then a malloc'd block
    Py_ssize_t length
    Py_ssize_t capacity
    uint8_t inline_data[INLINE_CAPACITY]


cdef inline void writer_init(Writer* w) noexcept:
    w.data = &w.inline_data[0]
    w.length = 0
    w.capacity = INLINE_CAPACITY


cdef inline void writer_free(Writer* w) noexcept:
    if w.data != &w.inline_data[0]:
        free(w.data)


cdef int grow(Writer* w, Py_ssize_t extra) except -1:
    cdef Py_ssize_t needed, capacity
    cdef uint8_t* data
    if extra > PY_SSIZE_T_MAX - w.length:
        raise MemoryError()
    needed = w.length + extra
    capacity = w.capacity
    while capacity < needed:
        capacity = needed if capacity > PY_SSIZE_T_MAX // 2 else capacity * 2
    if w.data == &w.inline_data[0]:
        data = <uint8_t*>malloc(capacity)
        if data == NULL:
            raise MemoryError()
        memcpy(data, w.data, w.length)
    else:
        data = <uint8_t*>realloc(w.data, capacity)
        if data == NULL:
            raise MemoryError()
    w.data = data
    w.capacity = capacity
    return 0


cdef inline uint8_t* reserve(Writer* w, Py_ssize_t extra) except NULL:
    """Room for ``extra`` more bytes; the caller writes them and adds them to the length."""
    if extra > w.capacity - w.length:
        grow(w, extra)
    return w.data + w.length


cdef inline void store_u16(uint8_t* p, uint16_t value) noexcept:
    p[0] = <uint8_t>(value >> 8)
    p[1] = <uint8_t>value


cdef inline void store_u32(uint8_t* p, uint32_t value) noexcept:
    p[0] = <uint8_t>(value >> 24)
    p[1] = <uint8_t>(value >> 16)
    p[2] = <uint8_t>(value >> 8)
    p[3] = <uint8_t>value


cdef inline void store_u64(uint8_t* p, uint64_t value) noexcept:
    store_u32(p, <uint32_t>(value >> 32))
    store_u32(p + 4, <uint32_t>value)


cdef inline int put_byte(Writer* w, uint8_t byte) except -1:
    reserve(w, 1)[0] = byte
    w.length += 1
    return 0


cdef inline int put_typed_u64(Writer* w, uint8_t type_byte, uint64_t value) except -1:
    cdef uint8_t* p = reserve(w, 9)
    p[0] = type_byte
    store_u64(p + 1, value)
    w.length += 9
    return 0


cdef int put_bytes(Writer* w, object data) except -1:
    """Append ``data``, a field the pure twin encoded."""
    if type(data) is not bytes:  # never trust Python code with a C-level type
        raise TypeError(f"expected an encoded field, not {type(data).__name__}")
    cdef Py_ssize_t size = PyBytes_GET_SIZE(data)
    memcpy(reserve(w, size), PyBytes_AS_STRING(data), size)
    w.length += size
    return 0


# The headers below choose msgpack's smallest form, as msgpack.packb does.


cdef int put_uint(Writer* w, uint64_t value) except -1:
    cdef uint8_t* p = reserve(w, 9)
    if value < 0x80:
        p[0] = <uint8_t>value
        w.length += 1
    elif value <= 0xFF:
        p[0] = 0xCC
        p[1] = <uint8_t>value
        w.length += 2
    elif value <= 0xFFFF:
        p[0] = 0xCD
        store_u16(p + 1, <uint16_t>value)
        w.length += 3
    elif value <= UINT32_MAX:
        p[0] = 0xCE
        store_u32(p + 1, <uint32_t>value)
        w.length += 5
    else:
        p[0] = 0xCF
        store_u64(p + 1, value)
        w.length += 9
    return 0


cdef int put_negative(Writer* w, int64_t value) except -1:
    cdef uint8_t* p = reserve(w, 9)
    if value >= -32:
        p[0] = <uint8_t>value  # negative fixint
        w.length += 1
    elif value >= -0x80:
        p[0] = 0xD0
        p[1] = <uint8_t>value
        w.length += 2
    elif value >= -0x8000:
        p[0] = 0xD1
        store_u16(p + 1, <uint16_t>value)
        w.length += 3
    elif value >= -0x80000000:
        p[0] = 0xD2
        store_u32(p + 1, <uint32_t>value)
        w.length += 5
    else:
        p[0] = 0xD3
        store_u64(p + 1, <uint64_t>value)
        w.length += 9
    return 0


cdef int put_length(Writer* w, uint64_t length, uint8_t fix_type, uint64_t fix_limit, uint8_t type8,
                    uint8_t type16) except -1:
    """A str, bin, array or map header; ``type8`` 0 for those without an 8-bit form, ``fix_limit`` 0 for bin."""
    cdef uint8_t* p = reserve(w, 5)
    if length < fix_limit:
        p[0] = fix_type | <uint8_t>length
        w.length += 1
    elif type8 and length <= 0xFF:
        p[0] = type8
        p[1] = <uint8_t>length
        w.length += 2
    elif length <= 0xFFFF:
        p[0] = type16
        store_u16(p + 1, <uint16_t>length)
        w.length += 3
    else:
        p[0] = type16 + 1  # the 32-bit form follows the 16-bit one in every family
        store_u32(p + 1, <uint32_t>length)
        w.length += 5
    return 0


cdef int put_raw(Writer* w, const char* data, Py_ssize_t size) except -1:
    memcpy(reserve(w, size), data, size)
    w.length += size
    return 0


cdef int pack(Writer* w, object value, int depth) except -1:
    """Append msgpack's encoding of ``value``: 1 if done, 0 if ``value`` is left to msgpack.

    After a 0 the writer holds a partial encoding: the caller drops it.
    """
    cdef type kind = type(value)
    cdef int overflow = 0
    cdef long long number
    cdef uint64_t bits
    cdef double real
    cdef Py_ssize_t size
    cdef const char* utf8
    if value is None:
        put_byte(w, 0xC0)
    elif value is True:
        put_byte(w, 0xC3)
    elif value is False:
        put_byte(w, 0xC2)
    elif kind is int:
        number = PyLong_AsLongLongAndOverflow(value, &overflow)
        if overflow == 0:
            if number >= 0:
                put_uint(w, <uint64_t>number)
            else:
                put_negative(w, number)
        elif overflow > 0 and value <= UINT64_MAX:
            put_typed_u64(w, 0xCF, PyLong_AsUnsignedLongLong(value))
        else:
            return 0  # beyond msgpack's ints: msgpack raises the error
    elif kind is str:
        utf8 = PyUnicode_AsUTF8AndSize(value, &size)
        if utf8 == NULL:
            PyErr_Clear()
            return 0
        if <uint64_t>size > UINT32_MAX:
            return 0
        put_length(w, <uint64_t>size, 0xA0, 32, 0xD9, 0xDA)
        put_raw(w, utf8, size)
    elif kind is float:
        real = PyFloat_AS_DOUBLE(value)
        memcpy(&bits, &real, 8)
        put_typed_u64(w, 0xCB, bits)
    elif kind is bytes:
        size = PyBytes_GET_SIZE(value)
        if <uint64_t>size > UINT32_MAX:
            return 0
        put_length(w, <uint64_t>size, 0xC4, 0, 0xC4, 0xC5)
        put_raw(w, PyBytes_AS_STRING(value), size)
    elif depth >= MAX_INLINE_DEPTH:
        return 0
    elif kind is list or kind is tuple:
        size = len(value)
        if <uint64_t>size > UINT32_MAX:
            return 0
        put_length(w, <uint64_t>size, 0x90, 16, 0, 0xDC)
        # Only the inlined types run here, and none of them runs Python code:
        # nothing can change the sequence while it is written.
        for item in value:
            if not pack(w, item, depth + 1):
                return 0
    elif kind is dict:
        size = len(<dict>value)
        if <uint64_t>size > UINT32_MAX:
            return 0
        put_length(w, <uint64_t>size, 0x80, 16, 0, 0xDE)
        for key, item in (<dict>value).items():
            if not pack(w, key, depth + 1) or not pack(w, item, depth + 1):
                return 0
    else:
        return 0
    return 1


cdef int put_uint64_arg(Writer* w, str what, object value) except -1:
    cdef int overflow = 0
    cdef long long number
    if type(value) is int:
        number = PyLong_AsLongLongAndOverflow(value, &overflow)
        if overflow == 0 and number >= 0:
            return put_typed_u64(w, 0xCF, <uint64_t>number)
    return put_bytes(w, _uint64_field(what, value))  # the rest, or the error, is the pure twin's


cdef int put_reply_to(Writer* w, object reply_to) except -1:
    cdef Py_ssize_t size
    cdef const char* utf8
    cdef uint8_t* p
    if reply_to is None:
        return put_byte(w, 0xC0)
    if type(reply_to) is str:
        utf8 = PyUnicode_AsUTF8AndSize(reply_to, &size)
        if utf8 == NULL:
            PyErr_Clear()
        elif size <= MAX_REPLY_TO_BYTES:
            p = reserve(w, 2 + size)
            p[0] = 0xD9
            p[1] = <uint8_t>size
            memcpy(p + 2, utf8, size)
            w.length += 2 + size
            return 0
    return put_bytes(w, _reply_to_field(reply_to))


cdef int put_headers(Writer* w, object headers) except -1:
    cdef Py_ssize_t start = w.length
    if headers is None:
        return put_byte(w, 0xC0)
    if type(headers) is dict:
        for name in <dict>headers:
            if type(name) is not str:
                break
        else:
            if pack(w, headers, 0):
                return 0
    w.length = start
    return put_bytes(w, _headers_field(headers))


cdef int put_payload(Writer* w, object payload) except -1:
    cdef Py_ssize_t start = w.length
    if pack(w, payload, 0):
        return 0
    w.length = start
    return put_bytes(w, _packed("the payload", payload))


def encode_invocation(call_id, reply_to, deadline, headers, payload):
    cdef Writer w
    writer_init(&w)
    try:
        # In wire order, which is also the order the pure twin checks the arguments in.
        put_byte(&w, 0x90 | INVOCATION_LENGTH)
        put_byte(&w, VERSION)
        put_byte(&w, KIND_INVOCATION)
        put_uint64_arg(&w, "the call id", call_id)
        put_reply_to(&w, reply_to)
        put_uint64_arg(&w, "the deadline", deadline)
        put_headers(&w, headers)
        put_payload(&w, payload)
        return PyBytes_FromStringAndSize(<const char*>w.data, w.length)
    finally:
        writer_free(&w)


def encode_reply(call_id, ok, payload):
    cdef Writer w
    cdef uint8_t kind
    writer_init(&w)
    try:
        put_byte(&w, 0x90 | REPLY_LENGTH)
        put_byte(&w, VERSION)
        put_byte(&w, 0)  # the kind, known once the call id is checked
        put_uint64_arg(&w, "the call id", call_id)
        if ok is True:
            kind = KIND_REPLY_OK
        elif ok is False:
            kind = KIND_REPLY_ERROR
        else:
            kind = _ok_kind(ok)  # raises the pure twin's error
        w.data[2] = kind
        put_payload(&w, payload)
        return PyBytes_FromStringAndSize(<const char*>w.data, w.length)
    finally:
        writer_free(&w)


cdef inline Py_ssize_t bin_header_size(Py_ssize_t size) noexcept:
    return 2 if size <= 0xFF else 3 if size <= 0xFFFF else 5


def encode_batch(items):
    cdef Writer w
    cdef Py_ssize_t count, index, size, total
    cdef uint8_t* p
    if type(items) is not list or not items:
        return _encode_batch_py(items)
    count = len(<list>items)
    total = 3 + 5
    for index in range(count):
        item = (<list>items)[index]
        if type(item) is not bytes or <uint64_t>PyBytes_GET_SIZE(item) > UINT32_MAX:
            return _encode_batch_py(items)  # raises its error
        size = PyBytes_GET_SIZE(item)
        total += bin_header_size(size) + size
    writer_init(&w)
    try:
        reserve(&w, total)
        put_byte(&w, 0x90 | BATCH_LENGTH)
        put_byte(&w, VERSION)
        put_byte(&w, KIND_BATCH)
        put_length(&w, <uint64_t>count, 0x90, 16, 0, 0xDC)
        for index in range(count):
            item = (<list>items)[index]
            size = PyBytes_GET_SIZE(item)
            put_length(&w, <uint64_t>size, 0, 0, 0xC4, 0xC5)
            put_raw(&w, PyBytes_AS_STRING(item), size)
        return PyBytes_FromStringAndSize(<const char*>w.data, w.length)
    finally:
        writer_free(&w)


# --- reading -----------------------------------------------------------------


cdef struct Reader:
    const uint8_t* data
    Py_ssize_t pos
    Py_ssize_t end


# What read_value returns for a value it leaves to the pure twin.
cdef object UNREAD = object()


cdef inline uint16_t load_u16(const uint8_t* p) noexcept:
    return (<uint16_t>p[0] << 8) | p[1]


cdef inline uint32_t load_u32(const uint8_t* p) noexcept:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | <uint32_t>p[3]


cdef inline uint64_t load_u64(const uint8_t* p) noexcept:
    return (<uint64_t>load_u32(p) << 32) | <uint64_t>load_u32(p + 4)


cdef inline const uint8_t* take(Reader* r, uint64_t count) noexcept:
    """The next ``count`` bytes, consumed; NULL (and nothing consumed) if the data ends first.

    ``count`` is unsigned and compared unsigned, as it comes from the data: a
    length of 2**31 or more must not turn negative where Py_ssize_t is 32 bits.
    """
    cdef const uint8_t* p
    if count > <uint64_t>(r.end - r.pos):
        return NULL
    p = r.data + r.pos
    r.pos += <Py_ssize_t>count
    return p


cdef bint read_int(Reader* r, int64_t* signed_value, uint64_t* unsigned_value, bint* is_unsigned) noexcept:
    """Any msgpack int form; False (nothing consumed) if the next value is not a whole int."""
    cdef Py_ssize_t start = r.pos
    cdef const uint8_t* p = take(r, 1)
    cdef uint8_t type_byte
    if p == NULL:
        return False
    type_byte = p[0]
    is_unsigned[0] = True
    if type_byte < 0x80:
        unsigned_value[0] = type_byte
        return True
    if type_byte >= 0xE0:
        is_unsigned[0] = False
        signed_value[0] = <int8_t>type_byte
        return True
    if 0xCC <= type_byte <= 0xCF:
        p = take(r, 1 << (type_byte - 0xCC))
        if p != NULL:
            if type_byte == 0xCC:
                unsigned_value[0] = p[0]
            elif type_byte == 0xCD:
                unsigned_value[0] = load_u16(p)
            elif type_byte == 0xCE:
                unsigned_value[0] = load_u32(p)
            else:
                unsigned_value[0] = load_u64(p)
            return True
    elif 0xD0 <= type_byte <= 0xD3:
        p = take(r, 1 << (type_byte - 0xD0))
        if p != NULL:
            is_unsigned[0] = False
            if type_byte == 0xD0:
                signed_value[0] = <int8_t>p[0]
            elif type_byte == 0xD1:
                signed_value[0] = <int16_t>load_u16(p)
            elif type_byte == 0xD2:
                signed_value[0] = <int32_t>load_u32(p)
            else:
                signed_value[0] = <int64_t>load_u64(p)
            return True
    r.pos = start
    return False


cdef bint read_uint(Reader* r, uint64_t* value) noexcept:
    """An unsigned int in any msgpack int form (a signed form with a value >= 0 too)."""
    cdef int64_t signed_value = 0
    cdef bint is_unsigned = False
    if not read_int(r, &signed_value, value, &is_unsigned):
        return False
    if is_unsigned:
        return True
    if signed_value < 0:
        return False
    value[0] = <uint64_t>signed_value
    return True


cdef bint read_array_header(Reader* r, uint64_t* count) noexcept:
    cdef const uint8_t* p = take(r, 1)
    cdef uint8_t type_byte
    if p == NULL:
        return False
    type_byte = p[0]  # p is reused below, and NULL when the data ends
    if 0x90 <= type_byte <= 0x9F:
        count[0] = type_byte & 0x0F
    elif type_byte == 0xDC and (p := take(r, 2)) != NULL:
        count[0] = load_u16(p)
    elif type_byte == 0xDD and (p := take(r, 4)) != NULL:
        count[0] = load_u32(p)
    else:
        return False
    return True


cdef object read_str(Reader* r, uint64_t size):
    cdef const uint8_t* p = take(r, size)
    if p == NULL:
        return UNREAD
    try:
        return PyUnicode_DecodeUTF8(<char*>p, <Py_ssize_t>size, NULL)
    except UnicodeDecodeError:
        return UNREAD


cdef object read_bin(Reader* r, uint64_t size):
    cdef const uint8_t* p = take(r, size)
    if p == NULL:
        return UNREAD
    return PyBytes_FromStringAndSize(<const char*>p, <Py_ssize_t>size)


cdef object read_list(Reader* r, uint64_t count, int depth):
    cdef list items
    cdef Py_ssize_t index
    if depth >= MAX_INLINE_DEPTH or count > <uint64_t>(r.end - r.pos):  # each element takes a byte at least
        return UNREAD
    items = [None] * <Py_ssize_t>count
    for index in range(<Py_ssize_t>count):
        item = read_value(r, depth + 1)
        if item is UNREAD:
            return UNREAD
        items[index] = item
    return items


cdef object read_dict(Reader* r, uint64_t count, int depth):
    cdef dict items
    cdef Py_ssize_t index
    if depth >= MAX_INLINE_DEPTH or count > <uint64_t>((r.end - r.pos) // 2):  # two bytes an entry at least
        return UNREAD
    items = {}
    for index in range(<Py_ssize_t>count):
        key = read_value(r, depth + 1)
        # Only keys that hash without fail: msgpack refuses a list key as unhashable.
        if key is UNREAD or type(key) is list or type(key) is dict:
            return UNREAD
        item = read_value(r, depth + 1)
        if item is UNREAD:
            return UNREAD
        items[key] = item
    return items


cdef object read_value(Reader* r, int depth):
    """The next msgpack value as msgpack.unpackb returns it, or UNREAD (position then undefined)."""
    cdef const uint8_t* p
    cdef uint8_t type_byte
    cdef int64_t signed_value = 0
    cdef uint64_t unsigned_value = 0
    cdef bint is_unsigned = False
    cdef uint32_t single_bits
    cdef float single
    cdef uint64_t double_bits
    cdef double real
    if read_int(r, &signed_value, &unsigned_value, &is_unsigned):
        return PyLong_FromUnsignedLongLong(unsigned_value) if is_unsigned else PyLong_FromLongLong(signed_value)
    p = take(r, 1)
    if p == NULL:
        return UNREAD
    type_byte = p[0]
    if 0xA0 <= type_byte <= 0xBF:
        return read_str(r, type_byte & 0x1F)
    if 0x90 <= type_byte <= 0x9F:
        return read_list(r, type_byte & 0x0F, depth)
    if 0x80 <= type_byte <= 0x8F:
        return read_dict(r, type_byte & 0x0F, depth)
    if type_byte == 0xC0:
        return None
    if type_byte == 0xC2:
        return False
    if type_byte == 0xC3:
        return True
    if type_byte == 0xCB and (p := take(r, 8)) != NULL:
        double_bits = load_u64(p)
        memcpy(&real, &double_bits, 8)
        return real
    if type_byte == 0xCA and (p := take(r, 4)) != NULL:
        single_bits = load_u32(p)
        memcpy(&single, &single_bits, 4)
        return <double>single
    if (type_byte == 0xD9 or type_byte == 0xC4) and (p := take(r, 1)) != NULL:
        return read_str(r, p[0]) if type_byte == 0xD9 else read_bin(r, p[0])
    if (type_byte == 0xDA or type_byte == 0xC5) and (p := take(r, 2)) != NULL:
        return read_str(r, load_u16(p)) if type_byte == 0xDA else read_bin(r, load_u16(p))
    if (type_byte == 0xDB or type_byte == 0xC6) and (p := take(r, 4)) != NULL:
        return read_str(r, load_u32(p)) if type_byte == 0xDB else read_bin(r, load_u32(p))
    if type_byte == 0xDC and (p := take(r, 2)) != NULL:
        return read_list(r, load_u16(p), depth)
    if type_byte == 0xDD and (p := take(r, 4)) != NULL:
        return read_list(r, load_u32(p), depth)
    if type_byte == 0xDE and (p := take(r, 2)) != NULL:
        return read_dict(r, load_u16(p), depth)
    if type_byte == 0xDF and (p := take(r, 4)) != NULL:
        return read_dict(r, load_u32(p), depth)
    return UNREAD  # 0xc1, ext types, or a header cut short


cdef object read_envelope(const uint8_t* data, Py_ssize_t size):
    """The envelope in ``data[:size]``, or UNREAD for anything but a valid envelope of inlined types."""
    cdef Reader r
    cdef uint64_t count = 0
    cdef uint64_t version = 0, kind = 0, call_id = 0, deadline = 0
    r.data = data
    r.pos = 0
    r.end = size
    if not (
        read_array_header(&r, &count) and read_uint(&r, &version) and version == VERSION
        and read_uint(&r, &kind) and read_uint(&r, &call_id)
    ):
        return UNREAD
    if kind == KIND_INVOCATION and count == INVOCATION_LENGTH:
        reply_to = read_value(&r, 1)
        if not (reply_to is None or type(reply_to) is str) or not read_uint(&r, &deadline):
            return UNREAD
        headers = read_value(&r, 1)
        if type(headers) is dict:
            for name in <dict>headers:
                if type(name) is not str:
                    return UNREAD
        elif headers is not None:
            return UNREAD
        payload = read_value(&r, 1)
        if payload is UNREAD or r.pos != r.end:
            return UNREAD
        return make_invocation(
            PyLong_FromUnsignedLongLong(call_id), reply_to, PyLong_FromUnsignedLongLong(deadline), headers, payload
        )
    if (kind == KIND_REPLY_OK or kind == KIND_REPLY_ERROR) and count == REPLY_LENGTH:
        payload = read_value(&r, 1)
        if payload is UNREAD or r.pos != r.end:
            return UNREAD
        return make_reply(PyLong_FromUnsignedLongLong(call_id), kind == KIND_REPLY_OK, payload)
    return UNREAD


cdef object from_fields(list fields):
    if fields[1] == KIND_INVOCATION:
        return make_invocation(fields[2], fields[3], fields[4], fields[5], fields[6])
    return make_reply(fields[2], fields[1] == KIND_REPLY_OK, fields[3])


cdef object read_batch(const uint8_t* data, Py_ssize_t size):
    """The items of the batch in ``data[:size]``; None for a body that is no batch; UNREAD for a bad batch."""
    cdef Reader r
    cdef uint64_t count = 0, version = 0, kind = 0, item_size = 0
    cdef const uint8_t* p
    cdef uint8_t type_byte
    cdef list items
    cdef Py_ssize_t index
    r.data = data
    r.pos = 0
    r.end = size
    if not (
        read_array_header(&r, &count) and read_uint(&r, &version) and version == VERSION
        and read_uint(&r, &kind) and kind == KIND_BATCH
    ):
        return None
    # Each item takes two bytes at least (an empty bin): no more items than that are read.
    if count != BATCH_LENGTH or not read_array_header(&r, &count) or count == 0 or count > <uint64_t>((r.end - r.pos) // 2):
        return UNREAD
    items = [None] * <Py_ssize_t>count
    for index in range(<Py_ssize_t>count):
        p = take(&r, 1)
        if p == NULL:
            return UNREAD
        type_byte = p[0]
        if type_byte == 0xC4 and (p := take(&r, 1)) != NULL:
            item_size = p[0]
        elif type_byte == 0xC5 and (p := take(&r, 2)) != NULL:
            item_size = load_u16(p)
        elif type_byte == 0xC6 and (p := take(&r, 4)) != NULL:
            item_size = load_u32(p)
        else:
            return UNREAD
        item = read_bin(&r, item_size)
        if item is UNREAD:
            return UNREAD
        items[index] = item
    if r.pos != r.end:
        return UNREAD
    return items


def batch_items(body):
    if type(body) is bytes:
        items = read_batch(<const uint8_t*>PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body))
    else:
        return _batch_items_py(body)  # the fast path is for what nsqd hands out: bytes
    if items is UNREAD:
        return _batch_items_py(body)  # raises the EnvelopeError that says what is wrong
    return items


def decode(body):
    cdef Py_buffer view
    if type(body) is bytes:
        envelope = read_envelope(<const uint8_t*>PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body))
    else:
        try:
            PyObject_GetBuffer(body, &view, PyBUF_SIMPLE)
        except (TypeError, BufferError):
            envelope = UNREAD  # not bytes-like, or not contiguous: the pure twin says which
        else:
            try:
                # msgpack refuses buffers of wider items; the pure twin raises its error.
                envelope = read_envelope(<const uint8_t*>view.buf, view.len) if view.itemsize == 1 else UNREAD
            finally:
                PyBuffer_Release(&view)
    if envelope is UNREAD:
        return from_fields(_read_fields(body))
    return envelope
