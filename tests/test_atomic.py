"""Atomic writes: the destination is replaced whole, or left untouched on error."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from rig.atomic import atomic_path, write_bytes_atomic, write_json_atomic, write_text_atomic


def test_writes_replace_whole_files(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.json"
    write_json_atomic(target, {"x": 1})
    assert json.loads(target.read_text()) == {"x": 1}
    write_text_atomic(target, "new")
    assert target.read_text() == "new"
    write_bytes_atomic(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert oct(os.stat(target).st_mode & 0o777) == "0o644"
    assert [p.name for p in target.parent.iterdir()] == ["a.json"]


def test_error_leaves_destination_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "keep.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer failed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_nan_is_refused_and_nothing_written(tmp_path: Path) -> None:
    target = tmp_path / "m.json"
    with pytest.raises(ValueError):
        write_json_atomic(target, {"x": float("nan")})
    assert not target.exists() and list(tmp_path.iterdir()) == []
