"""Shared helpers of the command-line tests: a refused command says why in exactly one line;
commands stopped with Ctrl-C get it whatever shell runs the tests."""

from __future__ import annotations

import signal

import pytest


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    """The command's stderr, asserted to be exactly one line (bad input gets one clear line,
    not a traceback)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def ctrl_c_reaches_the_child() -> None:
    """``preexec_fn`` for a command that a test stops with SIGINT: SIGINT at its default, as in
    a process started from a terminal. A shell that runs the test suite in the background
    (``cmd &`` without job control) starts it with SIGINT ignored, and every child inherits
    that, so Ctrl-C would never reach the command under test."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
