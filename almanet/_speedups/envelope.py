"""RPC envelope codec: the compiled twin when available, else the pure one."""

from typing import TYPE_CHECKING

from almanet._speedups import NO_EXTENSIONS

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

# Which twin the names below come from, as almanet.speedups() reports it.
IMPLEMENTATION = "py"
# mypy reads the first branch only: the pure twin is the type source.
if TYPE_CHECKING or NO_EXTENSIONS:
    from almanet._speedups.envelope_py import (
        ENVELOPE_VERSION,
        EnvelopeError,
        Invocation,
        Reply,
        batch_items,
        decode,
        encode_batch,
        encode_invocation,
        encode_reply,
    )
else:
    try:
        from almanet._speedups.envelope_c import (
            ENVELOPE_VERSION,
            EnvelopeError,
            Invocation,
            Reply,
            batch_items,
            decode,
            encode_batch,
            encode_invocation,
            encode_reply,
        )

        IMPLEMENTATION = "c"
    except ImportError:
        from almanet._speedups.envelope_py import (
            ENVELOPE_VERSION,
            EnvelopeError,
            Invocation,
            Reply,
            batch_items,
            decode,
            encode_batch,
            encode_invocation,
            encode_reply,
        )
