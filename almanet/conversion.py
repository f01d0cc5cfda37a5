"""Typed payloads: what an annotation asks a value to be, checked and converted; and back to the wire's builtins.

A procedure's payload annotation, its return annotation (on the caller's
side) and an ``rpc_error``'s ``payload_type`` each get a *converter*: a
function that returns the value as the annotation wants it, or raises
``ConversionError`` saying why it cannot ("Expected `int`, got `str` - at
`$.count`"). Which one:

- none, ``Any`` or ``object``: no converter, nothing checked;
- ``str``, ``bytes``, ``int``, ``float``, ``bool``, ``list``, ``dict`` and
  ``None``: an ``isinstance`` check, no conversion (``float`` takes an int,
  ``int`` and ``float`` never take a bool), as almanet always did;
- anything else msgspec can decode into (dataclasses, msgspec Structs,
  ``TypedDict``, ``NamedTuple``, generic aliases such as ``list[int]`` or
  ``dict[str, Any]``, ``Optional`` and unions, ``Literal``, enums,
  ``datetime``/``date``/``time``/``timedelta``, ``UUID``, ``Decimal``,
  ``Annotated`` constraints): ``msgspec.convert`` in strict mode, so a str is
  never taken for an int, but values the wire carries as strings (datetimes,
  UUIDs, decimals) are read from them;
- an annotation that holds a pydantic model (pydantic installed, never
  required): pydantic's ``TypeAdapter``, with the model's own rules.

What no converter can honour (a class msgspec does not know, a union of two
dict-like types) is a ``TypeError`` when the converter is asked for, that is
at registration, not at the first call.

Going out, a value the envelope cannot encode (a dataclass, a Struct, a
pydantic model, an enum, a datetime, a set) is turned into msgpack's builtins
by ``to_builtins`` and encoded again; values the envelope encodes never come
here. docs: README's "Typed procedures".
"""

from __future__ import annotations

import functools
import inspect
import sys
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from almanet.wire.errors import AlmanetError

__all__ = [
    "PLAIN_TYPES",
    "ConversionError",
    "Converter",
    "UnencodablePayload",
    "converter",
    "encode_as_builtins",
    "needs_builtins",
    "resolve_annotations",
    "to_builtins",
    "type_name",
]

Converter = Callable[[Any], Any]

# Annotations checked by isinstance alone, the payload left as it came.
# bool is an int subclass, but not a number to a procedure taking int or float.
PLAIN_TYPES: dict[Any, tuple[type, ...]] = {
    str: (str,),
    bytes: (bytes,),
    int: (int,),
    float: (float, int),
    bool: (bool,),
    list: (list,),
    dict: (dict,),
    None: (type(None),),
}

# What msgpack carries natively besides JSON's types: its bin. msgspec's
# default would write bytes as base64 strings and read them back from them.
_WIRE_BUILTINS = (bytes, bytearray, memoryview)
_CONVERT_BUILTINS = (bytes, bytearray)

# How messages name a value's type, as msgspec's own do.
_WIRE_NAMES: dict[type, str] = {list: "array", dict: "object", type(None): "null", tuple: "array"}


class ConversionError(AlmanetError, ValueError):
    """A value is not what the annotation asks for; the message says why and where (``$.field[0]``)."""


class UnencodablePayload(AlmanetError, TypeError):
    """A payload (or a result) that is not msgpack's data model and cannot be turned into it."""


def type_name(annotation: Any) -> str:
    """``annotation`` as messages show it: ``Order``, ``list[int]``, ``str | None``."""
    if annotation is None or annotation is type(None):
        return "None"
    if annotation is Any:
        return "Any"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return " | ".join(map(type_name, args))
    if origin is typing.Literal:
        return f"Literal[{', '.join(map(repr, args))}]"
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is not None and args:
        shown = (f"[{', '.join(map(type_name, arg))}]" if isinstance(arg, list) else type_name(arg) for arg in args)
        return f"{type_name(origin)}[{', '.join(shown)}]"
    if isinstance(annotation, type):
        return annotation.__qualname__.rsplit("<locals>.", 1)[-1]
    return repr(annotation).replace("typing.", "")


# --- resolving annotations ------------------------------------------------------------


class _Annotations:
    """What ``typing.get_type_hints`` reads one annotation from."""

    def __init__(self, name: str, annotation: Any) -> None:
        self.__annotations__ = {name: annotation}


def resolve_annotations(function: Callable[..., Any], names: Iterable[str]) -> dict[str, Any]:
    """The annotations of ``function``'s parameters ``names`` (``"return"`` for its result), resolved.

    String annotations (``from __future__ import annotations``) are evaluated
    in the function's module, and its closure. Those absent are left out; one
    that does not resolve is a ``TypeError`` naming it.
    """
    raw, owner = _raw_annotations(function)
    wanted = [name for name in names if name in raw]
    if not wanted:
        return {}
    unwrapped = inspect.unwrap(owner)
    globalns: dict[str, Any] = getattr(unwrapped, "__globals__", None) or {}
    code, closure = getattr(unwrapped, "__code__", None), getattr(unwrapped, "__closure__", None)
    cells = zip(code.co_freevars, closure, strict=True) if code is not None and closure else ()
    localns = {variable: value for variable, cell in cells if (value := _contents(cell)) is not _UNBOUND}
    return {name: _resolve(name, raw[name], globalns, localns) for name in wanted}


