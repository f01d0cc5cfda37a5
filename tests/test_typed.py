"""Typed payloads, results and errors (almanet.conversion; README's "Typed procedures").

The annotations here are strings (``from __future__ import annotations``), as
in most applications: registration resolves them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import decimal
import enum
import io
import re
import uuid
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, Literal, NamedTuple, Optional, TypedDict

import msgpack
import msgspec
import pytest

import almanet
from almanet import conversion
from almanet._speedups.envelope import encode_invocation
from almanet.errors import rpc_error
from almanet.pytest_plugin import BrokerAddresses
from almanet.rpc import invocation_envelope
from almanet.subscription import encode_payload

README = Path(__file__).resolve().parent.parent / "README.md"
TIMEOUT = 10.0
UTC = datetime.timezone.utc


@dataclasses.dataclass
class Order:
    item: str
    count: int = 1
    note: bytes = b""


@dataclasses.dataclass
class Receipt:
    total: int
    at: datetime.datetime


@dataclasses.dataclass
class Node:
    value: int
    children: list[Node] = dataclasses.field(default_factory=list)


class Point(TypedDict):
    x: int
    y: int


class Pair(NamedTuple):
    left: str
    right: int


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Item(msgspec.Struct):
    name: str
    tags: list[str] = []


class Restock(msgspec.Struct):
    day: str


class Unknown:
    """A class msgspec knows nothing of: no payload can be one."""


class OutOfStock(rpc_error):
    name = "tests.typed.OutOfStock"
    payload_type = Restock


class Denied(rpc_error):
    name = "tests.typed.Denied"


def new_service(address: str = "127.0.0.1:4150", prefix: str = "typed") -> almanet.Service:
    """A service to register on: nothing connects before it starts."""
    return almanet.new_service(address, prefix=prefix)


# --- plain annotations: as they always were ---------------------------------------------------


@pytest.mark.parametrize(
    ("annotation", "value", "reason"),
    [
        (str, 42, "Expected `str`, got `int`"),
        (int, True, "Expected `int`, got `bool`"),
        (float, False, "Expected `float`, got `bool`"),
        (int, 1.5, "Expected `int`, got `float`"),
        (bytes, "text", "Expected `bytes`, got `str`"),
        (list, {"a": 1}, "Expected `array`, got `object`"),
        (dict, [1], "Expected `object`, got `array`"),
        (bool, 1, "Expected `bool`, got `int`"),
        (None, 0, "Expected `null`, got `int`"),
    ],
)
def test_plain_annotations_refuse_other_types(annotation: Any, value: Any, reason: str) -> None:
    convert = conversion.converter(annotation)
    assert convert is not None
    with pytest.raises(conversion.ConversionError) as refused:
        convert(value)
    assert str(refused.value) == reason


@pytest.mark.parametrize(
    ("annotation", "value"),
    [(str, "s"), (bytes, b"\x00"), (int, 2**64 - 1), (float, 1.5), (float, 1), (bool, True), (list, [1]), (dict, {})],
)
def test_plain_annotations_take_their_type_as_it_is(annotation: Any, value: Any) -> None:
    convert = conversion.converter(annotation)
    assert convert is not None
    assert convert(value) is value  # float takes an int, and leaves it an int


@pytest.mark.parametrize("annotation", [Any, object])
def test_any_and_object_check_nothing(annotation: Any) -> None:
    assert conversion.converter(annotation) is None


# --- every kind of annotation, converted -------------------------------------------------------


WHEN = datetime.datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
IDENTIFIER = uuid.UUID("12345678-1234-5678-1234-567812345678")

CONVERTED = [
    (Order, {"item": "tea", "count": 2, "note": b"\xff"}, Order("tea", 2, b"\xff")),
    (Order, {"item": "tea"}, Order("tea")),
    (Node, {"value": 1, "children": [{"value": 2}]}, Node(1, [Node(2)])),
    (Point, {"x": 1, "y": 2}, {"x": 1, "y": 2}),
    (Pair, ["a", 1], Pair("a", 1)),
    (list[int], [1, 2], [1, 2]),
    (tuple[int, str], [1, "a"], (1, "a")),
    (set[int], [1, 2, 2], {1, 2}),
    (dict[str, Any], {"k": [1, {"deep": None}]}, {"k": [1, {"deep": None}]}),
    (dict[int, str], {1: "a"}, {1: "a"}),
    (Optional[str], None, None),  # noqa: UP045 (the spelling under test)
    (Optional[str], "s", "s"),  # noqa: UP045
    (int | str, "s", "s"),
    (int | None, 3, 3),
    (Literal["a", "b"], "b", "b"),
    (Color, "green", Color.GREEN),
    (Level, 2, Level.HIGH),
    (datetime.datetime, "2025-01-02T03:04:05Z", WHEN),
    (datetime.date, "2025-01-02", datetime.date(2025, 1, 2)),
    (datetime.timedelta, "PT3S", datetime.timedelta(seconds=3)),
    (uuid.UUID, str(IDENTIFIER), IDENTIFIER),
    (decimal.Decimal, "1.10", decimal.Decimal("1.10")),
    (Item, {"name": "cup", "tags": ["blue"]}, Item("cup", ["blue"])),
    (list[Item], [{"name": "cup"}], [Item("cup")]),
    (Annotated[int, msgspec.Meta(ge=0)], 5, 5),
    (bytes | None, b"raw", b"raw"),
]


@pytest.mark.parametrize(("annotation", "value", "expected"), CONVERTED, ids=lambda value: repr(value)[:40])
def test_annotations_convert_what_the_wire_carries(annotation: Any, value: Any, expected: Any) -> None:
    convert = conversion.converter(annotation)
    assert convert is not None
    assert convert(value) == expected
    assert type(convert(value)) is type(expected)


@pytest.mark.parametrize(("annotation", "value", "expected"), CONVERTED, ids=lambda value: repr(value)[:40])
def test_what_is_converted_goes_back_to_builtins_the_envelope_encodes(
    annotation: Any, value: Any, expected: Any
) -> None:
    convert = conversion.converter(annotation)
    assert convert is not None
    wire = msgpack.unpackb(msgpack.packb(conversion.to_builtins(expected)), strict_map_key=False)
    assert convert(wire) == expected


@pytest.mark.parametrize(
    ("annotation", "value", "reason"),
    [
        (Order, {"item": "tea", "count": "2"}, "Expected `int`, got `str` - at `$.count`"),
        (Order, {"count": 2}, "Object missing required field `item`"),
        (Order, {"item": "tea", "note": "aGk="}, "Expected `bytes`, got `str` - at `$.note`"),  # not base64
        (list[bytes] | None, ["aGk="], "Expected `bytes`, got `str` - at `$[0]`"),
        (Order, ["tea"], "Expected `object`, got `array`"),
        (Node, {"value": 1, "children": [{"value": "2"}]}, "Expected `int`, got `str` - at `$.children[0].value`"),
        (list[int], [1, "2"], "Expected `int`, got `str` - at `$[1]`"),
        (list[int], [1, True], "Expected `int`, got `bool` - at `$[1]`"),
        (dict[str, str], {"k": 1}, "Expected `str`, got `int` - at `$[...]`"),
        (Optional[int], "1", "Expected `int | null`, got `str`"),  # noqa: UP045
        (Color, "blue", "Invalid enum value 'blue'"),
        (Literal["a", "b"], "c", "Invalid enum value 'c'"),
        (datetime.datetime, "yesterday", "Invalid RFC3339 encoded datetime"),
        (Annotated[int, msgspec.Meta(ge=0)], -1, "Expected `int` >= 0"),
        (Point, {"x": 1}, "Object missing required field `y`"),
    ],
)
def test_invalid_values_are_refused_with_a_readable_reason(annotation: Any, value: Any, reason: str) -> None:
    convert = conversion.converter(annotation)
    assert convert is not None
    with pytest.raises(conversion.ConversionError) as refused:
        convert(value)
    assert str(refused.value) == reason


def test_to_builtins_turns_what_the_envelope_cannot_encode_into_builtins() -> None:
    value = {
        "order": Order("tea", 2, b"\x00\xff"),
        "color": Color.RED,
        "level": Level.HIGH,
        "at": WHEN,
        "item": Item("cup"),
        "tags": {"only"},
        "id": IDENTIFIER,
    }
    assert conversion.to_builtins(value) == {
        "order": {"item": "tea", "count": 2, "note": b"\x00\xff"},  # bytes stay msgpack's bin
        "color": "red",
        "level": 2,
        "at": "2025-01-02T03:04:05Z",
        "item": {"name": "cup", "tags": []},
        "tags": ["only"],
        "id": str(IDENTIFIER),
    }


def test_what_cannot_be_converted_raises_unencodable_payload_with_the_encoders_words() -> None:
    refused = TypeError("the payload cannot be encoded as msgpack: can not serialize 'Unknown' object")
    with pytest.raises(conversion.UnencodablePayload) as raised:
        conversion.encode_as_builtins(msgpack.packb, Unknown(), refused)
    assert str(raised.value) == str(refused) and raised.value.__cause__ is refused
    assert isinstance(raised.value, TypeError)


def test_encoding_converts_only_what_the_envelope_refuses() -> None:
    plain = {"item": "tea", "count": 2}
    assert invocation_envelope(1, None, 0, None, Order("tea", 2)) == invocation_envelope(
        1, None, 0, None, {"item": "tea", "count": 2, "note": b""}
    )
    assert invocation_envelope(1, None, 0, None, plain) == encode_invocation(1, None, 0, None, plain)
    assert msgpack.unpackb(encode_payload(Color.GREEN, False)) == "green"
    with pytest.raises(TypeError, match="cannot be encoded"):
        invocation_envelope(1, None, 0, None, Unknown())


@pytest.mark.parametrize(
    ("annotation", "shown"),
    [(Order, "Order"), (list[Order], "list[Order]"), (Optional[int], "int | None"), (None, "None")],  # noqa: UP045
)
def test_type_names_read_as_written(annotation: Any, shown: str) -> None:
    assert conversion.type_name(annotation) == shown


# --- procedures: what registration makes of the annotations --------------------------------------


def test_a_procedure_exposes_its_payload_and_result_types() -> None:
    service = new_service()

    @service.procedure(raises=(OutOfStock, Denied))
    async def buy(order: Order, **kwargs: Any) -> Receipt:
        """Buy an order."""
        return Receipt(order.count, WHEN)

    @service.procedure
    def plain(payload, **kwargs):  # type: ignore[no-untyped-def]
        return payload

    @service.procedure
    def nothing(payload: Any) -> None:
        return None

    assert (buy.payload_type, buy.result_type, buy.raises) == (Order, Receipt, (OutOfStock, Denied))
    assert buy.__doc__ == "Buy an order."
    assert (plain.payload_type, plain.result_type, plain.raises) == (Any, Any, ())
    assert (nothing.payload_type, nothing.result_type) == (Any, None)


def test_a_procedure_in_a_function_resolves_the_local_types_it_uses() -> None:
    @dataclasses.dataclass
    class Local:
        value: int

    service = new_service()

    @service.procedure
    def double(payload: Local) -> Local:
        return Local(payload.value * 2)

    assert double.payload_type is Local
    assert double.receive({"value": 2}) == Local(2)


def test_the_payload_is_checked_and_converted_by_receive() -> None:
    service = new_service()

    @service.procedure
    async def buy(order: Order) -> None: ...

    @service.procedure
    async def greet(payload: str) -> None: ...

    assert buy.receive({"item": "tea"}) == Order("tea")
    with pytest.raises(almanet.InvalidPayload) as refused:
        buy.receive({"item": "tea", "count": "2"})
    assert refused.value.args == ("typed.buy does not take this payload: Expected `int`, got `str` - at `$.count`",)
    assert greet.takes("hello") and not greet.takes(42)
    with pytest.raises(almanet.InvalidPayload, match=r"Expected `str`, got `int`"):
        greet.receive(42)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("def f(payload: Unknown) -> None: ...", r"typed\.f: its payload annotation cannot be honoured: Unknown"),
        ("def f(payload: list[Unknown]) -> None: ...", r"typed\.f: its payload annotation .*list\[Unknown\]"),
        ("def f(payload: Order | Point) -> None: ...", r"typed\.f: its payload annotation .*Order \| Point"),
        ("def f(payload: str) -> Unknown: ...", r"typed\.f: its return annotation cannot be honoured: Unknown"),
        ("def f(payload: Missing) -> None: ...", r"typed\.f: the annotation of 'payload', 'Missing', does not resolve"),
        ("def f(payload: list[Missing]) -> None: ...", r"typed\.f: .*'list\[Missing\]', does not resolve"),
        ("def f(payload: str) -> Missing: ...", r"typed\.f: the return annotation, 'Missing', does not resolve"),
    ],
)
def test_what_cannot_be_honoured_is_refused_at_registration(source: str, message: str) -> None:
    namespace: dict[str, Any] = dict(globals())
    exec(compile("from __future__ import annotations\n" + source, "<procedure>", "exec"), namespace)
    service = new_service()
    with pytest.raises(TypeError, match=message):
        service.procedure(namespace["f"])
    assert service.procedures == []


def test_context_parameters_may_name_types_only_the_type_checker_sees() -> None:
    namespace: dict[str, Any] = dict(globals())
    source = "def f(payload: str, session: OnlyForTypeCheckers, **kwargs: Any) -> str: ..."
    exec(compile("from __future__ import annotations\n" + source, "<procedure>", "exec"), namespace)
    assert new_service().procedure(namespace["f"]).payload_type is str


@pytest.mark.parametrize("raises", [(ValueError,), (Denied, "Denied"), [Denied()]])
def test_raises_takes_rpc_error_subclasses_only(raises: Any) -> None:
    with pytest.raises(TypeError, match="raises takes rpc_error subclasses"):
        new_service().procedure(raises=raises)


# --- typed rpc_error payloads -----------------------------------------------------------------


def test_an_error_payload_goes_as_builtins_and_comes_back_as_its_type() -> None:
    sent = OutOfStock("tea", payload=Restock("monday")).to_reply_payload()
    assert sent == ["tests.typed.OutOfStock", ["tea"], {"day": "monday"}]
    received = rpc_error.from_reply_payload(msgpack.unpackb(msgpack.packb(sent)))
    assert type(received) is OutOfStock
    assert received.payload == Restock("monday")


def test_an_error_without_payload_keeps_none() -> None:
    received = rpc_error.from_reply_payload(OutOfStock("tea").to_reply_payload())
    assert type(received) is OutOfStock and received.payload is None


def test_an_error_payload_that_is_not_its_type_is_an_invalid_reply() -> None:
    received = rpc_error.from_reply_payload(["tests.typed.OutOfStock", ["tea"], {"day": 1}])
    assert type(received) is almanet.InvalidReply
    assert received.args == (
        "the payload of tests.typed.OutOfStock is not a Restock: Expected `str`, got `int` - at `$.day`",
    )
    assert received.payload == {"day": 1}


def test_an_error_payload_type_that_cannot_be_honoured_is_refused_with_the_class() -> None:
    with pytest.raises(TypeError, match=r"Broken\.payload_type cannot be honoured: Unknown"):

        class Broken(rpc_error):
            name = "tests.typed.Broken"
            payload_type = Unknown


# --- Reply[T] --------------------------------------------------------------------------------


def test_reply_takes_a_type_argument_in_both_twins(envelope: ModuleType) -> None:
    alias = envelope.Reply[Order]
    assert alias(1, True, Order("tea")) == envelope.Reply(1, True, Order("tea"))
    assert almanet.Reply[int] is not None


# --- pydantic, when installed ------------------------------------------------------------------


def test_pydantic_models_are_validated_by_pydantic() -> None:
    pydantic = pytest.importorskip("pydantic")

    class Customer(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        name: str
        since: datetime.datetime | None = None
        avatar: bytes = b""

    convert = conversion.converter(Customer)
    assert convert is not None
    customer = convert({"name": "Aidar", "since": "2025-01-02T03:04:05Z", "avatar": b"\x89PNG"})
    assert customer == Customer(name="Aidar", since=WHEN, avatar=b"\x89PNG")
    listed = conversion.converter(list[Customer])
    assert listed is not None
    with pytest.raises(conversion.ConversionError) as refused:
        listed([{"name": "a"}, {"since": "x"}])
    # pydantic's own words, located as msgspec locates its errors:
    assert re.fullmatch(
        r"Field required - at `\$\[1\]\.name`; Input should be a valid datetime.* - at `\$\[1\]\.since`",
        str(refused.value),
    )
    wire = conversion.to_builtins(customer)
    assert wire == {"name": "Aidar", "since": "2025-01-02T03:04:05Z", "avatar": b"\x89PNG"}
    assert convert(wire) == customer


# --- end to end --------------------------------------------------------------------------------


def shop(address: str, prefix: str) -> tuple[almanet.Service, Any, Any]:
    service = almanet.new_service(address, prefix=prefix)

    @service.procedure(raises=(OutOfStock,))
    async def buy(order: Order, **kwargs: Any) -> Receipt:
        if order.item == "tea":
            raise OutOfStock("tea", payload=Restock("monday"))
        return Receipt(order.count * 3, WHEN)

    @service.procedure
    def colors(payload: list[Color]) -> set[Color]:  # sync: runs in the thread pool
        return set(payload)

    return service, buy, colors


async def test_a_dataclass_goes_in_and_comes_back(
    almanet_broker: BrokerAddresses, session: almanet.Session, prefix: str
) -> None:
    service, buy, colors = shop(almanet_broker.tcp_address, prefix)
    async with service:
        reply = await session.call(buy, Order("milk", 2), timeout=TIMEOUT)
        assert reply.payload == Receipt(6, WHEN)
        by_uri = await session.call(f"{prefix}.buy", {"item": "milk", "count": 2}, timeout=TIMEOUT)
        assert by_uri.payload == {"total": 6, "at": "2025-01-02T03:04:05Z"}
        typed = await session.call(f"{prefix}.buy", {"item": "milk"}, timeout=TIMEOUT, result_type=Receipt)
        assert typed.payload == Receipt(3, WHEN)
        assert (await session.call(colors, [Color.RED, Color.RED], timeout=TIMEOUT)).payload == {Color.RED}


async def test_an_invalid_payload_is_answered_with_its_reason(
    almanet_broker: BrokerAddresses, session: almanet.Session, prefix: str
) -> None:
    service, buy, colors = shop(almanet_broker.tcp_address, prefix)
    async with service:
        with pytest.raises(almanet.InvalidPayload) as refused:
            await session.call(buy, {"item": "milk", "count": "2"}, timeout=TIMEOUT)
        assert str(refused.value) == (
            f"InvalidPayload: {prefix}.buy does not take this payload: Expected `int`, got `str` - at `$.count`"
        )
        with pytest.raises(almanet.InvalidPayload, match=re.escape("Invalid enum value 'blue' - at `$[0]`")):
            await session.call(colors, ["blue"], timeout=TIMEOUT)
        assert (await session.call(buy, Order("milk"), timeout=TIMEOUT)).payload == Receipt(3, WHEN)


async def test_a_typed_error_payload_reaches_the_caller_as_its_type(
    almanet_broker: BrokerAddresses, session: almanet.Session, prefix: str
) -> None:
    service, buy, _ = shop(almanet_broker.tcp_address, prefix)
    async with service:
        with pytest.raises(OutOfStock) as raised:
            await session.call(buy, Order("tea"), timeout=TIMEOUT)
    assert raised.value.args == ("tea",)
    assert raised.value.payload == Restock("monday")


async def test_a_result_that_is_not_the_type_asked_for_is_an_invalid_reply(
    almanet_broker: BrokerAddresses, session: almanet.Session, prefix: str
) -> None:
    service, buy, _ = shop(almanet_broker.tcp_address, prefix)
    async with service:
        with pytest.raises(almanet.InvalidReply) as invalid:
            await session.call(buy, Order("milk"), timeout=TIMEOUT, result_type=list[int])
    assert invalid.value.args == (f"the result of {prefix}.buy is not a list[int]: Expected `array`, got `object`",)
    assert invalid.value.payload == {"total": 3, "at": "2025-01-02T03:04:05Z"}


async def test_undeclared_values_the_envelope_cannot_encode_go_as_builtins(
    almanet_broker: BrokerAddresses, session: almanet.Session, prefix: str, topic: str
) -> None:
    service = almanet.new_service(almanet_broker.tcp_address, prefix=prefix)

    @service.procedure
    async def echo(payload: Any) -> Any:
        return payload

    @service.procedure
    async def fails(payload: Any) -> Any:
        raise Denied("no", payload=Item("cup"))

    async with service:
        sent = [Order("tea"), Color.GREEN, WHEN, Item("cup", ["blue"])]
        reply = await session.call(echo, sent, timeout=TIMEOUT)
        assert reply.payload == [
            {"item": "tea", "count": 1, "note": b""},
            "green",
            "2025-01-02T03:04:05Z",
            {"name": "cup", "tags": ["blue"]},
        ]
        with pytest.raises(Denied) as raised:
            await session.call(fails, None, timeout=TIMEOUT)
        assert raised.value.payload == {"name": "cup", "tags": []}
    await session.produce(topic, Order("jam", 3))
    async with session.consume(topic, "ch") as messages:
        async for message in messages:
            message.commit()
            assert message.payload == {"item": "jam", "count": 3, "note": b""}
            break


async def test_pydantic_models_go_in_and_come_back(
    almanet_broker: BrokerAddresses, session: almanet.Session, prefix: str
) -> None:
    pydantic = pytest.importorskip("pydantic")

    class Customer(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        name: str
        since: datetime.datetime

    service = almanet.new_service(almanet_broker.tcp_address, prefix=prefix)

    @service.procedure
    async def welcome(customer: Customer) -> Customer:
        return Customer(name=customer.name.upper(), since=customer.since)

    async with service:
        reply = await session.call(welcome, Customer(name="aidar", since=WHEN), timeout=TIMEOUT)
        assert reply.payload == Customer(name="AIDAR", since=WHEN)
        with pytest.raises(almanet.InvalidPayload, match=re.escape("Field required - at `$.since`")):
            await session.call(welcome, {"name": "aidar"}, timeout=TIMEOUT)


# --- README ----------------------------------------------------------------------------------


def test_readme_example_runs_and_prints_what_it_says() -> None:
    text = README.read_text()
    section = text.split("\n## Typed procedures\n", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(compile(block, str(README), "exec", dont_inherit=True), {"__name__": "readme_typed"})
    assert output.getvalue().splitlines() == re.findall(r"#\s*(.+)$", block, re.MULTILINE)
