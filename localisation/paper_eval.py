"""The paper study: train the paper's model, its Table II baselines and its Table IV ablations
briefly on the same synthetic data, and evaluate them (and the classical detector) on one test
set with the shared metrics.

Every model sees frames prepared the same way (``study_image``): the 512x512 frame is resized
to 256x256 and normalised (the paper's input), optionally passed through the CycleGAN denoiser
there (the scale it was trained at: 80x80 crops of 256x256 frames), then resized to the study's
``input_size`` (128 on CPU) and normalised again. Training and validation frames are written
once as ``patchrig-tips/1`` datasets of such images (labels follow the resampling) and trained
with the shared trainer (``localisation.train``: the configuration's stages, plateau halving,
checkpoints). At test time ``StudyLocaliser`` (a ``TipLocaliser`` whose ``prepare`` is
``study_image``) runs on the raw test frames, so the metrics are in the input's pixels and µm.

Run: ``python -m localisation.paper_eval --out DIR --denoiser localisation/checkpoints/cyclegan-small.pt``
(``--help`` for the knobs). Results: ``DIR/results.json`` and ``DIR/tables.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import cv2
import numpy as np
import torch
from torch import nn

from localisation.configs import LocaliserConfig, Stage, get_config
from localisation.dataset_format import TipRecord, load_image, read_dataset, write_dataset
from localisation.evaluation import EvaluatedModel, evaluate
from localisation.inference import TipLocaliser
from localisation.models.cyclegan import Denoiser
from localisation.models.paper import PaperModel
from localisation.preprocess import Resampling, normalise, prepare
from localisation.progress import bar
from rig.logs import get_logger

log = get_logger(__name__)

PAPER_SIZE = 256  # the paper resizes every frame to 256x256; the denoiser works at this scale


@dataclass(frozen=True)
class StudyPlan:
    """The scaled-down protocol (see docs/readme/localiser-paper.md for what was cut)."""

    input_size: int = 128
    sigma_px: float = 5.0  # the paper's sigma 10 at 256 px, scaled with the input
    n_max: int = 6  # the test set has 0-6 tips per frame (the paper: 1-4, n_max 4)
    train_frames: int = 300
    val_frames: int = 40
    test_frames: int = 200
    train_seed: int = 10_000_000
    val_seed: int = 20_000_000
    test_seed: int = 777
    paper_stages: tuple[int, int, int] = (2, 1, 3)  # the paper: 50 / 50 / 100 epochs
    baseline_epochs: int = 6  # the paper: 200
    batch_size: int = 16
    plateau_patience: int = 2  # the paper: 20 epochs
    minutes_paper: float = 7.0  # wall-clock cap per paper-model training (1 thread)
    minutes_baseline: float = 3.0  # ... per baseline / ablation training
    threads: int = 1


def study_image(
    pixels: np.ndarray, um_per_px: float, *, size: int, denoiser: Denoiser | None
) -> tuple[np.ndarray, Resampling]:
    """Raw frame -> (size x size float32 image in [0, 1], resampling input px -> image px)."""
    img, rs = prepare(pixels, um_per_px, mode="resize", size=PAPER_SIZE, model_um_per_px=None)
    if denoiser is not None:
        with torch.inference_mode():
            img = denoiser.denoise(torch.from_numpy(img)[None, None])[0, 0].numpy()
    if size != PAPER_SIZE:
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA if size < PAPER_SIZE else cv2.INTER_LINEAR)
        f = size / PAPER_SIZE
        rs = Resampling(rs.sx * f, rs.sy * f)
    return normalise(img), rs


class StudyLocaliser(TipLocaliser):
    """A trained study model behind the ``locate`` interface, preparing frames by
    ``study_image`` (the denoiser runs inside ``prepare``, so its time counts there)."""

    def __init__(self, model: nn.Module, cfg: LocaliserConfig, *, denoiser: Denoiser | None) -> None:
        super().__init__(model, cfg, device=torch.device("cpu"), checkpoint="study")
        self.study_denoiser = denoiser

    def _prepare_valid(self, frame: np.ndarray, um_per_px: float) -> tuple[np.ndarray, Resampling]:
        # the one preparation hook that both ``prepare`` and ``locate`` go through (overriding
        # ``prepare`` alone silently skipped the denoiser in ``locate`` after a refactor)
        return study_image(frame, um_per_px, size=self.cfg.input_size, denoiser=self.study_denoiser)


class CoarseOnly(nn.Module):
    """Table IV "coarse learner without finer learner": the encoder's heatmap alone (tips are
    its local maxima, see postprocess.py)."""

    def __init__(self, paper_model: PaperModel) -> None:
        super().__init__()
        self.encoder = paper_model.encoder

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"heatmap": self.encoder(x)}


class DenoisedClassical:
    """The classical detector on the denoised 256x256 image (input pixels out)."""

    def __init__(self, denoiser: Denoiser) -> None:
        from localisation.classical import ClassicalTipDetector

        self.detector = ClassicalTipDetector()
        self.denoiser = denoiser

    def locate(self, pixels: np.ndarray, um_per_px: float) -> list:
        from localisation.types import TipDetection

        img, rs = study_image(pixels, um_per_px, size=PAPER_SIZE, denoiser=self.denoiser)
        dets = self.detector.locate(img, um_per_px / rs.sx)
        xy = rs.to_input(np.array([[d.x_px, d.y_px] for d in dets]).reshape(-1, 2))
        return [TipDetection(float(x), float(y), d.score) for (x, y), d in zip(xy, dets, strict=True)]


def study_config(plan: StudyPlan, base: str) -> LocaliserConfig:
    """``paper-small`` or ``baseline-*`` adapted to the study's input size, sigma and epochs."""
    cfg = get_config(base)
    if base == "paper-small":
        e1, e2, e3 = plan.paper_stages
        stages: tuple[Stage, ...] = (
            Stage("encoder", e1, cfg.stages[0].lr, ("encoder",)),
            Stage("decoder", e2, cfg.stages[1].lr, ("decoder",)),
            Stage("joint", e3, cfg.stages[2].lr, None),
        )
    else:
        stages = (Stage("all", plan.baseline_epochs, cfg.stages[0].lr, None),)
    kwargs = dict(cfg.model_kwargs)
    if kwargs.get("name") == "vgg16":
        kwargs["width"] = 0.25
    if kwargs.get("name") == "vit":
        kwargs.update(vit_depth=4, vit_dim=192, vit_heads=3)
    return cfg.with_overrides(
        input_size=plan.input_size,
        sigma_px=plan.sigma_px,
        n_max=plan.n_max,
        stages=stages,
        batch_size=plan.batch_size,
        plateau_patience_epochs=plan.plateau_patience,
        model_kwargs=kwargs,
        threads=plan.threads,
    )


