"""Training and evaluation data: frames prepared once at the model's scale, then augmented.

Rendering synthetic frames costs far more than augmenting them, so frames are rendered (or
read from a ``patchrig-tips/1`` directory) once, prepared with ``preprocess.prepare`` (the
same code inference uses), kept in memory as uint8 and optionally cached on disk as ``.npz``.
Every epoch then draws fresh random crops/flips/scales of them (``TipTrainingSet``).

Variable tip counts are padded to ``MAX_TIPS`` rows with a boolean validity mask: padded
rows are never tips (there are no fake (0, 0) tips anywhere).

Faint tips (``all_tips`` entries with reason ``low_contrast``: real tips in frame and in focus
whose contrast-to-noise ratio is below the simulator's visibility threshold) are carried as
``faint_model_px``: training ignores the heatmap around them (neither tip nor background),
as evaluation ignores predictions on them (``metrics``). Before, training taught "no tip"
there, one CNR step below tips it taught "tip": a contradiction at the threshold.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from localisation.augment import (
    AugmentConfig,
    apply_affine,
    move_points,
    random_affine,
    random_photometric,
)
from localisation.configs import LocaliserConfig
from localisation.preprocess import Resampling, prepare
from localisation.progress import bar
from rig.atomic import atomic_open
from rig.errors import DataError

if TYPE_CHECKING:
    from localisation.models.cyclegan import Denoiser
    from localisation.models.photon_denoiser import PhotonDenoiser

MAX_TIPS = 16  # padding rows per training sample (more tips than this in one crop: DataError)


@dataclass
class PreparedFrame:
    """One frame on the model's grid. ``image`` uint8 (h, w) (normalised x 255);
    ``tips_model_px`` (n, 2) in model pixels; ``resampling`` maps back to the input's pixels
    whose size is ``um_per_px``; ``file`` names the source (dataset file or synthetic seed);
    ``faint_model_px`` (m, 2): faint tips (model pixels), ignored by the loss."""

    image: np.ndarray
    tips_model_px: np.ndarray
    resampling: Resampling
    um_per_px: float
    file: str
    faint_model_px: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))

    def image_float(self) -> np.ndarray:
        return self.image.astype(np.float32) * np.float32(1.0 / 255.0)


def prepare_example(
    pixels: np.ndarray,
    tips_px: np.ndarray,
    um_per_px: float,
    cfg: LocaliserConfig,
    file: str,
    faint_px: np.ndarray | None = None,
) -> PreparedFrame:
    """Prepare one labelled frame for ``cfg`` (labels, and ``faint_px`` tips, follow the
    resampling)."""
    img, rs = prepare(
        pixels,
        um_per_px,
        mode=cfg.input_mode,
        size=cfg.input_size,
        model_um_per_px=cfg.model_um_per_px,
        what=file,
    )
    tips = rs.to_model(np.asarray(tips_px, dtype=np.float64).reshape(-1, 2)).astype(np.float32)
    faint = np.zeros((0, 2)) if faint_px is None else np.asarray(faint_px, dtype=np.float64).reshape(-1, 2)
    return PreparedFrame(
        image=np.round(img * 255.0).astype(np.uint8),
        tips_model_px=tips,
        resampling=rs,
        um_per_px=float(um_per_px),
        file=file,
        faint_model_px=rs.to_model(faint).astype(np.float32),
    )


def render_synthetic(
    cfg: LocaliserConfig, seed_start: int, n: int, *, progress: bool = True, desc: str = "render"
) -> list[PreparedFrame]:
    """Render ``n`` synthetic frames (seeds ``seed_start`` ...) with the simulator's broad
    randomisation (0-6 tips, 0.35-1.0 µm/px, 512x512) and prepare them for ``cfg``."""
    from localisation.evaluation import low_contrast_px
    from simulators.synth import sample_example

    frames = []
    for seed in bar(range(seed_start, seed_start + n), enabled=progress, desc=desc, unit="frame"):
        ex = sample_example(seed, domain=cfg.domain)
        faint = low_contrast_px(ex.meta.get("all_tips", []))
        frames.append(prepare_example(ex.pixels, ex.tips_px, ex.um_per_px, cfg, f"synthetic:{seed}", faint))
    return frames


def load_directory(cfg: LocaliserConfig, directory: str | Path, *, progress: bool = True) -> list[PreparedFrame]:
    """Read a ``patchrig-tips/1`` dataset and prepare every image for ``cfg``."""
    from localisation.dataset_format import load_image, read_dataset
    from localisation.evaluation import faint_tips_px

    ds = read_dataset(directory)
    frames = []
    for rec in bar(ds.records, enabled=progress, desc=f"read {directory}", unit="image"):
        pixels = load_image(rec)
        frames.append(prepare_example(pixels, rec.tips_px, rec.um_per_px, cfg, rec.file, faint_tips_px(rec)))
    return frames


def resolve_denoiser(path: str | Path) -> Path:
    """A denoiser file as given, else relative to the ``localisation`` package or the
    repository root (so configurations can name the shipped ``checkpoints/...`` files)."""
    p = Path(path)
    package = Path(__file__).resolve().parent
    for candidate in (p, package / p, package.parent / p):
        if candidate.is_file():
            return candidate
    raise DataError(f"denoiser checkpoint not found: {path}")


def load_frame_denoiser(path: str | Path) -> Denoiser | PhotonDenoiser:
    """The denoiser in a file, by its format: a CycleGAN generator (``patchrig-denoiser/1``,
    ``gan_train.py``) or a supervised ``PhotonDenoiser`` (``patchrig-photon-denoiser/1``,
    ``denoiser_train.py``). Either has ``denoise(x)``: (B, 1, H, W) in [0, 1] -> the same.
    Anything else, or a missing or damaged file: DataError."""
    from localisation.denoiser_train import DENOISER_FORMAT as PHOTON_FORMAT
    from localisation.denoiser_train import denoiser_from_payload
    from localisation.models.cyclegan import Denoiser, read_denoiser_file

    p = resolve_denoiser(path)
    payload = read_denoiser_file(p)
    if isinstance(payload, dict) and payload.get("format") == PHOTON_FORMAT:
        return denoiser_from_payload(payload, str(p))
    return Denoiser.from_payload(payload, p)


def denoise_frames(frames: Sequence[PreparedFrame], denoiser_path: str | Path, *, progress: bool = True) -> None:
    """Run the denoiser (``load_frame_denoiser``) once on every prepared frame, in place (the
    model then trains on what it will see at inference, where the same denoiser runs first)."""
    den = load_frame_denoiser(denoiser_path)
    for f in bar(frames, enabled=progress, desc="denoise", unit="frame"):
        x = torch.from_numpy(f.image_float())[None, None]
        y = den.denoise(x)[0, 0].clamp(0, 1).numpy()
        f.image = np.round(y * 255.0).astype(np.uint8)


def save_cache(frames: Sequence[PreparedFrame], path: str | Path) -> None:
    """Write prepared frames to one ``.npz`` atomically (no pickle)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shapes = np.array([f.image.shape for f in frames], dtype=np.int64).reshape(-1, 2)
    n_tips = np.array([len(f.tips_model_px) for f in frames], dtype=np.int64)
    arrays: dict[str, Any] = {
        "pixels": np.concatenate([f.image.ravel() for f in frames]) if frames else np.zeros(0, np.uint8),
        "shapes": shapes,
        "tips": np.concatenate([f.tips_model_px.reshape(-1, 2) for f in frames]).astype(np.float32)
        if frames
        else np.zeros((0, 2), np.float32),
        "n_tips": n_tips,
        "scales": np.array([[f.resampling.sx, f.resampling.sy] for f in frames], dtype=np.float64).reshape(-1, 2),
        "um_per_px": np.array([f.um_per_px for f in frames], dtype=np.float64),
        "files": np.array([f.file for f in frames], dtype=str),
        "faint": np.concatenate([f.faint_model_px.reshape(-1, 2) for f in frames]).astype(np.float32)
        if frames
        else np.zeros((0, 2), np.float32),
        "n_faint": np.array([len(f.faint_model_px) for f in frames], dtype=np.int64),
    }
    with atomic_open(path, "wb") as fh:
        np.savez(fh, **arrays)  # type: ignore[arg-type]


