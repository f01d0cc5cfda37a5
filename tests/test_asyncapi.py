"""``almanet.describe`` and ``almanet describe``: a service's AsyncAPI 3.0 document.

The document is validated against the official AsyncAPI 3.0.0 JSON Schema,
vendored in tests/data (tests/data/README.md), offline: every ``$ref`` of it
resolves within the bundle or jsonschema's own metaschemas.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
from pathlib import Path
from typing import Any, Optional, TypedDict

import jsonschema
import pytest
import referencing
from referencing.jsonschema import DRAFT7

import almanet
from almanet.cli import main

ASYNCAPI_SCHEMA = Path(__file__).parent / "data" / "asyncapi-3.0.0.json"


class Color(enum.Enum):
    """The colour of an item."""

    RED = "red"
    GREEN = "green"


@dataclasses.dataclass
class Order:
    """An order of one item."""

    item: str
    count: int
    color: Color = Color.RED
    note: Optional[str] = None  # noqa: UP045 (Optional, as users write it)


class Receipt(TypedDict):
    order_id: int
    lines: list[int]


@dataclasses.dataclass
class Shortage:
    item: str
    missing: int


class OutOfStock(almanet.rpc_error):
    """The shop has fewer of the item than ordered.

    Its payload says how many are missing.
    """

    name = "test_describe.OutOfStock"
    payload_type = Shortage


service = almanet.new_service("127.0.0.1:4150", "http://127.0.0.1:4161", prefix="describe.shop")


@service.procedure(raises=(OutOfStock,))
async def buy(payload: Order, **kwargs: Any) -> Receipt:
    """Buy an item.

    Raises OutOfStock when there are not enough.
    """
    return {"order_id": 1, "lines": [payload.count]}


@service.procedure(name="buy", channel="audit")
async def audit(payload: Optional[str], **kwargs: Any) -> None:  # noqa: UP045
    pass


@service.procedure
def total(payload: list[int], **kwargs: Any) -> int:
    return sum(payload)


@service.procedure
async def pair(payload: tuple[str, int], **kwargs: Any) -> dict[str, int]:
    return {payload[0]: payload[1]}


@service.procedure
async def anything(payload, **kwargs):  # type: ignore[no-untyped-def]
    return payload


# --- validating against the AsyncAPI 3.0.0 schema -------------------------------------------


@pytest.fixture(scope="module")
def asyncapi() -> jsonschema.Draft7Validator:
    """The AsyncAPI 3.0.0 schema's validator: every ``$ref`` resolves in the bundle (its definitions each have
    their ``$id``) or in jsonschema's metaschemas (draft-07's); a Registry retrieves nothing, so no network."""
    schema = json.loads(ASYNCAPI_SCHEMA.read_text())
    registry = referencing.Registry().with_resource(schema["$id"], DRAFT7.create_resource(schema)).crawl()
    return jsonschema.Draft7Validator(schema, registry=registry)


def problems(validator: jsonschema.Draft7Validator, document: dict[str, Any]) -> list[str]:
    """What is wrong with ``document``: each error, and those under it (a oneOf says which branch failed how)."""
    found: list[str] = []
    stack = list(validator.iter_errors(document))
    while stack:
        error = stack.pop()
        found.append(f"{list(error.absolute_path)}: {error.message[:300]}")
        stack.extend(error.context or ())
    return found


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return almanet.describe(service)


def test_the_document_is_valid_asyncapi_3(asyncapi: jsonschema.Draft7Validator, document: dict[str, Any]) -> None:
    assert document["asyncapi"] == "3.0.0"
    assert problems(asyncapi, document) == []
    json.dumps(document)  # JSON's types only


def test_the_validator_refuses_what_is_not_asyncapi_3(
    asyncapi: jsonschema.Draft7Validator, document: dict[str, Any]
) -> None:
    broken = json.loads(json.dumps(document))
    broken["operations"]["describe.shop.total"]["action"] = "publish"  # AsyncAPI 2's word
    del broken["info"]["version"]
    broken["channels"]["describe.shop.total"]["messages"]["invocation"]["payload"]["type"] = "integer number"
    found = problems(asyncapi, broken)
    assert any("'publish' is not one of" in problem for problem in found)
    assert any("'version' is a required property" in problem for problem in found)
    assert any("payload" in problem for problem in found)


def test_a_pydantic_model_is_described_by_pydantic(asyncapi: jsonschema.Draft7Validator) -> None:
    pydantic = pytest.importorskip("pydantic")

    class Parcel(pydantic.BaseModel):  # type: ignore[misc, name-defined]
        """A parcel."""

        weight: float
        order: Order

    shipping = almanet.new_service("127.0.0.1:4150", prefix="describe.shipping")

    async def ship(payload: Any, **kwargs: Any) -> Any:
        return payload.order

    ship.__annotations__ = {"payload": Parcel, "return": Order}  # a local class: not a string to resolve
    shipping.procedure(ship)
    described = almanet.describe(shipping)
    assert problems(asyncapi, described) == []
    components = described["components"]["schemas"]
    invocation = described["channels"]["describe.shipping.ship"]["messages"]["invocation"]
    parcel = components[invocation["payload"]["$ref"].rsplit("/", 1)[1]]
    assert parcel["title"] == "Parcel"
    assert set(parcel["required"]) == {"weight", "order"}
    order = components[parcel["properties"]["order"]["$ref"].rsplit("/", 1)[1]]  # its own, or msgspec's renamed
    assert set(order["properties"]) == {"item", "count", "color", "note"}


# --- what the document says ----------------------------------------------------------------


def schema_of(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """``schema``, or the component it refers to."""
    ref = schema.get("$ref")
    if ref is None:
        return schema
    assert ref.startswith("#/components/schemas/")
    return document["components"]["schemas"][ref.removeprefix("#/components/schemas/")]  # type: ignore[no-any-return]


def resolve(document: dict[str, Any], ref: str) -> Any:
    node: Any = document
    for token in ref.removeprefix("#/").split("/"):
        node = node[token.replace("~1", "/").replace("~0", "~")]
    return node


def test_info_and_servers(document: dict[str, Any]) -> None:
    assert document["info"]["title"] == "describe.shop"
    assert document["info"]["version"] == almanet.__version__
    assert document["defaultContentType"] == "application/msgpack"
    assert document["servers"]["nsqd"] == {
        "host": "127.0.0.1:4150",
        "protocol": "nsq",
        "protocolVersion": "V2",
        "description": document["servers"]["nsqd"]["description"],
    }
    assert document["servers"]["nsqlookupd"]["host"] == "127.0.0.1:4161"
    assert document["channels"]["describe.shop.total"]["servers"] == [{"$ref": "#/servers/nsqd"}]
    given = almanet.describe(service, title="Shop", version="2.1.0")
    assert (given["info"]["title"], given["info"]["version"]) == ("Shop", "2.1.0")


def test_each_procedure_is_an_operation_the_service_receives(document: dict[str, Any]) -> None:
    assert list(document["operations"]) == [
        "describe.shop.buy.rpc",  # a URI served on two NSQ channels: one AsyncAPI channel each
        "describe.shop.buy.audit",
        "describe.shop.total",
        "describe.shop.pair",
        "describe.shop.anything",
    ]
    for key, operation in document["operations"].items():
        assert operation["action"] == "receive"
        channel = resolve(document, operation["channel"]["$ref"])
        assert channel["address"] == operation["title"]
        assert [resolve(document, message["$ref"]) for message in operation["messages"]] == [
            channel["messages"]["invocation"]
        ]
        reply = resolve(document, operation["reply"]["channel"]["$ref"])
        assert reply["address"] == "_almanet.reply.{sessionId}#ephemeral"
        assert "sessionId" in reply["parameters"]
        assert [message["$ref"].rsplit("/", 1)[1] for message in operation["reply"]["messages"]] == list(
            reply["messages"]
        )
        assert key == operation["channel"]["$ref"].removeprefix("#/channels/")
    buy, audit = document["operations"]["describe.shop.buy.rpc"], document["operations"]["describe.shop.buy.audit"]
    assert (buy["x-nsq-channel"], audit["x-nsq-channel"]) == ("rpc", "audit")
    assert buy["title"] == audit["title"] == "describe.shop.buy"


def test_docstrings_are_summaries_and_descriptions(document: dict[str, Any]) -> None:
    buy = document["operations"]["describe.shop.buy.rpc"]
    assert buy["summary"] == "Buy an item."
    assert buy["description"] == "Buy an item.\n\nRaises OutOfStock when there are not enough."
    assert "summary" not in document["operations"]["describe.shop.total"]
    error = document["channels"]["describe.shop.buy.rpc.reply"]["messages"]["test_describe.OutOfStock"]
    assert error["summary"] == "The shop has fewer of the item than ordered."
    assert error["description"].startswith("The shop has fewer of the item than ordered.\n\nIts payload says")


def test_payload_and_result_schemas(document: dict[str, Any]) -> None:
    channels = document["channels"]
    invocation = channels["describe.shop.buy.rpc"]["messages"]["invocation"]
    assert invocation["contentType"] == "application/msgpack"
    order = schema_of(document, invocation["payload"])
    assert order["type"] == "object"
    assert set(order["properties"]) == {"item", "count", "color", "note"}
    assert set(order["required"]) == {"item", "count"}
    assert order["properties"]["item"] == {"type": "string"}
    color = schema_of(document, order["properties"]["color"])
    assert sorted(color["enum"]) == ["green", "red"]
    assert {"type": "null"} in order["properties"]["note"]["anyOf"]

    receipt = schema_of(document, channels["describe.shop.buy.rpc.reply"]["messages"]["result"]["payload"])
    assert set(receipt["required"]) == {"order_id", "lines"}
    assert receipt["properties"]["lines"] == {"type": "array", "items": {"type": "integer"}}

    audit = channels["describe.shop.buy.audit"]["messages"]["invocation"]["payload"]
    assert audit == {"anyOf": [{"type": "string"}, {"type": "null"}]}
    assert channels["describe.shop.buy.audit.reply"]["messages"]["result"]["payload"] == {"type": "null"}
    assert channels["describe.shop.total"]["messages"]["invocation"]["payload"] == {
        "type": "array",
        "items": {"type": "integer"},
    }
    assert channels["describe.shop.total.reply"]["messages"]["result"]["payload"] == {"type": "integer"}
    # A tuple in draft-07's words, as AsyncAPI's Schema Object has them.
    pair = channels["describe.shop.pair"]["messages"]["invocation"]["payload"]
    assert pair["items"] == [{"type": "string"}, {"type": "integer"}]
    assert pair["additionalItems"] is False
    assert "prefixItems" not in pair


def test_an_untyped_procedure_has_empty_schemas(document: dict[str, Any]) -> None:
    assert document["channels"]["describe.shop.anything"]["messages"]["invocation"]["payload"] == {}
    assert document["channels"]["describe.shop.anything.reply"]["messages"]["result"]["payload"] == {}


def test_the_errors_a_procedure_may_raise(document: dict[str, Any]) -> None:
    replies = document["channels"]["describe.shop.buy.rpc.reply"]["messages"]
    assert list(replies) == ["result", "test_describe.OutOfStock", "InternalError", "InvalidPayload", "InvalidEnvelope"]
    error = replies["test_describe.OutOfStock"]["payload"]  # [name, args, payload]
    assert error["type"] == "array"
    assert (error["minItems"], error["maxItems"], error["additionalItems"]) == (3, 3, False)
    name, args, payload = error["items"]
    assert name["const"] == "test_describe.OutOfStock"
    assert args["type"] == "array"
    shortage, nil = payload["anyOf"]
    assert nil == {"type": "null"}
    assert set(schema_of(document, shortage)["required"]) == {"item", "missing"}
    # almanet's own errors, which any procedure may answer with, are shared.
    internal = resolve(document, replies["InternalError"]["$ref"])
    assert internal["name"] == "InternalError"
    assert internal["payload"]["items"][0] == {"const": "InternalError", "description": "The error's name."}
    assert internal["payload"]["items"][2] == {"description": "The error's payload: nil when none."}
    assert "test_describe.OutOfStock" not in document["channels"]["describe.shop.total.reply"]["messages"]


def test_the_readme_example_prints_what_it_says(capsys: pytest.CaptureFixture[str]) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("\n## Describing the API\n", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    exec(compile(block, "README.md", "exec", dont_inherit=True), {"__name__": "readme_describe"})
    assert capsys.readouterr().out.splitlines() == re.findall(r"^#\s*(.+)$", block, re.MULTILINE)


# --- the command ---------------------------------------------------------------------------


def test_almanet_describe_prints_the_same_document(
    capsys: pytest.CaptureFixture[str], document: dict[str, Any], tmp_path: Path
) -> None:
    main(["describe", f"{__name__}:service"])
    assert json.loads(capsys.readouterr().out) == document
    written = tmp_path / "api.json"
    main(["describe", f"{__name__}:service", "--title", "Shop", "--api-version", "2.0.0", "--output", str(written)])
    assert capsys.readouterr().out == ""
    described = json.loads(written.read_text())
    assert (described["info"]["title"], described["info"]["version"]) == ("Shop", "2.0.0")
    assert described["operations"] == document["operations"]
