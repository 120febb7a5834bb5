"""``patchrig bench daemon``: the daemon's latencies, measured through its real sockets.

1. **Frame to telemetry** at ``--rate`` Hz (30) with four channels, the localiser on CPU:
   frames (pre-rendered by the simulated microscope, four tips) are published in
   patchrig-frame/1 by ``rig.frame_sender`` and received by the daemon's ZeroMQ frame source;
   the localiser worker takes the newest frame, assigns tips and publishes ``tips``. Latency is
   measured from the frame's send time (``t`` in its header) to the ``tips`` message arriving
   at a subscriber (median, p99), plus the daemon-internal part (frame received -> published).
   Frames the localiser could not keep up with are dropped, never queued: "no backlog" means
   the latency of the last quarter of the run is no worse than the first quarter's and every
   frame was either localised or counted as dropped.
2. **Command round trip** with ``--clients`` (4) concurrent client processes (``ping`` and
   ``get_position``), first with no frames, then while the frames of part 1 are flowing.
3. **stop_all** on the simulated quad rig of ``config/sim.toml`` (two Sensapex over UDP through
   the vendor SDK, two Scientifica over ptys through pyserial), each channel moving: the time
   from sending ``stop_all`` until every driver has had its STOP confirmed by its device (the
   drivers' ``stop`` returned), per trial; median, p99 and max.

Targets (issue 6): no backlog at 30 Hz; command round trip p99 <= 5 ms; stop_all reaching every
device within 20 ms.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from rig.atomic import write_json_atomic
from rig.errors import InvalidParams
from rig.logs import get_logger

log = get_logger("patchrig.bench.daemon")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=10.0, help="frame stream duration (default: %(default)s)")
    parser.add_argument("--rate", type=float, default=30.0, help="frame rate in Hz (default: %(default)s)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent command clients (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=400, help="requests per client (default: %(default)s)")
    parser.add_argument("--stops", type=int, default=20, help="stop_all trials (default: %(default)s)")
    parser.add_argument("--localiser", choices=["model", "classical", "oracle"], default="model",
                        help="localiser for part 1 (default: the shipped model, on CPU)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads of the localiser process (default: 1; on a small shared "
                        "machine two intra-op threads contend with the daemon and everything else)")
    parser.add_argument("--sensapex-group", type=int, default=None,
                        help="Sensapex SDK group for part 3 (default: config/sim.toml's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "p99": None, "max": None, "n": 0}
    arr = np.asarray(values, float)
    return {"median": float(np.median(arr)), "p99": float(np.percentile(arr, 99)), "max": float(arr.max()), "n": int(arr.size)}


def _spread_world(n: int = 4, seed: int = 3) -> Any:
    from simulators.world import SimWorld

    world = SimWorld(seed=seed)
    for i in range(n):
        world.add_channel("ABCDEFGH"[i], n_axes=3, position_um=np.full(3, 2500.0))
    for name in world.channel_names:  # tips apart from one another, as in patchrig sim
        az = np.radians(world.truth(name).look.azimuth_deg)
        now = world.true_tip_um(name)
        world.jump(name, np.array([45 * np.cos(az) - now[0], 45 * np.sin(az) - now[1], 0.0]))
    return world


def _config(names: list[str], frames_endpoint: str, threads: int | None) -> Any:
    from config.loader import config_from_mapping

    channels = [{"name": n, "driver": "simulated", "limits": {"min_um": [0.0] * 3, "max_um": [5000.0] * 3}} for n in names]
    loc: dict[str, Any] = {"device": "cpu"}
    if threads is not None:
        loc["threads"] = threads
    return config_from_mapping({"channels": channels, "frames": {"source": "zmq", "zmq_endpoint": frames_endpoint},
                                "localiser": loc}, "<bench>")


def bench_frames_and_commands(args: argparse.Namespace) -> dict[str, Any]:
    from manipulators.factory import build_manipulators
    from rig.client import TelemetrySubscriber
    from rig.daemon import Daemon
    from rig.frame_sender import FrameSender
    from rig.frame_sources import ZmqFrameSource
    from rig.simrig import load_localiser
    from simulators.microscope import SimMicroscope

    world = _spread_world()
    microscope = SimMicroscope(world, seed=5)
    frames = [microscope.render_frame() for _ in tqdm(range(30), desc="rendering frames", leave=False)]
    sender = FrameSender("tcp://127.0.0.1:*")
    cfg = _config(world.channel_names, sender.endpoint, args.threads)
    if args.localiser == "oracle":
        localiser: Any = _StaticOracle(world)
        device = "oracle"
    else:
        localiser, device = load_localiser(cfg, args.localiser)
    source = ZmqFrameSource(sender.endpoint)
    scratch = tempfile.TemporaryDirectory(prefix="patchrig-bench-")
    daemon = Daemon(cfg, build_manipulators(cfg, world=world), frames=source, localiser=localiser,
                    localiser_device=device, command_endpoint="tcp://127.0.0.1:0",
                    telemetry_endpoint="tcp://127.0.0.1:0", calibration_dir=Path(scratch.name))
    results: dict[str, Any] = {"localiser": args.localiser, "device": device, "rate_hz": args.rate,
                               "channels": len(world.channel_names)}
    received: list[tuple[float, dict[str, Any]]] = []
    stop_sub = threading.Event()
    try:
        daemon.start()
        sub = TelemetrySubscriber(daemon.telemetry_endpoint, ("tips",))

        def collect() -> None:
            while not stop_sub.is_set():
                item = sub.recv(0.1)
                if item is not None:
                    received.append((time.time(), item[1]))

        collector = threading.Thread(target=collect, name="bench-collect")
        collector.start()
        time.sleep(0.5)  # subscriptions settle
        # warm-up: a second of frames not counted
        sent_ids: list[int] = []
        stop_send = threading.Event()

        def send_frames(duration_s: float, record: bool) -> None:
            period = 1.0 / args.rate
            t_next = time.monotonic()
            end = t_next + duration_s
            i = 0
            while time.monotonic() < end and not stop_send.is_set():
                f = frames[i % len(frames)]
                fid = sender.send(f.pixels, um_per_px=f.um_per_px, z_um=f.z_um, t=time.time())
                if record:
                    sent_ids.append(fid)
                i += 1
                t_next += period
                time.sleep(max(0.0, t_next - time.monotonic()))

        rtt_idle = _round_trips(daemon.command_endpoint, world.channel_names, args.clients, args.requests)
        send_frames(1.0, record=False)
        received.clear()
        stats0 = dict(daemon.localiser_worker.stats)  # type: ignore[union-attr]
        sender_thread = threading.Thread(target=send_frames, args=(args.seconds, True), name="bench-send")
        sender_thread.start()

        # part 2 while frames flow
        time.sleep(0.5)
        rtt = _round_trips(daemon.command_endpoint, world.channel_names, args.clients, args.requests)
        sender_thread.join()
        time.sleep(0.5)  # last frames through
        stop_sub.set()
        collector.join()
        sub.close()
        stats1 = dict(daemon.localiser_worker.stats)  # type: ignore[union-attr]
    finally:
        stop_sub.set()
        daemon.close()
        sender.close()
        microscope.close()
        scratch.cleanup()

    sent_set = set(sent_ids)
    e2e = [(t_rx - m["t_frame"]) * 1e3 for t_rx, m in received if m["frame_id"] in sent_set]
    internal = [m["latency_ms"] for _t, m in received if m["frame_id"] in sent_set]
    localise = [m["localise_ms"] for _t, m in received if m["frame_id"] in sent_set]
    q = max(1, len(e2e) // 4)
    localised = stats1["localised"] - stats0["localised"]
    dropped = stats1["dropped"] - stats0["dropped"]  # frame ids never localised (skipped anywhere)
    results["frames"] = {
        "sent": len(sent_ids),
        "tips_messages": len(e2e),
        "localised": localised,
        "dropped": dropped,
        "frame_to_telemetry_ms": percentiles(e2e),
        "received_to_published_ms": percentiles(internal),
        "localise_ms": percentiles(localise),
        "first_quarter_median_ms": float(np.median(e2e[:q])) if e2e else None,
        "last_quarter_median_ms": float(np.median(e2e[-q:])) if e2e else None,
    }
    fr = results["frames"]
    fr["no_backlog"] = bool(
        e2e and fr["last_quarter_median_ms"] <= 1.5 * fr["first_quarter_median_ms"] + 5.0
        and fr["frame_to_telemetry_ms"]["p99"] < 1000.0
    )
    results["commands"] = {m: percentiles(v) for m, v in rtt.items()}
    results["commands"]["all"] = percentiles(rtt["ping"] + rtt["get_position"])
    results["commands"]["clients"] = args.clients
    results["commands_idle"] = {m: percentiles(v) for m, v in rtt_idle.items()}
    results["commands_idle"]["all"] = percentiles(rtt_idle["ping"] + rtt_idle["get_position"])
    return results


def _client_process(endpoint: str, channel: str, requests: int, start_at: float) -> dict[str, list[float]]:
    """One client process (as rig software is): alternating ping and get_position."""
    from rig.client import PatchrigClient

    local: dict[str, list[float]] = {"ping": [], "get_position": []}
    with PatchrigClient(endpoint, timeout_s=5.0) as c:
        c.ping()  # connect before the clock starts
        time.sleep(max(0.0, start_at - time.time()))
        for j in range(requests):
            method = "ping" if j % 2 == 0 else "get_position"
            params = {} if method == "ping" else {"channel": channel}
            t0 = time.perf_counter()
            c.call(method, params)
            local[method].append((time.perf_counter() - t0) * 1e3)
    return local


def _round_trips(endpoint: str, channels: list[str], n_clients: int, requests: int) -> dict[str, list[float]]:
    """``n_clients`` concurrent client processes, each with its own REQ socket."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    start_at = time.time() + 3.0  # every process imported and connected by then
    with ctx.Pool(n_clients) as pool:
        parts = pool.starmap(
            _client_process, [(endpoint, channels[k % len(channels)], requests, start_at) for k in range(n_clients)]
        )
    rtt: dict[str, list[float]] = {"ping": [], "get_position": []}
    for part in parts:
        for m, v in part.items():
            rtt[m].extend(v)
    return rtt


