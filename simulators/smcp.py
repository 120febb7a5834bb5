"""SMCP v1 frame codec: the UDP protocol of Sensapex devices (see protocols/sensapex-smcp.md §3).

One frame per datagram, all integers big-endian: a 16-byte header (version 0x10, extra,
receiver id, sender id, message id, options, type, sub-block count), then up to two sub-blocks
(u16 data type, u16 element count, count x 4-byte values). Positions travel as INT32 nm.

``decode`` raises ``SmcpError`` (a ``ValueError``) that says exactly what is wrong with a
malformed datagram; ``encode`` refuses frames it could not decode again.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

VERSION = 0x10
HEADER = struct.Struct(">BBHHHIHH")  # version, extra, receiver, sender, message id, options, type, blocks
BLOCK_HEADER = struct.Struct(">HH")  # data type, element count
MAX_DATAGRAM_BYTES = 1502
MAX_BLOCKS = 2

# options bits
OPT_REQ = 0x001
OPT_ACK = 0x002
OPT_NOTIFY = 0x004
OPT_ERROR = 0x008
OPT_REQ_ACK = 0x010
OPT_REQ_RESP = 0x020
OPT_REQ_NOTIFY = 0x040
OPT_REQ_BCAST = 0x080
OPT_PRIORITY = 0x100

# data types of sub-blocks
TYPE_UINT32 = 5
TYPE_INT32 = 6
TYPE_CHAR = 9
DATA_TYPES = (TYPE_UINT32, TYPE_INT32, TYPE_CHAR)

# message types (requests)
CMD_PING = 0
CMD_STOP = 1
CMD_INIT_ZERO = 4
CMD_CALIBRATE = 5
CMD_SAVE_ZERO = 8
CMD_SET_FEATURE = 11
CMD_GET_FEATURE = 12
CMD_GET_POSITIONS = 14
CMD_SET_PARAMETER = 15
CMD_GET_PARAMETER = 16
CMD_SET_EXT_FEATURE = 17
CMD_GET_EXT_FEATURE = 18
CMD_GET_VERSION = 23
CMD_GOTO_POS = 33
CMD_TAKE_STEP = 34

# notifications
NOTIFY_HELLO = 100
NOTIFY_POSITION_CHANGED = 101
NOTIFY_STATUS_CHANGED = 102
NOTIFY_GOTO_POS_COMPLETED = 104

COMMAND_NAMES = {
    CMD_PING: "PING",
    CMD_STOP: "STOP",
    CMD_INIT_ZERO: "INIT_ZERO",
    CMD_CALIBRATE: "CALIBRATE",
    CMD_SAVE_ZERO: "SAVE_ZERO",
    CMD_SET_FEATURE: "SET_FEATURE",
    CMD_GET_FEATURE: "GET_FEATURE",
    CMD_GET_POSITIONS: "GET_POSITIONS",
    CMD_SET_PARAMETER: "SET_PARAMETER",
    CMD_GET_PARAMETER: "GET_PARAMETER",
    CMD_SET_EXT_FEATURE: "SET_EXT_FEATURE",
    CMD_GET_EXT_FEATURE: "GET_EXT_FEATURE",
    CMD_GET_VERSION: "GET_VERSION",
    CMD_GOTO_POS: "GOTO_POS",
    CMD_TAKE_STEP: "TAKE_STEP",
    NOTIFY_HELLO: "HELLO",
    NOTIFY_POSITION_CHANGED: "POSITION_CHANGED",
    NOTIFY_STATUS_CHANGED: "STATUS_CHANGED",
    NOTIFY_GOTO_POS_COMPLETED: "GOTO_POS_COMPLETED",
}

# parameters (GET_PARAMETER / SET_PARAMETER)
PARAM_DEVICE_ID = 3
PARAM_HW_ID = 0x101
PARAM_SERIAL = 0x102
PARAM_AXIS_COUNT = 0x105

# ids
ID_ALL_DEVICES = 0x00FF
ID_ALL_CUS = 0x01FF
ID_ALL_PCS = 0x02FF
ID_ALL_CUS_AND_PCS = 0x03FF
ID_EVERYONE = 0x07FF

# STATUS_CHANGED bits
STATUS_BUSY = 0x1
STATUS_ERROR = 0x8
STATUS_AXIS_MOVING = (0x10, 0x20, 0x40, 0x80)

UNDEFINED_NM = 0x7FFFFFFF  # "axis undefined / do not move"


class SmcpError(ValueError):
    """A datagram or frame that is not valid SMCP v1."""


@dataclass(frozen=True)
class Block:
    """One sub-block: ``data_type`` (5 UINT32, 6 INT32, 9 char) and its 32-bit ``values``."""

    data_type: int
    values: tuple[int, ...]


@dataclass(frozen=True)
class Frame:
    """One SMCP v1 message. ``kind`` (see options) tells requests, ACKs, responses and
    notifications apart."""

    receiver: int
    sender: int
    message_id: int
    options: int
    type: int
    blocks: tuple[Block, ...] = field(default_factory=tuple)
    version: int = VERSION
    extra: int = 0

    @property
    def is_request(self) -> bool:
        return bool(self.options & OPT_REQ)

    @property
    def is_ack(self) -> bool:
        return bool(self.options & OPT_ACK)

    @property
    def is_notification(self) -> bool:
        return bool(self.options & OPT_NOTIFY)

    @property
    def is_error(self) -> bool:
        return bool(self.options & OPT_ERROR)

    @property
    def wants_ack(self) -> bool:
        return bool(self.options & OPT_REQ_ACK)

    @property
    def wants_response(self) -> bool:
        return bool(self.options & OPT_REQ_RESP)

    @property
    def wants_notification(self) -> bool:
        return bool(self.options & OPT_REQ_NOTIFY)

    @property
    def type_name(self) -> str:
        return COMMAND_NAMES.get(self.type, f"type {self.type}")

    def values(self, index: int = 0) -> tuple[int, ...]:
        """The values of sub-block ``index`` (empty when there is no such block)."""
        return self.blocks[index].values if index < len(self.blocks) else ()


def _signed32(v: int) -> int:
    return v - (1 << 32) if v & 0x80000000 else v


def encode(frame: Frame) -> bytes:
    """Serialise ``frame``; raises ``SmcpError`` if a field does not fit its wire type."""
    if len(frame.blocks) > MAX_BLOCKS:
        raise SmcpError(f"{len(frame.blocks)} sub-blocks; SMCP v1 allows at most {MAX_BLOCKS}")
    for name, value, bits in (
        ("version", frame.version, 8),
        ("extra", frame.extra, 8),
        ("receiver", frame.receiver, 16),
        ("sender", frame.sender, 16),
        ("message_id", frame.message_id, 16),
        ("options", frame.options, 32),
        ("type", frame.type, 16),
    ):
        if not 0 <= value < (1 << bits):
            raise SmcpError(f"{name}={value} does not fit in {bits} unsigned bits")
    parts = [
        HEADER.pack(
            frame.version,
            frame.extra,
            frame.receiver,
            frame.sender,
            frame.message_id,
            frame.options,
            frame.type,
            len(frame.blocks),
        )
    ]
    for block in frame.blocks:
        if block.data_type not in DATA_TYPES:
            raise SmcpError(f"unknown sub-block data type {block.data_type}")
        if len(block.values) > 0xFFFF:
            raise SmcpError("too many values in a sub-block")
        fmt = ">" + ("i" if block.data_type == TYPE_INT32 else "I") * len(block.values)
        try:
            payload = struct.pack(fmt, *block.values)
        except struct.error as exc:
            raise SmcpError(f"sub-block value out of range for data type {block.data_type}: {exc}") from None
        parts.append(BLOCK_HEADER.pack(block.data_type, len(block.values)) + payload)
    data = b"".join(parts)
    if len(data) > MAX_DATAGRAM_BYTES:
        raise SmcpError(f"frame is {len(data)} bytes; SMCP v1 allows at most {MAX_DATAGRAM_BYTES}")
    return data


def decode(data: bytes) -> Frame:
    """Parse one datagram; raise ``SmcpError`` naming the problem if it is not SMCP v1."""
    if len(data) < HEADER.size:
        raise SmcpError(f"datagram of {len(data)} bytes is shorter than the {HEADER.size}-byte header")
    if len(data) > MAX_DATAGRAM_BYTES:
        raise SmcpError(f"datagram of {len(data)} bytes exceeds {MAX_DATAGRAM_BYTES}")
    version, extra, receiver, sender, message_id, options, msg_type, n_blocks = HEADER.unpack_from(data)
    if version != VERSION:
        raise SmcpError(f"version byte 0x{version:02x}, expected 0x{VERSION:02x}")
    if n_blocks > MAX_BLOCKS:
        raise SmcpError(f"sub-block count {n_blocks}; at most {MAX_BLOCKS}")
    offset = HEADER.size
    blocks: list[Block] = []
    for i in range(n_blocks):
        if len(data) < offset + BLOCK_HEADER.size:
            raise SmcpError(f"sub-block {i} header truncated at byte {offset}")
        data_type, count = BLOCK_HEADER.unpack_from(data, offset)
        offset += BLOCK_HEADER.size
        if data_type not in DATA_TYPES:
            raise SmcpError(f"sub-block {i} has unknown data type {data_type}")
        end = offset + 4 * count
        if len(data) < end:
            raise SmcpError(
                f"sub-block {i} announces {count} values ({4 * count} bytes) but only "
                f"{len(data) - offset} bytes follow"
            )
        raw = struct.unpack_from(f">{count}I", data, offset)
        values = tuple(_signed32(v) for v in raw) if data_type == TYPE_INT32 else tuple(raw)
        blocks.append(Block(data_type, values))
        offset = end
    if offset != len(data):
        raise SmcpError(f"{len(data) - offset} trailing bytes after the last sub-block")
    return Frame(
        receiver=receiver,
        sender=sender,
        message_id=message_id,
        options=options,
        type=msg_type,
        blocks=tuple(blocks),
        version=version,
        extra=extra,
    )


def int32_block(*values: int) -> Block:
    """An INT32 sub-block (what libum sends and what positions use)."""
    return Block(TYPE_INT32, tuple(int(v) for v in values))


def ack_for(request: Frame, sender: int, *, error: bool = False) -> Frame:
    """The ACK of ``request``: to its sender, same message id and type, ACK bit set."""
    return Frame(
        receiver=request.sender,
        sender=sender,
        message_id=request.message_id,
        options=OPT_ACK | (OPT_ERROR if error else 0),
        type=request.type,
    )


def response_for(request: Frame, sender: int, blocks: tuple[Block, ...], *, error: bool = False) -> Frame:
    """The RESPONSE of ``request``: same type and message id, REQ and ACK bits clear."""
    return Frame(
        receiver=request.sender,
        sender=sender,
        message_id=request.message_id,
        options=OPT_ERROR if error else 0,
        type=request.type,
        blocks=blocks,
    )


def notification(sender: int, message_id: int, msg_type: int, *values: int, receiver: int = ID_ALL_PCS) -> Frame:
    """A notification (to all PCs by default, never asking for an ACK)."""
    return Frame(
        receiver=receiver,
        sender=sender,
        message_id=message_id & 0xFFFF,
        options=OPT_NOTIFY,
        type=msg_type,
        blocks=(int32_block(*values),),
    )


def um_to_nm(value_um: float) -> int:
    """µm -> INT32 nm on the wire (rounded)."""
    return int(round(value_um * 1000.0))


def nm_to_um(value_nm: int) -> float | None:
    """INT32 nm on the wire -> µm; ``None`` for the "undefined axis" marker."""
    if value_nm == UNDEFINED_NM:
        return None
    return value_nm / 1000.0
