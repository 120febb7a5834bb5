"""The autouse fixture of tests/conftest.py really fails a test that leaves a thread, a socket,
a ZeroMQ socket or a pty behind, and passes a test that cleans up.

A mini test file runs under the project's own conftest in a separate pytest process."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

MINI_TESTS = '''
import os
import socket
import threading

import zmq

_forever = threading.Event()


def test_leaks_a_thread():
    threading.Thread(target=_forever.wait, name="leaky-worker", daemon=True).start()


def test_leaks_a_socket():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    _keep.append(sock)


def test_leaks_a_zmq_socket():
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.bind("tcp://127.0.0.1:*")
    _keep.append((ctx, pub))


def test_leaks_a_pty():
    _keep.append(os.openpty())


def test_cleans_up():
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait, name="tidy-worker")
    worker.start()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.close()
    stop.set()
    worker.join()


_keep = []
'''


def test_conftest_fixture_fails_tests_that_leak(tmp_path: Path) -> None:
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_mini.py").write_text(MINI_TESTS)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
         "-o", "addopts=", "-rA", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=100,
    )
    out = proc.stdout + proc.stderr
    # the fixture fails the test in its teardown: pytest reports an ERROR for the test
    assert proc.returncode == 1, out
    assert "4 errors" in out, out
    assert "threads left running: leaky-worker" in out
    assert "sockets/ptys left open" in out
    for name in ("test_leaks_a_thread", "test_leaks_a_socket", "test_leaks_a_zmq_socket", "test_leaks_a_pty"):
        assert f"ERROR test_mini.py::{name}" in out, out
    assert "ERROR test_mini.py::test_cleans_up" not in out, out
    assert "PASSED test_mini.py::test_cleans_up" in out, out
