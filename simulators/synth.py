"""Synthetic labelled examples and datasets (``patchrig data synth``).

``sample_example(seed)`` draws one random scene (``simulators.scene.sample_scene``) and renders
it with exact Poisson-Gaussian detector noise; it is deterministic per seed and cheap enough to
call on the fly in a training loop. ``synthesise_dataset`` writes N of them as a patchrig-tips/1
dataset, rendering on several processes, into a temporary directory that is renamed into place
only when complete (labels.json written last, atomically).
"""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from localisation.dataset_format import (
    TipDataset,
    new_dataset_directory,
    read_dataset,
    write_image,
    write_labels,
)
from rig.errors import DataError
from simulators.scene import DOMAINS, averaged_scene, render_scene, sample_scene


@dataclass(frozen=True)
class SyntheticExample:
    """One labelled synthetic frame.

    ``pixels``: (h, w) uint8 or uint16; ``tips_px``: (n, 2) float64 x, y of the VISIBLE tips
    (pixel-centre convention); ``um_per_px``: pixel size; ``meta``: domain, seed, bit depth,
    style, and every pipette's tip with its visibility and reason (``all_tips``).
    """

    pixels: np.ndarray
    tips_px: np.ndarray
    um_per_px: float
    meta: dict[str, Any] = field(default_factory=dict)


MAX_TIPS = 32  # pipettes per synthetic image (a real rig holds at most 4-8)

def sample_example(
    seed: int,
    *,
    domain: str = "in_vivo",
    n_tips: tuple[int, int] = (0, 6),
    um_per_px: float | tuple[float, float] = (0.35, 1.0),
    size_px: int = 512,
    frames_averaged: int = 1,
) -> SyntheticExample:
    """Render one random labelled frame; the same arguments always give the same example.
    ``frames_averaged`` > 1: the frame is the mean of that many frames of the same still scene
    (``averaged_scene``): the same scene and pipettes, less detector noise, so some tips too
    faint to label in one frame become visible."""
    rng = np.random.default_rng(seed)
    scene = averaged_scene(
        sample_scene(rng, domain=domain, n_tips=n_tips, um_per_px=um_per_px, size_px=size_px), frames_averaged
    )
    pixels, labels = render_scene(scene, rng)
    visible = [(lab.x_px, lab.y_px) for lab in labels if lab.visible]
    all_tips = [
        {
            "x": round(lab.x_px, 4),
            "y": round(lab.y_px, 4),
            "defocus_um": round(lab.defocus_um, 3),
            "visible": lab.visible,
            "reason": lab.reason,
            "cnr": None if lab.cnr is None else round(lab.cnr, 2),
            "azimuth_deg": round(p.azimuth_deg % 360.0, 2),
        }
        for lab, p in zip(labels, scene.pipettes, strict=True)
    ]
    meta = {
        "domain": domain,
        "seed": int(seed),
        "bit_depth": scene.sensor.bit_depth,
        "style": scene.style,
        "photons_per_unit": round(scene.sensor.photons_per_unit, 3),
        "all_tips": all_tips,
    }
    return SyntheticExample(
        pixels=pixels,
        tips_px=np.asarray(visible, dtype=np.float64).reshape(-1, 2),
        um_per_px=scene.optics.um_per_px,
        meta=meta,
    )


def example_seed(seed: int, index: int) -> int:
    """The seed of example ``index`` of a dataset with master ``seed`` (independent streams)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint32)[0])


@dataclass(frozen=True)
class _Job:
    root: str
    index: int
    seed: int
    domain: str
    n_tips: tuple[int, int]
    um_per_px: tuple[float, float]
    size_px: int
    frames_averaged: int


def _render_job(job: _Job) -> dict[str, Any]:
    ex = sample_example(
        job.seed, domain=job.domain, n_tips=job.n_tips, um_per_px=job.um_per_px, size_px=job.size_px,
        frames_averaged=job.frames_averaged,
    )
    file = f"images/{job.index:06d}.png"
    write_image(Path(job.root) / file, ex.pixels)
    return {
        "file": file,
        "um_per_px": ex.um_per_px,
        "tips": ex.tips_px.tolist(),
        **{k: v for k, v in ex.meta.items()},
    }


class _Progress(tqdm):  # type: ignore[type-arg]
    """tqdm without its monitor thread (it would outlive the job)."""

    monitor_interval = 0


def _worker_init() -> None:
    cv2.setNumThreads(1)


def synthesise_dataset(
    out_dir: str | Path,
    n: int,
    seed: int,
    domain: str = "in_vivo",
    tips_range: tuple[int, int] = (0, 6),
    workers: int = 2,
    *,
    um_per_px: tuple[float, float] = (0.35, 1.0),
    size_px: int = 512,
    frames_averaged: int = 1,
    progress: bool = True,
) -> TipDataset:
    """Write ``n`` synthetic examples to ``out_dir`` as patchrig-tips/1, on ``workers``
    processes, with a progress bar. ``out_dir`` must not exist or be empty; it appears only
    when the dataset is complete. Deterministic per ``seed`` whatever ``workers`` is.
    ``frames_averaged``: each image the mean of that many frames of its scene (see
    ``sample_example``; the same seed gives the same scenes), recorded in the dataset's meta."""
    out = Path(out_dir)
    if domain not in DOMAINS:
        raise DataError(f"domain must be one of {DOMAINS}, got {domain!r}")
    if n < 1:
        raise DataError(f"n must be at least 1, got {n}")
    if int(frames_averaged) != frames_averaged or frames_averaged < 1:
        raise DataError(f"frames averaged must be a whole number >= 1, got {frames_averaged}")
    lo, hi = int(tips_range[0]), int(tips_range[1])
    if lo < 0 or hi < lo or hi > MAX_TIPS:
        raise DataError(f"tips range must be MIN-MAX with 0 <= MIN <= MAX <= {MAX_TIPS}, got {lo}-{hi}")
    with new_dataset_directory(out) as tmp:
        (tmp / "images").mkdir()
        jobs = [
            _Job(str(tmp), i, example_seed(seed, i), domain, (lo, hi), tuple(um_per_px), size_px, int(frames_averaged))  # type: ignore[arg-type]
            for i in range(n)
        ]
        entries: list[dict[str, Any]] = []
        bar = _Progress(total=n, desc=f"synth {domain}", unit="img", disable=not progress)
        try:
            if workers <= 1 or n < 4:
                for job in jobs:
                    entries.append(_render_job(job))
                    bar.update(1)
            else:
                ctx = multiprocessing.get_context("forkserver")
                with ctx.Pool(min(workers, os.cpu_count() or 1), initializer=_worker_init) as pool:
                    for entry in pool.imap(_render_job, jobs, chunksize=4):
                        entries.append(entry)
                        bar.update(1)
        finally:
            bar.close()
        meta = {
            "generator": "patchrig data synth",
            "domain": domain,
            "seed": int(seed),
            "n": int(n),
            "tips_range": [lo, hi],
            "um_per_px_range": [float(um_per_px[0]), float(um_per_px[1])],
            "frames_averaged": int(frames_averaged),
        }
        write_labels(tmp, entries, meta=meta)
    return read_dataset(out)
