"""Shared helper of the command-line tests: a refused command says why in exactly one line."""

from __future__ import annotations

import pytest


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    """The command's stderr, asserted to be exactly one line (bad input gets one clear line,
    not a traceback)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]
