"""virtio-msg encode/decode, sans-I/O, for the two profiles of docs/wire-format.md.

``"qemu-v0"`` (docs/wire-format.md §4, the default): what QEMU's virtio-msg-bus-ivshmem
speaks. Header of 6 bytes (type u8, msg_id u8, dev_num u16, msg_size u16), 38-byte payload,
every message 44 bytes. One request outstanding; a response is matched by msg_id.

``"spec-v1"`` (docs/wire-format.md §5): the draft virtio-msg transport. Header of 8 bytes
(type, msg_id, dev_num, token u16, msg_size), 40-byte payload, 48-byte messages, matched by token.

``"linux-v0"`` (docs/wire-format.md §12): what the Linux virtio-msg driver stack speaks. qemu-v0's
6-byte header with a real dev_id, up to 58 payload bytes (the whole 64-byte slot), feature words
and config bytes as spec-v1 carries them, bus GET_DEVICES / PING / EVENT_DEVICE, and a response to
every request but the events; matched by (type, msg_id, dev_id).

The codec is data: ``_layouts._BY_WIRE[profile][(type, msg_id)]`` says which class a wire type
is and how its payload is laid out (a ``struct`` format at payload offset 0 plus, for a few
messages, a variable tail). There is no if-chain per message.

Invariant (what the fuzz tests check): for ANY bytes, ``decode`` returns a message or raises
``ProtocolError``; it never raises anything else and never reads past the buffer or past
the message's own msg_size. Bad arguments to ``encode`` raise ``ValueError``/``TypeError``.
"""

from __future__ import annotations

import dataclasses
import operator
import struct
from collections.abc import Callable
from typing import Any, Final

from ..errors import ProtocolError
from . import messages as m
from .layouts import (
    _BY_CLASS,
    _BY_WIRE,
    _HEADER,
    _RESERVED_TYPE_BITS,
    HAS_TOKEN,
    HEADER_SIZE,
    MESSAGE_SIZE,
    PROFILES,
    _Layout,
    _Tail,
    _tail_len,
)
from .messages import *  # noqa: F403  (re-exported: protocol.GetFeatures etc.)
from .messages import Message, UnknownMessage

__all__ = [
    "HAS_TOKEN",
    "HEADER_SIZE",
    "MESSAGE_SIZE",
    "PROFILES",
    "decode",
    "encode",
    "expects_response",
    "is_response",
    "response_class",
    "response_matches",
    "wire_fields",
    *m.__all__,
]


def _pack_tail(tail: _Tail, msg: Message, profile: str) -> bytes:
    count: int = getattr(msg, tail.count)
    value: int | bytes = getattr(msg, tail.field)
    name = type(msg).__name__
    if count > tail.limit:
        raise ValueError(
            f"{name}.{tail.count}={count} exceeds {tail.limit}, the most {profile} carries"
        )
    if isinstance(value, int):  # feature blocks (unit 4): `count` little-endian u32s
        if value >> (32 * count):
            raise ValueError(f"{name}.features has bits beyond {count} 32-bit block(s)")
        return value.to_bytes(4 * count, "little")
    return value.ljust(tail.padded, b"\0") if tail.padded else value


def _unpack_tail(
    tail: _Tail, values: dict[str, Any], rest: bytes | bytearray | memoryview, msg_id: int
) -> None:
    count = values[tail.count]
    if count > tail.limit:
        raise ProtocolError(msg_id, f"{tail.count} {count} exceeds the maximum {tail.limit}")
    need = tail.padded or _tail_len(tail, count)
    if len(rest) < need:
        raise ProtocolError(
            msg_id, f"{tail.count} {count} needs {need} payload bytes, msg_size leaves {len(rest)}"
        )
    raw = bytes(rest[:need])
    if tail.unit == 4:
        values[tail.field] = int.from_bytes(raw, "little")
    else:
        values[tail.field] = raw[: _tail_len(tail, count)]


def _check_profile(profile: str) -> None:
    if profile not in _BY_WIRE:
        raise ValueError(f"unknown profile {profile!r}; use one of {', '.join(PROFILES)}")


# --- encode ------------------------------------------------------------------------------------


