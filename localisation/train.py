"""The localiser trainer: stages, plateau halving, checkpoints, resume, metrics log, DDP.

``train(cfg, TrainOptions(...))`` runs the configuration's stages in order. Each stage trains
the submodules it names (others frozen, e.g. the paper's encoder-only then decoder-only then
joint stages) with Adam at its learning rate; the learning rate is halved after
``plateau_patience_epochs`` epochs without validation-loss improvement (the paper: 20).

Per epoch: one pass over the augmented training frames, then validation (loss on un-augmented
crops, and detection metrics on whole frames in µm), a line in ``metrics.jsonl``, and
``last.pt`` (resumable: model, optimiser, scheduler, stage, epoch, best score). ``best.pt``
keeps the epoch with the best validation score (acc@5 µm + precision). ``max_minutes`` stops
cleanly between steps and saves ``last.pt``; ``--resume`` continues from it.

Multi-GPU: launched by ``torchrun`` (WORLD_SIZE set), each process trains on its share of
every epoch (DistributedSampler) with DistributedDataParallel (NCCL on GPUs, gloo on CPU);
rank 0 validates, logs and writes checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from localisation.checkpoint import (
    load_weights,
    read_checkpoint,
    save_checkpoint,
    unwrap,
    zero_tiny_,
)
from localisation.configs import LocaliserConfig, Stage, build_model
from localisation.data import (
    PreparedFrame,
    TipTrainingSet,
    cached_synthetic,
    denoise_frames,
    load_directory,
)
from localisation.heatmaps import batch_heatmaps
from localisation.inference import predict_prepared
from localisation.matching import paper_total_loss
from localisation.metrics import MetricsAccumulator
from localisation.models.fast import centernet_loss
from localisation.progress import bar
from rig.atomic import keep_jsonl_records
from rig.errors import DataError
from rig.logs import get_logger

#: Weights that weight decay has shrunk below ``TINY_WEIGHT`` are set to 0 this often
#: (``checkpoint.zero_tiny_``), so no step computes with subnormal floats (slow on x86; see
#: checkpoint.TINY_WEIGHT).
FLUSH_EVERY_STEPS = 50


log = get_logger(__name__, channel="train")


@dataclass
class TrainOptions:
    """Where and how long to train. ``data``/``val_data``: patchrig-tips/1 directories (None:
    synthetic frames from the configuration's seed ranges); ``cache_dir``: where rendered
    synthetic frames are cached; ``max_minutes``: wall-clock budget (None: unlimited)."""

    out_dir: Path
    data: Path | None = None
    val_data: Path | None = None
    cache_dir: Path | None = None
    resume: bool = False
    max_minutes: float | None = None
    device: str = "auto"
    threads: int | None = None
    workers: int = 0
    progress: bool = True
    seed: int = 0
    pretrained: dict[str, str] | None = None
    init_from: Path | None = None


def compute_loss(
    cfg: LocaliserConfig,
    model: nn.Module,
    outputs: dict[str, torch.Tensor],
    batch: dict[str, torch.Tensor],
    stage: Stage | None = None,
) -> dict[str, torch.Tensor]:
    """The configuration's loss on one batch (terms and ``total``).

    In a stage that trains only the ``encoder`` (the paper's first stage, "train only the
    heatmap prediction encoder"), the paper loss is the heatmap Dice alone: the Hungarian term
    would otherwise flow through the frozen, untrained decoder into the heatmap and dominate it
    (measured by the paper helper: the heatmap saturated to all ones).
    """
    tips, valid = batch["tips"], batch["valid"]
    if stage is not None and stage.trainable == ("encoder",) and "heatmap" in outputs:
        outputs = {"heatmap": outputs["heatmap"]}
    if cfg.loss == "centernet":
        return centernet_loss(
            outputs, tips, valid, stride=int(getattr(unwrap(model), "out_stride", 1)), sigma_cells=cfg.sigma_cells,
            ignore_px=batch.get("faint"), ignore_valid=batch.get("faint_valid"),
        )
    if cfg.loss == "paper":
        target = None
        if "heatmap" in outputs:
            h, w = outputs["heatmap"].shape[-2:]
            target = batch_heatmaps(tips, valid, h, w, sigma_px=cfg.sigma_px, mode="sum")
        return paper_total_loss(outputs, target, tips, valid, alpha=cfg.alpha)
    raise DataError(f"config {cfg.name!r}: unknown loss {cfg.loss!r}")


def evaluate_prepared(
    model: nn.Module,
    cfg: LocaliserConfig,
    frames: list[PreparedFrame],
    *,
    device: torch.device,
    progress: bool = False,
) -> dict[str, Any]:
    """Detection metrics (µm, input pixels) of the model on whole prepared frames."""
    acc = MetricsAccumulator()
    was_training = model.training
    model.eval()
    for f in bar(frames, enabled=progress, desc="validate", leave=False, unit="frame"):
        pred = predict_prepared(model, cfg, f.image_float(), device=device)
        acc.add(
            f.resampling.to_input(pred.xy_model_px),
            f.resampling.to_input(f.tips_model_px),
            f.um_per_px,
            faint_px=f.resampling.to_input(f.faint_model_px),
        )
    model.train(was_training)
    return acc.summary()


def _setup_distributed(device_opt: str) -> tuple[int, int, torch.device, bool]:
    """(rank, world size, device, whether this call created the process group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    created = False
    if world > 1 or "LOCAL_RANK" in os.environ:
        use_cuda = torch.cuda.is_available() and device_opt != "cpu"
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
            created = True
        rank = dist.get_rank()
        if use_cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            return rank, dist.get_world_size(), torch.device("cuda", local), created
        return rank, dist.get_world_size(), torch.device("cpu"), created
    if device_opt == "auto":
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"), False
    return 0, 1, torch.device(device_opt), False


def _any_rank(flag: bool, device: torch.device) -> bool:
    """``flag`` of this process, or-ed over all ranks under DDP (every rank must call it)."""
    if not dist.is_initialized():
        return flag
    shared = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(shared, op=dist.ReduceOp.MAX)
    return bool(shared.item() > 0)


def _set_trainable(model: nn.Module, trainable: tuple[str, ...] | None) -> list[nn.Parameter]:
    """Freeze everything except the named submodules (None: train all); frozen submodules
    also stay in eval mode (their batch-norm statistics do not move)."""
    inner = unwrap(model)
    if trainable is None:
        for p in inner.parameters():
            p.requires_grad_(True)
        return list(inner.parameters())
    for p in inner.parameters():
        p.requires_grad_(False)
    params: list[nn.Parameter] = []
    for name in trainable:
        try:
            sub = inner.get_submodule(name)
        except AttributeError as exc:
            raise DataError(f"stage trains {name!r}, which this model does not have") from exc
        for p in sub.parameters():
            p.requires_grad_(True)
            params.append(p)
    return params


def _frozen_to_eval(model: nn.Module, trainable: tuple[str, ...] | None) -> None:
    inner = unwrap(model)
    inner.train()
    if trainable is not None:
        for name, child in inner.named_children():
            if name not in trainable:
                child.eval()


def _val_score(summary: dict[str, Any]) -> float:
    o = summary["overall"]
    return float((o["acc_5um"] or 0.0) + o["precision"])


def load_frames(cfg: LocaliserConfig, opts: TrainOptions) -> tuple[list[PreparedFrame], list[PreparedFrame]]:
    """Training and validation frames (directories, or cached synthetic seeds)."""
    if opts.data is not None:
        train_frames = load_directory(cfg, opts.data, progress=opts.progress)
    else:
        train_frames = cached_synthetic(cfg, cfg.train_seed, cfg.train_examples, opts.cache_dir, desc="render train",
                                        progress=opts.progress)
    if opts.val_data is not None:
        val_frames = load_directory(cfg, opts.val_data, progress=opts.progress)
    elif opts.data is not None:
        n_val = max(1, min(cfg.val_examples, len(train_frames) // 10))
        val_frames, train_frames = train_frames[:n_val], train_frames[n_val:] or train_frames
    else:
        val_frames = cached_synthetic(cfg, cfg.val_seed, cfg.val_examples, opts.cache_dir, desc="render val",
                                      progress=opts.progress)
    if cfg.denoiser:
        denoise_frames(train_frames, cfg.denoiser, progress=opts.progress)
        denoise_frames(val_frames, cfg.denoiser, progress=opts.progress)
    return train_frames, val_frames


RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl")  # what a run directory holds


def _dataset_identity(path: Path | None) -> dict[str, str] | None:
    """A dataset directory as a resumed run must find it again: the SHA-256 of its labels.json,
    wherever it now lies (None for synthetic frames, which the configuration's seeds define)."""
    if path is None:
        return None
    labels = Path(path) / "labels.json"
    return {"labels_sha256": hashlib.sha256(labels.read_bytes()).hexdigest() if labels.is_file() else "missing"}


def run_identity(cfg: LocaliserConfig, opts: TrainOptions) -> dict[str, Any]:
    """What a run is trained on and with: the whole configuration (stages with their epochs
    and learning rates, batch size, scale, ...), the seed and the datasets. Stored in
    ``last.pt``; a resume with any of it changed is refused (it would silently train another
    run: other frames, fewer epochs, a learning rate the restored optimiser ignores)."""
    return json.loads(json.dumps({
        "config": cfg.to_dict(), "seed": opts.seed,
        "data": _dataset_identity(opts.data), "val_data": _dataset_identity(opts.val_data),
    }))


def _identity_changes(stored: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The fields (dotted names) whose values differ, with both values."""
    changes = []
    for key in sorted(set(stored) | set(now)):
        a, b = stored.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += [f"{key}.{c}" for c in _identity_changes(a, b)]
        elif a != b:
            changes.append(f"{key} (was {json.dumps(a)[:80]}, now {json.dumps(b)[:80]})")
    return changes


def _trim_metrics(path: Path, epochs_done: int) -> None:
    """Keep only the lines of epochs the resumed run will not train again (a stop between the
    metrics line and ``last.pt`` left a line of an epoch that is then trained again) and drop
    a torn last line."""
    keep_jsonl_records(path, lambda r: isinstance(r.get("epoch"), int) and r["epoch"] < epochs_done)


def train(cfg: LocaliserConfig, opts: TrainOptions) -> dict[str, Any]:
    """Train ``cfg``; returns the final state summary (best score, epochs done, stopped_early)."""
    rank, world, device, created_group = _setup_distributed(opts.device)
    try:
        return _train(cfg, opts, rank, world, device)
    finally:
        if created_group:
            dist.destroy_process_group()


def _train(cfg: LocaliserConfig, opts: TrainOptions, rank: int, world: int, device: torch.device) -> dict[str, Any]:
    is_main = rank == 0
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed + rank)
    random.seed(opts.seed + rank)
    np.random.seed(opts.seed + rank)
    out = Path(opts.out_dir)
    if not opts.resume:
        earlier = [name for name in RUN_FILES if (out / name).exists()]
        if earlier:
            raise DataError(f"{out} already holds a run ({', '.join(earlier)}): add --resume to continue it, "
                            "or choose another --out (nothing was overwritten)")
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    deadline = None if opts.max_minutes is None else t_start + 60.0 * opts.max_minutes

    model = build_model(cfg, pretrained=opts.pretrained).to(device)
    state: dict[str, Any] = {"stage": 0, "epoch_in_stage": 0, "global_step": 0, "epochs_done": 0, "best_score": -math.inf}
    opt_state = sched_state = None
    identity = run_identity(cfg, opts)  # stored in every last.pt
    if opts.resume:
        last = out / "last.pt"
        payload = read_checkpoint(last, expect_config=cfg.name)
        stored_scale = payload.get("config", {}).get("model_um_per_px")
        if stored_scale != cfg.model_um_per_px:
            # a resumed run never changes the scale its frames are resampled to
            raise DataError(
                f"{last} was trained at {stored_scale} µm per model pixel, not {cfg.model_um_per_px}: "
                f"resume with --um-per-px {stored_scale}"
            )
        stored_denoiser = payload.get("config", {}).get("denoiser")
        if stored_denoiser != cfg.denoiser:
            raise DataError(f"{last} was trained with denoiser {stored_denoiser!r}, not {cfg.denoiser!r}: "
                            f"resume with the run's own --denoiser")
        load_weights(model, payload, last)
        ts = payload.get("trainer_state") or {}
        if "run" in ts:  # checkpoints from before stop 23 carry no identity
            changes = _identity_changes(ts["run"], identity)
            if changes:
                raise DataError(f"{last}: --resume needs the run's own options and data; changed: "
                                f"{'; '.join(changes[:4])} (start a new run with --init-from {last} instead)")
        state.update({k: ts[k] for k in state if k in ts})
        opt_state, sched_state = ts.get("optimizer"), ts.get("scheduler")
        if is_main:
            log.info("resumed", checkpoint=str(last), **{k: state[k] for k in ("stage", "epoch_in_stage", "epochs_done")})
    elif opts.init_from is not None:
        load_weights(model, read_checkpoint(opts.init_from, expect_config=cfg.name), opts.init_from, grow=True)

    train_frames, val_frames = load_frames(cfg, opts)
    if not train_frames:
        raise DataError("no training frames")
    if is_main:
        log.info("data", train_frames=len(train_frames), val_frames=len(val_frames), config=cfg.name, device=str(device), world=world)
    train_set = TipTrainingSet(train_frames, cfg, seed=opts.seed)
    val_set = TipTrainingSet(val_frames, cfg, seed=opts.seed + 1, augment=False)
    ddp_model: nn.Module = model
    if dist.is_initialized():
        ddp_model = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            # the paper-family models train some submodules with others frozen
            find_unused_parameters=cfg.model != "fast",
        )
    metrics_path = out / "metrics.jsonl"
    if opts.resume and is_main:
        _trim_metrics(metrics_path, state["epochs_done"])
    stopped_early = False

    def save_last(opt: torch.optim.Optimizer | None, sched: Any) -> None:
        """``last.pt`` with the trainer state; ``opt`` None at a stage boundary (the next stage
        builds a new optimiser for other parameters, which the old state does not fit)."""
        if is_main:
            ts = {**state, "run": identity}
            if opt is not None:
                ts.update(optimizer=opt.state_dict(), scheduler=sched.state_dict())
            save_checkpoint(out / "last.pt", model, cfg, trainer_state=ts)

    while state["stage"] < len(cfg.stages) and not stopped_early:
        stage = cfg.stages[state["stage"]]
        params = _set_trainable(ddp_model, stage.trainable)
        opt = torch.optim.Adam([p for p in params if p.requires_grad], lr=stage.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience_epochs
        )
        if opt_state is not None and sched_state is not None:
            opt.load_state_dict(opt_state)
            sched.load_state_dict(sched_state)
            opt_state = sched_state = None
        sampler: DistributedSampler[Any] | None = (
            DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=opts.seed)
            if dist.is_initialized()
            else None
        )
        while state["epoch_in_stage"] < stage.epochs:
            epoch = state["epochs_done"]
            train_set.set_epoch(epoch)
            if sampler is not None:
                sampler.set_epoch(epoch)
            gen = torch.Generator().manual_seed(opts.seed * 100_003 + epoch)
            loader = DataLoader(
                train_set, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                num_workers=opts.workers, drop_last=len(train_set) > cfg.batch_size * world, generator=gen,
            )
            _frozen_to_eval(ddp_model, stage.trainable)
            sums: dict[str, float] = {}
            n_batches = 0
            show = opts.progress and is_main
            from tqdm import tqdm

            pbar = tqdm(loader, desc=f"{cfg.name} {stage.name} epoch {state['epoch_in_stage'] + 1}/{stage.epochs}",
                        unit="batch") if show else None
            for batch in pbar if pbar is not None else loader:
                batch = {k: v.to(device) for k, v in batch.items()}
                outputs = ddp_model(batch["image"])
                terms = compute_loss(cfg, model, outputs, batch, stage)
                opt.zero_grad(set_to_none=True)
                terms["total"].backward()
                nn.utils.clip_grad_norm_(params, 10.0)
                opt.step()
                state["global_step"] += 1
                if state["global_step"] % FLUSH_EVERY_STEPS == 0:
                    zero_tiny_(params)
                n_batches += 1
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                if pbar is not None:
                    pbar.set_postfix(loss=f"{sums['total'] / n_batches:.4f}")
                if deadline is not None and _any_rank(time.monotonic() > deadline, device):
                    stopped_early = True  # every rank at the same step: none waits in an all-reduce
                    break
            if stopped_early:
                save_last(opt, sched)
                if is_main:
                    log.warning("time budget reached; saved last.pt (resume with --resume)", minutes=opts.max_minutes)
                break
            # validation (rank 0), then share the loss so every rank's scheduler agrees
            record: dict[str, Any] = {}
            val_loss = torch.zeros(1, device=device)
            if is_main:
                val_loss[0] = _val_loss(cfg, model, val_set, device, stage)
                summary = evaluate_prepared(model, cfg, val_frames, device=device)
                record = {
                    "epoch": epoch, "stage": stage.name, "epoch_in_stage": state["epoch_in_stage"],
                    "step": state["global_step"], "lr": opt.param_groups[0]["lr"],
                    "train": {k: v / max(n_batches, 1) for k, v in sums.items()},
                    "val_loss": float(val_loss[0]), "val": summary["overall"],
                    "minutes": (time.monotonic() - t_start) / 60.0,
                }
            if dist.is_initialized():
                dist.broadcast(val_loss, src=0)
            sched.step(float(val_loss[0]))
            state["epoch_in_stage"] += 1
            state["epochs_done"] += 1
            if is_main:
                score = _val_score({"overall": record["val"]})
                if score > state["best_score"]:
                    state["best_score"] = score
                    save_checkpoint(out / "best.pt", model, cfg, metrics={"val": record["val"], "epoch": epoch})
                record["val_score"] = score
                with metrics_path.open("a") as fh:
                    fh.write(json.dumps(record) + "\n")
                o = record["val"]
                log.info("epoch", epoch=epoch, stage=stage.name, loss=round(record["train"]["total"], 4),
                         val_loss=round(record["val_loss"], 4), acc_5um=o["acc_5um"], acc_10um=o["acc_10um"],
                         precision=round(o["precision"], 4), lr=record["lr"])
            save_last(opt, sched)
        if not stopped_early:
            state["stage"] += 1
            state["epoch_in_stage"] = 0
            save_last(None, None)
    if dist.is_initialized():
        dist.barrier()
    return {"epochs_done": state["epochs_done"], "best_score": state["best_score"], "stopped_early": stopped_early,
            "out_dir": str(out)}


@torch.no_grad()
def _val_loss(
    cfg: LocaliserConfig, model: nn.Module, val_set: TipTrainingSet, device: torch.device, stage: Stage | None = None
) -> float:
    was = model.training
    model.eval()
    total, n = 0.0, 0
    for batch in DataLoader(val_set, batch_size=cfg.batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        total += float(compute_loss(cfg, model, model(batch["image"]), batch, stage)["total"]) * len(batch["image"])
        n += len(batch["image"])
    model.train(was)
    return total / max(n, 1)
