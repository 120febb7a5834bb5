"""Train the paper's CycleGAN denoiser: in vivo 80x80 crops (domain A) <-> ex vivo (domain B).

Faithful to Sec. III-A / IV-C and CycleGAN: ResNet generators G (in vivo -> ex vivo) and G'
(ex vivo -> in vivo), 70x70 PatchGAN discriminators, least-squares adversarial loss, cycle
loss (lambda = 10), identity loss (0.5 lambda), image pools of 50 fakes, Adam at 2e-4 with
betas (0.5, 0.999), constant learning rate then linear decay to zero.

Data: frames from ``simulators.synth.sample_example`` are resized to the localiser's input
(256x256, as the paper resizes every image) and normalised to [0, 1] exactly as at inference
(``localisation.preprocess.prepare``); an 80x80 crop is cut around every labelled tip,
reflection-padded where the tip is near the border. Augmentation: horizontal/vertical flips.

``train_cyclegan(GanConfig(...), out_dir)`` writes ``out_dir/cyclegan-train.pt`` (resumable:
networks, optimisers, pools, step) every ``checkpoint_every`` steps and at the end, a metrics
log ``out_dir/cyclegan-log.jsonl``, and the inference file ``out_dir/denoiser.pt``
(``Denoiser.load``).
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from localisation.models.cyclegan import (
    Denoiser,
    GeneratorSpec,
    PatchDiscriminator,
    ResnetGenerator,
    atomic_torch_save,
)
from localisation.progress import bar
from rig.atomic import keep_jsonl_records
from rig.errors import DataError
from rig.logs import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class GanConfig:
    """Everything that defines a CycleGAN run. Defaults are the paper's (200 epochs of 6,584
    crops at batch 1 is ~1.3 M steps; ``steps_constant``/``steps_decay`` set the schedule)."""

    ngf: int = 64
    n_blocks: int = 9
    ndf: int = 64
    crop: int = 80
    image_size: int = 256
    batch_size: int = 1
    steps_constant: int = 100_000
    steps_decay: int = 100_000
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    lambda_cycle: float = 10.0
    lambda_identity: float = 0.5
    pool_size: int = 50
    n_in_vivo_frames: int = 2000
    n_ex_vivo_frames: int = 2000
    seed: int = 0
    checkpoint_every: int = 500


class ImagePool:
    """CycleGAN's history of generated images (Shrivastava et al.): the discriminator sees a
    mix of the newest fakes and older ones. ``query(images)`` returns a batch of the same size:
    while the pool is filling, the new images; then each image is, with probability 0.5,
    swapped for a random stored one (which the new image replaces)."""

    def __init__(self, size: int = 50, *, seed: int = 0) -> None:
        self.size = size
        self.images: list[torch.Tensor] = []
        self._rng = random.Random(seed)

    def query(self, images: torch.Tensor) -> torch.Tensor:
        if self.size == 0:  # no history: the new fakes, detached as the pooled ones are
            return images.detach()
        out = []
        for img in images.detach():
            img = img.unsqueeze(0)
            if len(self.images) < self.size:
                self.images.append(img.clone())
                out.append(img)
            elif self._rng.random() < 0.5:
                i = self._rng.randrange(self.size)
                out.append(self.images[i].clone())
                self.images[i] = img.clone()
            else:
                out.append(img)
        return torch.cat(out, 0)


def lr_factor(step: int, steps_constant: int, steps_decay: int) -> float:
    """Learning-rate multiplier: 1 for the first ``steps_constant`` steps, then linear to 0
    at step ``steps_constant + steps_decay``."""
    if step < steps_constant:
        return 1.0
    if steps_decay <= 0:
        return 0.0
    return max(0.0, 1.0 - (step - steps_constant) / steps_decay)


def crop_around(img: np.ndarray, x: float, y: float, size: int) -> np.ndarray:
    """A size x size crop of ``img`` centred on pixel (x, y), reflection-padded at borders."""
    half = size // 2
    cx, cy = int(round(x)), int(round(y))
    padded = np.pad(img, size, mode="reflect")
    r0, c0 = cy - half + size, cx - half + size
    return padded[r0 : r0 + size, c0 : c0 + size]


def make_crops(
    domain: str, n_frames: int, *, seed: int, crop: int, image_size: int, progress: bool = True
) -> np.ndarray:
    """(M, crop, crop) float32 crops in [0, 1] around every tip of ``n_frames`` synthetic frames
    of ``domain`` (seeds ``seed .. seed + n_frames - 1``)."""
    from localisation.preprocess import prepare
    from simulators.synth import sample_example

    crops = []
    for s in bar(range(seed, seed + n_frames), enabled=progress, desc=f"{domain} crops", unit="frame", leave=False):
        ex = sample_example(s, domain=domain)
        img, rs = prepare(ex.pixels, ex.um_per_px, mode="resize", size=image_size, model_um_per_px=None)
        for x, y in rs.to_model(ex.tips_px):
            crops.append(crop_around(img, x, y, crop))
    if not crops:
        raise DataError(f"no labelled tips in {n_frames} synthetic {domain} frames")
    return np.stack(crops).astype(np.float32)


class CropSampler:
    """Random batches of flipped crops, as (B, 1, crop, crop) tensors in [-1, 1]."""

    def __init__(self, crops: np.ndarray, batch_size: int, seed: int) -> None:
        self.crops = torch.from_numpy(crops)[:, None] * 2 - 1
        self.batch_size = batch_size
        self.gen = torch.Generator().manual_seed(seed)

    def sample(self) -> torch.Tensor:
        idx = torch.randint(len(self.crops), (self.batch_size,), generator=self.gen)
        batch = self.crops[idx].clone()
        flips = torch.rand(2, self.batch_size, generator=self.gen) < 0.5
        batch[flips[0]] = batch[flips[0]].flip(-1)
        batch[flips[1]] = batch[flips[1]].flip(-2)
        return batch


class CycleGan(nn.Module):
    """The four networks: ``g`` (in vivo -> ex vivo), ``g_inv``, ``d_ex``, ``d_in``."""

    def __init__(self, cfg: GanConfig) -> None:
        super().__init__()
        self.g = ResnetGenerator(ngf=cfg.ngf, n_blocks=cfg.n_blocks)
        self.g_inv = ResnetGenerator(ngf=cfg.ngf, n_blocks=cfg.n_blocks)
        self.d_ex = PatchDiscriminator(ndf=cfg.ndf)
        self.d_in = PatchDiscriminator(ndf=cfg.ndf)


def lsgan(pred: torch.Tensor, real: bool) -> torch.Tensor:
    """Least-squares GAN loss against target 1 (real) or 0 (fake)."""
    return F.mse_loss(pred, torch.full_like(pred, 1.0 if real else 0.0))


class CycleGanTrainer:
    """One object per run: ``step(real_in, real_ex) -> dict of losses``."""

    def __init__(self, cfg: GanConfig) -> None:
        torch.manual_seed(cfg.seed)
        self.cfg = cfg
        self.nets = CycleGan(cfg)
        betas = (cfg.beta1, cfg.beta2)
        self.opt_g = torch.optim.Adam(
            list(self.nets.g.parameters()) + list(self.nets.g_inv.parameters()), lr=cfg.lr, betas=betas
        )
        self.opt_d = torch.optim.Adam(
            list(self.nets.d_ex.parameters()) + list(self.nets.d_in.parameters()), lr=cfg.lr, betas=betas
        )
        self.pool_ex = ImagePool(cfg.pool_size, seed=cfg.seed)
        self.pool_in = ImagePool(cfg.pool_size, seed=cfg.seed + 1)
        self.step_count = 0
        self._set_lr()

    def _set_lr(self) -> None:
        lr = self.cfg.lr * lr_factor(self.step_count, self.cfg.steps_constant, self.cfg.steps_decay)
        for opt in (self.opt_g, self.opt_d):
            for group in opt.param_groups:
                group["lr"] = lr

    @property
    def lr(self) -> float:
        return float(self.opt_g.param_groups[0]["lr"])

    def step(self, real_in: torch.Tensor, real_ex: torch.Tensor) -> dict[str, float]:
        """One generator and one discriminator update on batches in [-1, 1]."""
        n, c = self.nets, self.cfg
        n.train()
        # generators (discriminators fixed)
        for d in (n.d_ex, n.d_in):
            d.requires_grad_(False)
        fake_ex = n.g(real_in)
        fake_in = n.g_inv(real_ex)
        rec_in = n.g_inv(fake_ex)
        rec_ex = n.g(fake_in)
        loss_adv = lsgan(n.d_ex(fake_ex), True) + lsgan(n.d_in(fake_in), True)
        loss_cyc = F.l1_loss(rec_in, real_in) + F.l1_loss(rec_ex, real_ex)
        loss_idt = F.l1_loss(n.g(real_ex), real_ex) + F.l1_loss(n.g_inv(real_in), real_in)
        loss_g = loss_adv + c.lambda_cycle * loss_cyc + c.lambda_cycle * c.lambda_identity * loss_idt
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()
        # discriminators, on pooled fakes
        for d in (n.d_ex, n.d_in):
            d.requires_grad_(True)
        pooled_ex = self.pool_ex.query(fake_ex)
        pooled_in = self.pool_in.query(fake_in)
        loss_d_ex = 0.5 * (lsgan(n.d_ex(real_ex), True) + lsgan(n.d_ex(pooled_ex), False))
        loss_d_in = 0.5 * (lsgan(n.d_in(real_in), True) + lsgan(n.d_in(pooled_in), False))
        self.opt_d.zero_grad(set_to_none=True)
        (loss_d_ex + loss_d_in).backward()
        self.opt_d.step()
        self.step_count += 1
        self._set_lr()
        return {
            "g_adv": float(loss_adv.detach()),
            "cycle": float(loss_cyc.detach()),
            "identity": float(loss_idt.detach()),
            "d_ex": float(loss_d_ex.detach()),
            "d_in": float(loss_d_in.detach()),
        }

    def state(self) -> dict:
        return {
            "config": asdict(self.cfg),
            "nets": self.nets.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "pool_ex": self.pool_ex.images,
            "pool_in": self.pool_in.images,
            "pool_rngs": [list(self.pool_ex._rng.getstate()[1]), list(self.pool_in._rng.getstate()[1])],
            "step": self.step_count,
        }

    def load_state(self, state: dict) -> None:
        if state.get("config") != asdict(self.cfg):
            raise DataError("resume checkpoint was made with another CycleGAN configuration")
        self.nets.load_state_dict(state["nets"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.pool_ex.images = list(state["pool_ex"])
        self.pool_in.images = list(state["pool_in"])
        if "pool_rngs" in state:  # states from before stop 23 lack them (their resume is not exact)
            for pool, words in zip((self.pool_ex, self.pool_in), state["pool_rngs"], strict=True):
                pool._rng.setstate((3, tuple(int(w) for w in words), None))
        self.step_count = int(state["step"])
        self._set_lr()

    def denoiser(self) -> Denoiser:
        spec = GeneratorSpec(ngf=self.cfg.ngf, n_blocks=self.cfg.n_blocks, crop=self.cfg.crop, image_size=self.cfg.image_size)
        gen = ResnetGenerator(ngf=self.cfg.ngf, n_blocks=self.cfg.n_blocks)
        gen.load_state_dict(self.nets.g.state_dict())
        return Denoiser(gen, spec)


def _trim_log(path: Path, step: int) -> None:
    """Keep the log records of steps up to ``step`` (the checkpoint resumed from): the steps
    after it are trained again and logged again."""
    keep_jsonl_records(path, lambda r: int(r["step"]) <= step)


def train_cyclegan(
    cfg: GanConfig,
    out_dir: str | Path,
    *,
    crops: tuple[np.ndarray, np.ndarray] | None = None,
    resume: bool = True,
    progress: bool = True,
) -> Denoiser:
    """Run (or resume) a CycleGAN training; returns the in vivo -> ex vivo ``Denoiser``.

    ``crops`` = (in vivo, ex vivo) arrays (M, crop, crop) in [0, 1] to skip the synthesis.
    """
    out = Path(out_dir)
    if crops is None:
        crops = (
            make_crops("in_vivo", cfg.n_in_vivo_frames, seed=cfg.seed, crop=cfg.crop, image_size=cfg.image_size, progress=progress),
            make_crops("ex_vivo", cfg.n_ex_vivo_frames, seed=cfg.seed + 1_000_000, crop=cfg.crop, image_size=cfg.image_size, progress=progress),
        )
    out.mkdir(parents=True, exist_ok=True)  # only once there is something to train on
    trainer = CycleGanTrainer(cfg)
    state_path = out / "cyclegan-train.pt"
    saved: dict[str, Any] = {}
    if resume and state_path.is_file():
        saved = torch.load(state_path, map_location="cpu", weights_only=True)
        trainer.load_state(saved)
        log.info("cyclegan_resumed", step=trainer.step_count)
    _trim_log(out / "cyclegan-log.jsonl", trainer.step_count)  # 0: a run stopped before its first checkpoint
    sampler_in = CropSampler(crops[0], cfg.batch_size, cfg.seed + trainer.step_count)
    sampler_ex = CropSampler(crops[1], cfg.batch_size, cfg.seed + 7 + trainer.step_count)
    if "samplers" in saved:  # a resumed run draws the batches an uninterrupted one would have
        sampler_in.gen.set_state(saved["samplers"][0])
        sampler_ex.gen.set_state(saved["samplers"][1])
    total = cfg.steps_constant + cfg.steps_decay
    log.info("cyclegan_start", crops_in_vivo=len(crops[0]), crops_ex_vivo=len(crops[1]), steps=total)
    t0 = time.perf_counter()
    pbar = tqdm(total=total, initial=trainer.step_count, desc="cyclegan", unit="step") if progress else None
    with (out / "cyclegan-log.jsonl").open("a") as logf:
        while trainer.step_count < total:
            losses = trainer.step(sampler_in.sample(), sampler_ex.sample())
            if any(not np.isfinite(v) for v in losses.values()):
                raise DataError(f"CycleGAN training diverged at step {trainer.step_count}: {losses}")
            if pbar is not None:
                pbar.update(1)
            if trainer.step_count % 25 == 0 or trainer.step_count == total:
                if pbar is not None:
                    pbar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()})
                record = {"step": trainer.step_count, "lr": trainer.lr, "time_s": round(time.perf_counter() - t0, 1), **losses}
                logf.write(json.dumps(record) + "\n")
                logf.flush()
            if trainer.step_count % cfg.checkpoint_every == 0 or trainer.step_count == total:
                atomic_torch_save({**trainer.state(), "samplers": [sampler_in.gen.get_state(), sampler_ex.gen.get_state()]},
                                  state_path)
    if pbar is not None:
        pbar.close()
    denoiser = trainer.denoiser()
    denoiser.save(out / "denoiser.pt")
    log.info("cyclegan_done", steps=trainer.step_count, seconds=round(time.perf_counter() - t0, 1))
    return denoiser


def main(argv: list[str] | None = None) -> int:
    """``python -m localisation.gan_train --out DIR [...]``: train a denoiser (CPU or GPU).

    The shipped ``checkpoints/cyclegan-small.pt`` came from ``--out DIR --ngf 16 --blocks 6
    --ndf 32 --batch 4 --steps 600 600 --frames 600 800 --threads 1``.
    """
    import argparse
    import shutil

    p = argparse.ArgumentParser(description="Train the CycleGAN denoiser (in vivo -> ex vivo).")
    p.add_argument("--out", type=Path, required=True, help="run folder (resumable)")
    p.add_argument("--ngf", type=int, default=GanConfig.ngf, help="generator width (paper: 64)")
    p.add_argument("--blocks", type=int, default=GanConfig.n_blocks, help="residual blocks (paper: 9)")
    p.add_argument("--ndf", type=int, default=GanConfig.ndf, help="discriminator width (paper: 64)")
    p.add_argument("--batch", type=int, default=GanConfig.batch_size)
    p.add_argument("--steps", type=int, nargs=2, default=(GanConfig.steps_constant, GanConfig.steps_decay),
                   metavar=("CONSTANT", "DECAY"), help="steps at constant LR, then decaying to zero")
    p.add_argument("--frames", type=int, nargs=2, default=(GanConfig.n_in_vivo_frames, GanConfig.n_ex_vivo_frames),
                   metavar=("IN_VIVO", "EX_VIVO"), help="synthetic frames to cut crops from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--copy-to", type=Path, help="also copy the denoiser file here when done")
    a = p.parse_args(argv)
    try:
        for name, value in (("--ngf", a.ngf), ("--blocks", a.blocks), ("--ndf", a.ndf), ("--batch", a.batch),
                            ("--frames", min(a.frames)), ("--threads", a.threads or 1)):
            if value < 1:
                raise DataError(f"{name} must be at least 1, got {value}")
        if min(a.steps) < 0 or sum(a.steps) < 1:
            raise DataError(f"--steps must be 0 or more and not both 0, got {list(a.steps)}")
        if a.threads:
            torch.set_num_threads(a.threads)
        cfg = GanConfig(
            ngf=a.ngf, n_blocks=a.blocks, ndf=a.ndf, batch_size=a.batch, steps_constant=a.steps[0],
            steps_decay=a.steps[1], n_in_vivo_frames=a.frames[0], n_ex_vivo_frames=a.frames[1], seed=a.seed,
            checkpoint_every=200,
        )
        train_cyclegan(cfg, a.out)
        if a.copy_to is not None:
            shutil.copyfile(a.out / "denoiser.pt", a.copy_to)
    except (DataError, OSError, ValueError) as exc:  # one line, no traceback
        print(f"gan_train: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
