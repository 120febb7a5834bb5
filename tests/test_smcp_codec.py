"""SMCP v1 frame codec: round trips, exact bytes, and clear errors on malformed datagrams."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from simulators import smcp


def test_header_bytes_are_big_endian_and_in_order() -> None:
    frame = smcp.Frame(receiver=0x00FF, sender=603, message_id=0x1234, options=0x11, type=smcp.CMD_PING)
    data = smcp.encode(frame)
    assert data == bytes([0x10, 0, 0x00, 0xFF, 0x02, 0x5B, 0x12, 0x34, 0, 0, 0, 0x11, 0, 0, 0, 0])
    assert smcp.decode(data) == frame


def test_sub_blocks_carry_counts_not_bytes_and_signed_int32() -> None:
    frame = smcp.Frame(
        receiver=1, sender=600, message_id=7, options=0x51, type=smcp.CMD_GOTO_POS,
        blocks=(smcp.int32_block(10_000_000, -5, smcp.UNDEFINED_NM), smcp.Block(smcp.TYPE_UINT32, (1, 2))),
    )
    data = smcp.encode(frame)
    assert len(data) == 16 + 4 + 12 + 4 + 8
    assert struct.unpack_from(">HH", data, 16) == (smcp.TYPE_INT32, 3)
    assert struct.unpack_from(">i", data, 24) == (-5,)
    back = smcp.decode(data)
    assert back.values(0) == (10_000_000, -5, smcp.UNDEFINED_NM)
    assert back.values(1) == (1, 2)
    assert back.values(2) == ()


def test_option_flags() -> None:
    f = smcp.Frame(receiver=1, sender=600, message_id=1, options=0x71, type=smcp.CMD_GOTO_POS)
    assert f.is_request and f.wants_ack and f.wants_response and f.wants_notification
    assert not f.is_ack and not f.is_notification and not f.is_error
    assert f.type_name == "GOTO_POS"
    assert smcp.Frame(receiver=1, sender=2, message_id=1, options=0, type=999).type_name == "type 999"


def test_ack_and_response_copy_message_id_type_and_sender() -> None:
    req = smcp.Frame(receiver=2, sender=631, message_id=42, options=0x31, type=smcp.CMD_GET_POSITIONS)
    ack = smcp.ack_for(req, 2)
    assert (ack.receiver, ack.sender, ack.message_id, ack.type) == (631, 2, 42, smcp.CMD_GET_POSITIONS)
    assert ack.is_ack and not ack.is_request and not ack.is_error
    assert smcp.ack_for(req, 2, error=True).is_error
    resp = smcp.response_for(req, 2, (smcp.int32_block(1, 2, 3),))
    assert resp.options == 0 and resp.message_id == 42 and resp.values(0) == (1, 2, 3)
    err = smcp.response_for(req, 2, (), error=True)
    assert err.is_error and err.blocks == ()


def test_notifications_go_to_all_pcs_and_never_ask_for_an_ack() -> None:
    n = smcp.notification(3, 70000, smcp.NOTIFY_POSITION_CHANGED, 1, 2, 3)
    assert n.receiver == smcp.ID_ALL_PCS and n.is_notification and not n.wants_ack
    assert n.message_id == 70000 & 0xFFFF
    assert smcp.decode(smcp.encode(n)) == n


def test_unit_conversions() -> None:
    assert smcp.um_to_nm(12.3456) == 12346
    assert smcp.nm_to_um(-1500) == -1.5
    assert smcp.nm_to_um(smcp.UNDEFINED_NM) is None


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "shorter than the 16-byte header"),
        (b"\x10" * 15, "shorter than the 16-byte header"),
        (bytes([0x11]) + bytes(15), "version byte 0x11"),
        (bytes([0x10]) + bytes(13) + b"\x00\x03", "sub-block count 3"),
        (bytes([0x10]) + bytes(13) + b"\x00\x01" + b"\x00\x06", "header truncated"),
        (bytes([0x10]) + bytes(13) + b"\x00\x01" + b"\x00\x07\x00\x01" + bytes(4), "unknown data type 7"),
        (bytes([0x10]) + bytes(13) + b"\x00\x01" + b"\x00\x06\x00\x03" + bytes(8), "announces 3 values"),
        (bytes([0x10]) + bytes(15) + b"xx", "2 trailing bytes"),
        (bytes([0x10]) + bytes(1600), "exceeds 1502"),
    ],
)
def test_malformed_datagrams_raise_clear_errors(data: bytes, match: str) -> None:
    with pytest.raises(smcp.SmcpError, match=match):
        smcp.decode(data)


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (smcp.Frame(receiver=70000, sender=1, message_id=1, options=0, type=0), "receiver=70000"),
        (smcp.Frame(receiver=1, sender=-1, message_id=1, options=0, type=0), "sender=-1"),
        (smcp.Frame(receiver=1, sender=1, message_id=1, options=0, type=0, blocks=(smcp.int32_block(),) * 3), "at most 2"),
        (smcp.Frame(receiver=1, sender=1, message_id=1, options=0, type=0, blocks=(smcp.Block(4, (1,)),)), "data type 4"),
        (smcp.Frame(receiver=1, sender=1, message_id=1, options=0, type=0, blocks=(smcp.int32_block(2**31),)), "out of range"),
        (smcp.Frame(receiver=1, sender=1, message_id=1, options=0, type=0, blocks=(smcp.int32_block(*range(400)),)), "at most 1502"),
    ],
)
def test_encode_refuses_frames_that_do_not_fit(frame: smcp.Frame, match: str) -> None:
    with pytest.raises(smcp.SmcpError, match=match):
        smcp.encode(frame)


u16 = st.integers(0, 0xFFFF)
blocks = st.lists(
    st.one_of(
        st.builds(lambda v: smcp.Block(smcp.TYPE_INT32, tuple(v)), st.lists(st.integers(-(2**31), 2**31 - 1), max_size=8)),
        st.builds(lambda v: smcp.Block(smcp.TYPE_UINT32, tuple(v)), st.lists(st.integers(0, 2**32 - 1), max_size=8)),
    ),
    max_size=2,
)


@given(u16, u16, u16, st.integers(0, 2**32 - 1), u16, blocks)
def test_round_trip_of_any_valid_frame(receiver: int, sender: int, mid: int, options: int, typ: int, bl: list) -> None:
    frame = smcp.Frame(receiver=receiver, sender=sender, message_id=mid, options=options, type=typ, blocks=tuple(bl))
    assert smcp.decode(smcp.encode(frame)) == frame


@given(st.binary(max_size=64))
def test_decode_never_fails_other_than_with_smcp_error(data: bytes) -> None:
    with contextlib.suppress(smcp.SmcpError):
        smcp.decode(data)
