"""Payload codecs: Python values to bytes and back, chosen by type and content type.

A handler's annotation says what a payload decodes to; the ``Content-Type`` header says
how it was encoded. :func:`decoder_for` looks at the type once, at start-up, and returns
a closure that does nothing per message but pick a decoder by content type and call it.
:func:`encode` goes the other way and says which header to send.

JSON is the default on the wire: an absent header means JSON, so natskit omits the
header for JSON payloads (``encode`` returns ``None`` as the content type).

What each kind of type accepts, by content type (others raise :class:`DecodeError`):

==================  ================================  ==================================
type                content types                     notes
==================  ================================  ==================================
``msgspec.Struct``  absent or JSON, MessagePack       also dataclasses, dict, list,
                                                      TypedDict, int...
pydantic model      absent or JSON, MessagePack       validated by pydantic
protobuf message    absent or protobuf                binary wire format only
``str``             absent or text, JSON, MessagePack absent or text: the payload as
                                                      strict UTF-8
``bytes``           any, even unknown ones            the payload, untouched
``Any``/``object``  any                               see :func:`decoder_for`
==================  ================================  ==================================

pydantic and protobuf are optional: this module never imports them. A class can only
be a pydantic model or a protobuf message if its library is already imported, so
looking in ``sys.modules`` is enough to recognise them, and costs nothing otherwise.

Decode errors never carry the payload, which may hold personal data or credentials:
reasons come from the library's message with any quoted input value removed, and the
library's exception is not chained (its message or attributes may quote the input).
"""

from __future__ import annotations

import functools
import re
import sys
import types
import typing
from collections.abc import Callable
from typing import Any

import msgspec
import msgspec.inspect

from natskit.errors import CodecError, DecodeError

__all__ = [
    "BINARY",
    "CONTENT_TYPE",
    "JSON",
    "MSGPACK",
    "PROTOBUF",
    "TEXT",
    "Decoder",
    "decoder_for",
    "encode",
    "type_name",
]

CONTENT_TYPE = "Content-Type"
JSON = "application/json"
MSGPACK = "application/msgpack"
PROTOBUF = "application/protobuf"
TEXT = "text/plain; charset=utf-8"
BINARY = "application/octet-stream"

Decoder = Callable[[bytes, str | None], Any]
"""``decoder(data, content_type)``: the value, or :class:`DecodeError`."""

# Media types (lower case, parameters dropped) to the canonical content types above.
_MEDIA_TYPES = {
    "application/json": JSON,
    "application/msgpack": MSGPACK,
    "application/x-msgpack": MSGPACK,
    "application/vnd.msgpack": MSGPACK,
    "application/protobuf": PROTOBUF,
    "application/x-protobuf": PROTOBUF,
    "application/vnd.google.protobuf": PROTOBUF,
    "text/plain": TEXT,
    "application/octet-stream": BINARY,
}

_REASON_LIMIT = 200

_json_encode = msgspec.json.Encoder().encode
_msgpack_encode = msgspec.msgpack.Encoder().encode
_json_decode_any = msgspec.json.Decoder().decode
_msgpack_decode_any = msgspec.msgpack.Decoder().decode

_Table = dict[str, Callable[[bytes], Any]]
_Translate = Callable[[Exception, str], DecodeError]


# -- type names ----------------------------------------------------------------------


def type_name(tp: Any) -> str:
    """A short, readable name for a type or annotation, for error messages.

    Classes are named without their module (``Order``, not ``shop.models.Order``), and
    generic annotations are spelled as in source (``dict[str, list[Order]]``,
    ``Order | None``). Anything else falls back to its ``repr``.
    """
    if tp is Any:
        return "Any"
    if tp is None or tp is type(None):
        return "None"
    if tp is Ellipsis:
        return "..."
    if typing.get_origin(tp) is not None:
        return _generic_name(tp)
    name = getattr(tp, "__qualname__", None)
    if not isinstance(name, str):
        return repr(tp)
    # A class defined in a function: "make.<locals>.Order" reads better as "Order".
    return name.rpartition("<locals>.")[2]