def encode(msg: Message, profile: str = "qemu-v0") -> bytes:
    """The exact bytes of ``msg`` as it sits in a queue slot.

    Args:
        msg: any message object.
        profile: ``"qemu-v0"``, ``"spec-v1"`` or ``"linux-v0"``.

    Returns:
        44 (qemu-v0), 48 (spec-v1) or 64 (linux-v0) bytes; msg_size = header + the type's
        payload size; unused payload bytes zero.

    Raises:
        ValueError: the profile does not define this message, or cannot carry a field's
            value (a token in qemu-v0, features past 64 bits, config data past 8 bytes, ...).
    """
    fast = _FAST_ENCODERS.get((profile, type(msg)))
    if fast is not None and not (msg.token and not HAS_TOKEN[profile]):
        try:
            return fast(msg)
        except struct.error:
            pass  # a value this profile's field is too narrow for: the full path says which
    _check_profile(profile)
    out = bytearray(MESSAGE_SIZE[profile])
    hsize = HEADER_SIZE[profile]
    if isinstance(msg, UnknownMessage):
        return _encode_unknown(msg, profile, out)
    layout = _BY_CLASS[profile].get(type(msg))
    name = type(msg).__name__
    if layout is None:
        raise ValueError(f"{name} is not a {profile} message")
    if msg.token and not HAS_TOKEN[profile]:
        raise ValueError(f"{name}.token={msg.token}: {profile} has no token field (use spec-v1)")
    for field, default in layout.absent_defaults:
        if getattr(msg, field) != default:
            raise ValueError(f"{name}.{field} cannot be carried by {profile}: must be {default!r}")
    try:
        layout.fixed.pack_into(out, hsize, *[getattr(msg, n) for n in layout.names])
    except struct.error as exc:  # a field wider in the class than in this profile
        raise ValueError(f"{name} does not fit {profile}: {exc}") from exc
    size = layout.fixed.size
    if layout.tail is not None:
        tail = _pack_tail(layout.tail, msg, profile)
        out[hsize + size : hsize + size + len(tail)] = tail
        size += len(tail)
    _pack_header(out, profile, msg.type, msg.msg_id, msg.dev_num, msg.token, hsize + size)
    return bytes(out)


def _pack_header(
    out: bytearray, profile: str, type_: int, msg_id: int, dev_num: int, token: int, size: int
) -> None:
    if not HAS_TOKEN[profile]:
        _HEADER[profile].pack_into(out, 0, type_, msg_id, dev_num, size)
    else:
        _HEADER[profile].pack_into(out, 0, type_, msg_id, dev_num, token, size)


def _encode_unknown(msg: UnknownMessage, profile: str, out: bytearray) -> bytes:
    hsize = HEADER_SIZE[profile]
    if not hsize <= len(msg.raw) <= len(out):
        raise ValueError(
            f"UnknownMessage.raw holds {len(msg.raw)} bytes; {profile} needs {hsize}..{len(out)}"
        )
    if msg.token and not HAS_TOKEN[profile]:
        raise ValueError(f"UnknownMessage.token={msg.token}: {profile} has no token field")
    out[hsize : len(msg.raw)] = msg.raw[hsize:]
    _pack_header(out, profile, msg.msg_type, msg.unknown_id, msg.dev_num, msg.token, len(msg.raw))
    return bytes(out)


def _fast_encoder(layout: _Layout, profile: str) -> Callable[[Message], bytes] | None:
    """One ``struct.pack`` for header + fields + zero padding, for a layout with no tail and
    no absent fields (most messages): what the general path does in five steps, in one.
    None where the general path is needed."""
    if layout.tail is not None or layout.absent:
        return None
    cls, hsize = layout.cls, HEADER_SIZE[profile]
    size = hsize + layout.fixed.size
    pad = MESSAGE_SIZE[profile] - size
    full = struct.Struct(_HEADER[profile].format + layout.fixed.format[1:] + f"{pad}x")
    type_, msg_id, pack = cls.type.fget(cls), cls.MSG_ID, full.pack  # type: ignore[attr-defined]
    get = operator.attrgetter(*layout.names) if layout.names else None
    one = len(layout.names) == 1
    if not HAS_TOKEN[profile]:
        if get is None:
            return lambda msg: pack(type_, msg_id, msg.dev_num, size)
        if one:
            return lambda msg: pack(type_, msg_id, msg.dev_num, size, get(msg))
        return lambda msg: pack(type_, msg_id, msg.dev_num, size, *get(msg))
    if get is None:
        return lambda msg: pack(type_, msg_id, msg.dev_num, msg.token, size)
    if one:
        return lambda msg: pack(type_, msg_id, msg.dev_num, msg.token, size, get(msg))
    return lambda msg: pack(type_, msg_id, msg.dev_num, msg.token, size, *get(msg))


_FAST_ENCODERS: dict[tuple[str, type], Callable[[Message], bytes]] = {}
for _profile in PROFILES:
    for _cls, _layout in _BY_CLASS[_profile].items():
        _enc = _fast_encoder(_layout, _profile)
        if _enc is not None:
            _FAST_ENCODERS[(_profile, _cls)] = _enc


