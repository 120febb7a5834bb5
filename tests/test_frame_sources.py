"""The daemon's frame sources on real ZeroMQ sockets and real files: newest frame only, drop
counting, corrupt frames rejected and counted while the source keeps going, TIFF stack and
folder replay, the simulated source, and the factory."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from config.models import FramesConfig
from rig.errors import ConfigError
from rig.frame_sender import FrameSender, encode_frame
from rig.frame_sources import (
    FrameRejected,
    ReplayFrameSource,
    SimulatedFrameSource,
    ZmqFrameSource,
    build_frame_source,
    decode_frame,
)
from simulators.microscope import SimMicroscope
from simulators.world import SimWorld


def wait_until(pred: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


def image(value: int, shape: tuple[int, int] = (32, 48), dtype: type = np.uint16) -> np.ndarray:
    return np.full(shape, value, dtype)


def connected(sender: FrameSender, source: ZmqFrameSource) -> int:
    """Send probe frames until the SUB is connected (ZeroMQ's slow joiner); returns the next
    free frame_id. Probes use ids 0.. and are consumed."""
    fid = 0
    while True:
        sender.send(image(fid), um_per_px=0.5, frame_id=fid)
        got = source.wait_for_frame(None if fid == 0 else -1, 0.1)
        fid += 1
        if got is not None:
            return fid
        assert fid < 100, "subscriber never connected"


def test_decode_roundtrip_and_header_checks() -> None:
    pixels = np.arange(96, dtype=np.uint16).reshape(8, 12)
    parts = encode_frame(pixels, frame_id=7, um_per_px=0.62, z_um=-3.0, t=12.5)
    frame = decode_frame(parts)
    assert frame.frame_id == 7 and frame.t_s == 12.5 and frame.z_um == -3.0
    assert np.array_equal(frame.pixels, pixels) and not frame.pixels.flags.writeable
    header = json.loads(parts[1])
    bad_headers = {
        "schema": ("schema", "other/1"),
        "frame_id": ("frame_id", -1),
        "shape": ("shape", [3]),
        "dtype": ("dtype", "float32"),
        "um_per_px": ("um_per_px", 0),
        "order": ("order", "F"),
        "z_um": ("z_um", "high"),
    }
    for message, (key, value) in bad_headers.items():
        with pytest.raises(FrameRejected, match=message):
            decode_frame([b"frame", json.dumps({**header, key: value}).encode(), parts[2]])
    # values no float can hold, ids no sequence reaches, and frames too small for the localiser
    for key, value in (("t", 10**400), ("um_per_px", 10**400), ("z_um", -(10**400)), ("frame_id", 2**62),
                       ("shape", [1, 1]), ("shape", [4, 24])):
        with pytest.raises(FrameRejected, match=key) as raised:
            decode_frame([b"frame", json.dumps({**header, key: value}).encode(), parts[2]])
        assert len(str(raised.value)) < 200  # the message quotes a shortened value
    for raw in (b'{"t": ' + b"1" * 5000 + b"}", b"[" * 100_000):  # too many digits; too deep
        with pytest.raises(FrameRejected, match="header"):
            decode_frame([b"frame", raw, parts[2]])
    with pytest.raises(FrameRejected, match="lacks t"):
        decode_frame([b"frame", json.dumps({k: v for k, v in header.items() if k != "t"}).encode(), parts[2]])
    with pytest.raises(FrameRejected, match="bytes"):
        decode_frame([b"frame", parts[1], parts[2][:-2]])


def test_zmq_keeps_only_the_newest_frame_and_counts_drops() -> None:
    with FrameSender("tcp://127.0.0.1:*") as sender, ZmqFrameSource(sender.endpoint) as source:
        first = connected(sender, source)
        base = source.stats
        n = 12
        for i in range(n):
            sender.send(image(i), um_per_px=0.5, frame_id=first + i)
        last_id = first + n - 1
        # watch the counters only: latest() would take frames and so change what counts as dropped
        assert wait_until(lambda: source.stats["dropped"] - base["dropped"] >= n - 1)
        time.sleep(0.1)
        frame = source.latest()
        assert frame is not None and frame.frame_id == last_id
        assert frame is not None and frame.pixels[0, 0] == n - 1
        stats = source.stats
        # every frame but the newest was either skipped while draining or superseded before
        # anyone took it: all of them are counted as dropped, none is lost silently
        assert stats["dropped"] - base["dropped"] == n - 1
        assert 1 <= stats["received"] - base["received"] <= n
        assert stats["rejected"] == 0


def test_zmq_counts_gaps_in_the_senders_frame_ids() -> None:
    with FrameSender("tcp://127.0.0.1:*") as sender, ZmqFrameSource(sender.endpoint) as source:
        fid = connected(sender, source)
        base = source.stats["dropped"]
        seen = fid - 1
        for new_id in (fid, fid + 1, fid + 5):  # ids fid+2..fid+4 never arrive
            sender.send(image(1), um_per_px=0.5, frame_id=new_id)
            got = source.wait_for_frame(seen, 5.0)
            assert got is not None and got.frame_id == new_id
            seen = new_id
        assert source.stats["dropped"] - base == 3


def test_zmq_rejects_a_frame_that_repeats_the_previous_id_loudly() -> None:
    """A publisher that sends every frame with one id used to stop localisation in silence
    (consumers wait for a frame after that id): the repeats are rejected and counted."""
    with FrameSender("tcp://127.0.0.1:*") as sender, ZmqFrameSource(sender.endpoint) as source:
        fid = connected(sender, source)
        sender.send(image(1), um_per_px=0.5, frame_id=fid)
        assert source.wait_for_frame(fid - 1, 5.0) is not None
        rejected = source.stats["rejected"]
        for _ in range(3):
            sender.send(image(2), um_per_px=0.5, frame_id=fid)
            time.sleep(0.005)
        assert wait_until(lambda: source.stats["rejected"] == rejected + 3)
        latest = source.latest()
        assert latest is not None and latest.pixels[0, 0] == 1  # the first frame with that id stays
        sender.send(image(3), um_per_px=0.5, frame_id=fid + 1)  # a new id flows again
        got = source.wait_for_frame(fid, 5.0)
        assert got is not None and got.pixels[0, 0] == 3


def test_zmq_rejects_corrupt_frames_counts_them_and_keeps_going() -> None:
    with FrameSender("tcp://127.0.0.1:*") as sender, ZmqFrameSource(sender.endpoint) as source:
        fid = connected(sender, source)  # fixes the stream's geometry: 32x48 uint16
        good = encode_frame(image(5), frame_id=fid, um_per_px=0.5)
        header = json.loads(good[1])
        corrupt = [
            [b"frame", good[1]],  # two parts
            [b"frame", b"{not json", good[2]],  # bad header JSON
            [b"frame", json.dumps({k: v for k, v in header.items() if k != "shape"}).encode(), good[2]],
            [b"frame", good[1], good[2][:100]],  # truncated bytes
            [b"frame", json.dumps({**header, "dtype": "uint32"}).encode(), good[2]],  # bad dtype
            encode_frame(image(5, (32, 40)), frame_id=fid, um_per_px=0.5),  # wrong size
            encode_frame(image(5, dtype=np.uint8), frame_id=fid, um_per_px=0.5),  # wrong dtype
            [b"frame", b"\xff\xfe", good[2]],  # not UTF-8
        ]
        for parts in corrupt:
            sender.send_parts(parts)
            time.sleep(0.005)
        assert wait_until(lambda: source.stats["rejected"] == len(corrupt))
        sender.send(image(77), um_per_px=0.5, frame_id=fid + 1)
        frame = source.wait_for_frame(fid, 5.0)
        assert frame is not None and frame.pixels[0, 0] == 77 and frame.shape == (32, 48)
        assert source.stats["rejected"] == len(corrupt)


def test_zmq_survives_hostile_headers_and_follows_a_sender_that_restarts_its_numbering() -> None:
    with FrameSender("tcp://127.0.0.1:*") as sender, ZmqFrameSource(sender.endpoint) as source:
        last_probe = connected(sender, source) - 1
        fid = last_probe + 1000
        sender.send(image(1), um_per_px=0.5, frame_id=fid)
        got = source.wait_for_frame(last_probe, 5.0)
        assert got is not None and got.frame_id == fid
        header = json.loads(encode_frame(image(2), frame_id=fid + 1, um_per_px=0.5)[1])
        hostile = [
            [b"frame", json.dumps({**header, "t": 10**400}).encode(), image(2).tobytes()],
            [b"frame", b'{"t": ' + b"1" * 5000 + b"}", image(2).tobytes()],
            [b"frame", b"[" * 100_000, image(2).tobytes()],
            [b"frame", json.dumps({**header, "frame_id": 2**62}).encode(), image(2).tobytes()],
        ]
        rejected = source.stats["rejected"]
        for parts in hostile:
            sender.send_parts(parts)
            time.sleep(0.005)
        assert wait_until(lambda: source.stats["rejected"] == rejected + len(hostile))
        # the acquisition program restarts: frame ids begin again at 0, and frames still flow
        dropped = source.stats["dropped"]
        seen = fid
        for new_id in (0, 1, 2):
            sender.send(image(10 + new_id), um_per_px=0.5, frame_id=new_id)
            got = source.wait_for_frame(seen, 5.0)
            assert got is not None and got.frame_id == new_id and got.pixels[0, 0] == 10 + new_id
            seen = new_id
        assert source.stats["dropped"] == dropped  # a renumbering is not counted as lost frames


def test_zmq_source_close_wakes_waiters_and_bad_endpoint_is_a_clear_error() -> None:
    source = ZmqFrameSource("tcp://127.0.0.1:1")
    source.start()
    t0 = time.monotonic()
    assert source.wait_for_frame(None, 0.2) is None
    assert time.monotonic() - t0 < 5.0
    source.close()
    assert source.wait_for_frame(None, 5.0) is None  # closed: returns at once
    with pytest.raises(ConfigError, match="cannot subscribe"):
        ZmqFrameSource("nonsense://x").start()


def collect(source: ReplayFrameSource, timeout_s: float = 10.0) -> list:
    frames = []
    last = None
    deadline = time.monotonic() + timeout_s
    while not source.finished.is_set() and time.monotonic() < deadline:
        f = source.wait_for_frame(last, 0.05)
        if f is not None:
            frames.append(f)
            last = f.frame_id
    f = source.wait_for_frame(last, 0.05)
    if f is not None:
        frames.append(f)
    return frames


def test_replay_of_a_tiff_stack(tmp_path: Path) -> None:
    stack = np.stack([image(100 * i, (24, 30)) for i in range(6)])
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack)
    with ReplayFrameSource(path, rate_hz=100.0, um_per_px=0.8, z_um=-50.0, loop=False) as source:
        frames = collect(source)
    assert source.n_frames == 6
    assert frames and frames[-1].frame_id == 5 and frames[-1].pixels[0, 0] == 500
    for f in frames:
        assert f.pixels[0, 0] == 100 * f.frame_id and f.um_per_px == 0.8 and f.z_um == -50.0
    assert source.stats["received"] == 6 and source.stats["rejected"] == 0


def test_replay_of_a_folder_rejects_bad_images_and_goes_on(tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "00.png"), image(10, dtype=np.uint8))
    (tmp_path / "01.png").write_bytes(b"not a png")
    colour = np.zeros((32, 48, 3), np.uint8)
    colour[..., 1] = 100  # green
    cv2.imwrite(str(tmp_path / "02.png"), colour)
    cv2.imwrite(str(tmp_path / "03.png"), image(1000))  # 16-bit: does not match the stream
    cv2.imwrite(str(tmp_path / "04.png"), image(40, (20, 20), np.uint8))  # wrong size
    cv2.imwrite(str(tmp_path / "05.png"), image(50, dtype=np.uint8))
    tifffile.imwrite(tmp_path / "06.tif", np.ones((32, 48, 3)), photometric="rgb")  # colour float64
    cv2.imwrite(str(tmp_path / "07.png"), image(70, dtype=np.uint8))
    (tmp_path / "notes.txt").write_text("ignored")
    # 20 Hz: the collector must see frames 5 and 7 before the next replaces them (newest only)
    with ReplayFrameSource(tmp_path, rate_hz=20.0, um_per_px=0.5, loop=False) as source:
        frames = collect(source)
    assert source.n_frames == 8
    assert source.stats == {"received": 4, "dropped": source.stats["dropped"], "rejected": 4}
    values = {f.frame_id: int(f.pixels[0, 0]) for f in frames}
    assert values.get(5) == 50
    assert values.get(7) == 70  # replay went on after the colour float TIFF
    assert values.get(2, 59) in range(55, 62)  # green 100 -> grey 0.587 * 100


def test_replay_loops_and_rejects_bad_paths(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "s.tif", np.stack([image(i) for i in range(2)]))
    with ReplayFrameSource(tmp_path / "s.tif", rate_hz=200.0, um_per_px=0.5) as source:
        assert wait_until(lambda: (f := source.latest()) is not None and f.frame_id >= 4)
        f = source.latest()
        assert f is not None and f.pixels[0, 0] == f.frame_id % 2
    with pytest.raises(ConfigError, match="does not exist"):
        ReplayFrameSource(tmp_path / "missing", rate_hz=10, um_per_px=0.5)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no PNG or TIFF"):
        ReplayFrameSource(tmp_path / "empty", rate_hz=10, um_per_px=0.5)
    (tmp_path / "bad.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(ConfigError, match="cannot open"):
        ReplayFrameSource(tmp_path / "bad.tif", rate_hz=10, um_per_px=0.5)


def test_simulated_source_starts_and_stops_the_microscope() -> None:
    world = SimWorld(seed=0, image_size_px=(64, 80))
    world.add_channel("A")
    microscope = SimMicroscope(world, rate_hz=50.0)
    with SimulatedFrameSource(microscope) as source:
        first = source.wait_for_frame(None, 10.0)
        assert first is not None
        second = source.wait_for_frame(first.frame_id, 10.0)
        assert second is not None and second.frame_id > first.frame_id
        assert microscope.running
    assert not microscope.running
    assert source.stats["received"] >= 2 and source.stats["rejected"] == 0


def test_build_frame_source_follows_the_config(tmp_path: Path) -> None:
    world = SimWorld(seed=0, image_size_px=(64, 64))
    sim = build_frame_source(FramesConfig(), microscope=SimMicroscope(world))
    assert isinstance(sim, SimulatedFrameSource)
    with pytest.raises(ConfigError, match="simulated microscope"):
        build_frame_source(FramesConfig())
    zmq_source = build_frame_source(FramesConfig(source="zmq", zmq_endpoint="tcp://127.0.0.1:5999"))
    assert isinstance(zmq_source, ZmqFrameSource) and zmq_source.endpoint == "tcp://127.0.0.1:5999"
    tifffile.imwrite(tmp_path / "s.tif", np.stack([image(1)]))
    replay_cfg = FramesConfig(source="replay", replay_path=tmp_path / "s.tif", replay_rate_hz=5.0)
    with pytest.raises(ConfigError, match="pixel size"):
        build_frame_source(replay_cfg)
    replay = build_frame_source(replay_cfg, um_per_px=0.7)
    assert isinstance(replay, ReplayFrameSource) and replay.um_per_px == 0.7 and replay.rate_hz == 5.0
    replay.close()


def test_replay_of_a_scanimage_int16_stack_and_folder(tmp_path: Path) -> None:
    """ScanImage saves signed 16-bit frames with small negative noise: replayed as uint16,
    negatives set to 0."""
    stack = np.stack([np.full((16, 20), v, np.int16) for v in (-7, 300, 1200)])
    stack[1, 0, 0] = -3
    tifffile.imwrite(tmp_path / "scanimage.tif", stack, photometric="minisblack")
    with ReplayFrameSource(tmp_path / "scanimage.tif", rate_hz=20.0, um_per_px=0.5, loop=False) as source:
        frames = collect(source)
    assert source.stats["received"] == 3 and source.stats["rejected"] == 0
    by_id = {f.frame_id: f.pixels for f in frames}
    assert all(p.dtype == np.uint16 for p in by_id.values())
    assert by_id[2][5, 5] == 1200 and by_id[1][0, 0] == 0
    folder = tmp_path / "frames"
    folder.mkdir()
    tifffile.imwrite(folder / "a.tif", stack[1])
    with ReplayFrameSource(folder, rate_hz=100.0, um_per_px=0.5, loop=False) as source:
        (frame,) = collect(source)
    assert frame.pixels.dtype == np.uint16 and frame.pixels[0, 0] == 0 and frame.pixels[3, 3] == 300


def test_replay_refuses_a_stack_without_integer_pixels_up_front(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "float.tif", np.zeros((3, 16, 16), np.float32), photometric="minisblack")
    with pytest.raises(ConfigError, match=r"float\.tif.*float32.*8- or 16-bit"):
        ReplayFrameSource(tmp_path / "float.tif", rate_hz=10, um_per_px=0.5)


def test_the_copyable_sender_script_publishes_a_pattern_the_daemon_receives(tmp_path: Path) -> None:
    import socket as _socket

    from rig import frame_sender

    with _socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"tcp://127.0.0.1:{port}"
    result: list[int] = []
    sender = threading.Thread(
        target=lambda: result.append(frame_sender.main([endpoint, "--seconds", "2", "--rate", "50"])),
    )
    with ZmqFrameSource(endpoint) as source:
        sender.start()
        try:
            first = source.wait_for_frame(None, 10.0)
            assert first is not None and first.shape == (512, 512) and first.pixels.dtype == np.uint16
            later = source.wait_for_frame(first.frame_id, 10.0)
            assert later is not None and not np.array_equal(first.pixels, later.pixels)
        finally:
            sender.join(20)
    assert result == [0]
    assert source.stats["rejected"] == 0


def test_the_sender_script_and_encoder_refuse_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    from rig import frame_sender

    assert frame_sender.main(["nonsense://x", "--seconds", "0"]) == 1
    assert "cannot bind nonsense://x" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        frame_sender.main(["--rate", "0"])
    pixels = np.zeros((16, 16), np.uint16)
    with pytest.raises(ValueError, match="um_per_px"):
        frame_sender.encode_frame(pixels, frame_id=0, um_per_px=float("inf"))
    with pytest.raises(ValueError, match="z_um"):
        frame_sender.encode_frame(pixels, frame_id=0, um_per_px=0.5, z_um=float("nan"))


@pytest.mark.parametrize(
    ("pixels", "fields"),
    [
        (np.zeros((16, 16), np.uint16), {"frame_id": -1}),
        (np.zeros((16, 16), np.uint16), {"frame_id": 2**53 + 1}),
        (np.zeros((16, 16), np.uint16), {"frame_id": True}),
        (np.zeros((16, 16), np.uint16), {"frame_id": 1.5}),
        (np.zeros((16, 16), np.uint16), {"t": float("nan")}),
        (np.zeros((16, 16), np.uint16), {"t": float("inf")}),
        (np.zeros((4, 4), np.uint16), {}),
        (np.zeros((16, 16385), np.uint8), {}),
    ],
)
def test_encode_frame_refuses_what_the_daemon_would_reject(pixels: np.ndarray, fields: dict) -> None:
    """The sender's own check: an acquisition program hears of a bad frame at once, instead of
    the daemon's frames silently stopping. Every such frame is one the receiver rejects too."""
    kwargs = {"frame_id": 1, "um_per_px": 0.6, "t": 1.0, **fields}
    with pytest.raises(ValueError):
        encode_frame(pixels, **kwargs)
    header = {"schema": "patchrig-frame/1", "frame_id": kwargs["frame_id"], "t": kwargs["t"],
              "shape": list(pixels.shape), "dtype": pixels.dtype.name, "order": "C", "um_per_px": 0.6, "z_um": None}
    with pytest.raises(FrameRejected):
        decode_frame([b"frame", json.dumps(header).encode(), pixels.tobytes()])


def test_encode_frame_takes_the_receivers_extremes() -> None:
    for pixels, frame_id in ((np.zeros((8, 8), np.uint8), 0), (np.zeros((8, 16384), np.uint16), 2**53)):
        frame = decode_frame(encode_frame(pixels, frame_id=frame_id, um_per_px=0.6, t=1.0))
        assert frame.frame_id == frame_id and frame.shape == pixels.shape


def test_replay_refuses_a_stack_with_channels_and_reads_planar_colour(tmp_path: Path) -> None:
    """An ImageJ stack of 2 channels replayed channel 1, channel 2, ... as new frames; a planar
    RGB stack passed the start check and then had every page rejected."""
    two_channels = tmp_path / "tc.tif"
    stack = np.zeros((4, 2, 32, 32), np.uint16)  # 4 time points of 2 channels
    stack[:, 0], stack[:, 1] = 100, 5000
    tifffile.imwrite(two_channels, stack, imagej=True, metadata={"axes": "TCYX"})
    with pytest.raises(ConfigError, match="2 channels"):
        ReplayFrameSource(two_channels, rate_hz=20.0, um_per_px=0.5)
    planar = tmp_path / "rgb.tif"
    colour = np.zeros((3, 3, 32, 32), np.uint8)  # 3 frames of (samples, h, w)
    colour[:, 1] = 200  # green
    tifffile.imwrite(planar, colour, photometric="rgb", planarconfig="separate")
    with ReplayFrameSource(planar, rate_hz=20.0, um_per_px=0.5) as source:
        assert source.n_frames == 3
        frame = source.read(0)
        assert frame.shape == (32, 32) and int(frame.mean()) == round(200 * 0.587)
