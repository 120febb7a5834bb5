"""Second stage of the ``fast`` localiser: re-score and refine every first-stage candidate.

Beyond the paper. The paper refines a coarse heatmap with a finer learner on the whole image;
here the finer look is spent only where the first stage proposes a tip:

1. The first stage (``FastTipNet`` at 1.5 µm per model pixel) proposes up to ``candidates``
   heatmap peaks whose score reaches ``min_first_score`` (a low bar, so that faint tips are
   proposed too).
2. The frame is resampled once to ``crop_um_per_px`` (0.75 µm/px: twice as fine, so a 1 µm dye
   spot and a 3-7 µm labelled cell differ in size) and normalised with the same robust
   percentiles as the first stage's input.
3. ``TipVerifier`` sees a ``crop_size_px`` square (64 px = 48 µm) centred on each candidate,
   plus the candidate's first-stage logit, and returns a tip logit and a sub-pixel offset
   (crop pixels, x = column, y = row) from the candidate to the tip.

   With ``context_channels`` > 0 it also reads the first stage's decoder features at the
   candidate (``sample_context``): what the first stage saw over its receptive field (the
   whole 352-pixel input, up to 528 µm), beyond the crop's 48 µm.

The final score is ``sigmoid(tip logit)`` and the tip lies at candidate + offset. The trainer
(``verifier_train.py``) labels candidates from the first stage's own proposals on training
frames, so the verifier learns exactly the mistakes that the first stage makes (hard negatives:
labelled cells, shank edges, noise). Deterministic: eval mode, no randomness.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from localisation.postprocess import suppress_duplicates
from localisation.preprocess import Resampling, normalise, resample
from rig.errors import DataError


@dataclass(frozen=True)
class VerifierConfig:
    """What defines a verifier. ``candidates``: first-stage peaks examined per frame;
    ``min_first_score``: first-stage score a peak needs to be examined; ``crop_size_px`` and
    ``crop_um_per_px``: the crop (pixels, µm per pixel); ``widths``: channels of the 4 stages;
    ``context_channels``: channels of the first stage's decoder features read at each
    candidate (0: none, the verifier sees only its crop and the first-stage logit)."""

    candidates: int = 16
    min_first_score: float = 0.02
    crop_size_px: int = 64
    crop_um_per_px: float = 0.75
    widths: tuple[int, int, int, int] = (12, 24, 48, 96)
    context_channels: int = 0

    def __post_init__(self) -> None:
        """ValueError for a configuration no verifier can be built from."""
        if self.crop_size_px % 16 or self.crop_size_px < 16:
            raise ValueError(f"crop_size_px must be a multiple of 16, got {self.crop_size_px}")
        if self.candidates < 1 or not 0 <= self.min_first_score < 1 or self.crop_um_per_px <= 0:
            raise ValueError(f"bad verifier config {self}")
        if self.context_channels < 0:
            raise ValueError(f"context_channels must be >= 0, got {self.context_channels}")
        if len(self.widths) != 4 or min(self.widths) < 1:
            raise ValueError(f"widths must be 4 channel counts of at least 1, got {self.widths}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VerifierConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown verifier config fields: {sorted(unknown)}")
        d = dict(d)
        if "widths" in d:
            d["widths"] = tuple(int(w) for w in d["widths"])
        return cls(**d)


def _conv(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class TipVerifier(nn.Module):
    """Crops (N, 1, S, S) in [0, 1], first-stage logits (N,) and, when
    ``cfg.context_channels`` > 0, the first stage's features at each candidate (N, C) ->
    (N, 3): tip logit, offset x and offset y in crop pixels. Four stride-2 stages, then a fully
    connected layer over the (S/16)^2 cells, so the output knows where in the crop things are.
    With context, the crop's embedding and an embedding of the features meet in a hidden
    layer, so the two can interact (not only add their votes)."""

    def __init__(self, cfg: VerifierConfig = VerifierConfig()) -> None:
        super().__init__()
        a, b, c, d = cfg.widths
        self.body = nn.Sequential(
            _conv(1, a, 1), _conv(a, a, 2), _conv(a, b, 1), _conv(b, b, 2),
            _conv(b, c, 1), _conv(c, c, 2), _conv(c, d, 1), _conv(d, d, 2),
        )
        cells = (cfg.crop_size_px // 16) ** 2
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(d * cells, 128), nn.ReLU(inplace=True))
        self.context_channels = cfg.context_channels
        if cfg.context_channels:
            self.context_embed = nn.Sequential(nn.Linear(cfg.context_channels, 64), nn.ReLU(inplace=True))
            self.head: nn.Module = nn.Sequential(nn.Linear(128 + 64 + 1, 128), nn.ReLU(inplace=True), nn.Linear(128, 3))
        else:
            self.head = nn.Linear(128 + 1, 3)

    def forward(
        self, crops: torch.Tensor, first_logits: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = self.embed(self.body(crops))
        parts = [h, first_logits.reshape(-1, 1).to(h.dtype)]
        if self.context_channels:
            if context is None or context.shape != (h.shape[0], self.context_channels):
                got = None if context is None else tuple(context.shape)
                raise ValueError(f"this verifier needs context features ({h.shape[0]}, {self.context_channels}), got {got}")
            parts.insert(1, self.context_embed(context.to(h.dtype)))
        return self.head(torch.cat(parts, 1))


def sample_context(features: torch.Tensor, xy_model_px: np.ndarray, stride: int) -> np.ndarray:
    """The first stage's decoder features (1, C, h, w; cells of ``stride`` model pixels) read
    bilinearly at points (n, 2; x, y in model pixels, pixel-centre origin), edges replicated:
    (n, C) float32. The same function serves inference and the trainer."""
    xy = torch.as_tensor(np.asarray(xy_model_px, dtype=np.float32).reshape(-1, 2), device=features.device)
    h, w = features.shape[-2:]
    gx = (xy[:, 0] + 0.5) / (w * stride) * 2 - 1
    gy = (xy[:, 1] + 0.5) / (h * stride) * 2 - 1
    grid = torch.stack([gx, gy], -1)[None, None]  # (1, 1, n, 2)
    vals = F.grid_sample(features[:1].float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return vals[0, :, 0].T.contiguous().cpu().numpy().astype(np.float32)


def score_logit(scores: np.ndarray) -> np.ndarray:
    """First-stage scores (probabilities) -> logits, clipped to +-9.2 (float32)."""
    s = np.clip(np.asarray(scores, dtype=np.float64), 1e-4, 1 - 1e-4)
    return np.log(s / (1 - s)).astype(np.float32)


def crop_grid(pixels: np.ndarray, um_per_px: float, cfg: VerifierConfig) -> tuple[np.ndarray, Resampling]:
    """A validated frame resampled to ``cfg.crop_um_per_px`` and normalised to [0, 1]."""
    img, rs = resample(pixels, um_per_px, mode="fixed_scale", size=0, model_um_per_px=cfg.crop_um_per_px)
    return normalise(img), rs


def crops_at(grid: np.ndarray, centres_grid_px: np.ndarray, size_px: int) -> np.ndarray:
    """``size_px`` squares of ``grid`` centred on each point (n, 2; x, y in grid pixels,
    pixel-centre origin), bilinear, edges replicated: (n, size_px, size_px) float32. The
    centre of a crop lies between its pixels (size_px - 1) / 2."""
    out = np.empty((len(centres_grid_px), size_px, size_px), dtype=np.float32)
    for k, (x, y) in enumerate(np.asarray(centres_grid_px, dtype=np.float64).reshape(-1, 2)):
        out[k] = cv2.getRectSubPix(grid, (size_px, size_px), (float(x), float(y)))
    return out


@torch.inference_mode()
def verify(
    verifier: nn.Module,
    cfg: VerifierConfig,
    pixels: np.ndarray,
    um_per_px: float,
    candidates_px: np.ndarray,
    first_scores: np.ndarray,
    *,
    device: torch.device,
    context: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Re-score and refine first-stage candidates (input pixels) of one validated frame.
    ``context``: the first stage's features at each candidate (n, C; ``sample_context``),
    needed when ``cfg.context_channels`` > 0. Returns (tips (n, 2) in input pixels, scores
    (n,)), in the candidates' order."""
    candidates_px = np.asarray(candidates_px, dtype=np.float64).reshape(-1, 2)
    if len(candidates_px) == 0:
        return candidates_px, np.zeros(0)
    grid, rs = crop_grid(pixels, um_per_px, cfg)
    centres = rs.to_model(candidates_px)
    crops = torch.from_numpy(crops_at(grid, centres, cfg.crop_size_px))[:, None].to(device)
    logits = torch.from_numpy(score_logit(first_scores)).to(device)
    ctx = None if context is None else torch.from_numpy(np.asarray(context, dtype=np.float32)).to(device)
    return read_outputs(verifier(crops, logits, ctx).float().cpu().numpy(), centres, rs)


