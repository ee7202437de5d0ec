"""Codecs: round trips for every kind of type, content-type dispatch, and errors that
never quote the payload."""

from __future__ import annotations

import dataclasses
import enum
import re
import subprocess
import sys
import textwrap
from typing import Any, Literal, TypedDict

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from natskit.codec import (
    BINARY,
    CONTENT_TYPE,
    JSON,
    MSGPACK,
    PROTOBUF,
    TEXT,
    decoder_for,
    encode,
    type_name,
)
from natskit.errors import CodecError, DecodeError

SECRET = "hunter2-SECRET-MARKER"


class Kind(enum.Enum):
    BUY = "buy"
    SELL = "sell"


class Order(msgspec.Struct):
    id: str
    qty: int
    tags: list[str] = []


class Strict(msgspec.Struct, forbid_unknown_fields=True):
    kind: Kind
    side: Literal["l", "r"] = "l"


class Created(msgspec.Struct, tag="created"):
    id: str


class Deleted(msgspec.Struct, tag="deleted"):
    id: str


@dataclasses.dataclass
class Point:
    x: int
    y: int


class Totals(TypedDict):
    count: int
    sum: float


def roundtrip(value: Any, tp: Any, content_type: str | None = None) -> Any:
    data, sent_as = encode(value, content_type)
    assert isinstance(data, bytes)
    return decoder_for(tp)(data, sent_as)


def assert_no_secret(err: BaseException) -> None:
    assert SECRET not in str(err)
    assert SECRET not in repr(err)
    assert err.__cause__ is None
    assert err.__suppress_context__


# -- round trips ---------------------------------------------------------------------


def test_constants_are_the_wire_names() -> None:
    assert CONTENT_TYPE == "Content-Type"
    assert JSON == "application/json"
    assert MSGPACK == "application/msgpack"
    assert PROTOBUF == "application/protobuf"
    assert TEXT == "text/plain; charset=utf-8"
    assert BINARY == "application/octet-stream"


def test_struct_encodes_as_headerless_json() -> None:
    order = Order("o1", 3, ["x"])
    assert encode(order) == (b'{"id":"o1","qty":3,"tags":["x"]}', None)
    assert roundtrip(order, Order) == order


def test_struct_round_trips_through_msgpack() -> None:
    order = Order("o1", 3, ["x"])
    data, content_type = encode(order, MSGPACK)
    assert content_type == MSGPACK
    assert msgspec.msgpack.decode(data) == {"id": "o1", "qty": 3, "tags": ["x"]}
    assert decoder_for(Order)(data, content_type) == order


def test_explicit_json_is_labelled() -> None:
    assert encode(Order("o1", 1), JSON)[1] == JSON
    assert roundtrip(Order("o1", 1), Order, JSON) == Order("o1", 1)


@pytest.mark.parametrize(
    ("value", "tp"),
    [
        (Point(1, 2), Point),
        ({"a": 1, "b": 2}, dict[str, int]),
        ({"a": [1, "x"]}, dict),
        ([Order("a", 1), Order("b", 2)], list[Order]),
        (Totals(count=2, sum=1.5), Totals),
        (42, int),
        (None, Order | None),
        (Created("c1"), Created | Deleted),
    ],
)
@pytest.mark.parametrize("content_type", [None, MSGPACK])
def test_msgspec_types_round_trip(
    value: Any, tp: Any, content_type: str | None
) -> None:
    assert roundtrip(value, tp, content_type) == value


def test_content_type_parameters_and_case_are_ignored() -> None:
    decode = decoder_for(Order)
    data = b'{"id":"o1","qty":1}'
    assert decode(data, "Application/JSON; charset=utf-8") == Order("o1", 1)
    packed = msgspec.msgpack.encode(Order("o1", 1))
    assert decode(packed, "application/x-msgpack") == Order("o1", 1)


def test_str_round_trips_as_text() -> None:
    assert encode("héllo") == ("héllo".encode(), TEXT)
    assert roundtrip("héllo", str) == "héllo"
    # No header: a plain string, as `nats pub subject hello` sends it.
    assert decoder_for(str)(b"hello", None) == "hello"
    assert decoder_for(str)(b"hello", "text/plain") == "hello"