class _StaticOracle:
    """The bench's world does not move while frames stream: its true tips, for any frame."""

    def __init__(self, world: Any) -> None:
        from localisation.types import TipDetection

        self._tips = [TipDetection(float(x), float(y), 0.95) for x, y in (world.true_tip_px(n) for n in world.channel_names)]

    def locate(self, pixels: np.ndarray, um_per_px: float) -> list[Any]:
        return list(self._tips)


def bench_stop_all(args: argparse.Namespace) -> dict[str, Any]:
    from config.loader import load_config
    from manipulators.factory import build_manipulators
    from rig.client import PatchrigClient
    from rig.daemon import Daemon
    from rig.simrig import SimulatedRig

    cfg = load_config()
    if args.sensapex_group is not None:
        data = cfg.model_dump(mode="json")
        for ch in data["channels"]:
            if ch.get("sensapex"):
                ch["sensapex"]["group"] = args.sensapex_group
        from config.models import RigConfig

        cfg = RigConfig.model_validate(data)
    sim = SimulatedRig(cfg)
    trials: list[float] = []
    per_device: dict[str, list[float]] = {}
    replies: list[float] = []
    try:
        cfg = sim.start()
        manipulators = build_manipulators(cfg, world=sim.world)
        stamps: dict[str, float] = {}

        def instrument(m: Any) -> None:
            original = m._do_stop

            def timed_stop(reason: str) -> None:
                original(reason)
                stamps[m.name] = time.perf_counter()

            m._do_stop = timed_stop

        for m in manipulators.values():
            instrument(m)
        daemon = Daemon(cfg, manipulators, command_endpoint="tcp://127.0.0.1:0", telemetry_endpoint="tcp://127.0.0.1:0")
        with daemon, PatchrigClient(daemon.command_endpoint, timeout_s=5.0) as c:
            starts = {n: np.asarray(c.get_position(n)) for n in manipulators}
            for k in tqdm(range(args.stops), desc="stop_all trials", leave=False):
                sign = 1.0 if k % 2 == 0 else -1.0
                for n, p0 in starts.items():
                    target = p0.copy()
                    target[0] += sign * 100.0
                    c.move(n, target.tolist(), 300.0, wait=False)
                time.sleep(0.15)
                stamps.clear()
                t0 = time.perf_counter()
                reply = c.stop_all()
                t_reply = time.perf_counter()
                deadline = time.monotonic() + 2.0
                while len(stamps) < len(manipulators) and time.monotonic() < deadline:
                    time.sleep(0.001)
                if not reply.get("all_stopped"):
                    log.warning("stop_all reported errors", errors=reply.get("errors"))
                lat = {n: (stamps[n] - t0) * 1e3 for n in stamps}
                for n, v in lat.items():
                    per_device.setdefault(n, []).append(v)
                trials.append(max(lat.values()) if len(lat) == len(manipulators) else float("inf"))
                replies.append((t_reply - t0) * 1e3)
                for n, p0 in starts.items():  # back to the start for the next trial
                    c.move(n, p0.tolist(), 1000.0, wait=False)
                time.sleep(0.35)
    finally:
        sim.close()
    drivers = {ch.name: ch.driver for ch in cfg.channels}
    return {
        "all_devices_ms": percentiles(trials),
        "reply_ms": percentiles(replies),
        "per_device_ms": {n: {"driver": drivers[n], **percentiles(v)} for n, v in per_device.items()},
        "trials": len(trials),
    }


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def check_options(args: argparse.Namespace) -> None:
    """InvalidParams for an option the bench cannot use, before anything starts."""
    for name in ("seconds", "rate"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            raise InvalidParams(f"--{name} must be a positive number, got {value}")
    for name in ("clients", "requests", "stops", "threads"):
        if getattr(args, name) < 1:
            raise InvalidParams(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.json is not None and args.json.is_dir():
        raise InvalidParams(f"--json {args.json} is a directory; name the file to write")


def run(args: argparse.Namespace) -> int:
    check_options(args)
    t0 = time.monotonic()
    results = bench_frames_and_commands(args)
    results["stop_all"] = bench_stop_all(args)
    results["seconds"] = time.monotonic() - t0
    fr, cmd, st = results["frames"], results["commands"], results["stop_all"]
    print(f"\npatchrig bench daemon ({results['channels']} channels, localiser {results['localiser']} on {results['device']})")
    print(f"frames at {results['rate_hz']:.0f} Hz: sent {fr['sent']}, localised {fr['localised']}, dropped {fr['dropped']}, "
          f"no backlog: {fr['no_backlog']}")
    print(f"  frame -> tips telemetry   median {_fmt(fr['frame_to_telemetry_ms']['median'])} ms   p99 {_fmt(fr['frame_to_telemetry_ms']['p99'])} ms")
    print(f"  received -> published      median {_fmt(fr['received_to_published_ms']['median'])} ms   p99 {_fmt(fr['received_to_published_ms']['p99'])} ms")
    print(f"  localiser per frame        median {_fmt(fr['localise_ms']['median'])} ms   p99 {_fmt(fr['localise_ms']['p99'])} ms")
    for title, table in (("no frames", results["commands_idle"]), (f"{results['rate_hz']:.0f} Hz frames localised meanwhile", cmd)):
        print(f"command round trip, {cmd['clients']} clients, {title}:")
        for m in ("ping", "get_position", "all"):
            p99 = table[m]["p99"]
            print(f"  {m:13} median {_fmt(table[m]['median'])} ms   p99 {_fmt(p99)} ms   (n={table[m]['n']})  "
                  f"target p99 <= 5 ms: {'yes' if p99 is not None and p99 <= 5.0 else 'NO'}")
    a = st["all_devices_ms"]
    print(f"stop_all until every device confirmed its stop ({st['trials']} trials): median {_fmt(a['median'])} ms   "
          f"p99 {_fmt(a['p99'])} ms   max {_fmt(a['max'])} ms   target <= 20 ms: {'yes' if a['max'] <= 20.0 else 'NO'}")
    for n, d in st["per_device_ms"].items():
        print(f"  {n} ({d['driver']}): median {_fmt(d['median'])} ms   max {_fmt(d['max'])} ms")
    if args.json is not None:
        write_json_atomic(args.json, results, indent=2, allow_nan=True)
        print(f"results: {args.json}")
    return 0