# --- decode ------------------------------------------------------------------------------------


def decode(data: bytes | bytearray | memoryview, profile: str = "qemu-v0") -> Message:
    """Parse one message from untrusted bytes (a slot, or a message cut to its size).

    Only ``msg_size`` bytes are read; bytes after them are ignored.

    Returns:
        The message object, or ``UnknownMessage`` for a (type, msg_id) the profile does
        not define.

    Raises:
        ProtocolError: too short for a header, msg_size out of range, reserved type bits
            set, or a payload too short or inconsistent for its type. Nothing else.
        ValueError: ``profile`` is not a known profile (a caller's mistake).
    """
    _check_profile(profile)
    # bytes and byte memoryviews (a queue slot) are read as they are; struct reads any buffer
    view = data if type(data) is bytes or _is_byte_view(data) else memoryview(data).cast("B")
    hsize = HEADER_SIZE[profile]
    if len(view) < hsize:
        raise ProtocolError(None, f"{len(view)} bytes are shorter than the {hsize}-byte header")
    if not HAS_TOKEN[profile]:
        type_, msg_id, dev_num, size = _HEADER[profile].unpack_from(view)
        token = 0
    else:
        type_, msg_id, dev_num, token, size = _HEADER[profile].unpack_from(view)
    limit = min(len(view), MESSAGE_SIZE[profile])
    if not hsize <= size <= limit:
        raise ProtocolError(msg_id, f"msg_size {size} outside {hsize}..{limit}")
    type_ &= ~_RESERVED_TYPE_BITS  # the draft: receivers MUST ignore them (QEMU does too)
    layout = _BY_WIRE[profile].get((type_, msg_id))
    if layout is None:
        return UnknownMessage(
            msg_type=type_,
            unknown_id=msg_id,
            raw=bytes(view[:size]),
            dev_num=dev_num,
            token=token,
        )
    if size - hsize < layout.fixed.size:
        raise ProtocolError(
            msg_id,
            f"{layout.cls.__name__} needs {layout.fixed.size} payload bytes, msg_size gives "
            f"{size - hsize}",
        )
    if layout.tail is None:  # fixed fields only: read in place, set slots positionally
        return _POSITIONAL[layout](layout.fixed.unpack_from(view, hsize), dev_num, token)
    # A tail the sender under-counts (linux-v0 SET_DRV_FEATURES / SET_CONFIG) is read as
    # far as its own count says, never past the slot or the buffer.
    payload = view[hsize : limit if layout.tail.past_size else size]
    values = dict(zip(layout.names, layout.fixed.unpack_from(payload), strict=True))
    _unpack_tail(layout.tail, values, payload[layout.fixed.size :], msg_id)
    values["dev_num"] = dev_num
    values["token"] = token
    return _build(layout.cls, values)


def _build(cls: type[Message], values: dict[str, object]) -> Message:
    """Make a decoded message without re-running its field checks (h11's ``_parsed``).

    Safe because the layouts only produce valid values: every struct format is no wider than
    its field, and the tails give exactly ``size`` bytes (``(num + 7) // 8`` for a bitmap).
    The property tests re-validate every decoded message to keep that true. Fields the
    profile does not carry take their defaults. About twice as fast as the constructor.
    """
    build = _BUILDERS.get(cls)
    if build is None:
        build = _BUILDERS[cls] = _builder(cls)
    return build(values)


def _builder(cls: type[Message]) -> Callable[[dict[str, object]], Message]:
    slots = [(f.name, getattr(cls, f.name).__set__, f.default) for f in dataclasses.fields(cls)]
    new = object.__new__

    def build(values: dict[str, object]) -> Message:
        msg = new(cls)
        for name, set_slot, default in slots:
            set_slot(msg, values.get(name, default))
        return msg

    return build


_BUILDERS: dict[type, Callable[[dict[str, object]], Message]] = {}


def _is_byte_view(data: object) -> bool:
    return type(data) is memoryview and data.format == "B" and data.ndim == 1


