"""The RPC error model: what a procedure raises is what its caller catches.

A procedure that raises an ``rpc_error`` subclass answers with an error
reply carrying the class's stable ``name``, the exception's ``args`` and its
``payload``. The caller re-raises the class registered under that name when
it knows one (any imported subclass registers itself), else a plain
``rpc_error`` with the same ``name``, ``args`` and ``payload``. Anything else
a procedure raises reaches the caller as ``InternalError``, without the
remote traceback. docs/PROTOCOL.md has the wire form.
"""

from __future__ import annotations

import logging
from typing import Any

import msgpack

from almanet import conversion
from almanet.wire.errors import AlmanetError

logger = logging.getLogger("almanet")

_registry: dict[str, type[rpc_error]] = {}


class CallTimeout(AlmanetError, TimeoutError):
    """No reply came within the call's timeout."""


class NoResponders(CallTimeout):
    """No service serves the URI called: none answered the session's discovery query in time.

    Raised within ``DISCOVERY_WAIT`` (0.75 s), before the invocation is
    published, so nothing is left behind in the broker. A ``TimeoutError``, as
    a call nobody answers always was.
    """


class UnreadableBody(AlmanetError, ValueError):
    """A consumed message's body is not what ``produce`` sends (one msgpack value): read its ``.body``."""


class rpc_error(AlmanetError):  # lower case: the name users know from the original almanet
    """An error a procedure raises for its caller.

    Subclasses register themselves under ``name`` (their class name unless
    they set one), so a caller that imports the same class catches it.
    A subclass may declare ``payload_type`` (any annotation a procedure's
    payload may have, see ``almanet.conversion``): the payload it is raised
    with is sent as builtins, and the caller's exception has it converted
    back to that type (``InvalidReply`` when it is not one). A payload of
    None stays None.
    """

    name: str = "rpc_error"
    payload: Any = None
    payload_type: Any = Any

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name", cls.__name__)
        if not isinstance(name, str) or not name:
            raise TypeError(f"{cls.__qualname__}.name must be a non-empty str")
        cls.name = name
        if "payload_type" in cls.__dict__:
            try:
                conversion.converter(cls.payload_type)
            except TypeError as error:
                raise TypeError(f"{cls.__qualname__}.payload_type cannot be honoured: {error}") from None
        known = _registry.get(name)
        if known is not None and known.__qualname__ != cls.__qualname__:
            logger.warning("rpc_error name %r of %s now means %s", name, known, cls)
        _registry[name] = cls

    def __init__(self, *args: Any, payload: Any = None) -> None:
        super().__init__(*args)
        self.payload = payload

    def __str__(self) -> str:
        text = ", ".join(map(str, self.args))
        return f"{self.name}: {text}" if text else self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, args={self.args!r}, payload={self.payload!r})"

    def to_reply_payload(self) -> list[Any]:
        """``[name, args, payload]``: the error reply's payload."""
        payload = self.payload
        if payload is not None and type(self).payload_type is not Any:
            payload = conversion.to_builtins(payload)
        return [self.name, [_encodable(arg) for arg in self.args], payload]

    @classmethod
    def from_reply_payload(cls, payload: Any) -> rpc_error:
        """The exception an error reply's payload stands for (a plain ``rpc_error`` for an unknown name)."""
        try:
            name, args, error_payload = payload
            if not isinstance(name, str) or not isinstance(args, list):
                raise ValueError
        except (TypeError, ValueError):
            return InvalidReply(f"an error reply whose payload is not [name, args, payload]: {payload!r:.200}")
        known = _registry.get(name)
        if known is None:
            error = rpc_error(*args, payload=error_payload)
            error.name = name
            return error
        try:
            error = known(*args)
        except Exception:  # its constructor takes other arguments: rebuild it as it was raised
            error = Exception.__new__(known)
            error.args = tuple(args)
        convert = conversion.converter(known.payload_type) if error_payload is not None else None
        if convert is not None:
            try:
                error_payload = convert(error_payload)
            except conversion.ConversionError as reason:
                return InvalidReply(
                    f"the payload of {name} is not a {conversion.type_name(known.payload_type)}: {reason}",
                    payload=error_payload,
                )
        error.payload = error_payload
        return error


def describe_error(error: BaseException) -> str:
    """``str(error)``, or its ``repr`` when its ``__str__`` fails (an exception built from what came off the wire)."""
    try:
        return str(error)
    except Exception:
        return object.__repr__(error)


def _encodable(value: Any) -> Any:
    """``value`` if msgpack can encode it, else its ``str()``."""
    try:
        msgpack.packb(value)
    except (TypeError, ValueError, OverflowError):
        return str(value)
    return value


class InternalError(rpc_error):
    """The procedure raised something that is not an ``rpc_error``; its traceback stays on the callee's side."""


class InvalidEnvelope(rpc_error):
    """The callee could not read the invocation (not an envelope, or a version it does not speak)."""


class InvalidPayload(rpc_error):
    """The procedure does not take this payload (its annotated type does not match)."""


class InvalidReply(rpc_error):
    """The reply could not be read (raised on the caller's side)."""


_registry["rpc_error"] = rpc_error
