"""The simulated two-photon microscope: renders the shared world's true tips into frames.

Each frame draws every visible channel's pipette at ``world.true_tip_um(channel)`` (the hidden
transform of the manipulator's read-back, with drift and jumps) with that channel's
``PipetteLook`` (azimuth, elevation, tip radius, taper), over a fixed tissue background made
from ``seed``, with Poisson-like shot noise (Gaussian approximation, for speed), read noise and
scan-line noise (``simulators.render``). Running, it renders at ``rate_hz`` on a background
thread, advances the world's clock (drift, jumps) by the elapsed time, and hands frames to
subscribers; ``patchrig simulate microscope`` publishes them as patchrig-frame/1 over ZeroMQ.

The daemon sees only frames. The truth of the last frame (``last_truth``) is for tests.
"""

from __future__ import annotations

import argparse
import math
import threading
import time
from collections.abc import Callable

import cv2
import numpy as np

from rig.frame import Frame
from rig.logs import get_logger
from simulators.render import Optics, Pipette, Sensor, TipLabel, expose
from simulators.scene import (
    BackgroundParams,
    Scene,
    expected_image,
    render_background,
    scene_labels,
    with_pipettes,
)
from simulators.signals import sigterm_as_ctrl_c
from simulators.world import SimWorld

log = get_logger("simulators.microscope")

FrameCallback = Callable[[Frame], None]

# what the command line accepts (the renderer's optics are tuned for this range)
UM_PER_PX_RANGE = (0.1, 5.0)
SIZE_PX_RANGE = (32, 4096)


