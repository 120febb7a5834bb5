"""The ideal-observer bound (localisation/localisation_bound.py): the alternative pipette, d',
scenes rebuilt from their seeds, the report and its refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.special import ndtr

from localisation.dataset_format import load_image, read_dataset, write_dataset
from localisation.localisation_bound import (
    RETRACT_UM,
    discriminability,
    frame_bounds,
    main,
    retracted,
)
from rig.errors import DataError
from simulators.render import Optics, Pipette, Sensor, render_pipettes
from simulators.synth import sample_example, synthesise_dataset


@pytest.fixture(scope="module")
def synth_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four `patchrig data synth` frames (1-3 tips, 256 px): each image records its seed."""
    root = tmp_path_factory.mktemp("bound") / "ds"
    synthesise_dataset(root, 4, seed=5, tips_range=(1, 3), workers=1, size_px=256, progress=False)
    return root


def test_the_alternative_ends_further_up_the_same_shank_with_the_glass_beyond_unchanged() -> None:
    p = Pipette(tip_um=(0.0, 0.0, 0.0), azimuth_deg=30.0, elevation_deg=25.0, tip_radius_um=0.7, half_angle_deg=5.0,
                shadow=0.6, tip_spot=0.5, cloud=0.4, cloud_offset_um=(3.0, -2.0))
    q = retracted(p, RETRACT_UM)
    dx, dy = q.tip_um[0] - p.tip_um[0], q.tip_um[1] - p.tip_um[1]
    assert math.hypot(dx, dy) == pytest.approx(RETRACT_UM)
    assert math.degrees(math.atan2(dy, dx)) == pytest.approx(30.0)  # toward the shank
    assert q.tip_um[2] - p.tip_um[2] == pytest.approx(RETRACT_UM * math.tan(math.radians(25.0)))
    # the cloud stays where it was; the opening is the cone's radius at the new tip
    assert (q.tip_um[0] + q.cloud_offset_um[0], q.tip_um[1] + q.cloud_offset_um[1]) == pytest.approx((3.0, -2.0))
    along = RETRACT_UM / math.cos(math.radians(25.0))
    assert q.tip_radius_um == pytest.approx(0.7 + along * math.tan(math.radians(5.0)))
    # rendered: the glass differs near the old tip only; farther up the shank it is the same
    optics = Optics(size_px=(200, 200), um_per_px=0.5)
    a, b = render_pipettes([p], optics), render_pipettes([q], optics)
    yy, xx = np.mgrid[0:200, 0:200].astype(np.float64)
    u = ((xx - 99.5) * math.cos(math.radians(30.0)) + (yy - 99.5) * math.sin(math.radians(30.0))) * 0.5  # µm along
    far = u > RETRACT_UM + 6.0
    assert np.abs(a.transmission - b.transmission)[far].max() < 1e-3
    assert np.abs(a.transmission - b.transmission)[~far].max() > 0.05
    np.testing.assert_allclose(a.cloud, b.cloud, atol=1e-5)


def test_discriminability_is_the_photon_snr_of_the_difference() -> None:
    sensor = Sensor(photons_per_unit=4.0, gain_adu=40.0, read_noise_adu=20.0, offset_adu=200.0, bit_depth=16)
    e0 = np.full((10, 10), 2.0, np.float32)
    assert discriminability(e0, e0.copy(), sensor) == 0.0
    e1 = e0.copy()
    e1[3, 4] += 0.5
    e1[6, 6] -= 0.25
    var = 2.0 * 4.0 + (20.0 / 40.0) ** 2  # photons
    expected = math.sqrt(((0.5 * 4.0) ** 2 + (0.25 * 4.0) ** 2) / var)
    assert discriminability(e0, e1, sensor) == pytest.approx(expected, rel=1e-5)
    # contrast above the detector's full scale does not count
    top = np.full((4, 4), 1e6, np.float32)
    brighter = top.copy()
    brighter[0, 0] *= 2
    assert discriminability(top, brighter, sensor) == 0.0


def test_frame_bounds_rebuild_each_scene_from_its_seed(synth_dataset: Path) -> None:
    ds = read_dataset(synth_dataset)
    total = 0
    for rec in ds.records:
        rows = frame_bounds(rec, ds.meta, load_image(rec).shape[:2])
        assert len(rows) == len(rec.tips_px)
        total += len(rows)
        for row in rows:
            assert row["d_prime"] > 0
            assert row["error_bound"] == pytest.approx(float(ndtr(-row["d_prime"] / 2)))
            assert row["cnr"] is not None and row["cnr"] >= 6.0  # labelled tips are visible
    assert total > 0
    # a record whose seed is not its scene's is refused
    rec = ds.records[0]
    rec.extra["seed"] = int(rec.extra["seed"]) + 1
    with pytest.raises(DataError, match="does not match its labels"):
        frame_bounds(rec, ds.meta, load_image(rec).shape[:2])


def test_frame_bounds_rebuild_a_frame_averaged_dataset(tmp_path: Path) -> None:
    """A `data synth --frames-averaged` set is rebuilt through its recorded K (more tips are
    visible than in one frame, so a rebuild ignoring K would not match its labels)."""
    root = tmp_path / "avg"
    synthesise_dataset(root, 3, seed=5, tips_range=(2, 3), workers=1, size_px=256, frames_averaged=16, progress=False)
    ds = read_dataset(root)
    for rec in ds.records:
        assert len(frame_bounds(rec, ds.meta, load_image(rec).shape[:2])) == len(rec.tips_px)


def test_cli_reports_per_band_and_refuses_a_dataset_without_seeds(tmp_path: Path, synth_dataset: Path) -> None:
    out = tmp_path / "bound.json"
    fig = tmp_path / "bound.png"
    assert main(["--data", str(synth_dataset), "--out", str(out), "--figure", str(fig), "--checkpoint", "default",
                 "--threads", "1", "--no-progress"]) == 0
    doc = json.loads(out.read_text())
    n_tips = sum(len(r.tips_px) for r in read_dataset(synth_dataset).records)
    assert doc["summary"]["overall"]["tips"] == n_tips == len(doc["per_tip"])
    assert sum(b["tips"] for b in doc["summary"]["by_d_prime"].values()) == n_tips
    by_cnr = doc["summary"]["by_cnr"]
    assert sum(b["tips"] for b in by_cnr.values()) == n_tips  # every labelled tip has a CNR
    assert list(by_cnr) == [b for b in ("<10", "10-20", "20-40", "40+") if b in by_cnr]  # faint to bright
    found = [r["found"] for r in doc["per_tip"]]
    assert doc["summary"]["overall"]["localiser_found"] == pytest.approx(np.mean(found))
    assert doc["summary"]["overall"]["ideal_error_bound"] == pytest.approx(np.mean([r["error_bound"] for r in doc["per_tip"]]))
    assert fig.stat().st_size > 1000
    # a hand-made dataset (no seeds recorded) gets a clear error and no report
    plain = tmp_path / "plain"
    ex = sample_example(7, n_tips=(1, 1), size_px=128)
    write_dataset(plain, [("images/000000.png", ex.pixels, ex.um_per_px, ex.tips_px)])
    assert main(["--data", str(plain), "--out", str(tmp_path / "no.json"), "--no-progress"]) == 1
    assert not (tmp_path / "no.json").exists()