_UNBOUND = object()


def _contents(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # a cell not bound yet
        return _UNBOUND


def _resolve(name: str, annotation: Any, globalns: dict[str, Any], localns: dict[str, Any]) -> Any:
    try:
        hints = typing.get_type_hints(
            _Annotations(name, annotation), globalns=globalns, localns=localns, include_extras=True
        )
    except Exception as error:
        where = "the return annotation" if name == "return" else f"the annotation of {name!r}"
        raise TypeError(
            f"{where}, {annotation!r}, does not resolve ({type(error).__name__}: {error}); "
            "name only types importable at run time, defined at module level "
            "(not under TYPE_CHECKING, nor in a function, with from __future__ import annotations)"
        ) from None
    value = hints[name]
    return None if value is type(None) else value


def _raw_annotations(function: Callable[..., Any]) -> tuple[dict[str, Any], Any]:
    """The annotations as written, and what has them (a callable object's ``__call__``)."""
    owner: Any = function if inspect.isroutine(function) else type(function).__call__
    try:
        return dict(inspect.get_annotations(owner)), owner
    except TypeError:  # neither a function nor a class (a partial): nothing to read
        return {}, function


# --- converters -------------------------------------------------------------------------


def converter(annotation: Any) -> Converter | None:
    """The converter to ``annotation`` (see the module's doc); None when it asks for nothing.

    ``TypeError`` saying why when the annotation cannot be honoured.
    """
    if annotation is Any or annotation is object:
        return None
    try:
        hash(annotation)
    except TypeError:  # no plain type, and not cached
        return _new_converter(annotation, plain=False)
    return _cached_converter(annotation)


@functools.lru_cache(maxsize=1024)
def _cached_converter(annotation: Any) -> Converter | None:
    return _new_converter(annotation)


def _new_converter(annotation: Any, plain: bool = True) -> Converter | None:
    types = PLAIN_TYPES.get(annotation) if plain else None
    if types is not None:
        return _plain_converter(annotation, types)
    try:
        info = msgspec.inspect.type_info(annotation)
    except Exception as error:  # TypeError mostly; a broken annotation may raise anything
        raise TypeError(f"{type_name(annotation)} is not supported: {error}") from None
    if isinstance(info, msgspec.inspect.AnyType):
        return None
    unknown, has_bytes, _ = _walk(info)
    if unknown:
        if all(_is_pydantic_model(cls) for cls in unknown):
            return _pydantic_converter(annotation)
        names = ", ".join(cls.__qualname__ for cls in unknown)
        raise TypeError(
            f"{type_name(annotation)} is not supported: {names} is neither a builtin type, a dataclass, a msgspec "
            "Struct, a TypedDict, a NamedTuple, an enum, a datetime type nor a pydantic model"
        )
    return _msgspec_converter(annotation, has_bytes)


def _plain_converter(annotation: Any, types: tuple[type, ...]) -> Converter:
    takes_bool = bool in types
    expected = "null" if annotation is None else _WIRE_NAMES.get(annotation, annotation.__name__)

    def convert(value: Any) -> Any:
        if isinstance(value, types) and (takes_bool or type(value) is not bool):
            return value
        raise ConversionError(f"Expected `{expected}`, got `{_wire_name(value)}`")

    return convert


def _wire_name(value: Any) -> str:
    kind = type(value)
    return _WIRE_NAMES.get(kind, kind.__name__)


def _msgspec_converter(annotation: Any, has_bytes: bool) -> Converter:
    validation_error = msgspec.ValidationError
    # builtin_types costs each call (a third of a small Struct's conversion): only where bytes are.
    convert_to = functools.partial(msgspec.convert, builtin_types=_CONVERT_BUILTINS) if has_bytes else msgspec.convert

    def convert(value: Any) -> Any:
        try:
            return convert_to(value, annotation, strict=True)
        except validation_error as error:
            raise ConversionError(str(error)) from None

    return convert


_BYTES_TYPES = (msgspec.inspect.BytesType, msgspec.inspect.ByteArrayType, msgspec.inspect.MemoryViewType)
# What the envelope encodes as it is (with what they hold): a value of any other type is not.
_ENCODED_AS_IS = (
    *_BYTES_TYPES,
    msgspec.inspect.AnyType,
    msgspec.inspect.NoneType,
    msgspec.inspect.BoolType,
    msgspec.inspect.IntType,
    msgspec.inspect.FloatType,
    msgspec.inspect.StrType,
    msgspec.inspect.ListType,
    msgspec.inspect.TupleType,
    msgspec.inspect.VarTupleType,
    msgspec.inspect.DictType,
    msgspec.inspect.TypedDictType,
    msgspec.inspect.NamedTupleType,
    msgspec.inspect.LiteralType,
    msgspec.inspect.UnionType,
    msgspec.inspect.Metadata,
)


def _walk(info: msgspec.inspect.Type) -> tuple[list[type], bool, bool]:
    """The classes msgspec only knows by ``isinstance`` in ``info`` (never what the wire carries); whether
    bytes are there (which msgpack carries as they are, where msgspec would read them from base64 strings);
    whether the envelope encodes its values as they are."""
    found: list[type] = []
    has_bytes = False
    as_is = True
    seen: set[int] = set()
    stack: list[Any] = [info]
    while stack:
        node = stack.pop()
        if id(node) in seen:  # recursive types refer to themselves
            continue
        seen.add(id(node))
        if isinstance(node, msgspec.inspect.Type) and not isinstance(node, _ENCODED_AS_IS):
            as_is = False
        if isinstance(node, msgspec.inspect.CustomType):
            if node.cls not in found:
                found.append(node.cls)
        elif isinstance(node, _BYTES_TYPES):
            has_bytes = True
        elif isinstance(node, msgspec.Struct):  # msgspec.inspect's types and fields are Structs
            stack.extend(getattr(node, field) for field in node.__struct_fields__)
        elif isinstance(node, tuple):
            stack.extend(node)
    return found, has_bytes, as_is


# --- pydantic (only when the application imported it) ------------------------------------


def _pydantic() -> Any:
    return sys.modules.get("pydantic")


def _is_pydantic_model(cls: type) -> bool:
    pydantic = _pydantic()
    return pydantic is not None and isinstance(cls, type) and issubclass(cls, pydantic.BaseModel)


def _pydantic_converter(annotation: Any) -> Converter:
    pydantic = _pydantic()
    try:
        validate = pydantic.TypeAdapter(annotation).validate_python
    except Exception as error:  # pydantic's schema errors are TypeErrors, or say so
        raise TypeError(f"{type_name(annotation)} is not supported by pydantic: {error}") from None
    validation_error = pydantic.ValidationError

    def convert(value: Any) -> Any:
        try:
            return validate(value)
        except validation_error as error:
            raise ConversionError(_pydantic_reason(error)) from None

    return convert


def _pydantic_reason(error: Any) -> str:
    """pydantic's errors in msgspec's words: ``Input should be a valid integer - at `$.count```."""
    reasons = []
    for detail in error.errors(include_url=False):
        path = "$" + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in detail["loc"])
        reasons.append(f"{detail['msg']} - at `{path}`" if detail["loc"] else detail["msg"])
    return "; ".join(reasons)