def load_cache(path: str | Path) -> list[PreparedFrame]:
    """Read frames written by ``save_cache`` (DataError if malformed)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            pixels, shapes, tips, n_tips = z["pixels"], z["shapes"], z["tips"], z["n_tips"]
            scales, upp, files = z["scales"], z["um_per_px"], z["files"]
            # caches written before faint tips were kept have none
            faint = z["faint"] if "faint" in z.files else np.zeros((0, 2), np.float32)
            n_faint = z["n_faint"] if "n_faint" in z.files else np.zeros(len(shapes), np.int64)
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(f"{path}: not a prepared-frame cache ({exc})") from exc
    frames = []
    p_off = t_off = f_off = 0
    for i, (h, w) in enumerate(shapes):
        img = pixels[p_off : p_off + h * w].reshape(h, w)
        p_off += h * w
        t = tips[t_off : t_off + n_tips[i]]
        t_off += n_tips[i]
        f = faint[f_off : f_off + n_faint[i]]
        f_off += n_faint[i]
        rs = Resampling(float(scales[i, 0]), float(scales[i, 1]))
        frames.append(PreparedFrame(img, t, rs, float(upp[i]), str(files[i]), faint_model_px=f))
    return frames


def cached_synthetic(
    cfg: LocaliserConfig, seed_start: int, n: int, cache_dir: str | Path | None, *, desc: str, progress: bool = True
) -> list[PreparedFrame]:
    """``render_synthetic`` with an on-disk cache keyed by everything that changes the frames."""
    if cache_dir is None:
        return render_synthetic(cfg, seed_start, n, desc=desc, progress=progress)
    scale = cfg.model_um_per_px if cfg.input_mode == "fixed_scale" else cfg.input_size
    key = f"synth-{cfg.domain}-{cfg.input_mode}-{scale}-{seed_start}-{n}-faint.npz"
    path = Path(cache_dir) / key
    if path.exists():
        return load_cache(path)
    frames = render_synthetic(cfg, seed_start, n, desc=desc, progress=progress)
    save_cache(frames, path)
    return frames


class TipTrainingSet(Dataset):
    """Randomly augmented training samples from prepared frames.

    Item: ``{"image": (1, S, S) float32 in [0, 1], "tips": (MAX_TIPS, 2) model px, "valid":
    (MAX_TIPS,) bool, "faint", "faint_valid": the same for faint tips (ignored by the loss; more
    than MAX_TIPS in one crop are cut)}`` with S = ``cfg.input_size``. Deterministic per (seed, epoch, index):
    call ``set_epoch`` each epoch for fresh augmentations.
    """

    def __init__(self, frames: Sequence[PreparedFrame], cfg: LocaliserConfig, *, seed: int = 0, augment: bool = True) -> None:
        self.frames = list(frames)
        self.cfg = cfg
        self.seed = seed
        self.augment = augment
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        frame = self.frames[i]
        rng = np.random.default_rng((self.seed, self.epoch, i))
        img = frame.image_float()
        s = self.cfg.input_size
        aug = self.cfg.augment if self.augment else no_augmentation(self.cfg.augment)
        matrix = random_affine(img.shape, (s, s), aug, rng, random_crop=self.cfg.input_mode == "fixed_scale")
        out, tips = apply_affine(img, frame.tips_model_px, matrix, (s, s), border_value=float(img.mean()))
        faint = move_points(frame.faint_model_px, matrix, (s, s))
        if self.augment and self.cfg.augment.photometric:
            out = random_photometric(out, rng)
        if len(tips) > MAX_TIPS:
            raise DataError(f"{frame.file}: {len(tips)} tips in one sample, at most {MAX_TIPS}")
        tips_padded, valid = _padded(tips)
        faint_padded, faint_valid = _padded(faint[:MAX_TIPS])
        return {
            "image": torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))[None],
            "tips": torch.from_numpy(tips_padded),
            "valid": torch.from_numpy(valid),
            "faint": torch.from_numpy(faint_padded),
            "faint_valid": torch.from_numpy(faint_valid),
        }


def _padded(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(MAX_TIPS, 2) float32 rows holding ``points`` first, and the (MAX_TIPS,) validity mask."""
    padded = np.zeros((MAX_TIPS, 2), dtype=np.float32)
    padded[: len(points)] = points
    valid = np.zeros(MAX_TIPS, dtype=bool)
    valid[: len(points)] = True
    return padded, valid


def no_augmentation(aug: AugmentConfig) -> AugmentConfig:
    """The same augmentation config with every random change switched off."""
    return dataclasses.replace(aug, flip=False, rot90=False, scale_range=(1.0, 1.0), photometric=False)