def write_study_dataset(
    out: Path, plan: StudyPlan, seed_start: int, n: int, denoiser: Denoiser | None, *, progress: bool
) -> Path:
    """Render synthetic frames, prepare them by ``study_image`` and write a dataset."""
    if (out / "labels.json").exists():
        return out
    from simulators.synth import sample_example

    records = []
    for seed in bar(range(seed_start, seed_start + n), enabled=progress, desc=f"write {out.name}", unit="frame"):
        ex = sample_example(seed)
        img, rs = study_image(ex.pixels, ex.um_per_px, size=plan.input_size, denoiser=denoiser)
        tips = rs.to_model(ex.tips_px)
        records.append((f"images/{seed}.png", np.round(img * 255).astype(np.uint8), ex.um_per_px / rs.sx, tips))
    write_dataset(out, records)
    return out


def train_study_model(
    cfg: LocaliserConfig, name: str, data: tuple[Path, Path], out_dir: Path, plan: StudyPlan, *, progress: bool
) -> tuple[nn.Module, dict[str, Any]]:
    """Train with the shared trainer and return the trained model (``best.pt``, else ``last.pt``)
    and the run's summary. A finished run (``done.json``) is not trained again; one stopped
    mid-run (``last.pt`` only) resumes from its checkpoint."""
    minutes = plan.minutes_paper if cfg.model == "paper" else plan.minutes_baseline
    from localisation.checkpoint import load_model
    from localisation.train import TrainOptions, train

    run = out_dir / "runs" / name
    done = run / "done.json"
    if not done.exists():
        t0 = time.monotonic()
        summary = train(
            cfg,
            TrainOptions(
                out_dir=run, data=data[0], val_data=data[1], max_minutes=minutes,
                device="cpu", threads=plan.threads, progress=progress,
                resume=(run / "last.pt").exists(),  # a study stopped mid-model goes on from there
            ),
        )
        summary["train_minutes"] = (time.monotonic() - t0) / 60.0
        done.write_text(json.dumps(summary))
    summary = json.loads(done.read_text())
    best = run / "best.pt"
    model, _, _ = load_model(best if best.exists() else run / "last.pt")
    return model.eval(), summary