@pytest.mark.parametrize("content_type", [JSON, MSGPACK])
def test_str_with_structured_content_type_is_a_string_value(content_type: str) -> None:
    data, sent_as = encode("héllo", content_type)
    assert sent_as == content_type
    assert data != "héllo".encode()
    assert decoder_for(str)(data, sent_as) == "héllo"


def test_str_rejects_invalid_utf8_without_quoting_it() -> None:
    payload = SECRET.encode() + b"\xff\xfe"
    with pytest.raises(DecodeError) as info:
        decoder_for(str)(payload, None)
    err = info.value
    assert err.expected == "str"
    assert err.reason.startswith(f"invalid UTF-8 at byte {len(SECRET)}")
    assert_no_secret(err)


@pytest.mark.parametrize(
    "content_type", [None, JSON, MSGPACK, BINARY, "x-custom/thing"]
)
def test_bytes_decoder_hands_over_the_payload(content_type: str | None) -> None:
    payload = b"\x00\xffraw"
    assert decoder_for(bytes)(payload, content_type) is payload


def test_bytes_like_values_are_sent_as_they_are() -> None:
    assert encode(b"\x00raw") == (b"\x00raw", BINARY)
    assert encode(bytearray(b"ab")) == (b"ab", BINARY)
    assert encode(memoryview(b"ab")) == (b"ab", BINARY)
    # Already encoded payloads keep the label they are given.
    assert encode(b'{"a":1}', JSON) == (b'{"a":1}', JSON)


def test_any_decodes_by_content_type() -> None:
    decode = decoder_for(Any)
    assert decode(b'{"a":[1,2]}', None) == {"a": [1, 2]}
    assert decode(b'{"a":1}', JSON) == {"a": 1}
    assert decode(msgspec.msgpack.encode({"a": 1}), MSGPACK) == {"a": 1}
    assert decode(b"hi", TEXT) == "hi"
    assert decode(b"\x01\x02", BINARY) == b"\x01\x02"
    assert decode(b"\x01\x02", PROTOBUF) == b"\x01\x02"
    assert decode(b"\x01\x02", "x-custom/thing") == b"\x01\x02"


def test_any_without_header_falls_back_to_bytes() -> None:
    decode = decoder_for(object)
    assert decode(b"not json", None) == b"not json"
    assert decode(b"42", None) == 42


def test_any_with_json_header_rejects_bad_json() -> None:
    with pytest.raises(DecodeError, match="JSON is malformed"):
        decoder_for(Any)(SECRET.encode(), JSON)


# -- decode errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tp", "payload", "reason"),
    [
        (
            Order,
            f'{{"id": "x", "qty": "{SECRET}"}}',
            "Expected `int`, got `str` - at `$.qty`",
        ),
        (Order, f'{{"id": 1, "qty": 1, "x": "{SECRET}"}}', "Expected `str`, got `int`"),
        (Order, f"not json {SECRET}", "JSON is malformed"),
        (Strict, f'{{"kind": "{SECRET}"}}', "Invalid enum value - at `$.kind`"),
        (
            Strict,
            f'{{"kind": "buy", "side": "{SECRET}"}}',
            "Invalid enum value - at `$.side`",
        ),
        (Strict, f'{{"kind": "buy", "{SECRET}": 1}}', "Object contains unknown field"),
        (Created | Deleted, f'{{"type": "{SECRET}"}}', "Invalid value - at `$.type`"),
        (
            Strict,
            f'{{"kind": "{SECRET} - at `$.kind` {SECRET}"}}',
            "Invalid enum value - at `$.kind`",
        ),
    ],
)
def test_bad_payload_raises_decode_error_without_payload(
    tp: Any, payload: str, reason: str
) -> None:
    with pytest.raises(DecodeError) as info:
        decoder_for(tp)(payload.encode(), None)
    err = info.value
    assert reason in err.reason
    assert err.expected == type_name(tp)
    assert f"did not decode into {type_name(tp)}" in str(err)
    assert_no_secret(err)


def test_bad_msgpack_raises_decode_error() -> None:
    with pytest.raises(DecodeError, match="MessagePack data is malformed") as info:
        decoder_for(Order)(b"\xc1" + SECRET.encode(), MSGPACK)
    assert_no_secret(info.value)


