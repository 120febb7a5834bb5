"""How well could ANY localiser do on a synthetic set? A per-tip bound from the simulator's truth.

    python -m localisation.localisation_bound --data runs/testset-779-v3 --out runs/eval/bound.json \\
        [--checkpoint default] [--figure runs/eval/bound.png]

Diagnostics only: nothing here changes a model. For every labelled tip of a synthetic
``patchrig-tips/1`` set (``patchrig data synth``: each image records its seed), the scene is
rebuilt from its seed (and checked against the stored labels), and compared with ONE
alternative scene: the same frame with that pipette ending ``RETRACT_UM`` (10.5 µm) further up
its own shank (``retracted``: the glass beyond the new tip, every other pipette, the background
and the dye cloud unchanged; only the last 10.5 µm of glass is gone and the tip's dye spot sits
at the new end). Their tips lie more than 10 µm apart, so no answer is within 5 µm of both.

An observer who knows everything about the frame, noise-free, except which of the two scenes
it is looking at, decides best by the likelihood ratio. Its discriminability is
``d' = sqrt(sum((e1 - e0)^2 / var))`` over the frame, in photons (``var``: shot noise of e0 plus
read noise; contrast above the detector's full scale does not count, as for the CNR), and with
both scenes equally likely it still errs with probability ``Phi(-d'/2)``. Every simplification
here (no scan-line noise, interference, smear or background clutter; the whole scene known)
makes that observer stronger than any real localiser, so ``Phi(-d'/2)`` is a lower bound on the
error of the two-way choice: over such a pair of equally likely scenes, no localiser puts the
tip within 5 µm more often than ``1 - Phi(-d'/2)`` on average. The mean over the tips is
therefore a floor (under this idealisation) on the share of tips any localiser misplaces.

With ``--checkpoint`` the localiser's own result (matched to a detection within 5 µm at its
threshold, as ``evaluate`` matches) is recorded per tip too, so the report shows where it falls short of what the frames allow.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import ndtr

from localisation.dataset_format import TipRecord, load_image, read_dataset
from localisation.metrics import CNR_BAND_NAMES, cnr_band, gated_pairs
from localisation.progress import bar
from rig.atomic import write_json_atomic
from rig.errors import DataError

RETRACT_UM = 10.5  # in-plane distance from the true tip to the alternative's (> 2 x 5 µm)
D_PRIME_BANDS = (0.0, 4.0, 8.0, 16.0, 32.0)  # lower edges of the per-tip report bands


def retracted(pipette: Any, back_um: float) -> Any:
    """``pipette`` (``simulators.render.Pipette``) ending ``back_um`` µm (in the focal plane)
    further up its own shank: the new tip lies on the same axis (it rises with the elevation),
    its opening is the cone's radius there, so the glass beyond it is unchanged; the tip's dye
    spot moves with the tip; the ejected dye cloud stays where it was."""
    az = math.radians(pipette.azimuth_deg)
    el = math.radians(pipette.elevation_deg)
    dx, dy = back_um * math.cos(az), back_um * math.sin(az)
    along_um = back_um / math.cos(el)  # 3-D distance along the axis
    x, y, z = pipette.tip_um
    return replace(
        pipette,
        tip_um=(x + dx, y + dy, z + back_um * math.tan(el)),
        tip_radius_um=pipette.tip_radius_um + along_um * math.tan(math.radians(pipette.half_angle_deg)),
        cloud_offset_um=(pipette.cloud_offset_um[0] - dx, pipette.cloud_offset_um[1] - dy),
    )


def discriminability(expected: np.ndarray, alternative: np.ndarray, sensor: Any) -> float:
    """d' of two noiseless expected frames (background units) for an ideal observer: the
    Gaussian approximation of the Poisson likelihood ratio, sqrt(sum((e1 - e0)^2 / var)) in
    photons, ``var`` = shot noise of ``expected`` + read noise. Both are clipped at the
    detector's full scale first (saturated contrast is lost)."""
    from simulators.render import full_scale_units

    k = float(sensor.photons_per_unit)
    full_scale = full_scale_units(sensor)
    e0 = np.minimum(expected, full_scale).astype(np.float64)
    e1 = np.minimum(alternative, full_scale).astype(np.float64)
    changed = e0 != e1
    diff = (e1[changed] - e0[changed]) * k
    var = np.maximum(e0[changed] * k, 0.0) + (sensor.read_noise_adu / max(sensor.gain_adu, 1e-9)) ** 2 + 1e-6
    return float(math.sqrt(float((diff * diff / var).sum())))


