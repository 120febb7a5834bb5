"""rig.logs: JSON lines off a terminal, readable console lines on one, stdlib logs of other
libraries routed through the same formatter, channel/op carried where bound."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from rig.errors import ConfigError
from rig.logs import configure_logging, flush_logs, get_logger, operation

REPO = Path(__file__).resolve().parents[1]


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put structlog and the root logger back as they were after the test."""
    saved_config = structlog.get_config()
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    yield
    structlog.configure(**saved_config)
    for handler in list(root.handlers):
        if handler not in saved_handlers:
            root.removeHandler(handler)
    root.setLevel(saved_level)


def _configure(monkeypatch: pytest.MonkeyPatch, *, tty: bool, level: str = "INFO") -> _Stream:
    stream = _Stream(tty)
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging(level)
    return stream


def _json_lines(stream: _Stream) -> list[dict]:
    assert flush_logs(5.0)
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_json_lines_when_stderr_is_not_a_terminal(monkeypatch, restore_logging) -> None:
    stream = _configure(monkeypatch, tty=False)
    get_logger("patchrig.manipulator", channel="A").info("move", target_um=[1.0, 2.0, 3.0])
    (line,) = _json_lines(stream)
    assert line["event"] == "move"
    assert line["channel"] == "A"
    assert line["level"] == "info"
    assert line["logger"] == "patchrig.manipulator"
    assert line["target_um"] == [1.0, 2.0, 3.0]
    assert line["timestamp"].endswith("Z")


def test_a_logger_made_before_configuration_follows_it(monkeypatch, restore_logging) -> None:
    """Module-level loggers are created at import time, before the CLI configures logging."""
    early = get_logger("patchrig.early", channel="A")
    stream = _configure(monkeypatch, tty=False)
    early.info("late line")
    (line,) = _json_lines(stream)
    assert (line["event"], line["channel"], line["logger"]) == ("late line", "A", "patchrig.early")


def test_readable_console_lines_on_a_terminal(monkeypatch, restore_logging) -> None:
    stream = _configure(monkeypatch, tty=True)
    get_logger("patchrig.manipulator", channel="B").warning("stop failed", reason="timeout")
    assert flush_logs(5.0)
    text = stream.getvalue()
    assert text.strip(), "nothing logged"
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.splitlines()[0])
    for part in ("stop failed", "channel", "B", "reason", "timeout", "warning"):
        assert part in text


def test_stdlib_logs_of_other_libraries_are_routed_through_structlog(monkeypatch, restore_logging) -> None:
    stream = _configure(monkeypatch, tty=False)
    logging.getLogger("some.library").warning("disk %s at %d%%", "sda", 91)
    (line,) = _json_lines(stream)
    assert line["event"] == "disk sda at 91%"
    assert line["logger"] == "some.library"
    assert line["level"] == "warning"
    assert "timestamp" in line


def test_level_filters_both_structlog_and_stdlib_lines(monkeypatch, restore_logging) -> None:
    stream = _configure(monkeypatch, tty=False, level="warning")
    get_logger("patchrig.x").info("hidden")
    logging.getLogger("lib").info("hidden too")
    get_logger("patchrig.x").warning("shown")
    assert [line["event"] for line in _json_lines(stream)] == ["shown"]


def test_operation_context_tags_every_line_of_the_block(monkeypatch, restore_logging) -> None:
    stream = _configure(monkeypatch, tty=False)
    with operation("move_tip", channel="C"):
        get_logger("patchrig.calibration").info("looking")
        logging.getLogger("zmq.lib").warning("slow reply")
    get_logger("patchrig.calibration").info("after")
    inside_1, inside_2, after = _json_lines(stream)
    assert (inside_1["op"], inside_1["channel"]) == ("move_tip", "C")
    assert (inside_2["op"], inside_2["channel"], inside_2["logger"]) == ("move_tip", "C", "zmq.lib")
    assert "op" not in after and "channel" not in after


def test_exceptions_are_one_json_line_with_the_traceback(monkeypatch, restore_logging) -> None:
    stream = _configure(monkeypatch, tty=False)
    try:
        raise RuntimeError("device gone")
    except RuntimeError:
        get_logger("patchrig.x", channel="D").exception("poll failed")
    (line,) = _json_lines(stream)
    assert line["channel"] == "D"
    assert "RuntimeError: device gone" in line["exception"]