def test_decode_error_takes_a_subject() -> None:
    with pytest.raises(DecodeError) as info:
        decoder_for(int)(b'"x"', None)
    placed = info.value.with_subject("orders.eu")
    assert str(placed) == (
        "payload on 'orders.eu' did not decode into int: Expected `int`, got `str`"
    )


def test_unknown_content_type_is_named() -> None:
    with pytest.raises(DecodeError) as info:
        decoder_for(Order)(b"{}", "application/x-yaml")
    assert info.value.reason == "unknown content type 'application/x-yaml'"
    assert info.value.expected == "Order"


@pytest.mark.parametrize("content_type", [TEXT, BINARY, PROTOBUF])
def test_content_type_that_does_not_fit_the_type(content_type: str) -> None:
    with pytest.raises(DecodeError, match="cannot be decoded into this type"):
        decoder_for(Order)(b"{}", content_type)


# -- unsupported types ---------------------------------------------------------------


class Plain:
    pass


def handler() -> None:
    pass


@pytest.mark.parametrize(
    ("tp", "named"),
    [
        (handler, "handler"),
        (Plain, "Plain"),
        (list[Plain], "list[Plain]"),
        (dict[str, Plain], "dict[str, Plain]"),
        (3, "3"),
    ],
)
def test_unsupported_annotation_raises_type_error(tp: Any, named: str) -> None:
    with pytest.raises(
        TypeError, match=re.escape(f"cannot decode payloads into {named}")
    ):
        decoder_for(tp)


def test_self_referencing_struct_is_supported() -> None:
    assert roundtrip(Tree("a", [Tree("b")]), Tree) == Tree("a", [Tree("b")])


class Tree(msgspec.Struct):
    name: str
    children: list[Tree] = []


# -- encode errors -------------------------------------------------------------------


class Unencodable:
    def __repr__(self) -> str:
        return SECRET


def test_unencodable_value_names_its_type_not_its_value() -> None:
    with pytest.raises(CodecError) as info:
        encode(Unencodable())
    assert "Unencodable" in str(info.value)
    assert SECRET not in str(info.value)
    with pytest.raises(CodecError, match="Unencodable"):
        encode({"nested": Unencodable()}, MSGPACK)


def test_encode_rejects_unknown_content_type() -> None:
    with pytest.raises(ValueError, match="unknown content type 'application/x-yaml'"):
        encode({"a": 1}, "application/x-yaml")


def test_encode_refuses_content_type_that_does_not_fit() -> None:
    with pytest.raises(CodecError, match="Order"):
        encode(Order("o", 1), TEXT)
    with pytest.raises(CodecError, match="Order"):
        encode(Order("o", 1), PROTOBUF)


# -- type names ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tp", "name"),
    [
        (Order, "Order"),
        (int, "int"),
        (Any, "Any"),
        (None, "None"),
        (dict[str, list[Order]], "dict[str, list[Order]]"),
        (Order | None, "Order | None"),
        (tuple[int, ...], "tuple[int, ...]"),
        (Literal["a", 1], "Literal['a', 1]"),
    ],
)
def test_type_name(tp: Any, name: str) -> None:
    assert type_name(tp) == name


# -- properties ----------------------------------------------------------------------

orders = st.builds(
    Order,
    id=st.text(),
    qty=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    tags=st.lists(st.text()),
)


@given(orders, st.sampled_from([None, JSON, MSGPACK]))
def test_struct_round_trip_property(order: Order, content_type: str | None) -> None:
    assert roundtrip(order, Order, content_type) == order


# -- pydantic ------------------------------------------------------------------------


