"""``TipLocaliser``: a trained checkpoint as the daemon's localiser.

``TipLocaliser.load(checkpoint=None)`` loads the shipped ``localisation/checkpoints/fast.pt``
(or any localiser checkpoint); ``.locate(pixels, um_per_px)`` takes a greyscale frame of any
size and pixel size and returns ``TipDetection``s in the INPUT's pixels (x = column, y = row,
origin at the centre of the top-left pixel), best first. Steps, each timed in
``last_timings_ms``:

1. pre-processing: validation, resampling to the model's scale (``fixed_scale``: 1 model px =
   ``model_um_per_px`` µm, then padding to the network's multiple; ``resize``: S x S), robust
   intensity normalisation (preprocess.py);
2. denoiser: the configuration's denoiser (a CycleGAN generator or a ``PhotonDenoiser``) on
   the whole frame, when it has one;
3. model: the network's forward pass (each BatchNorm folded into the convolution before it,
   fusion.py; the caller's module is copied, not changed);
4. verifier (checkpoints that carry one, as the shipped ``fast.pt`` does): the first stage
   proposes up to ``candidates`` low-threshold peaks and the second stage re-scores and refines
   each one from a fine crop of the frame (verifier.py); the threshold then applies to the
   verifier's score;
5. post-processing: thresholding, duplicate suppression, mapping back to input pixels.

Deterministic: same frame -> same detections (eval mode, deterministic kernels, no
randomness). Bad frames (not an array, empty, NaN, wrong dimensions) raise ``DataError``.
"""

from __future__ import annotations

import re
import threading
import time
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from localisation.checkpoint import DEFAULT_CHECKPOINT, load_model
from localisation.configs import LocaliserConfig, model_stride
from localisation.fusion import fuse_conv_batchnorm_
from localisation.postprocess import detections
from localisation.preprocess import Resampling, pad_to_multiple, prepare_valid, validate_frame
from localisation.types import TipDetection
from localisation.verifier import (
    VerifierConfig,
    first_stage_threshold,
    load_verifier,
    sample_context,
    select_verified,
    verify,
)
from rig.errors import DataError


@dataclass
class ModelPrediction:
    """Detections on the model grid: ``xy_model_px`` (m, 2), ``scores`` (m,), and the
    predicted heatmap probability (h, w) on the model grid when the model has one."""

    xy_model_px: np.ndarray
    scores: np.ndarray
    heatmap: np.ndarray | None
    outputs: dict[str, torch.Tensor]


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cpu``, ``cuda`` or ``cuda:N`` as named.
    DataError for another name or a GPU this machine does not have."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    match = re.fullmatch(r"cuda(?::(\d+))?", str(device))
    if device == "cpu":
        return torch.device("cpu")
    if match is None:
        raise DataError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if int(match.group(1) or 0) >= n_gpus:
        raise DataError(f"device {device}: no such CUDA GPU on this machine ({n_gpus} found)")
    return torch.device(device)


def model_input(image_model: np.ndarray, cfg: LocaliserConfig, model: nn.Module) -> np.ndarray:
    """Pad a prepared image to what the network accepts (fixed_scale) or check its size."""
    if cfg.input_mode == "fixed_scale":
        return pad_to_multiple(image_model, max(model_stride(model), 1))
    return image_model