def _generic_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is typing.Union or origin is types.UnionType:
        return " | ".join(type_name(arg) for arg in args)
    if origin is typing.Literal:
        return f"Literal[{', '.join(repr(arg) for arg in args)}]"
    if not args:
        return type_name(origin)
    return f"{type_name(origin)}[{', '.join(type_name(arg) for arg in args)}]"


# -- decoding ------------------------------------------------------------------------


def decoder_for(tp: Any) -> Decoder:
    """Build the decoder for payloads annotated ``tp``, once, ahead of the messages.

    The result is a plain function ``decode(data, content_type=None)``, the cheapest
    thing to call per message: with no header (JSON) it is one ``is None`` test and the
    msgspec decoder's bound method. Every decoder that any content type needs is built
    here, so a bad annotation fails at start-up with a ``TypeError`` naming it.

    ``Any`` and ``object`` mean "whatever was sent": JSON and MessagePack payloads are
    decoded to plain Python values, text to ``str``, protobuf and octet-stream to raw
    ``bytes``. Without a header, a payload that parses as JSON is decoded, and any other
    is handed over as raw ``bytes`` rather than failing, since a handler that accepts
    anything should not lose messages from publishers that send no header. (The catch:
    ``b"42"`` arrives as the int ``42``.) Unknown content types also give raw ``bytes``.

    pydantic models are decoded by ``model_validate_json``, pydantic's own JSON parser,
    which is faster than msgspec to dicts followed by ``model_validate``; MessagePack
    goes through msgspec to plain values and then ``model_validate``.
    """
    name = type_name(tp)
    if tp is bytes:
        return _bytes_decoder(name)
    if tp is str:
        return _str_decoder(name)
    if tp is Any or tp is object:
        return _any_decoder(name)
    if isinstance(tp, type):
        if _is_subclass(tp, "pydantic", "BaseModel"):
            return _pydantic_decoder(tp, name)
        if _is_subclass(tp, "google.protobuf.message", "Message"):
            return _protobuf_decoder(tp, name)
    return _msgspec_decoder(tp, name)


def _is_subclass(tp: type, module: str, attr: str) -> bool:
    loaded = sys.modules.get(module)
    base = getattr(loaded, attr, None)
    return isinstance(base, type) and issubclass(tp, base)


def _bytes_decoder(name: str) -> Decoder:
    def decode(data: bytes, content_type: str | None = None) -> Any:
        return data

    decode.__qualname__ = f"decoder_for({name})"
    return decode


def _str_decoder(name: str) -> Decoder:
    table: _Table = {
        TEXT: _utf8,
        JSON: msgspec.json.Decoder(str).decode,
        MSGPACK: msgspec.msgpack.Decoder(str).decode,
    }
    return _dispatching_decoder(name, table, _utf8, _CODEC_ERRORS, _translate_codec)


def _any_decoder(name: str) -> Decoder:
    table: _Table = {
        JSON: _json_decode_any,
        MSGPACK: _msgpack_decode_any,
        TEXT: _utf8,
        PROTOBUF: _identity,
        BINARY: _identity,
    }
    return _dispatching_decoder(
        name, table, _json_or_bytes, _CODEC_ERRORS, _translate_codec, unknown=_identity
    )


def _msgspec_decoder(tp: Any, name: str) -> Decoder:
    try:
        json_decode = msgspec.json.Decoder(tp).decode
        msgpack_decode = msgspec.msgpack.Decoder(tp).decode
    except TypeError:
        raise TypeError(
            f"cannot decode payloads into {name}: unsupported type"
        ) from None
    # msgspec accepts any class at build time (it could be decoded with a dec_hook) and
    # fails on every message instead; natskit passes no hooks, so refuse it here.
    custom = _custom_class_in(msgspec.inspect.type_info(tp))
    if custom is not None:
        raise TypeError(
            f"cannot decode payloads into {name}: msgspec cannot decode "
            f"{type_name(custom)} (pydantic models and protobuf messages are supported "
            "only as the whole payload type)"
        )
    table: _Table = {JSON: json_decode, MSGPACK: msgpack_decode}
    return _dispatching_decoder(
        name, table, json_decode, _CODEC_ERRORS, _translate_codec
    )


