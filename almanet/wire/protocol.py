"""Facts of NSQ TCP protocol V2 shared by the codec, the client and the broker.

Sources: nsq.io "TCP Protocol Spec" and nsqd's documented defaults
(``--max-msg-size``, ``--max-body-size``, ``--max-req-timeout``).
"""

from typing import Final

MAGIC_V2: Final = b"  V2"

FRAME_TYPE_RESPONSE: Final = 0
FRAME_TYPE_ERROR: Final = 1
FRAME_TYPE_MESSAGE: Final = 2

# Commands without arguments are their own encoding.
NOP: Final = b"NOP\n"
CLS: Final = b"CLS\n"

# Response frame payloads nsqd sends.
OK: Final = b"OK"
HEARTBEAT: Final = b"_heartbeat_"
CLOSE_WAIT: Final = b"CLOSE_WAIT"

MESSAGE_ID_SIZE: Final = 16
# A message frame's data: timestamp (int64 ns), attempts (uint16), id (16 bytes), body.
MESSAGE_HEADER_SIZE: Final = 8 + 2 + MESSAGE_ID_SIZE

# Topic and channel names: [.a-zA-Z0-9_-], 1 to 64 characters counting "#ephemeral".
MAX_NAME_LENGTH: Final = 64
EPHEMERAL_SUFFIX: Final = b"#ephemeral"

# nsqd reads command lines through a 16 KiB buffer: a line that does not fit
# (newline included) closes the connection without an error frame.
MAX_COMMAND_LINE: Final = 16 * 1024

DEFAULT_MAX_MSG_SIZE: Final = 1024 * 1024
DEFAULT_MAX_BODY_SIZE: Final = 5 * 1024 * 1024
DEFAULT_MAX_REQ_TIMEOUT_MS: Final = 60 * 60 * 1000
# Largest frame nsqd sends with default settings: the size field counts the
# 4-byte frame type, the message header and the body.
DEFAULT_MAX_FRAME_SIZE: Final = 4 + MESSAGE_HEADER_SIZE + DEFAULT_MAX_MSG_SIZE