def rebuild_scene(record: TipRecord, meta: dict[str, Any], shape_hw: tuple[int, int]) -> Any:
    """The scene of one synthetic record, drawn again from its seed with the dataset's ranges
    and the image's size ``shape_hw``, seen through the dataset's ``frames_averaged`` (1 when
    not recorded) as ``simulators.synth.sample_example`` draws it."""
    from simulators.scene import averaged_scene, sample_scene

    seed = record.extra.get("seed")
    if seed is None or "tips_range" not in meta or "um_per_px_range" not in meta:
        raise DataError(f"{record.file}: not a `patchrig data synth` image (no seed or ranges recorded)")
    h, w = shape_hw
    scene = sample_scene(
        np.random.default_rng(int(seed)),
        domain=str(meta.get("domain", "in_vivo")),
        n_tips=(int(meta["tips_range"][0]), int(meta["tips_range"][1])),
        um_per_px=(float(meta["um_per_px_range"][0]), float(meta["um_per_px_range"][1])),
        size_px=(int(h), int(w)),
    )
    return averaged_scene(scene, int(meta.get("frames_averaged", 1)))


def frame_bounds(
    record: TipRecord, meta: dict[str, Any], shape_hw: tuple[int, int], back_um: float = RETRACT_UM
) -> list[dict[str, Any]]:
    """Per labelled tip of one record whose image is ``shape_hw`` (height, width) pixels, in the
    record's order: its d', the two-way error bound ``Phi(-d'/2)`` and its CNR. DataError if
    the rebuilt scene's visible tips are not the record's labels (a dataset not made by this
    simulator version)."""
    from simulators.scene import expected_image, render_background, scene_labels, with_pipettes

    scene = rebuild_scene(record, meta, shape_hw)
    background = render_background(scene.background, scene.optics)
    expected, references = expected_image(scene, background)
    labels = scene_labels(scene, expected, references)
    visible = [(i, lab) for i, lab in enumerate(labels) if lab.visible]
    rebuilt = np.array([[lab.x_px, lab.y_px] for _, lab in visible], dtype=np.float64).reshape(-1, 2)
    tips = np.asarray(record.tips_px, dtype=np.float64).reshape(-1, 2)
    if rebuilt.shape != tips.shape or not np.allclose(rebuilt, tips, atol=1e-3):
        raise DataError(f"{record.file}: the scene rebuilt from seed {record.extra.get('seed')} does not match its "
                        "labels (made by another simulator version?)")
    out = []
    for i, lab in visible:
        pipettes = list(scene.pipettes)
        pipettes[i] = retracted(pipettes[i], back_um)
        alternative, _ = expected_image(with_pipettes(scene, tuple(pipettes)), background)
        d_prime = discriminability(expected, alternative, scene.sensor)
        out.append({"d_prime": d_prime, "error_bound": float(ndtr(-d_prime / 2.0)),
                    "cnr": None if lab.cnr is None else float(lab.cnr)})
    return out


def d_prime_band(d_prime: float) -> str:
    """The report band of a d' ("0-4", ..., "32+")."""
    edges = D_PRIME_BANDS
    for lo, hi in zip(edges, edges[1:], strict=False):
        if lo <= d_prime < hi:
            return f"{lo:g}-{hi:g}"
    return f"{edges[-1]:g}+"


