"""almanet's error root, and the errors of the NSQ wire protocol.

``AlmanetError``
    Every error almanet raises derives from it; each also subclasses the
    builtin it stands for where callers expect one (``ConnectionError``,
    ``TimeoutError``, ``ValueError``). The RPC errors (``almanet.rpc_error``
    and its kind) are in ``almanet.errors``.

``ConnectionFailed`` (a ``ConnectionError``)
    A connection to nsqd or nsqlookupd could not be made, was lost, or is
    closed: what was sent on it may or may not have arrived.

``ProtocolError``
    The bytes on a connection broke NSQ protocol V2; the connection cannot go on.

    ``FrameError``
        A frame sent by nsqd is malformed (client direction): a size below 4 or
        above the limit, an unknown frame type, a message frame shorter than its
        26-byte header, or a connection closed in the middle of a frame.

    ``CompressionError``
        A snappy or deflate stream negotiated with IDENTIFY is corrupt (either
        direction).

    ``CommandError``
        A client's command is refused (server direction). ``code`` and
        ``description`` are the ones nsqd uses; ``data`` is the payload of the
        error frame to send before closing the connection.

        ``Unauthorized``
            nsqd refused a command its auth server does not permit
            (``E_UNAUTHORIZED``); the message names the permission and topic.

``MessageTooBig`` (a ``ValueError``, not a ``ProtocolError``)
    A message is larger than nsqd takes (its ``--max-msg-size``): refused
    before it is sent, or by nsqd.

A plain ``ProtocolError`` from the command parser (a command line longer than
nsqd's read buffer, a connection closed mid-command) closes the connection
without an error frame, as nsqd does.
"""

import re


class AlmanetError(Exception):
    """The root of every error almanet raises."""


class ConnectionFailed(AlmanetError, ConnectionError):
    """A connection to nsqd or nsqlookupd could not be made, was lost, or is closed."""


class ProtocolError(AlmanetError):
    """The bytes on an NSQ connection broke protocol V2."""


class FrameError(ProtocolError):
    """A frame received from nsqd is malformed."""


class CompressionError(ProtocolError):
    """A compressed stream (snappy or deflate) received on a connection is corrupt."""


class CommandError(ProtocolError):
    """A command received by the broker is refused with an nsqd error code."""

    def __init__(self, code: str, description: str) -> None:
        super().__init__(f"{code} {description}" if description else code)
        self.code = code
        self.description = description

    @property
    def data(self) -> bytes:
        """The error frame's payload: ``E_CODE description``, raw bytes preserved."""
        return str(self).encode("utf-8", "surrogateescape")


# nsqd's E_UNAUTHORIZED description: the command, then the topic and channel, quoted.
_REFUSED_COMMAND = re.compile(r'AUTH failed for (\w+) on "(.*)" "(.*)"$')


class Unauthorized(CommandError):
    """``E_UNAUTHORIZED`` from nsqd at ``refused_by``: its auth server does not grant the secret the command."""

    def __init__(self, code: str, description: str, refused_by: str) -> None:
        super().__init__(code, description)
        refused = _REFUSED_COMMAND.search(description)
        if refused is not None:
            command, topic, channel = refused.groups()
            permission = "subscribe" if command == "SUB" else "publish"
            where = f"topic {topic}" + (f", channel {channel}" if channel else "")
            self.args = (
                f"{code} {description}: nsqd at {refused_by} says its auth server does not grant "
                f"this secret the {permission} permission on {where}",
            )

    @property
    def data(self) -> bytes:
        return f"{self.code} {self.description}".encode("utf-8", "surrogateescape")


class MessageTooBig(AlmanetError, ValueError):
    """A message larger than nsqd's ``--max-msg-size`` (``limit``): refused before it is sent, or by nsqd."""

    def __init__(self, size: int, limit: int, *, refused_by: str = "") -> None:
        where = f"nsqd at {refused_by} refused it" if refused_by else "not sent"
        super().__init__(f"a message of {size} bytes exceeds max_msg_size ({limit}): {where}")
        self.size = size
        self.limit = limit


def wire_text(raw: bytes) -> str:
    """Text of raw wire bytes for an error description, reversible by ``CommandError.data``."""
    return raw.decode("utf-8", "surrogateescape")


_GO_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v"}


def go_quote(raw: bytes) -> str:
    """Quote bytes as Go's ``%q`` does, so error texts match nsqd's byte for byte."""
    out = ['"']
    for char in raw.decode("utf-8", "surrogateescape"):
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte
            out.append(f"\\x{code - 0xDC00:02x}")
        elif char in '"\\':
            out.append("\\" + char)
        elif char in _GO_ESCAPES:
            out.append(_GO_ESCAPES[char])
        elif char.isprintable():
            out.append(char)
        elif code < 0x80:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    out.append('"')
    return "".join(out)