def denoiser_ablation(denoiser_path: Path, records: list[TipRecord], n: int = 40) -> dict[str, Any]:
    """Whole frame vs tiles: output difference, seams at tile borders, latency (1 thread)."""
    whole = Denoiser.load(denoiser_path)
    tiled = Denoiser.load(denoiser_path, tile=80, overlap=16)
    stitched = Denoiser.load(denoiser_path, tile=80, overlap=0)
    diffs: dict[str, list[float]] = {"tiles16_vs_whole": [], "tiles0_vs_whole": []}
    seams: dict[str, list[float]] = {"whole": [], "tiles16": [], "tiles0": []}
    times: dict[str, list[float]] = {"whole": [], "tiles16": [], "tiles0": []}
    edges = {  # columns/rows where a tile starts or ends (hard seams are possible there)
        "whole": tile_edges(PAPER_SIZE, 80, 0),  # the same lines, for reference
        "tiles16": tile_edges(PAPER_SIZE, 80, 16),
        "tiles0": tile_edges(PAPER_SIZE, 80, 0),
    }
    for rec in records[:n]:
        img, _ = prepare(load_image(rec), rec.um_per_px, mode="resize", size=PAPER_SIZE, model_um_per_px=None)
        x = torch.from_numpy(img)[None, None]
        outs = {}
        for key, den in (("whole", whole), ("tiles16", tiled), ("tiles0", stitched)):
            t0 = time.perf_counter()
            outs[key] = den.denoise(x)[0, 0].numpy()
            times[key].append((time.perf_counter() - t0) * 1e3)
        diffs["tiles16_vs_whole"].append(float(np.abs(outs["tiles16"] - outs["whole"]).mean()))
        diffs["tiles0_vs_whole"].append(float(np.abs(outs["tiles0"] - outs["whole"]).mean()))
        for key, y in outs.items():
            gx = np.abs(np.diff(y, axis=1))  # gx[:, c]: step between columns c and c + 1
            gy = np.abs(np.diff(y, axis=0))
            at = np.mean([gx[:, b - 1].mean() for b in edges[key]] + [gy[b - 1].mean() for b in edges[key]])
            seams[key].append(float(at / max(0.5 * (gx.mean() + gy.mean()), 1e-9)))
    return {
        "frames": min(n, len(records)),
        "mean_abs_difference": {k: float(np.mean(v)) for k, v in diffs.items()},
        "seam_ratio": {k: float(np.mean(v)) for k, v in seams.items()},
        "latency_ms_256px_1thread": {k: float(np.median(v)) for k, v in times.items()},
    }


def tile_edges(length: int, tile: int, overlap: int) -> list[int]:
    """Pixel indices b (0 < b < length) where a tile begins or ends: seams lie between b-1, b."""
    from localisation.models.cyclegan import tile_starts

    starts = tile_starts(length, tile, overlap)
    return sorted({b for s in starts for b in (s, s + tile) if 0 < b < length})