def _positional_builder(
    layout: _Layout,
) -> Callable[[tuple[object, ...], int, int], Message]:
    """``_build`` for a tail-less layout: the struct's values in ``layout.names`` order, the
    other fields their defaults (as ``_build``; same safety argument).

    Generated straight-line code, as ``dataclasses`` generates ``__init__``: one slot store
    per field and no loop, about half the time of the loop over setters on this hot path.
    """
    cls = layout.cls
    ns: dict[str, object] = {
        "new": object.__new__,
        "cls": cls,
        # the slot descriptors (mypy reads a slot on the class as a class-variable access)
        "set_dev": cls.dev_num.__set__,  # type: ignore[attr-defined,misc]
        "set_token": cls.token.__set__,  # type: ignore[attr-defined,misc]
    }
    body = ["    msg = new(cls)"]
    if layout.names:
        body.append("    " + "".join(f"v{i}, " for i in range(len(layout.names))) + "= values")
    for i, name in enumerate(layout.names):
        ns[f"set{i}"] = getattr(cls, name).__set__
        body.append(f"    set{i}(msg, v{i})")
    others = [
        f for f in dataclasses.fields(cls) if f.name not in (*layout.names, "dev_num", "token")
    ]
    for j, f in enumerate(others):
        ns[f"rest{j}"], ns[f"default{j}"] = getattr(cls, f.name).__set__, f.default
        body.append(f"    rest{j}(msg, default{j})")
    body += ["    set_dev(msg, dev_num)", "    set_token(msg, token)", "    return msg"]
    exec("def build(values, dev_num, token):\n" + "\n".join(body), ns)
    return ns["build"]  # type: ignore[return-value]


_POSITIONAL = {
    layout: _positional_builder(layout)
    for by_wire in _BY_WIRE.values()
    for layout in by_wire.values()
    if layout.tail is None
}


def wire_fields(msg: Message, profile: str = "qemu-v0") -> dict[str, object]:
    """The payload fields ``profile`` carries for ``msg``, in wire order (for display)."""
    _check_profile(profile)
    layout = _BY_CLASS[profile].get(type(msg))
    if layout is None:
        return msg.payload_fields()
    names = layout.names + ((layout.tail.field,) if layout.tail else ())
    return {name: getattr(msg, name) for name in names}


# --- Matching ------------------------------------------------------------------------------------


def is_response(msg: Message) -> bool:
    """True for a response (type bit 0)."""
    return bool(msg.type & m.TYPE_RESPONSE)


def response_class(msg: Message, profile: str = "qemu-v0") -> type[Message] | None:
    """The class of the response ``msg`` gets in ``profile``, or None if it gets none."""
    _check_profile(profile)
    if is_response(msg) or msg.EVENT or isinstance(msg, UnknownMessage):
        return None
    if profile == "qemu-v0" and msg.MSG_ID in _QEMU_NO_REPLY:
        return None
    layout = _BY_WIRE[profile].get((msg.type | m.TYPE_RESPONSE, msg.msg_id))
    return layout.cls if layout else None


# QEMU's device never answers RESET_VQUEUE; IOMMU_ENABLE has no response.
_QEMU_NO_REPLY: Final = frozenset({m.MSG_RESET_VQUEUE, m.MSG_IOMMU_ENABLE})


def expects_response(msg: Message, profile: str = "qemu-v0") -> bool:
    """True when a peer speaking ``profile`` answers ``msg``."""
    return response_class(msg, profile) is not None


def response_matches(request: Message, reply: Message, profile: str = "qemu-v0") -> bool:
    """True when ``reply`` answers ``request``.

    spec-v1 matches on msg_id, the bus bit, token and dev_num. linux-v0 has no token: the
    Linux stack matches (type, msg_id) and, for transport messages, dev_id; the echoed field
    below is checked too. qemu-v0 has no token either: QEMU
    matches on msg_id alone (``virtio_msg_is_resp``), which lets a late response, after a
    timeout, answer the next request of the same type, and the lag can persist. So where a
    qemu-v0 response echoes a request field (QEMU's device does: the index of
    GET/SET_FEATURES and GET/SET_VQUEUE, the offset of GET/SET_CONFIG, the va of
    IOMMU_TRANSLATE), that field must match too.
    """
    _check_profile(profile)
    if not is_response(reply) or is_response(request):
        return False
    if reply.msg_id != request.msg_id or (reply.type ^ request.type) & m.TYPE_BUS:
        return False
    if profile == "spec-v1":
        return reply.token == request.token and reply.dev_num == request.dev_num
    if profile == "linux-v0" and not request.BUS and reply.dev_num != request.dev_num:
        return False
    echoed = _QEMU_ECHOED.get(type(request))
    return echoed is None or getattr(reply, echoed, None) == getattr(request, echoed)


# qemu-v0 / linux-v0 responses that carry a field of their request back (response_matches).
_QEMU_ECHOED: Final = {
    m.GetFeatures: "index",
    m.SetFeatures: "index",
    m.GetVqueue: "index",
    m.SetVqueue: "index",
    m.GetConfig: "offset",
    m.SetConfig: "offset",
    m.IommuTranslate: "va",
    m.BusGetDevices: "offset",
}
