"""Calibration persistence: atomic versioned JSON per channel, reload, refusal for another rig."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from calibration.store import FORMAT, VERSION, CalibrationStore, StoredCalibration
from calibration.transform import ChannelCalibration
from config.models import RigIdentity
from rig.errors import DataError, NotCalibrated

RIG = RigIdentity(name="rig-1", objective="25x/1.05", um_per_px=0.62)


def _stored(offset=(1.0, 2.0, 3.0)) -> StoredCalibration:
    cal = ChannelCalibration(
        channel="A",
        matrix=np.array([[0.9, -0.4, 0.01, 0.8], [0.4, 0.9, 0.02, 0.1], [0.0, 0.0, 1.0, -0.45]]),
        offset_um=np.array(offset),
        matrix_cov=np.full((2, 4, 4), 1e-6),
        anchor_position_um=np.full(4, 10000.0),
        anchor_var_um2=0.02,
        residual_um=0.31,
        n_points=15,
        n_inliers=14,
        z_model="assumed",
        z_up_sign=-1.0,
    )
    stored = StoredCalibration(cal)
    stored.record("calibrate")
    return stored


def test_save_and_reload(tmp_path):
    store = CalibrationStore(tmp_path, RIG)
    path = store.save("A", _stored())
    document = json.loads(path.read_text())
    assert document["format"] == FORMAT and document["version"] == VERSION
    assert document["rig"] == {"name": "rig-1", "objective": "25x/1.05", "um_per_px": 0.62}
    again = CalibrationStore(tmp_path, RIG).load("A")
    assert again is not None
    np.testing.assert_allclose(again.calibration.matrix, _stored().calibration.matrix)
    np.testing.assert_allclose(again.calibration.offset_um, [1.0, 2.0, 3.0])
    assert again.calibration.z_up_sign == -1.0
    assert [h["source"] for h in again.offset_history] == ["calibrate"]
    assert store.load("B") is None


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    store = CalibrationStore(tmp_path, RIG)
    store.save("A", _stored((1.0, 1.0, 1.0)))
    before = (tmp_path / "A.json").read_text()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        store.save("A", _stored((9.0, 9.0, 9.0)))
    monkeypatch.undo()
    assert (tmp_path / "A.json").read_text() == before  # the old calibration is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["A.json"]  # no temp file left


@pytest.mark.parametrize(
    ("other", "words"),
    [
        (RigIdentity(name="rig-2", objective="25x/1.05", um_per_px=0.62), "rig 'rig-1'"),
        (RigIdentity(name="rig-1", objective="16x/0.8", um_per_px=0.62), "objective '25x/1.05'"),
        (RigIdentity(name="rig-1", objective="25x/1.05", um_per_px=0.5), "pixel size 0.62"),
    ],
)
def test_other_rig_objective_or_pixel_size_is_refused(tmp_path, other, words):
    CalibrationStore(tmp_path, RIG).save("A", _stored())
    before = (tmp_path / "A.json").read_bytes()
    with pytest.raises(NotCalibrated, match="made for") as info:
        CalibrationStore(tmp_path, other).load("A")
    assert words in str(info.value)
    assert (tmp_path / "A.json").read_bytes() == before


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("{not json", "unreadable"),
        ("[1, 2]", "not a JSON object"),
        (json.dumps({"format": "something-else", "version": 1}), "format"),
        (json.dumps({"format": FORMAT, "version": 99}), "version 99"),
    ],
)
def test_corrupt_file_gives_clear_error_and_is_left_alone(tmp_path, text, words):
    (tmp_path / "A.json").write_text(text)
    with pytest.raises(DataError, match=words) as info:
        CalibrationStore(tmp_path, RIG).load("A")
    assert "A.json" in str(info.value)
    assert (tmp_path / "A.json").read_text() == text


def test_malformed_calibration_section_names_the_file(tmp_path):
    store = CalibrationStore(tmp_path, RIG)
    path = store.save("A", _stored())
    document = json.loads(path.read_text())
    del document["calibration"]["offset_um"]
    path.write_text(json.dumps(document))
    with pytest.raises(DataError, match="offset_um"):
        store.load("A")


def test_bad_channel_name_rejected(tmp_path):
    from rig.errors import InvalidParams

    with pytest.raises(InvalidParams):
        CalibrationStore(tmp_path, RIG).path("../evil")