def test_pydantic_round_trips_and_errors_omit_input() -> None:
    pydantic = pytest.importorskip(
        "pydantic", reason="pydantic is optional and not installed here"
    )

    class Item(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        name: str
        qty: int
        kind: Literal["a", "b"] = "a"

    item = Item(name="n", qty=2, kind="b")
    data, content_type = encode(item)
    assert content_type is None
    assert decoder_for(Item)(data, content_type) == item
    assert roundtrip(item, Item, MSGPACK) == item
    assert roundtrip(item, Item, JSON) == item

    bad = f'{{"name": "{SECRET}", "qty": "{SECRET}", "kind": "{SECRET}"}}'.encode()
    with pytest.raises(DecodeError) as info:
        decoder_for(Item)(bad, None)
    err = info.value
    assert err.expected == "Item"
    assert "unable to parse string as an integer - at $.qty" in err.reason
    assert "Input should be 'a' or 'b' - at $.kind" in err.reason
    assert "input_value" not in str(err)
    assert_no_secret(err)

    packed = msgspec.msgpack.encode({"name": "n", "qty": SECRET})
    with pytest.raises(DecodeError, match=r"at \$\.qty") as info:
        decoder_for(Item)(packed, MSGPACK)
    assert_no_secret(info.value)


def test_pydantic_reason_is_truncated() -> None:
    pydantic = pytest.importorskip(
        "pydantic", reason="pydantic is optional and not installed here"
    )

    class Many(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        values: list[int]

    bad = msgspec.json.encode({"values": [SECRET] * 50})
    with pytest.raises(DecodeError) as info:
        decoder_for(Many)(bad, None)
    assert len(info.value.reason) <= 200
    assert info.value.reason.endswith("...")
    assert_no_secret(info.value)


# -- protobuf ------------------------------------------------------------------------


def make_proto_class() -> Any:
    """A protobuf message class built from a descriptor, with no generated module."""
    descriptor_pb2 = pytest.importorskip(
        "google.protobuf.descriptor_pb2",
        reason="protobuf is optional and not installed here",
    )
    from google.protobuf import descriptor_pool, message_factory

    file = descriptor_pb2.FileDescriptorProto(name="natskit_test.proto", package="t")
    message = file.message_type.add(name="Order")
    field = descriptor_pb2.FieldDescriptorProto
    message.field.add(
        name="id", number=1, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL
    )
    message.field.add(
        name="qty", number=2, type=field.TYPE_INT32, label=field.LABEL_OPTIONAL
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("t.Order"))


def test_protobuf_round_trips_in_binary() -> None:
    order_cls = make_proto_class()
    order = order_cls(id="o1", qty=3)
    data, content_type = encode(order)
    assert content_type == PROTOBUF
    assert data == order.SerializeToString()
    decode = decoder_for(order_cls)
    assert decode(data, content_type) == order
    assert decode(data, None) == order  # publishers outside natskit send no header


def test_protobuf_errors() -> None:
    order_cls = make_proto_class()
    decode = decoder_for(order_cls)
    with pytest.raises(DecodeError) as info:
        decode(b"\xff\xff" + SECRET.encode(), PROTOBUF)
    assert info.value.expected == "Order"
    assert "Error parsing message" in info.value.reason
    assert_no_secret(info.value)
    with pytest.raises(DecodeError, match="cannot be decoded into this type"):
        decode(b"{}", JSON)
    with pytest.raises(CodecError, match="binary format only"):
        encode(order_cls(id="o1"), MSGPACK)


def test_well_known_protobuf_type() -> None:
    timestamp_pb2 = pytest.importorskip(
        "google.protobuf.timestamp_pb2",
        reason="protobuf is optional and not installed here",
    )
    stamp = timestamp_pb2.Timestamp(seconds=10, nanos=5)
    assert roundtrip(stamp, timestamp_pb2.Timestamp) == stamp


# -- optional dependencies -----------------------------------------------------------


def test_codec_works_and_imports_nothing_optional_without_them() -> None:
    # Setting a module to None in sys.modules makes importing it fail, as if absent.
    script = textwrap.dedent(
        """
        import sys
        for name in ("pydantic", "google", "google.protobuf"):
            sys.modules[name] = None
        import msgspec
        from natskit.codec import decoder_for, encode

        class Order(msgspec.Struct):
            id: str

        data, content_type = encode(Order("o1"))
        assert decoder_for(Order)(data, content_type) == Order("o1")
        assert encode("x") == (b"x", "text/plain; charset=utf-8")
        assert decoder_for(bytes)(b"x", None) == b"x"
        assert sys.modules["pydantic"] is None
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=False,
        env={"PYTHONPATH": ":".join(p for p in sys.path if p)},
    )
    assert result.returncode == 0, result.stderr
