"""NSQ frame codec: the compiled twin when available, else the pure one."""

from typing import TYPE_CHECKING

from almanet._speedups import NO_EXTENSIONS

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

# Which twin the names below come from, as almanet.speedups() reports it.
IMPLEMENTATION = "py"
# mypy reads the first branch only: the pure twin is the type source.
if TYPE_CHECKING or NO_EXTENSIONS:
    from almanet._speedups.frames_py import (
        Command,
        CommandParser,
        ErrorFrame,
        FrameReader,
        MessageFrame,
        ResponseFrame,
        check_name,
        encode_auth,
        encode_dpub,
        encode_error,
        encode_fin,
        encode_identify,
        encode_message,
        encode_mpub,
        encode_pub,
        encode_rdy,
        encode_req,
        encode_response,
        encode_sub,
        encode_touch,
        is_valid_name,
        parse_base10,
        split_mpub,
    )
else:
    try:
        from almanet._speedups.frames_c import (
            Command,
            CommandParser,
            ErrorFrame,
            FrameReader,
            MessageFrame,
            ResponseFrame,
            check_name,
            encode_auth,
            encode_dpub,
            encode_error,
            encode_fin,
            encode_identify,
            encode_message,
            encode_mpub,
            encode_pub,
            encode_rdy,
            encode_req,
            encode_response,
            encode_sub,
            encode_touch,
            is_valid_name,
            parse_base10,
            split_mpub,
        )

        IMPLEMENTATION = "c"
    except ImportError:
        from almanet._speedups.frames_py import (
            Command,
            CommandParser,
            ErrorFrame,
            FrameReader,
            MessageFrame,
            ResponseFrame,
            check_name,
            encode_auth,
            encode_dpub,
            encode_error,
            encode_fin,
            encode_identify,
            encode_message,
            encode_mpub,
            encode_pub,
            encode_rdy,
            encode_req,
            encode_response,
            encode_sub,
            encode_touch,
            is_valid_name,
            parse_base10,
            split_mpub,
        )