def _custom_class_in(info: msgspec.inspect.Type) -> type | None:
    """The first class in a type tree that msgspec could only decode with hooks."""
    seen: set[int] = set()
    pending: list[Any] = [info]
    while pending:
        node = pending.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, msgspec.inspect.CustomType):
            return node.cls
        if isinstance(node, msgspec.inspect.Field):
            pending.append(node.type)
        elif isinstance(node, msgspec.inspect.Type):
            for field in node.__struct_fields__:
                value = getattr(node, field)
                if isinstance(value, tuple):
                    pending.extend(value)
                else:
                    pending.append(value)
    return None


def _pydantic_decoder(tp: Any, name: str) -> Decoder:
    validate = tp.model_validate
    table: _Table = {
        JSON: tp.model_validate_json,
        MSGPACK: lambda data: validate(_msgpack_decode_any(data)),
    }
    catch = (sys.modules["pydantic"].ValidationError, msgspec.DecodeError)
    return _dispatching_decoder(
        name, table, tp.model_validate_json, catch, _translate_pydantic
    )


def _protobuf_decoder(tp: Any, name: str) -> Decoder:
    # Without a header, a protobuf type still means the binary wire format: publishers
    # outside natskit rarely set headers, and the annotation is the stronger signal.
    table: _Table = {PROTOBUF: tp.FromString}
    catch = (sys.modules["google.protobuf.message"].DecodeError,)
    return _dispatching_decoder(name, table, tp.FromString, catch, _translate_codec)


def _dispatching_decoder(
    name: str,
    table: _Table,
    default: Callable[[bytes], Any],
    catch: tuple[type[Exception], ...],
    translate: _Translate,
    *,
    unknown: Callable[[bytes], Any] | None = None,
) -> Decoder:
    """The per-message closure: choose by content type, call, translate errors."""
    lookup = table.get
    resolve = functools.partial(_resolve, table, name, unknown)

    def decode(data: bytes, content_type: str | None = None) -> Any:
        # A header spelled exactly like one of the constants costs one dict lookup.
        fn = (
            default
            if content_type is None
            else lookup(content_type) or resolve(content_type)
        )
        try:
            return fn(data)
        except catch as exc:
            raise translate(exc, name) from None

    decode.__qualname__ = f"decoder_for({name})"
    return decode


def _resolve(
    table: _Table,
    name: str,
    unknown: Callable[[bytes], Any] | None,
    content_type: str,
) -> Callable[[bytes], Any]:
    """The slow path: a header that is not spelled exactly like our constants."""
    canonical = _canonical(content_type)
    if canonical is not None and canonical in table:
        return table[canonical]
    if unknown is not None:
        return unknown
    shown = content_type[:100]
    if canonical is None:
        reason = f"unknown content type {shown!r}"
    else:
        reason = f"content type {shown!r} cannot be decoded into this type"
    raise DecodeError(reason, expected=name)


@functools.lru_cache(maxsize=64)
def _canonical(content_type: str) -> str | None:
    # Charset parameters are ignored: natskit reads and writes text as UTF-8 only.
    media = content_type.partition(";")[0].strip().lower()
    return _MEDIA_TYPES.get(media)


def _utf8(data: bytes) -> str:
    return str(data, "utf-8")


def _identity(data: bytes) -> bytes:
    return data


def _json_or_bytes(data: bytes) -> Any:
    try:
        return _json_decode_any(data)
    except msgspec.DecodeError:
        return data


_CODEC_ERRORS: tuple[type[Exception], ...] = (msgspec.DecodeError, UnicodeDecodeError)

# msgspec messages that quote the input: "Invalid enum value 'x' - at `$.kind`",
# "Invalid value 'x'" (union tags) and "Object contains unknown field `x`". The quoted
# part is greedy up to the last " - at `$" so that a value containing it cannot leak.
_QUOTED_INPUT = re.compile(
    r"(Invalid (?:enum )?value|unknown field) .*?(?=( - at `\$[^`]*`)?\Z)", re.DOTALL
)


def _translate_codec(exc: Exception, name: str) -> DecodeError:
    if isinstance(exc, UnicodeDecodeError):
        reason = f"invalid UTF-8 at byte {exc.start}: {exc.reason}"
    else:
        reason = _QUOTED_INPUT.sub(r"\1", str(exc))
    return DecodeError(_truncate(reason), expected=name)


