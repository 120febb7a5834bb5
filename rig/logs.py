"""structlog set-up: readable console lines on a terminal, JSON lines otherwise.

Standard-library logging of other libraries (pyzmq, the sensapex wrapper, matplotlib, ...) is
routed through the same processors, so one stream carries everything, in one format.

Where they apply, lines carry ``channel=`` (the manipulator channel) and ``op=`` (the operation):
bind them on a logger (``get_logger(name, channel="A")``) or, for everything logged by the
current thread or task inside a block, including stdlib lines of other libraries, use
``with operation("move_tip", channel="A"): ...``.

Safety: no thread that logs ever waits on the output stream. A line is formatted in the
thread that logs it and handed to one background writer thread; if stderr stops being read (a
terminal after Ctrl-S, a paused pager, a stuck pipe), only that writer waits, a stop still
reaches its device, and lines beyond ``BACKLOG_LINES`` are dropped and counted (one line says
how many once the stream moves again). ``flush_logs`` waits for the backlog, with a time limit;
the process flushes at exit.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import enum
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import structlog

from rig.errors import ConfigError

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

_configured = False


BACKLOG_LINES = 10_000  # lines waiting for a stalled stderr before new ones are dropped
EXIT_FLUSH_S = 2.0  # how long the process waits at exit for its backlog to be written


class _BackgroundWriter:
    """One thread writing log lines to whatever ``sys.stderr`` is at write time (so it survives
    stream redirection). ``put`` never blocks: a full backlog drops the line and counts it."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._lines: collections.deque[str] = collections.deque()
        self._cond = threading.Condition()
        self._dropped = 0
        self._writing = False
        self._pid = -1  # the process whose thread runs; a forked child starts its own
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._forget_parent)

    def _forget_parent(self) -> None:
        """In a forked child: a fresh lock (the parent's writer may have held it at the fork,
        which would leave it locked here for ever) and none of the parent's lines."""
        self._cond = threading.Condition()
        self._lines = collections.deque()
        self._dropped = 0
        self._writing = False
        self._pid = -1

    def put(self, line: str) -> None:
        with self._cond:
            if os.getpid() != self._pid:
                self._start()
            if len(self._lines) >= self._capacity:
                self._dropped += 1
                return
            self._lines.append(line)
            self._cond.notify()

    def _start(self) -> None:
        """(Re)start the thread in this process; called with the condition held."""
        self._pid = os.getpid()
        self._writing = False
        threading.Thread(target=self._run, name="patchrig-persistent-log-writer", daemon=True).start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._lines and not self._dropped:
                    self._cond.wait()
                batch = list(self._lines)
                self._lines.clear()
                if self._dropped:
                    batch.append(f"patchrig: {self._dropped} log lines dropped: stderr was not being read\n")
                    self._dropped = 0
                self._writing = True
            try:
                stream = sys.stderr
                stream.write("".join(batch))
                stream.flush()
            except Exception:  # noqa: S110 - a closed or broken stderr must not end logging
                pass
            finally:
                with self._cond:
                    self._writing = False
                    self._cond.notify_all()

    def flush(self, timeout_s: float) -> bool:
        """Wait until every queued line is written (at most ``timeout_s``); True if it was."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            if os.getpid() != self._pid:
                return not self._lines
            while self._lines or self._writing:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True


_writer = _BackgroundWriter(BACKLOG_LINES)
atexit.register(lambda: _writer.flush(EXIT_FLUSH_S))


def flush_logs(timeout_s: float = 1.0) -> bool:
    """Wait until every line logged so far is written to stderr (at most ``timeout_s``
    seconds); True if it was. For tests and for messages that must follow the log lines."""
    return _writer.flush(timeout_s)


class _NonBlockingHandler(logging.Handler):
    """Formats in the logging thread, writes through the background writer (never waits)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        _writer.put(line + "\n")


def _json_default(value: Any) -> Any:
    """JSON for what log lines often carry: numpy scalars and arrays, paths, enums, others by repr."""
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy scalars and arrays
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, enum.Enum):
        return value.value
    return repr(value)


def configure_logging(level: str = "INFO", *, json_lines: bool | None = None) -> None:
    """Configure structlog and stdlib logging once per process.

    ``json_lines=None`` picks console output when stderr is a terminal, JSON lines otherwise.
    ``level`` is one of ``LEVELS`` (any case); anything else raises ``ConfigError`` and changes
    nothing.
    """
    global _configured
    level_name = str(level).strip().upper()
    if level_name not in LEVELS:
        raise ConfigError(f"unknown log level {level!r}; use one of {', '.join(LEVELS)}")
    if json_lines is None:
        json_lines = not sys.stderr.isatty()
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer(default=_json_default)
        if json_lines
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info if json_lines else (lambda _l, _m, e: e),
            renderer,
        ],
    )
    handler = _NonBlockingHandler()
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_patchrig", False):
            root.removeHandler(old)
    handler._patchrig = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level_name)
    _configured = True


def get_logger(name: str, **bound: Any) -> Any:
    """A structlog logger named ``name`` with ``bound`` key/values (e.g. channel="A").

    The logger is lazy: it is assembled from the configuration in force when a line is logged,
    so a module-level logger made at import time (before ``configure_logging``) still follows
    the console/JSON choice of the process. (Calling ``.bind()`` on it assembles it then.)
    """
    return structlog.get_logger(name, **bound)


@contextlib.contextmanager
def operation(op: str, **bound: Any) -> Iterator[None]:
    """Within the block, every log line of this thread (or asyncio task) carries ``op=op`` and
    ``bound`` (e.g. ``channel="A"``), including stdlib lines of other libraries."""
    with structlog.contextvars.bound_contextvars(op=op, **bound):
        yield