def summarise(per_tip: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over tips: the mean two-way error bound (the share of tips even the ideal observer
    misplaces), the share at each d' band and, when recorded, the localiser's share found."""

    def block(rows: list[dict[str, Any]]) -> dict[str, Any]:
        found = [r["found"] for r in rows if "found" in r]
        return {
            "tips": len(rows),
            "ideal_error_bound": float(np.mean([r["error_bound"] for r in rows])) if rows else None,
            "localiser_found": float(np.mean(found)) if found else None,
        }

    bands: dict[str, list[dict[str, Any]]] = {}
    cnr_bands: dict[str, list[dict[str, Any]]] = {}
    for r in per_tip:
        bands.setdefault(d_prime_band(r["d_prime"]), []).append(r)
        if r["cnr"] is not None:
            cnr_bands.setdefault(cnr_band(r["cnr"]), []).append(r)
    order = [d_prime_band(lo + 1e-9) for lo in D_PRIME_BANDS]
    return {
        "overall": block(per_tip),
        "by_d_prime": {b: block(bands[b]) for b in order if b in bands},
        "by_cnr": {b: block(cnr_bands[b]) for b in CNR_BAND_NAMES if b in cnr_bands},
    }


def localiser_found(loc: Any, pixels: np.ndarray, record: TipRecord, tolerance_um: float = 5.0) -> list[bool]:
    """Per labelled tip of ``record`` (image ``pixels``): is it matched to a detection of ``loc``
    (a ``TipLocaliser``, at its own threshold) within ``tolerance_um``? Matched one to one as
    ``evaluate`` matches (``metrics.gated_pairs``), so the share found is its accuracy."""
    dets = loc.locate(pixels, record.um_per_px)
    pred_um = np.array([[d.x_px, d.y_px] for d in dets], dtype=np.float64).reshape(-1, 2) * record.um_per_px
    true_um = np.asarray(record.tips_px, dtype=np.float64).reshape(-1, 2) * record.um_per_px
    found = np.zeros(len(true_um), dtype=bool)
    _, cols, dist = gated_pairs(pred_um, true_um, tolerance_um)
    found[cols[dist <= tolerance_um]] = True
    return found.tolist()


def plot(result: dict[str, Any], path: Path) -> None:
    """Bars per d' band: the most the ideal observer can place within 5 µm (1 - its error bound)
    and, when recorded, the localiser's share found; the tip count over each band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bands = result["summary"]["by_d_prime"]
    names = list(bands)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(6.4, 3.4), dpi=110)
    ideal = [100 * (1 - bands[b]["ideal_error_bound"]) for b in names]
    ax.bar(x - 0.2, ideal, 0.4, label="ideal observer that knows the rest of the scene", color="#9ab")
    if all(bands[b]["localiser_found"] is not None for b in names):
        ax.bar(x + 0.2, [100 * bands[b]["localiser_found"] for b in names], 0.4, label="localiser (within 5 µm)",
               color="#d62")
    for xi, b in zip(x, names, strict=True):
        ax.text(float(xi), 102, f"n={bands[b]['tips']}", ha="center", fontsize=7)
    ax.set_xticks(x, [f"d' {b}" for b in names])
    ax.set_ylim(0, 128)
    ax.set_ylabel("% of tips")
    ax.set_title(f"tips by discriminability from a {result['retract_um']:g} µm shorter pipette", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", ncol=2, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def analyse(data: Path, *, checkpoint: str | None = None, limit: int | None = None, threads: int = 2,
            progress: bool = True) -> dict[str, Any]:
    """The report of the module docstring for the dataset ``data`` (first ``limit`` images)."""
    ds = read_dataset(data)
    records = ds.records[:limit]
    loc = None
    if checkpoint is not None:
        from localisation.inference import TipLocaliser

        loc = TipLocaliser.load(None if checkpoint == "default" else checkpoint, threads=threads)
    per_tip: list[dict[str, Any]] = []
    for index, record in enumerate(bar(records, enabled=progress, desc="ideal observer", unit="image")):
        pixels = load_image(record)
        rows = frame_bounds(record, ds.meta, pixels.shape[:2])
        if loc is not None:
            for row, hit in zip(rows, localiser_found(loc, pixels, record), strict=True):
                row["found"] = hit
        for j, row in enumerate(rows):
            per_tip.append({"image": index, "tip": j, **row})
    if not per_tip:
        raise DataError(f"{data}: no labelled tips")
    return {"data": str(data), "images": len(records), "retract_um": RETRACT_UM,
            "checkpoint": None if loc is None else loc.checkpoint, "summary": summarise(per_tip), "per_tip": per_tip}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m localisation.localisation_bound",
        description="How well could any localiser do on a synthetic set? Per tip, the ideal observer's "
                    "error bound against a pipette 10.5 µm shorter (see the module docstring).",
    )
    parser.add_argument("--data", type=Path, required=True, help="a `patchrig data synth` dataset")
    parser.add_argument("--out", type=Path, required=True, help="report (JSON)")
    parser.add_argument("--checkpoint", help="also record this localiser's result per tip ('default': the shipped one)")
    parser.add_argument("--figure", type=Path, help="bar chart by d' band (PNG)")
    parser.add_argument("--limit", type=int, help="first N images only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        result = analyse(args.data, checkpoint=args.checkpoint, limit=args.limit, threads=args.threads,
                         progress=not args.no_progress)
    except DataError as exc:
        print(f"error: {exc}")
        return 1
    write_json_atomic(args.out, result)
    if args.figure is not None:
        plot(result, args.figure)
    s = result["summary"]
    print(f"{s['overall']['tips']} tips; ideal observer misplaces at least {100 * s['overall']['ideal_error_bound']:.2g} %")
    for name, block in s["by_d_prime"].items():
        found = "" if block["localiser_found"] is None else f", localiser finds {100 * block['localiser_found']:.1f} %"
        print(f"  d' {name}: {block['tips']} tips, ideal misplaces >= {100 * block['ideal_error_bound']:.2g} %{found}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
