"""Shared fixtures. Every test fails if it leaves a thread, a ZeroMQ socket or a file
descriptor (socket, pty) behind."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest

from rig.logs import flush_logs


def _fd_kinds() -> dict[int, str]:
    kinds: dict[int, str] = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:") or target.startswith("/dev/pts/") or target == "/dev/ptmx":
            kinds[int(fd)] = target
    return kinds


def _wait_until(pred, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


@pytest.fixture(autouse=True)
def no_leaked_threads_or_sockets(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves threads or sockets/ptys open (after a short grace period)."""
    threads_before = {t.ident for t in threading.enumerate()}
    fds_before = _fd_kinds()
    yield
    flush_logs(1.0)  # the test's log lines go to its own captured output
    if request.node.get_closest_marker("allow_leaks"):
        return

    def new_threads() -> list[threading.Thread]:
        return [
            t for t in threading.enumerate()
            if t.ident not in threads_before and t.is_alive()
            # per-process singletons: the sensapex SDK poller (tests/sensapex_fixtures) and the
            # log writer (rig/logs.py)
            and not t.name.startswith("patchrig-persistent")
        ]

    def new_fds() -> dict[int, str]:
        now = _fd_kinds()
        return {fd: k for fd, k in now.items() if fds_before.get(fd) != k}

    _wait_until(lambda: not new_threads(), 2.0)
    _wait_until(lambda: not new_fds(), 1.0)
    leaked_threads = new_threads()
    leaked_fds = new_fds()
    problems = []
    if leaked_threads:
        problems.append("threads left running: " + ", ".join(t.name for t in leaked_threads))
    if leaked_fds:
        problems.append("sockets/ptys left open: " + ", ".join(f"{fd}->{k}" for fd, k in leaked_fds.items()))
    if problems:
        pytest.fail("; ".join(problems))
