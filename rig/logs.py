"""structlog set-up: readable console lines on a terminal, JSON lines otherwise.

Standard-library logging of other libraries (pyzmq, the sensapex wrapper, matplotlib, ...) is
routed through the same processors, so one stream carries everything, in one format.

Where they apply, lines carry ``channel=`` (the manipulator channel) and ``op=`` (the operation):
bind them on a logger (``get_logger(name, channel="A")``) or, for everything logged by the
current thread or task inside a block, including stdlib lines of other libraries, use
``with operation("move_tip", channel="A"): ...``.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

import structlog

from rig.errors import ConfigError

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

_configured = False


class _CurrentStderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at emit time (survives stream redirection)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:  # noqa: ANN001
        pass


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
    handler = _CurrentStderrHandler()
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