def run_study(plan: StudyPlan, out_dir: Path, denoiser_path: Path, *, progress: bool = True) -> dict[str, Any]:
    """Everything: data, trainings, evaluations, the denoiser ablation; writes results.json."""
    torch.set_num_threads(plan.threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    from simulators.synth import synthesise_dataset

    test_dir = out_dir / "test"
    if not (test_dir / "labels.json").exists():
        synthesise_dataset(test_dir, plan.test_frames, plan.test_seed, workers=1, progress=progress)
    records = read_dataset(test_dir).records
    den = Denoiser.load(denoiser_path)
    data = {
        flag: (
            write_study_dataset(out_dir / f"train-{flag}", plan, plan.train_seed, plan.train_frames, d, progress=progress),
            write_study_dataset(out_dir / f"val-{flag}", plan, plan.val_seed, plan.val_frames, d, progress=progress),
        )
        for flag, d in (("raw", None), ("gan", den))
    }
    runs = [  # (name, base config, data, denoiser at test time)
        ("paper-small+gan", "paper-small", "gan"),
        ("paper-small", "paper-small", "raw"),
        ("vgg16", "baseline-vgg16", "raw"),
        ("resnet18", "baseline-resnet18", "raw"),
        ("resnet50", "baseline-resnet50", "raw"),
        ("vit", "baseline-vit", "raw"),
        ("vit+gan", "baseline-vit", "gan"),
        ("resnet18+gan", "baseline-resnet18", "gan"),
    ]
    results: dict[str, Any] = {"plan": dataclasses.asdict(plan), "denoiser": str(denoiser_path), "models": {}}
    evaluated: list[EvaluatedModel] = []
    models: dict[str, tuple[nn.Module, LocaliserConfig]] = {}
    for name, base, flag in runs:
        cfg = study_config(plan, base)
        model, summary = train_study_model(cfg, name, data[flag], out_dir, plan, progress=progress)
        models[name] = (model, cfg)
        loc = StudyLocaliser(model, cfg, denoiser=den if flag == "gan" else None)
        ev = evaluate(name, loc, records, progress=progress, keep_heatmaps=False)
        evaluated.append(ev)
        results["models"][name] = {"train": summary, "metrics": ev.metrics, "latency_ms": ev.latency_ms}
        log.info("study_model", name=name, **{k: ev.metrics["overall"][k] for k in ("acc_5um", "acc_10um", "precision")})
    # Table IV: the coarse learner alone (heatmap peaks of the trained paper model)
    paper_gan, cfg = models["paper-small+gan"]
    extra: list[tuple[str, Any]] = [
        ("paper-small+gan coarse only", StudyLocaliser(CoarseOnly(cast(PaperModel, paper_gan)), cfg, denoiser=den)),
        ("paper-small+gan, tiled denoiser", StudyLocaliser(paper_gan, cfg, denoiser=Denoiser.load(denoiser_path, tile=80, overlap=16))),
        ("classical", None),
        ("classical+gan", DenoisedClassical(den)),
    ]
    for name, localiser in extra:
        if localiser is None:
            from localisation.classical import ClassicalTipDetector

            localiser = ClassicalTipDetector()
        ev = evaluate(name, localiser, records, progress=progress, keep_heatmaps=False)
        evaluated.append(ev)
        results["models"][name] = {"metrics": ev.metrics, "latency_ms": ev.latency_ms}
    results["denoiser_ablation"] = denoiser_ablation(denoiser_path, records)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    from localisation.evaluation import metrics_table

    (out_dir / "tables.md").write_text(metrics_table(evaluated) + "\n")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="study folder (resumable)")
    parser.add_argument("--denoiser", type=Path, default=Path(__file__).parent / "checkpoints" / "cyclegan-small.pt")
    parser.add_argument("--minutes-paper", type=float, default=StudyPlan.minutes_paper)
    parser.add_argument("--minutes-baseline", type=float, default=StudyPlan.minutes_baseline)
    parser.add_argument("--train-frames", type=int, default=StudyPlan.train_frames)
    parser.add_argument("--test-frames", type=int, default=StudyPlan.test_frames)
    parser.add_argument(
        "--test-seed", type=int, default=StudyPlan.test_seed,
        help="seed of the test set; 779 with --test-frames 500 renders the shared test set runs/testset-779-v3",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    plan = StudyPlan(
        minutes_paper=args.minutes_paper,
        minutes_baseline=args.minutes_baseline,
        train_frames=args.train_frames,
        test_frames=args.test_frames,
        test_seed=args.test_seed,
    )
    run_study(plan, args.out, args.denoiser, progress=not args.quiet)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