def read_outputs(outputs: np.ndarray, centres_grid_px: np.ndarray, rs: Resampling) -> tuple[np.ndarray, np.ndarray]:
    """The verifier's raw outputs (n, 3) for crops centred on ``centres_grid_px`` (crop-grid
    pixels; ``rs`` maps input pixels to that grid) -> (tips (n, 2) in input pixels, scores (n,)
    as probabilities). Shared by inference and the trainer's validation sweep."""
    tips = rs.to_input(centres_grid_px + outputs[:, 1:3])
    return tips, 1.0 / (1.0 + np.exp(-outputs[:, 0].astype(np.float64)))


def select_verified(
    tips_px: np.ndarray,
    scores: np.ndarray,
    *,
    score_threshold: float,
    frame_shape: tuple[int, int],
    um_per_px: float,
    n_max: int,
    min_separation_um: float = 4.5,
) -> tuple[np.ndarray, np.ndarray]:
    """The verifier's final detections of one frame: inside the frame, score at least the
    threshold, none within ``min_separation_um`` of a better one, at most ``n_max``, best
    first. Returns (tips (m, 2) input pixels, scores (m,))."""
    h, w = frame_shape
    x, y = tips_px[:, 0], tips_px[:, 1]
    sel = (scores >= score_threshold) & (x >= -0.5) & (x <= w - 0.5) & (y >= -0.5) & (y <= h - 0.5)
    tips_px, scores = tips_px[sel], scores[sel]
    keep = suppress_duplicates(tips_px, scores, min_separation_um / float(um_per_px))[:n_max]
    return tips_px[keep].reshape(-1, 2), scores[keep]