@torch.inference_mode()
def predict_prepared(
    model: nn.Module,
    cfg: LocaliserConfig,
    image_model: np.ndarray,
    *,
    device: torch.device,
    denoiser: nn.Module | None = None,
    score_threshold: float | None = None,
    timings: dict[str, float] | None = None,
) -> ModelPrediction:
    """Run the network on one prepared image (model grid, float32 in [0, 1])."""
    h, w = image_model.shape
    x = torch.from_numpy(np.ascontiguousarray(model_input(image_model, cfg, model)))[None, None].to(device)
    t0 = time.perf_counter()
    if denoiser is not None:
        x = denoiser.denoise(x)  # type: ignore[operator]
    _sync(device)
    t1 = time.perf_counter()
    out = model(x)
    _sync(device)
    t2 = time.perf_counter()
    thr = cfg.score_threshold if score_threshold is None else score_threshold
    xy, scores = detections(out, score_threshold=thr, n_max=cfg.n_max)[0]
    inside = (xy[:, 0] <= w - 0.5) & (xy[:, 1] <= h - 0.5) & (xy[:, 0] >= -0.5) & (xy[:, 1] >= -0.5)
    xy, scores = xy[inside], scores[inside]
    heat = None
    if "heatmap" in out:
        heat = torch.sigmoid(out["heatmap"][0, 0].float()).cpu().numpy()[:h, :w]
    elif "center_logits" in out:
        s = int(getattr(model, "out_stride", 1))
        heat = torch.sigmoid(out["center_logits"][0, 0].float()).cpu().numpy()[: -(-h // s), : -(-w // s)]
    if timings is not None:
        timings["denoiser"] = (t1 - t0) * 1e3
        timings["model"] = (t2 - t1) * 1e3
    return ModelPrediction(xy, scores, heat, out)


def first_stage_context(pred: ModelPrediction, model: nn.Module, vcfg: VerifierConfig) -> np.ndarray | None:
    """The first stage's decoder features at each of its candidates (n, C), for a verifier
    that reads them (``vcfg.context_channels`` > 0); None for one that does not. The widths
    match: ``TipLocaliser.load`` checks them (``check_context_width``) and the trainer sets
    the verifier's width from its first stage."""
    if not vcfg.context_channels:
        return None
    return sample_context(pred.outputs["features"], pred.xy_model_px, int(getattr(model, "out_stride", 1)))


def feature_width(model: nn.Module) -> int | None:
    """Channels of the ``features`` a first stage returns (a ``fast`` network's decoder width,
    its ``lat4`` output); None for a network without them."""
    lat4 = getattr(model, "lat4", None)
    return int(lat4.out_channels) if isinstance(lat4, nn.Conv2d) else None


def check_context_width(model: nn.Module, vcfg: VerifierConfig, where: str) -> None:
    """DataError naming ``where`` when a verifier reads first-stage features that the first
    stage does not give."""
    if not vcfg.context_channels:
        return
    width = feature_width(model)
    if width != vcfg.context_channels:
        raise DataError(f"checkpoint {where}: the verifier reads {vcfg.context_channels} first-stage feature "
                        f"channels; the first stage gives {width}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _for_inference(model: nn.Module, device: torch.device) -> nn.Module:
    """An eval-mode copy of ``model`` on ``device`` with each convolution's BatchNorm folded
    into it (``fusion.fuse_conv_batchnorm_``) and its 4-D weights stored channels-last; the
    caller's module is not changed.

    Channels-last lets the CPU's convolution library (oneDNN) skip reordering every
    activation. Measured on 2 threads of this machine (stop 13): the verifier's network from
    8.4 to 3.6 ms for 16 crops, the first stage's from 15.6 to 12.1 ms on a 352x352 input, with
    outputs equal to float32 rounding (tested). A one-channel frame is already channels-last
    in memory, so the inputs need no conversion."""
    copy = deepcopy(model).eval()
    fuse_conv_batchnorm_(copy)
    return copy.to(device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]


@dataclass
class CascadeStages:
    """What each stage of a cascade said about one frame, in the INPUT's pixels: the first
    stage's candidates (``candidates_px`` (k, 2), ``first_scores`` (k,)) and, for each one, the
    verifier's refined tip (``refined_px`` (k, 2)) and score (``verifier_scores`` (k,)), before
    thresholding and duplicate suppression. For diagnostics (``localisation.miss_analysis``)."""

    candidates_px: np.ndarray
    first_scores: np.ndarray
    refined_px: np.ndarray
    verifier_scores: np.ndarray


class TipLocaliser:
    """A loaded localiser (see the module docstring). Thread-safe: one call at a time."""

    def __init__(
        self,
        model: nn.Module,
        cfg: LocaliserConfig,
        *,
        device: torch.device,
        checkpoint: str,
        denoiser: nn.Module | None = None,
        score_threshold: float | None = None,
        verifier: tuple[nn.Module, VerifierConfig] | None = None,
        checkpoint_has_verifier: bool | None = None,
    ) -> None:
        self.model = _for_inference(model, device)
        self.cfg = cfg
        self.device = device
        self.checkpoint = checkpoint
        self.denoiser = None if denoiser is None else denoiser.eval().to(device)
        self.score_threshold = cfg.score_threshold if score_threshold is None else score_threshold
        self.verifier = None if verifier is None else _for_inference(verifier[0], device)
        self.verifier_cfg = None if verifier is None else verifier[1]
        #: the checkpoint carries a verifier (used or, for the ablation, switched off)
        self.checkpoint_has_verifier = verifier is not None if checkpoint_has_verifier is None else checkpoint_has_verifier
        if self.verifier_cfg is not None:
            # the first stage decodes as many peaks as the verifier examines
            self.model.n_max = self.verifier_cfg.candidates  # type: ignore[assignment]
        self.last_timings_ms: dict[str, float] = {}
        #: the last frame's per-stage outputs (cascades only; None before the first frame)
        self.last_cascade: CascadeStages | None = None
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls,
        checkpoint: str | Path | None = None,
        device: str = "auto",
        threads: int | None = None,
        *,
        expect_config: str | None = None,
        denoiser: str | Path | None = None,
        score_threshold: float | None = None,
        use_verifier: bool = True,
    ) -> TipLocaliser:
        """Load a checkpoint (None: the shipped ``fast.pt``). ``threads``: torch CPU threads
        (None: the configuration's). ``expect_config``: refuse a checkpoint of another
        configuration (DataError). ``denoiser``: a denoiser file (CycleGAN or photon) overriding the
        configuration's. ``use_verifier=False``: the first stage alone (ablation; its own
        threshold is then ``score_threshold`` or the configuration's)."""
        path = Path(checkpoint) if checkpoint is not None else DEFAULT_CHECKPOINT
        model, cfg, payload = load_model(path, expect_config=expect_config)
        ver = None
        if "verifier" in payload and use_verifier:
            ver = load_verifier(payload["verifier"], str(path))
            check_context_width(model, ver[1], str(path))
        elif "verifier" in payload:
            cfg = cfg.with_overrides(score_threshold=first_stage_threshold(payload, cfg))
        torch.set_num_threads(int(threads if threads is not None else cfg.threads))
        dev = resolve_device(device)
        den = None
        den_path = denoiser if denoiser is not None else cfg.denoiser
        if den_path:
            from localisation.data import load_frame_denoiser

            den = load_frame_denoiser(den_path)
        return cls(
            model, cfg, device=dev, checkpoint=str(path), denoiser=den, score_threshold=score_threshold, verifier=ver,
            checkpoint_has_verifier="verifier" in payload,
        )

    def prepare(self, pixels: np.ndarray, um_per_px: float) -> tuple[np.ndarray, Resampling]:
        """Validated, resampled, normalised frame on the model grid."""
        return self._prepare_valid(validate_frame(pixels, um_per_px), um_per_px)

    def _prepare_valid(self, frame: np.ndarray, um_per_px: float) -> tuple[np.ndarray, Resampling]:
        """``prepare`` of a frame that ``validate_frame`` already returned."""
        cfg = self.cfg
        return prepare_valid(
            frame, um_per_px, mode=cfg.input_mode, size=cfg.input_size, model_um_per_px=cfg.model_um_per_px
        )

    def locate_with_heatmap(
        self, pixels: np.ndarray, um_per_px: float
    ) -> tuple[list[TipDetection], ModelPrediction, Resampling]:
        """``locate`` plus the model-grid prediction (heatmap) and the resampling used."""
        with self._lock:
            t0 = time.perf_counter()
            frame = validate_frame(pixels, um_per_px)  # once: the verifier crops the same frame
            image_model, rs = self._prepare_valid(frame, um_per_px)
            t1 = time.perf_counter()
            timings: dict[str, float] = {"preprocess": (t1 - t0) * 1e3}
            vcfg = self.verifier_cfg
            pred = predict_prepared(
                self.model,
                self.cfg,
                image_model,
                device=self.device,
                denoiser=self.denoiser,
                score_threshold=self.score_threshold if vcfg is None else vcfg.min_first_score,
                timings=timings,
            )
            t2 = time.perf_counter()
            xy_in, scores = rs.to_input(pred.xy_model_px), pred.scores
            timings["verifier"] = 0.0
            if self.verifier is not None and vcfg is not None:
                tv = time.perf_counter()
                context = first_stage_context(pred, self.model, vcfg)
                refined, verified = verify(
                    self.verifier, vcfg, frame, um_per_px, xy_in, scores, device=self.device, context=context
                )
                _sync(self.device)
                timings["verifier"] = (time.perf_counter() - tv) * 1e3
                self.last_cascade = CascadeStages(xy_in, scores, refined, verified)
                xy_in, scores = select_verified(
                    refined, verified, score_threshold=self.score_threshold, frame_shape=(frame.shape[0], frame.shape[1]),
                    um_per_px=um_per_px, n_max=self.cfg.n_max,
                )
            dets = [
                TipDetection(float(x), float(y), float(s))
                for (x, y), s in zip(xy_in, scores, strict=True)
            ]
            t3 = time.perf_counter()
            timings["postprocess"] = (
                (t3 - t2) * 1e3 + (t2 - t1) * 1e3 - timings["denoiser"] - timings["model"] - timings["verifier"]
            )
            timings["total"] = (t3 - t0) * 1e3
            self.last_timings_ms = timings
            return dets, pred, rs

    def locate(self, pixels: np.ndarray, um_per_px: float) -> list[TipDetection]:
        """Tips in the input's pixels, best first (possibly none). See the module docstring."""
        return self.locate_with_heatmap(pixels, um_per_px)[0]
