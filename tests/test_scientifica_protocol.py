"""Byte-level tests of the Scientifica driver, in the style of pymeasure's ``expected_protocol``:
each test scripts the exact command bytes the driver must send and the reply bytes the
controller gives, and fails on any other byte, any extra command, or any missing one.

The scripted port stands in for pyserial here on purpose: the byte exchange is what is under
test. The same driver runs against real pyserial and a pty in the other Scientifica tests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from manipulators.base import Limits
from manipulators.scientifica import (
    ErrorReply,
    GarbledReply,
    ScientificaInfo,
    ScientificaProtocol,
    StopRequested,
    parse_position_ticks,
)
from rig.errors import DeviceError, DeviceTimeout, InvalidParams, OutOfBounds

PORT = "/dev/ttyUSB7"


class ScriptedPort:
    """A serial port that expects ``script`` = [(command bytes, reply bytes or None), ...].

    ``None`` is silence (the read times out empty). A reply is queued when its command is
    written; reads take from that queue, as a real port's input buffer. Records the baud rate
    and the read timeout in force for every exchange.
    """

    def __init__(self, script: Sequence[tuple[bytes, bytes | None]], baudrate: int = 9600) -> None:
        self.script = list(script)
        self.inbox = bytearray()
        self.timeout: float | None = None
        self.baudrate = baudrate
        self.sent: list[bytes] = []
        self.bauds: list[int] = []
        self.read_timeouts: list[float | None] = []

    def write(self, data: bytes) -> int:
        assert self.script, f"unexpected command {data!r}: the script is finished"
        expected, reply = self.script.pop(0)
        assert data == expected, f"sent {data!r}, the script expects {expected!r}"
        self.sent.append(data)
        self.bauds.append(self.baudrate)
        if reply is not None:
            self.inbox += reply
        return len(data)

    def read_until(self, expected: bytes = b"\n", size: int | None = None) -> bytes:
        self.read_timeouts.append(self.timeout)
        end = self.inbox.find(expected)
        cut = len(self.inbox) if end < 0 else end + len(expected)
        out = bytes(self.inbox[:cut])
        del self.inbox[:cut]
        return out

    def read(self, size: int = 1) -> bytes:
        out = bytes(self.inbox[:size])
        del self.inbox[:size]
        return out

    def reset_input_buffer(self) -> None:
        self.inbox.clear()

    def close(self) -> None:
        pass

    def assert_finished(self) -> None:
        assert not self.script, f"commands never sent: {self.script}"


def protocol(
    script: Sequence[tuple[bytes, bytes | None]],
    baudrate: int = 9600,
    abort: Callable[[], bool] | None = None,
) -> tuple[ScientificaProtocol, ScriptedPort]:
    port = ScriptedPort(script, baudrate)
    proto = ScientificaProtocol(port, channel="C", port_name=PORT, timeout_s=0.05, abort=abort)
    return proto, port


def identified(
    version: int,
    uu: tuple[float, float, float],
    script: Sequence[tuple[bytes, bytes | None]],
    abort: Callable[[], bool] | None = None,
) -> tuple[ScientificaProtocol, ScriptedPort]:
    proto, port = protocol(script, abort=abort)
    proto.info = ScientificaInfo(version=version, uu=uu, top_default=30000 if version == 2 else 2500,
                                 acc=500 if version == 2 else 20000)
    return proto, port


V2_IDENTIFY: list[tuple[bytes, bytes | None]] = [
    (b"scientifica\r", b"Y519\r"),
    (b"VER\r", b"2\r"),
    (b"DESC\r", b"PatchStar\r"),
    (b"DATE\r", b"Scientifica 2.13\tMar 12 2019\t10:22:01\r"),
    (b"TYPE\r", b"1.05\r"),
    (b"UUX\r", b"6.4\r"),
    (b"UUY\r", b"6.4\r"),
    (b"UUZ\r", b"-6.4\r"),
    (b"TOP\r", b"30000\r"),
    (b"ACC\r", b"500\r"),
]


# -- handshake and identity ---------------------------------------------------------------------
def test_identify_v2_reads_version_name_firmware_type_user_units_top_and_acc() -> None:
    proto, port = protocol(V2_IDENTIFY)
    info = proto.identify(9600, expected_version=2)
    port.assert_finished()
    assert info.version == 2 and info.units == 2 and info.ticks_per_um == 10.0
    assert info.description == "PatchStar"
    assert info.firmware == "2.13"
    assert info.type_code == "1.05"
    assert info.uu == (6.4, 6.4, -6.4)
    assert (info.top_default, info.acc) == (30000, 500)


def test_identify_v3_uses_ustep_and_hundredth_micron_ticks() -> None:
    proto, port = protocol([
        (b"scientifica\r", b"Y519\r"),
        (b"VER\r", b"3\r"),
        (b"DESC\r", b"MicroStar\r"),
        (b"DATE\r", b"Scientifica 3.22\tMar 12 2019\t10:22:01\r"),
        (b"TYPE\r", b"3.08\r"),
        (b"USTEP X\r", b"1600\r"),
        (b"USTEP Y\r", b"-1600\r"),
        (b"USTEP Z\r", b"1600\r"),
        (b"TOP\r", b"2500\r"),
        (b"ACC\r", b"20000\r"),
    ])
    info = proto.identify(38400)
    port.assert_finished()
    assert info.units == 3 and info.ticks_per_um == 100.0
    assert info.uu == (1600.0, -1600.0, 1600.0)
    assert info.description == "MicroStar" and info.firmware == "3.22"


def test_optional_identity_fields_tolerate_e_replies() -> None:
    script = list(V2_IDENTIFY)
    script[2] = (b"DESC\r", b"E,1\r")
    script[4] = (b"TYPE\r", b"E,1\r")
    proto, port = protocol(script)
    info = proto.identify(9600)
    port.assert_finished()
    assert info.description == "" and info.type_code == ""


def test_handshake_retries_once_with_a_longer_wait() -> None:
    proto, port = protocol([(b"scientifica\r", None), (b"scientifica\r", b"Y519\r")])
    proto.handshake(9600)
    port.assert_finished()
    first, second = port.read_timeouts
    assert first == pytest.approx(0.05)
    assert second == pytest.approx(0.1)  # twice the timeout: 1 s with the default 0.5 s, as ACQ4 waits


def test_handshake_recovers_from_a_garbled_first_answer() -> None:
    script: list[tuple[bytes, bytes | None]] = [(b"scientifica\r", b"\xf3\x9a\r"), (b"scientifica\r", b"Y519\r")]
    proto, port = protocol(script)
    proto.handshake(9600)
    port.assert_finished()


def test_handshake_refuses_a_device_that_is_not_scientifica() -> None:
    proto, port = protocol([(b"scientifica\r", b"OK\r")])
    with pytest.raises(DeviceError, match="not a Scientifica") as info:
        proto.handshake(9600)
    assert "'C'" in str(info.value) and PORT in str(info.value)


def test_wrong_baud_is_reported_with_the_rate_the_device_answers_at() -> None:
    garbage = b"\xe6\xb9\xc2\xce"  # no CR: what a reply looks like at the wrong rate
    proto, port = protocol([
        (b"scientifica\r", garbage),
        (b"scientifica\r", garbage),
        (b"scientifica\r", b"Y519\r"),  # the probe at the other rate
    ])
    with pytest.raises(DeviceError, match="answers at 38400 baud, not the configured 9600") as info:
        proto.handshake(9600)
    port.assert_finished()
    assert port.bauds == [9600, 9600, 38400]
    assert port.baudrate == 9600, "the configured rate is restored after the probe"
    assert PORT in str(info.value) and "'C'" in str(info.value)


def test_garbage_at_both_rates_is_a_clear_error() -> None:
    garbage = b"\xe6\xb9\xc2\xce"
    proto, port = protocol([(b"scientifica\r", garbage)] * 3)
    with pytest.raises(DeviceError, match="garbled answers .* 9600 baud"):
        proto.handshake(9600)
    port.assert_finished()


def test_silent_port_is_a_timeout_naming_channel_and_port() -> None:
    proto, port = protocol([(b"scientifica\r", None)] * 3, baudrate=38400)
    with pytest.raises(DeviceTimeout, match="no answer to the identity check") as info:
        proto.handshake(38400)
    port.assert_finished()
    assert port.bauds == [38400, 38400, 9600]
    assert port.baudrate == 38400
    assert info.value.code == "timeout"
    assert "'C'" in str(info.value) and PORT in str(info.value)


def test_expected_version_mismatch_is_refused_before_anything_else() -> None:
    proto, port = protocol([(b"scientifica\r", b"Y519\r"), (b"VER\r", b"3\r")])
    with pytest.raises(DeviceError, match="reports version 3 .* expects version 2"):
        proto.identify(9600, expected_version=2)
    port.assert_finished()


# -- positions and units -------------------------------------------------------------------------
def test_v2_position_is_pos_in_tenths_of_a_micron() -> None:
    proto, port = identified(2, (6.4,) * 3, [(b"POS\r", b"123\t-45\t6\r")])
    assert np.allclose(proto.read_position_um(), [12.3, -4.5, 0.6])
    port.assert_finished()


def test_v3_position_is_p_in_hundredths_of_a_micron() -> None:
    proto, port = identified(3, (1600.0,) * 3, [(b"P\r", b"123\t-45\t6\r")])
    assert np.allclose(proto.read_position_um(), [1.23, -0.45, 0.06])
    port.assert_finished()


def test_position_parser_accepts_tabs_spaces_and_commas_and_rejects_other_shapes() -> None:
    assert parse_position_ticks("1\t2\t3") == (1, 2, 3)
    assert parse_position_ticks("1 2 3") == (1, 2, 3)
    assert parse_position_ticks("1,2,3") == (1, 2, 3)
    for bad in ("1\t2", "1\t2\t3\t4", "a\tb\tc", ""):
        with pytest.raises(ValueError):
            parse_position_ticks(bad)


def test_ticks_round_toward_the_inside_of_the_limits() -> None:
    proto, _ = identified(2, (6.4,) * 3, [])
    # ordinary rounding when it stays inside
    limits = Limits((0.0, 0.0, -10.02), (10.04, 10.0, 10.0))
    assert proto.ticks_for(np.array([10.04, 5.0, -10.02]), limits) == (100, 50, -100)
    # 10.06 µm at a 10.06 µm limit would round up to 101 ticks = 10.1 µm, outside: round down;
    # -10.06 at a -10.06 limit likewise rounds up (toward the inside) to -100 ticks
    limits_tight = Limits((0.0, 0.0, -10.06), (10.06, 10.0, 10.0))
    assert proto.ticks_for(np.array([10.06, 0.0, -10.06]), limits_tight) == (100, 0, -100)
    assert proto.ticks_for(np.array([-3.26, 0.0, 0.0])) == (-33, 0, 0)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    version=st.sampled_from([2, 3]),
    lo=st.floats(-20000, 19000, allow_nan=False),
    width=st.floats(0.001, 1000, allow_nan=False),
    fraction=st.floats(0, 1),
)
def test_rounded_targets_never_leave_the_limits(version: int, lo: float, width: float, fraction: float) -> None:
    """Any target inside the limits becomes ticks inside the limits, within one tick of the
    target; limits narrower than a tick with no tick inside are refused, never left."""
    proto, _ = identified(version, (6.4,) * 3 if version == 2 else (1600.0,) * 3, [])
    tpu = 10.0 if version == 2 else 100.0
    hi = lo + width
    target = lo + fraction * (hi - lo)
    limits = Limits((lo, -1.0, -1.0), (hi, 1.0, 1.0))
    has_tick_inside = any(
        lo <= k / tpu <= hi for k in range(int(np.ceil(lo * tpu)) - 1, int(np.floor(hi * tpu)) + 2)
    )
    if not has_tick_inside:
        with pytest.raises(OutOfBounds, match="no .* device step lies within the limits"):
            proto.ticks_for(np.array([target, 0.0, 0.0]), limits)
        return
    ticks = proto.ticks_for(np.array([target, 0.0, 0.0]), limits)
    value = ticks[0] / tpu
    assert lo <= value <= hi
    assert abs(value - target) <= 1.0 / tpu + 1e-9


# -- speed (TOP) and acceleration (ACC) conversions -------------------------------------------------
def test_v2_top_is_speed_times_two_times_smallest_user_unit_rounded_down() -> None:
    info = ScientificaInfo(version=2, uu=(-6.4, 6.4, 6.4), top_default=30000, acc=500)
    assert info.top_for_speed(500.0) == 6400
    assert info.top_for_speed(100.0) == 1280
    assert info.top_for_speed(100.07) == 1280  # rounded toward slower
    slice_scope = ScientificaInfo(version=2, uu=(4.03, 4.03, 6.4), top_default=30000, acc=500)
    assert slice_scope.top_for_speed(500.0) == 4030  # the fastest axis sets the scale
    assert info.min_speed_um_s == pytest.approx(1000 / 12.8)
    assert info.max_speed_um_s == pytest.approx(50000 / 12.8)


def test_v3_top_is_micrometres_per_second() -> None:
    info = ScientificaInfo(version=3, uu=(1600.0,) * 3, top_default=2500, acc=20000)
    assert info.top_for_speed(500.0) == 500
    assert info.top_for_speed(2.9) == 2
    assert (info.min_speed_um_s, info.max_speed_um_s) == (1.0, 5000.0)


def test_acc_conversions() -> None:
    v2 = ScientificaInfo(version=2, uu=(6.4,) * 3, top_default=30000, acc=500)
    assert v2.acc_for_acceleration(19531.25) == 500
    assert v2.acceleration_for_acc(500) == pytest.approx(19531.25)
    v3 = ScientificaInfo(version=3, uu=(1600.0,) * 3, top_default=2500, acc=20000)
    assert v3.acc_for_acceleration(12345.4) == 12345


def test_set_acceleration_sends_acc_in_device_units() -> None:
    proto, port = identified(2, (6.4,) * 3, [(b"ACC 256\r", b"A\r")])
    assert proto.set_acceleration(10000.0) == 256
    port.assert_finished()
    assert proto.info is not None and proto.info.acc == 256


def test_acceleration_out_of_range_is_rejected_without_sending() -> None:
    proto, port = identified(2, (6.4,) * 3, [])
    with pytest.raises(InvalidParams, match="outside this controller's range"):
        proto.set_acceleration(1e6)
    assert port.sent == []


def test_move_sets_top_sends_abs_and_restores_top() -> None:
    info_top = 6400  # 500 µm/s on a v2 PatchStar
    proto, port = identified(2, (6.4,) * 3, [
        (b"TOP 6400\r", b"A\r"),
        (b"ABS 1000 -20 5\r", b"A\r"),
        (b"TOP 30000\r", b"A\r"),
    ])
    proto.send_move(proto.ticks_for(np.array([100.0, -2.0, 0.5])), info_top)
    port.assert_finished()
    assert not proto.top_dirty


def test_v3_move_is_sent_in_hundredths_of_a_micron() -> None:
    proto, port = identified(3, (1600.0,) * 3, [
        (b"TOP 250\r", b"A\r"),
        (b"ABS 10000 -200 5\r", b"A\r"),
        (b"TOP 2500\r", b"A\r"),
    ])
    proto.send_move(proto.ticks_for(np.array([100.0, -2.0, 0.05])), 250)
    port.assert_finished()


def test_move_at_the_default_top_sends_abs_only() -> None:
    proto, port = identified(3, (1600.0,) * 3, [(b"ABS 1 2 3\r", b"A\r")])
    proto.send_move((1, 2, 3), 2500)
    port.assert_finished()


# -- E replies, garbled replies, timeouts ------------------------------------------------------------
def test_e_reply_is_an_error_with_its_number_and_is_not_retried() -> None:
    proto, port = identified(2, (6.4,) * 3, [
        (b"TOP 6400\r", b"A\r"),
        (b"ABS 1 2 3\r", b"E,3\r"),
        (b"TOP 30000\r", b"A\r"),  # TOP is restored even though ABS failed
    ])
    with pytest.raises(ErrorReply) as info:
        proto.send_move((1, 2, 3), 6400)
    port.assert_finished()
    assert info.value.errno == 3
    assert "'ABS 1 2 3'" in str(info.value) and "'E,3'" in str(info.value)
    assert PORT in str(info.value) and "'C'" in str(info.value)
    assert info.value.code == "device_error"


def test_garbled_position_reply_is_resynchronised_and_retried_once() -> None:
    proto, port = identified(2, (6.4,) * 3, [
        (b"POS\r", b"1\t\xff\xfe\t3\r"),
        (b"POS\r", b"10\t20\t30\r"),
    ])
    assert np.allclose(proto.read_position_um(), [1.0, 2.0, 3.0])
    port.assert_finished()
    assert proto.garbled_count == 1


def test_wrong_shaped_reply_counts_as_garbled() -> None:
    proto, port = identified(2, (6.4,) * 3, [(b"POS\r", b"A\r"), (b"POS\r", b"1\t2\t3\r")])
    assert np.allclose(proto.read_position_um(), [0.1, 0.2, 0.3])
    port.assert_finished()


def test_two_garbled_replies_give_a_clear_error() -> None:
    proto, port = identified(2, (6.4,) * 3, [(b"S\r", b"\x9f\r"), (b"S\r", b"\x9f\x80\r")])
    with pytest.raises(GarbledReply, match="garbled reply .* to 'S'") as info:
        proto.read_status()
    port.assert_finished()
    assert PORT in str(info.value)


def test_stale_bytes_are_flushed_before_the_next_command() -> None:
    # an extra late "A\r" after the status reply must not be read as the position
    proto, port = identified(2, (6.4,) * 3, [(b"S\r", b"0\rA\r"), (b"POS\r", b"7\t8\t9\r")])
    assert proto.read_status() == 0
    assert np.allclose(proto.read_position_um(), [0.7, 0.8, 0.9])
    port.assert_finished()


def test_timeout_after_one_retry_names_command_channel_and_port() -> None:
    proto, port = identified(2, (6.4,) * 3, [(b"S\r", None), (b"S\r", None)])
    with pytest.raises(DeviceTimeout, match="no reply to 'S' within 0.05 s") as info:
        proto.read_status()
    port.assert_finished()
    assert PORT in str(info.value) and "'C'" in str(info.value)


def test_incomplete_reply_is_garbled_then_retried() -> None:
    proto, port = identified(2, (6.4,) * 3, [(b"S\r", b"0"), (b"S\r", b"3\r")])
    assert proto.read_status() == 3
    port.assert_finished()


# -- stop has priority ---------------------------------------------------------------------------------
def test_pending_stop_aborts_ordinary_exchanges_but_never_stop_itself() -> None:
    flag = {"stop": True}
    proto, port = identified(2, (6.4,) * 3, [(b"STOP\r", b"A\r")], abort=lambda: flag["stop"])
    with pytest.raises(StopRequested):
        proto.read_status()
    proto.stop()
    port.assert_finished()


def test_stop_between_top_and_abs_leaves_abs_unsent_and_top_to_restore() -> None:
    flag = {"stop": False}
    proto, port = identified(2, (6.4,) * 3, [(b"TOP 6400\r", b"A\r")], abort=lambda: flag["stop"])

    original = port.write

    def write_then_request_stop(data: bytes) -> int:
        n = original(data)
        flag["stop"] = True  # a stop arrives while TOP is in flight
        return n

    port.write = write_then_request_stop  # type: ignore[method-assign]
    with pytest.raises(StopRequested):
        proto.send_move((1, 2, 3), 6400)
    port.assert_finished()
    assert proto.top_dirty
    port.write = original  # type: ignore[method-assign]
    port.script = [(b"TOP 30000\r", b"A\r")]
    proto.restore_top()
    port.assert_finished()
    assert not proto.top_dirty