def test_reconfiguring_does_not_duplicate_lines(monkeypatch, restore_logging) -> None:
    _configure(monkeypatch, tty=False)
    stream = _configure(monkeypatch, tty=False)
    get_logger("patchrig.x").info("once")
    assert len(_json_lines(stream)) == 1


def test_unknown_level_is_a_clear_error_that_changes_nothing(monkeypatch, restore_logging) -> None:
    stream = _configure(monkeypatch, tty=False)
    with pytest.raises(ConfigError, match="unknown log level 'LOUD'"):
        configure_logging("LOUD")
    get_logger("patchrig.x").info("still configured")
    assert [line["event"] for line in _json_lines(stream)] == ["still configured"]


def test_cli_writes_json_lines_to_a_pipe() -> None:
    """A real `patchrig` process whose stderr is a pipe logs JSON lines, channel-less lines
    included (here the microscope simulator's start line)."""
    proc = subprocess.run(
        [sys.executable, "-m", "rig.cli", "simulate", "microscope", "--duration", "0.2", "--size", "64",
         "--channels", "1", "--endpoint", "tcp://127.0.0.1:*"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    assert lines, proc.stderr
    assert all({"event", "level", "logger", "timestamp"} <= set(line) for line in lines)
    assert any(line["event"] == "publishing" for line in lines)


def test_json_lines_carry_numpy_values_and_paths_as_plain_json(monkeypatch, restore_logging) -> None:
    import numpy as np

    stream = _configure(monkeypatch, tty=False)
    get_logger("patchrig.x", channel="A").info(
        "read", position_um=np.array([1.5, 2.0]), n=np.int64(3), gain=np.float32(0.5), path=Path("/tmp/a")
    )
    (line,) = _json_lines(stream)
    assert line["position_um"] == [1.5, 2.0] and line["n"] == 3 and line["gain"] == 0.5
    assert line["path"] == "/tmp/a"


class _StalledStream(_Stream):
    """stderr whose reader has stopped reading (a terminal after Ctrl-S, a full pipe)."""

    def __init__(self) -> None:
        super().__init__(tty=False)
        self.reading = threading.Event()

    def write(self, s: str) -> int:
        self.reading.wait()
        return super().write(s)


def test_logging_never_waits_on_a_stalled_stderr(monkeypatch, restore_logging) -> None:
    """A thread that logs (a stopper, the server loop) returns at once whatever stderr does;
    the lines are written once the stream moves again."""
    stream = _StalledStream()
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging("INFO")
    log = get_logger("patchrig.x")
    t0 = time.monotonic()
    for i in range(50):
        log.info("line", i=i)
    assert time.monotonic() - t0 < 2.0  # the writer waits on the stream, not the threads that log
    assert not flush_logs(0.2) and stream.getvalue() == ""
    stream.reading.set()
    assert [line["i"] for line in _json_lines(stream)] == list(range(50))


def test_a_full_backlog_drops_lines_and_says_how_many(monkeypatch) -> None:
    from rig.logs import _BackgroundWriter

    stream = _StalledStream()
    monkeypatch.setattr(sys, "stderr", stream)
    writer = _BackgroundWriter(capacity=3)
    writer.put("first\n")
    deadline = time.monotonic() + 5
    while not writer._writing and time.monotonic() < deadline:  # the writer thread holds "first"
        time.sleep(0.01)
    for i in range(10):
        writer.put(f"{i}\n")
    stream.reading.set()
    assert writer.flush(5.0)
    assert stream.getvalue().splitlines() == ["first", "0", "1", "2",
                                              "patchrig: 7 log lines dropped: stderr was not being read"]


def test_a_forked_child_logs_even_if_the_writer_held_its_lock_at_the_fork(monkeypatch, restore_logging) -> None:
    """Training forks worker processes; a child must never inherit the writer's lock held."""
    import multiprocessing

    from rig import logs

    configure_logging("INFO", json_lines=True)

    def child() -> None:
        get_logger("patchrig.child").info("from the child")
        assert flush_logs(5.0)

    holding, fork_done = threading.Event(), threading.Event()

    def hold_the_lock() -> None:  # as the writer thread does while it takes its lines
        with logs._writer._cond:
            holding.set()
            fork_done.wait(10.0)

    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    assert holding.wait(5.0)
    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    fork_done.set()
    holder.join(5.0)
    process.join(20.0)
    alive = process.is_alive()
    if alive:
        process.kill()
        process.join()
    assert not alive and process.exitcode == 0
