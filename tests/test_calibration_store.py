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


def _edit(section: str, key: str, value):  # type: ignore[no-untyped-def]
    def apply(document):  # type: ignore[no-untyped-def]
        target = document if section == "" else document[section]
        target[key] = value
    return apply


def _edit_history(key: str, value):  # type: ignore[no-untyped-def]
    def apply(document):  # type: ignore[no-untyped-def]
        document["offset_history"][0][key] = value
    return apply


NAN = float("nan")


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (_edit("calibration", "anchor_var_um2", NAN), "anchor_var_um2"),
        (_edit("calibration", "residual_um", NAN), "residual_um"),
        (_edit("calibration", "z_up_sign", NAN), "z_up_sign"),
        (_edit("calibration", "z_up_sign", 0.5), "z_up_sign"),
        (_edit("calibration", "created_s", NAN), "created_s"),
        (_edit("calibration", "matrix_cov_um2_per_um2", [[[NAN] * 4] * 4] * 2), "matrix_cov"),
        (_edit("calibration", "matrix_cov_um2_per_um2", [1e-6] * 32), "matrix_cov"),  # flat: no reshaping
        (_edit("calibration", "anchor_position_um", [[0.0]] * 4), "anchor_position_um"),  # a column
        (_edit("calibration", "anchor_position_um", [NAN, 0.0, 0.0, 0.0]), "anchor_position_um"),
        (_edit("calibration", "offset_um", ["1", "2", "3"]), "offset_um"),
        (_edit("calibration", "offset_um", [True, 0, 0]), "offset_um"),
        (_edit("calibration", "matrix_um_per_um", [[1e4, 2e4, 3e4, 0], [4e4, 5e4, 6e4, 0], [7e4, 8e4, 9e4, 0]]), "singular"),
        (_edit("calibration", "matrix_um_per_um", [[1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 1e-6, 0]]), "singular"),
        (_edit("calibration", "n_axes", 3), "n_axes"),
        (_edit("calibration", "n_points", -1), "n_points"),
        (_edit("calibration", "n_inliers", 99), "inliers"),
        (_edit("calibration", "anchor_var_um2", -0.5), "anchor_var_um2"),
        (_edit("calibration", "channel", "B"), "channel 'B'"),
        (_edit("", "version", True), "version"),
        (_edit("", "version", 1.0), "version"),
        (_edit_history("offset_um", [NAN, 0.0, 0.0]), r"offset_history\[0\]"),
        (_edit_history("t_s", "yesterday"), r"offset_history\[0\]"),
        (_edit("", "offset_history", {"a": 1}), "offset_history"),
        (_edit("calibration", "anchor_var_um2", 10**400), "anchor_var_um2"),  # too large for a float
        (_edit("calibration", "offset_um", [10**400, 0, 0]), "offset_um"),
        (_edit("calibration", "matrix_cov_um2_per_um2", [[[-1.0 if i == j else 0.0 for j in range(4)] for i in range(4)]] * 2),
         "positive semi-definite"),  # negative variances: the uncertainty would read 0 µm
        (_edit("calibration", "matrix_cov_um2_per_um2", [[[1.0, 2.0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0],
                                                          [0, 0, 0, 1.0]]] * 2), "positive semi-definite"),
    ],
)
def test_a_hand_edited_or_damaged_file_is_refused_and_left_alone(tmp_path, edit, words):
    """Every value of a calibration file is checked at load: a NaN, a string, a boolean, a
    reshaped array or a near-singular matrix is refused naming the field, never used (a NaN
    loaded once made every later save of the channel fail)."""
    store = CalibrationStore(tmp_path, RIG)
    path = store.save("A", _stored())
    document = json.loads(path.read_text())
    edit(document)
    text = json.dumps(document)  # NaN is written as NaN, as a hand edit could
    path.write_text(text)
    with pytest.raises(DataError, match=words):
        store.load("A")
    assert path.read_text() == text


def test_a_number_too_long_for_json_is_refused_naming_the_file(tmp_path):
    """Python refuses integers of more than 4,300 digits: that, too, is a damaged file (it
    stopped the daemon from starting), not a crash."""
    store = CalibrationStore(tmp_path, RIG)
    path = store.save("A", _stored())
    text = path.read_text().replace('"residual_um": ', '"residual_um": 1' + "0" * 5000 + ", \"x\": ", 1)
    path.write_text(text)
    with pytest.raises(DataError, match=f"calibration file {path} is unreadable"):
        store.load("A")
    assert path.read_text() == text


def test_a_refused_file_is_set_aside_not_overwritten(tmp_path):
    """A file refused at load (here: made with another objective) is kept beside the new
    calibration the first time the channel is saved again."""
    other = CalibrationStore(tmp_path, RigIdentity(name="rig-1", objective="40x/0.8", um_per_px=0.62))
    old_text = other.save("A", _stored((7.0, 7.0, 7.0))).read_text()
    store = CalibrationStore(tmp_path, RIG)
    with pytest.raises(NotCalibrated):
        store.load("A")
    aside = store.set_aside("A")
    assert aside is not None and aside.name.startswith("A.refused-") and aside.read_text() == old_text
    assert not (tmp_path / "A.json").exists()
    assert store.set_aside("A") is None
    store.save("A", _stored())
    assert store.load("A") is not None and aside.read_text() == old_text