# --- going out ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def _needs_builtins(annotation: Any) -> bool:
    if annotation is Any or annotation is object or annotation in PLAIN_TYPES:
        return False
    try:
        unknown, _, as_is = _walk(msgspec.inspect.type_info(annotation))
    except Exception:  # what converter() refuses
        return False
    return bool(unknown) or not as_is


def needs_builtins(annotation: Any) -> bool:
    """Whether values of ``annotation`` are ones the envelope does not encode as they are (a dataclass, a
    Struct, an enum, a datetime, a set, a pydantic model, or what holds one), which ``to_builtins`` turns
    into ones it does."""
    try:
        return _needs_builtins(annotation)
    except TypeError:  # unhashable
        return False


def to_builtins(value: Any) -> Any:
    """``value`` as msgpack's builtins: dataclasses, Structs, pydantic models and TypedDicts as dicts, enums as
    their values, datetimes, UUIDs and decimals as strings, sets as lists; bytes stay bytes.

    ``TypeError`` for what none of these is.
    """
    return msgspec.to_builtins(value, builtin_types=_WIRE_BUILTINS, enc_hook=_encode_other)


def _encode_other(value: Any) -> Any:
    if _is_pydantic_model(type(value)):
        return value.model_dump()  # python mode: bytes stay bytes; to_builtins goes on with the rest
    raise TypeError(f"Encoding objects of type {type(value).__qualname__} is unsupported")


def encode_as_builtins(encode: Callable[[Any], bytes], value: Any, refused: Exception) -> bytes:
    """``encode(to_builtins(value))``, for an encoder that ``refused`` ``value`` (a dataclass, an enum...).

    ``UnencodablePayload`` saying why when ``value`` has no builtins form, or
    the encoder refuses that too (an int over 64 bits). Called only once the
    encoder refused, so a payload it takes costs nothing more.
    """
    try:
        return encode(to_builtins(value))
    except (TypeError, ValueError, OverflowError, RecursionError):
        pass
    said = str(refused)
    if not said.startswith("the payload cannot be encoded"):  # msgpack's own words
        said = f"the payload cannot be encoded as msgpack: {said}"
    raise UnencodablePayload(said) from refused