class SimMicroscope:
    """A two-photon microscope looking at ``world`` (pixel size, frame size and focal plane
    are the world's). ``bit_depth``: 8 or 16. ``photons_per_unit``: mean photons per pixel of
    the dye-lit background (noise level). Deterministic per ``seed`` for a given world state.
    """

    def __init__(
        self,
        world: SimWorld,
        *,
        rate_hz: float = 30.0,
        seed: int = 0,
        bit_depth: int = 16,
        photons_per_unit: float = 8.0,
        advance_world: bool = True,
    ) -> None:
        if not (0 < rate_hz <= 1000):
            raise ValueError(f"rate_hz must be in (0, 1000], got {rate_hz}")
        if bit_depth not in (8, 16):
            raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")
        if not (math.isfinite(world.um_per_px) and world.um_per_px > 0):
            raise ValueError(f"the world's um_per_px must be positive and finite, got {world.um_per_px}")
        if min(world.image_size_px) < 8:
            raise ValueError(f"the world's image size must be at least 8x8 pixels, got {world.image_size_px}")
        self.world = world
        self.rate_hz = float(rate_hz)
        self.seed = seed
        self.advance_world = advance_world
        self._rng = np.random.default_rng(seed)
        h, w = world.image_size_px
        optics = Optics(
            size_px=(h, w),
            um_per_px=world.um_per_px,
            focal_z_um=world.focal_z_um,
            psf_sigma_um=0.45,
            defocus_blur=0.1,
            max_blur_um=15.0,
            emission_falloff_um=40.0,
        )
        bg_rng = np.random.default_rng([seed, 1])
        background = BackgroundParams(
            seed=int(bg_rng.integers(2**31)),
            smooth_amp=0.25,
            smooth_cells=4,
            texture_amp=0.15,
            texture_um=2.5,
            fine_texture_amp=0.1,
            bright_cells=5,
            bright_cell_peak=(0.8, 2.5),
            dark_cells=12,
            dark_cell_depth=(0.2, 0.5),
            n_vessels=1,
            vessel_depth=0.4,
        )
        if bit_depth == 16:
            sensor = Sensor(photons_per_unit, 40.0, 200.0, 12.0, 6.0, 0.02, 16, exact_poisson=False)
        else:
            sensor = Sensor(photons_per_unit, 45.0 / photons_per_unit, 5.0, 1.5, 0.5, 0.02, 8, exact_poisson=False)
        self._scene = Scene(
            domain="in_vivo",
            optics=optics,
            pipettes=(),
            background=background,
            sensor=sensor,
            vignette_strength=0.25,
            scan_edge=0.15,
        )
        self._background = render_background(background, optics)
        self._lock = threading.Lock()
        self._subscribers: list[FrameCallback] = []
        self._latest: Frame | None = None
        self._next_frame_id = 0
        self.last_truth: dict[str, TipLabel] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.frames_rendered = 0
        self.frames_late = 0

    # -- rendering -------------------------------------------------------------------------
    def pipettes_now(self) -> dict[str, Pipette]:
        """The visible channels' pipettes at their true positions now (microscope µm)."""
        out = {}
        for name in self.world.channel_names:
            truth = self.world.truth(name)
            if not truth.visible:
                continue
            tip = self.world.true_tip_um(name)
            look = truth.look
            out[name] = Pipette(
                tip_um=(float(tip[0]), float(tip[1]), float(tip[2])),
                azimuth_deg=look.azimuth_deg,
                elevation_deg=look.elevation_deg,
                tip_radius_um=look.tip_radius_um,
                half_angle_deg=look.half_angle_deg,
                shadow=0.8,
                fill=0.0,
                rim=0.5,
                tip_spot=2.5,
                tip_spot_um=0.8,
            )
        return out

    def render_frame(self) -> Frame:
        """Render the world as it is now into a new frame (does not notify subscribers)."""
        pipettes = self.pipettes_now()
        scene = with_pipettes(self._scene, tuple(pipettes.values()))
        expected, references = expected_image(scene, self._background)
        labels = scene_labels(scene, expected, references)
        with self._lock:
            pixels = expose(expected, scene.sensor, self._rng)
            frame_id = self._next_frame_id
            self._next_frame_id += 1
            self.last_truth = dict(zip(pipettes, labels, strict=True))
        pixels.setflags(write=False)
        frame = Frame(
            frame_id=frame_id,
            t_s=time.time(),
            pixels=pixels,
            um_per_px=self.world.um_per_px,
            z_um=self.world.focal_z_um,
            received_s=time.monotonic(),
        )
        with self._lock:
            self._latest = frame
            self.frames_rendered += 1
        return frame

    def latest(self) -> Frame | None:
        """The newest frame rendered, or None."""
        with self._lock:
            return self._latest

    # -- streaming -------------------------------------------------------------------------
    def subscribe(self, callback: FrameCallback) -> Callable[[], None]:
        """Call ``callback(frame)`` on the render thread for every new frame. Returns a
        function that unsubscribes. Exceptions in callbacks are logged, never fatal."""
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start rendering at ``rate_hz`` on a background thread (idempotent)."""
        if self.running:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="sim-microscope", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the render thread and wait for it."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=5.0)

    def __enter__(self) -> SimMicroscope:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        cv2.setNumThreads(1)
        period = 1.0 / self.rate_hz
        next_t = time.monotonic()
        last_t = next_t
        while not self._stop.is_set():
            now = time.monotonic()
            if self.advance_world:
                self.world.advance(now - last_t)
            last_t = now
            try:
                frame = self.render_frame()
            except Exception:
                log.exception("render failed")
                self._stop.wait(period)
                continue
            with self._lock:
                subscribers = list(self._subscribers)
            for callback in subscribers:
                try:
                    callback(frame)
                except Exception:
                    log.exception("frame subscriber failed")
            next_t += period
            delay = next_t - time.monotonic()
            if delay < 0:  # late: skip ahead rather than burst
                self.frames_late += 1
                next_t = time.monotonic()
            else:
                self._stop.wait(delay)


# --------------------------------------------------------------------------------------------
# patchrig simulate microscope


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Render the simulated two-photon microscope at --rate and publish every frame as "
        "patchrig-frame/1 on a ZeroMQ PUB socket, until Ctrl-C (or --duration). The pipettes "
        "circle slowly unless --still, so a subscriber sees tips move."
    )
    parser.add_argument("--endpoint", default="tcp://127.0.0.1:5560",
                        help="PUB endpoint to bind (default tcp://127.0.0.1:5560; tcp://127.0.0.1:* picks a port)")
    parser.add_argument("--rate", type=float, default=30.0, help="frames per second, above 0 and at most 200 (default 30)")
    parser.add_argument("--channels", type=int, default=4, help="number of pipettes, 1-8 (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="world and noise seed, >= 0 (default 0)")
    parser.add_argument("--um-per-px", type=float, default=0.62,
                        help=f"pixel size in µm, {UM_PER_PX_RANGE[0]:g}-{UM_PER_PX_RANGE[1]:g} (default 0.62)")
    parser.add_argument("--size", type=int, default=512,
                        help=f"frame size in pixels, {SIZE_PX_RANGE[0]}-{SIZE_PX_RANGE[1]} (default 512)")
    parser.add_argument("--bit-depth", type=int, choices=[8, 16], default=16, help="pixel depth (default 16)")
    parser.add_argument(
        "--still", action="store_true",
        help="keep the pipettes still (default: they circle slowly, 20 µm wide)",
    )
    parser.add_argument("--duration", type=float, default=None, help="stop after S seconds (default: run until Ctrl-C)")


def _check_cli_arguments(args: argparse.Namespace) -> None:
    from rig.errors import InvalidParams

    if not 1 <= args.channels <= 8:
        raise InvalidParams(f"--channels must be 1..8, got {args.channels}")
    if not 0 < args.rate <= 200:
        raise InvalidParams(f"--rate must be in (0, 200], got {args.rate}")
    lo, hi = UM_PER_PX_RANGE
    if not lo <= args.um_per_px <= hi:
        raise InvalidParams(f"--um-per-px must be in [{lo:g}, {hi:g}] µm, got {args.um_per_px}")
    lo_px, hi_px = SIZE_PX_RANGE
    if not lo_px <= args.size <= hi_px:
        raise InvalidParams(f"--size must be in [{lo_px}, {hi_px}] pixels, got {args.size}")
    if args.seed < 0:
        raise InvalidParams(f"--seed must be >= 0, got {args.seed}")
    if args.duration is not None and not 0 <= args.duration < math.inf:
        raise InvalidParams(f"--duration must be a finite number of seconds >= 0, got {args.duration}")


def run_cli(args: argparse.Namespace) -> int:
    import zmq

    from rig.errors import ConfigError
    from rig.frame_sender import FrameSender

    _check_cli_arguments(args)
    world = SimWorld(
        seed=args.seed, um_per_px=args.um_per_px, image_size_px=(args.size, args.size),
        drift_um_per_min=0.5,
    )
    names = [chr(ord("A") + i) for i in range(args.channels)]
    start = {name: world.add_channel(name).position_um.copy() for name in names}
    microscope = SimMicroscope(world, rate_hz=args.rate, seed=args.seed, bit_depth=args.bit_depth)
    try:
        sender = FrameSender(args.endpoint)
    except zmq.ZMQError as exc:
        raise ConfigError(f"cannot publish on {args.endpoint}: {exc}") from exc

    def publish(frame: Frame) -> None:
        sender.send(frame.pixels, um_per_px=frame.um_per_px, z_um=frame.z_um, frame_id=frame.frame_id, t=frame.t_s)

    microscope.subscribe(publish)
    log.info("publishing", endpoint=sender.endpoint, rate_hz=args.rate, channels=len(names))
    with sigterm_as_ctrl_c():  # before the first line: whoever reads it may stop us at once
        t0 = time.monotonic()
        try:
            microscope.start()
            print(
                f"Simulated microscope publishing patchrig-frame/1 on {sender.endpoint}: "
                f"{args.size}x{args.size} px, {args.um_per_px:g} µm/px, {args.bit_depth}-bit, "
                f"{len(names)} pipettes, {args.rate:g} Hz. "
                + ("Ctrl-C stops." if args.duration is None else f"Stops after {args.duration:g} s."),
                flush=True,
            )
            _publish_until_done(args, world, microscope, names, start, t0)
        except KeyboardInterrupt:
            pass  # Ctrl-C (or SIGTERM) is how this command normally ends
        finally:
            microscope.close()
            sender.close()
    print(f"Simulated microscope stopped after {microscope.frames_rendered} frames", flush=True)
    return 0


def _publish_until_done(
    args: argparse.Namespace, world: SimWorld, microscope: SimMicroscope, names: list[str],
    start: dict[str, np.ndarray], t0: float,
) -> None:
    """Move the pipettes (unless --still) and log the frame rate until --duration passes."""
    last_report, last_count = t0, 0
    while args.duration is None or time.monotonic() - t0 < args.duration:
        time.sleep(0.05)
        now = time.monotonic()
        if not args.still:
            for i, name in enumerate(names):
                phase = 2 * math.pi * (now - t0) / 20.0 + i
                pos = start[name].copy()
                pos[0] += 10.0 * math.cos(phase)
                pos[1] += 10.0 * math.sin(phase)
                world.set_manipulator_position_um(name, pos)
        if now - last_report >= 5.0:
            n = microscope.frames_rendered
            log.info("frames", fps=round((n - last_count) / (now - last_report), 1), total=n)
            last_report, last_count = now, n