def verifier_payload(
    verifier: nn.Module, cfg: VerifierConfig, *, first_stage_threshold: float, half: bool = False
) -> dict[str, Any]:
    """What a localiser checkpoint stores under ``"verifier"``. ``first_stage_threshold``: the
    first stage's own score threshold, used when the verifier is switched off (ablation)."""
    state = {
        k: (v.half() if half and v.is_floating_point() else v).detach().cpu() for k, v in verifier.state_dict().items()
    }
    return {"config": cfg.to_dict(), "model_state": state, "first_stage_threshold": float(first_stage_threshold)}


def first_stage_threshold(payload: dict[str, Any], cfg: Any) -> float:
    """The first stage's own score threshold of a checkpoint: stored beside its verifier, or
    the configuration's (``cfg.score_threshold``) when it has none."""
    return float(payload.get("verifier", {}).get("first_stage_threshold", cfg.score_threshold))


def load_verifier(entry: Any, where: str) -> tuple[TipVerifier, VerifierConfig]:
    """Rebuild a verifier from a checkpoint's ``"verifier"`` entry (float32, tiny weights
    flushed to 0 as for the first stage, eval mode). A malformed entry raises DataError naming
    ``where``."""
    from localisation.checkpoint import flush_tiny

    try:
        cfg = VerifierConfig.from_dict(entry["config"])
        model = TipVerifier(cfg)
        model.load_state_dict(flush_tiny(entry["model_state"]))
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise DataError(f"checkpoint {where}: malformed verifier ({first})") from exc
    return model.eval(), cfg
