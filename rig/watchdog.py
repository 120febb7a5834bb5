"""The watchdog: stops motion when the rig can no longer be trusted, and says so.

Checked ``rate_hz`` times a second (one thread):
- **stale frames**: no frame received for ``stale_after_s`` while a closed-loop operation
  (``move_tip``, ``calibrate``: they steer by the picture) runs -> that channel is stopped and an
  ``alarm`` event ``stale_frames`` is published. Open-loop ``move`` does not need frames.
- **silent device**: a channel whose position could not be read for ``device_silent_s`` ->
  its operations are cancelled, a stop is attempted and an ``alarm`` ``device_silent`` goes out.
- **lease lapse**: a controlling client holding the lease (``lease`` method) that did not renew
  it in time -> every manipulator is stopped (as ``stop_all``) and an ``alarm`` ``lease_lapsed``
  goes out; the lease is released.

The watchdog never waits for a device: its ``stop_all`` and each channel's halt return at once
(the stops run on the channels' stopper threads), so a slow device cannot hold up its checks.

Each alarm is raised once per episode; recovery is reported as an ``info`` event.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from rig.errors import Busy, DeviceError, InvalidParams, NoFrame
from rig.logs import get_logger

CLOSED_LOOP = frozenset({"move_tip", "calibrate"})


class Lease:
    """The controlling-client lease (a dead-man switch). Thread-safe."""

    def __init__(self, default_lease_s: float = 10.0) -> None:
        self.default_lease_s = float(default_lease_s)
        self._lock = threading.Lock()
        self.holder: str | None = None
        self.lease_s = self.default_lease_s
        self.expires_s = 0.0

    def apply(self, action: str, holder: str, lease_s: float | None = None) -> dict[str, Any]:
        """acquire / renew / release for ``holder``; raises Busy or InvalidParams."""
        now = time.monotonic()
        with self._lock:
            if action == "acquire":
                if self.holder is not None and self.holder != holder:
                    raise Busy(f"lease held by {self.holder!r} for {self.expires_s - now:.1f} s more")
                self.holder = holder
                self.lease_s = float(lease_s or self.default_lease_s)
                self.expires_s = now + self.lease_s
            elif action == "renew":
                if self.holder != holder:
                    raise InvalidParams(f"{holder!r} does not hold the lease (holder: {self.holder!r})")
                if lease_s is not None:
                    self.lease_s = float(lease_s)
                self.expires_s = now + self.lease_s
            elif action == "release":
                if self.holder not in (None, holder):
                    raise InvalidParams(f"{holder!r} does not hold the lease (holder: {self.holder!r})")
                self.holder = None
            else:
                raise InvalidParams(f"unknown lease action {action!r}")
            return self._describe_locked(now)

    def expired_holder(self) -> str | None:
        """If the lease lapsed: release it and return the old holder; else None."""
        with self._lock:
            if self.holder is not None and time.monotonic() > self.expires_s:
                holder, self.holder = self.holder, None
                return holder
            return None

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return self._describe_locked(time.monotonic())

    def _describe_locked(self, now: float) -> dict[str, Any]:
        if self.holder is None:
            return {"holder": None, "lease_s": self.lease_s, "expires_in_s": None}
        return {"holder": self.holder, "lease_s": self.lease_s, "expires_in_s": max(0.0, self.expires_s - now)}


class Watchdog:
    """See the module docstring. ``controllers``: name -> ChannelController; ``frame_age_s``:
    seconds since the newest frame was received (None: no frame yet; no frame source: omit)."""

    def __init__(
        self,
        controllers: dict[str, Any],
        *,
        event: Callable[..., Any],
        stop_all: Callable[[str], Any],
        lease: Lease,
        frame_age_s: Callable[[], float | None] | None = None,
        stale_after_s: float = 1.0,
        device_silent_s: float = 2.0,
        rate_hz: float = 20.0,
    ) -> None:
        self._controllers = controllers
        self._event = event
        self._stop_all = stop_all
        self.lease = lease
        self._frame_age_s = frame_age_s
        self.stale_after_s = float(stale_after_s)
        self.device_silent_s = float(device_silent_s)
        self._period_s = 1.0 / rate_hz
        self._stop = threading.Event()
        self._frames_stale = False
        self._silent: set[str] = set()
        self._stopped_ops: set[str] = set()  # operations already stopped for stale frames (alarm once)
        self.alarms: list[dict[str, Any]] = []
        self.log = get_logger("patchrig.watchdog")
        self._thread = threading.Thread(target=self._run, name="patchrig-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)

    def _alarm(self, kind: str, message: str, **fields: Any) -> None:
        entry = {"kind": kind, "message": message, "t": time.time(), **fields}
        self.alarms = [*self.alarms[-19:], entry]
        self._event("alarm", kind, message, **fields)

    def check_once(self) -> None:
        self._check_lease()
        self._check_frames()
        self._check_devices()

    def _check_lease(self) -> None:
        holder = self.lease.expired_holder()
        if holder is not None:
            self._stop_all("lease lapsed")
            self._alarm("lease_lapsed", f"controlling client {holder!r} stopped renewing its lease: all motion stopped", holder=holder)

    def _check_frames(self) -> None:
        if self._frame_age_s is None:
            return
        age = self._frame_age_s()
        stale = age is None or age > self.stale_after_s
        if stale:
            for name, ctl in self._controllers.items():
                op = ctl.current
                if op is not None and op.method in CLOSED_LOOP and not op.finished and op.id not in self._stopped_ops:
                    self._stopped_ops = {*list(self._stopped_ops)[-63:], op.id}
                    ctl.cancel_ops("stale frames", failure=NoFrame(
                        f"no fresh frame for {'ever' if age is None else f'{age:.2f} s'}: stopped by the watchdog",
                        channel=name,
                    ))
                    # from the channel's stopper thread: a slow device must not hold up the
                    # watchdog's other checks (a lapsed lease, the other channels)
                    ctl.halt_async("stale frames")
                    self._alarm(
                        "stale_frames",
                        f"no fresh frame for {'ever' if age is None else f'{age:.2f} s'}: {op.method} {op.id} stopped",
                        channel=name,
                        op=op.id,
                    )
            if not self._frames_stale and age is not None:
                self._event("warning", "frames_stale", f"no frame for {age:.2f} s", age_s=age)
            self._frames_stale = age is not None
        elif self._frames_stale:
            self._frames_stale = False
            self._event("info", "frames_recovered", "frames are arriving again")

    def _check_devices(self) -> None:
        now = time.monotonic()
        for name, ctl in self._controllers.items():
            silent_for = now - ctl.last_device_ok_s
            if silent_for > self.device_silent_s and ctl.device_error is not None:
                if name not in self._silent:
                    self._silent.add(name)
                    ctl.cancel_ops("device silent", failure=DeviceError(
                        f"device silent for {silent_for:.1f} s ({ctl.device_error}): stopped by the watchdog",
                        channel=name,
                    ))
                    ctl.halt_async("device silent")
                    self._alarm(
                        "device_silent",
                        f"no answer for {silent_for:.1f} s ({ctl.device_error}): operations cancelled, stop sent",
                        channel=name,
                    )
            elif name in self._silent and ctl.device_error is None:
                self._silent.discard(name)
                self._event("info", "device_recovered", "device answers again", channel=name)

    def _run(self) -> None:
        while not self._stop.wait(self._period_s):
            try:
                self.check_once()
            except Exception as exc:  # the watchdog must keep watching
                self.log.exception("watchdog check failed", error=str(exc))