def _translate_pydantic(exc: Any, name: str) -> DecodeError:
    if isinstance(exc, msgspec.DecodeError):
        return _translate_codec(exc, name)
    # errors() without the input: pydantic's str(exc) quotes input_value=...
    details = exc.errors(include_input=False, include_url=False)
    parts = []
    for detail in details:
        path = _pydantic_path(detail["loc"])
        parts.append(f"{detail['msg']} - at {path}" if path != "$" else detail["msg"])
    return DecodeError(_truncate("; ".join(parts)), expected=name)


def _pydantic_path(loc: tuple[int | str, ...]) -> str:
    path = "$"
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def _truncate(reason: str) -> str:
    if len(reason) <= _REASON_LIMIT:
        return reason
    return reason[: _REASON_LIMIT - 3] + "..."


# -- encoding ------------------------------------------------------------------------


def encode(value: Any, content_type: str | None = None) -> tuple[bytes, str | None]:
    """Encode a value for the wire: the bytes, and the content type for the header.

    A returned content type of ``None`` means JSON, and the header may be omitted.
    Without ``content_type``, the value's type decides: ``bytes``-like values go as they
    are (octet-stream), ``str`` as UTF-8 text, protobuf messages in their binary format,
    pydantic models via ``model_dump_json``, and everything else msgspec can encode
    (Structs, dataclasses, dicts, lists, numbers...) as JSON. A Struct, the common case,
    costs one type check and the encoder call.

    ``content_type=MSGPACK`` forces MessagePack (pydantic models via ``model_dump()``);
    ``JSON`` forces JSON, so a ``str`` becomes a JSON string. ``bytes``-like values
    are taken as an already encoded payload and labelled with ``content_type``.
    A value that cannot be encoded as asked raises :class:`CodecError` naming its type,
    never its value; a content type natskit does not know raises ``ValueError``.
    """
    canonical = None
    if content_type is not None:
        canonical = _canonical(content_type)
        if canonical is None:
            raise ValueError(f"unknown content type {content_type[:100]!r}")
    try:
        if content_type is None:
            # Comparing the metaclass is three times cheaper than isinstance(Struct).
            if type(type(value)) is _STRUCT_META:
                return _json_encode(value), None
            return _encode_default(value)
        return _encode_as(value, content_type, canonical)
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
        how = "JSON" if content_type is None else repr(content_type[:100])
        raise CodecError(
            f"cannot encode a value of type {type_name(type(value))} as {how}: "
            f"{_truncate(str(exc))}"
        ) from exc


_STRUCT_META = type(msgspec.Struct)
_JSON_NATIVE = frozenset({dict, list, tuple, int, float, bool, type(None)})


def _encode_default(value: Any) -> tuple[bytes, str | None]:
    if type(value) in _JSON_NATIVE:
        return _json_encode(value), None
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value), BINARY
    if isinstance(value, str):
        return value.encode(), TEXT
    if _is_instance(value, "google.protobuf.message", "Message"):
        return value.SerializeToString(), PROTOBUF
    if _is_instance(value, "pydantic", "BaseModel"):
        return value.model_dump_json().encode(), None
    return _json_encode(value), None


def _encode_as(
    value: Any, content_type: str, canonical: str | None
) -> tuple[bytes, str | None]:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value), content_type
    is_protobuf = _is_instance(value, "google.protobuf.message", "Message")
    if canonical == PROTOBUF and is_protobuf:
        return value.SerializeToString(), content_type
    if is_protobuf:
        raise TypeError("protobuf messages are encoded in their binary format only")
    if canonical in {JSON, MSGPACK}:
        if _is_instance(value, "pydantic", "BaseModel"):
            if canonical == JSON:
                return value.model_dump_json().encode(), content_type
            value = value.model_dump()
        encoder = _json_encode if canonical == JSON else _msgpack_encode
        return encoder(value), content_type
    if canonical == TEXT and isinstance(value, str):
        return value.encode(), content_type
    raise TypeError(
        "only str is sent as text, bytes as octet-stream, protobuf as protobuf"
    )


def _is_instance(value: Any, module: str, attr: str) -> bool:
    loaded = sys.modules.get(module)
    base = getattr(loaded, attr, None)
    return isinstance(base, type) and isinstance(value, base)
