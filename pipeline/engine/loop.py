"""The one training loop every training stage runs.

A stage supplies a config (`TrainConfig` plus its `model` section), a function that builds its
model (an `nn.Module` whose forward takes a batch dict and returns a dict with `loss` and scalars
to log) and, optionally, a function that draws image grids. The loop does the rest: process group,
back end, data, checkpoints and resume, preemption, non-finite steps, EMA, logging, export.

Resume: running again on an unfinished OUT_DIR loads the newest committed checkpoint (model,
optimizer, LR schedule, loss scaler, EMA, counters, RNG state per rank, data position per rank)
and continues with the next step and the next unseen batch; a finished OUT_DIR is left as it is.
"""
from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path
from typing import Callable

import numpy as np
import safetensors.torch
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pipeline.config import dump_config
from pipeline.data.loader import StreamingLoader
from pipeline.engine.backends import make_backend
from pipeline.engine.checkpoint import Checkpointer, latest, step_of
from pipeline.engine.config import TrainConfig
from pipeline.engine.distributed import DistInfo, any_rank, barrier, free_cores, setup, teardown
from pipeline.engine.monitor import Monitor

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: checkpointed on a signal; run the same command again to resume
PREEMPTED_MARKER = "PREEMPTED"

BuildModel = Callable[[TrainConfig], nn.Module]
DrawImages = Callable[[nn.Module, dict], dict[str, torch.Tensor]]


class NonFiniteLoss(RuntimeError):
    """Too many consecutive micro-batches gave a NaN or Inf loss or gradient."""


class Preemption:
    """Remembers that SIGTERM or SIGUSR1 arrived; the loop checkpoints at the next step boundary."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGUSR1)}

    def _handle(self, signum, frame) -> None:
        self.requested = True  # nothing else is safe here: the step in flight must finish first

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def exit_code(status: str) -> int:
    """The process exit code for what `train` returned."""
    return PREEMPTED_EXIT_CODE if status == "preempted" else 0


def train(cfg: TrainConfig, build_model: BuildModel, draw_images: DrawImages | None = None) -> str:
    """Trains to `trainer.max_steps`, resuming if OUT_DIR holds a checkpoint. Returns 'finished',
    or 'preempted' after a signal (the checkpoint is written; exit with PREEMPTED_EXIT_CODE)."""
    out = Path(cfg.trainer.out_dir)
    if (out / "final" / "model.safetensors").exists():
        print(f"{out}: already finished; delete {out / 'final'} to train again", flush=True)
        return "finished"
    dist = setup(cfg.engine.backend, cfg.engine.timeout_s)
    try:
        return _Run(cfg, dist, build_model, draw_images).run()
    finally:
        teardown()


class _Run:
    def __init__(self, cfg: TrainConfig, dist: DistInfo, build_model: BuildModel, draw_images: DrawImages | None):
        self.cfg, self.dist, self.draw_images = cfg, dist, draw_images
        self.out = Path(cfg.trainer.out_dir)
        if dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.out / "config.yaml")
        _seed_everything(cfg.trainer.seed + dist.rank, cfg.trainer.deterministic)
        if dist.device.type == "cpu":
            threads = _cpu_threads(cfg)
            os.environ["OMP_NUM_THREADS"] = str(threads)  # else accelerate sets its own count over ours
            torch.set_num_threads(threads)
        self.memory_format = torch.channels_last if cfg.engine.channels_last else torch.preserve_format
        model = build_model(cfg).to(dist.device, memory_format=self.memory_format)
        self.backend = make_backend(model, cfg, dist)
        self.ema = (AveragedModel(self.backend.module, multi_avg_fn=get_ema_multi_avg_fn(cfg.trainer.ema_decay),
                                  use_buffers=True) if cfg.trainer.ema_decay else None)
        self.loader = StreamingLoader(cfg.data, seed=cfg.trainer.seed, rank=dist.rank, world_size=dist.world_size)
        self.checkpointer = Checkpointer(self.out / "checkpoints", cfg.trainer.keep_checkpoints, dist)
        self.step, self.samples, self.nonfinite = 0, 0, 0
        self.preview: dict | None = None  # the batch image grids are drawn from, fixed for the run

    # -- checkpoint state -------------------------------------------------------------------------
    def _write(self, folder: Path) -> None:
        self.backend.save(folder, self.dist.is_main)
        if self.ema is not None and self.dist.is_main:
            safetensors.torch.save_file({k: v.contiguous() for k, v in self.ema.state_dict().items()},
                                        folder / "ema.safetensors")
        torch.save({"step": self.step, "samples": self.samples, "nonfinite": self.nonfinite,
                    "loader": self.loader.state_dict(), "rng": _rng_state()}, folder / f"rank-{self.dist.rank}.pt")

    def _resume(self) -> None:
        checkpoint = latest(self.out / "checkpoints")
        if checkpoint is None:
            return
        self.backend.load(checkpoint)
        if self.ema is not None:
            self.ema.load_state_dict(safetensors.torch.load_file(checkpoint / "ema.safetensors"))
        state = torch.load(checkpoint / f"rank-{self.dist.rank}.pt", weights_only=True)
        self.step, self.samples, self.nonfinite = state["step"], state["samples"], state["nonfinite"]
        self.loader.load_state_dict(state["loader"])
        _set_rng_state(state["rng"])
        if self.dist.is_main:
            (self.out / PREEMPTED_MARKER).unlink(missing_ok=True)
            print(f"resumed from {checkpoint} (step {step_of(checkpoint)})", flush=True)

    def _set_schedule_step(self) -> None:
        """A model whose schedules follow training (the dVAE's temperature and KL weight) reads a
        `step` buffer: the loop sets it to the optimizer steps taken, which forward passes would
        over-count with gradient accumulation or skipped non-finite micro-batches."""
        step = getattr(self.backend.module, "step", None)
        if isinstance(step, torch.Tensor):
            step.fill_(self.step)

    def _update_ema(self) -> None:
        self.ema.update_parameters(self.backend.module)
        # Counters are not averaged: rounded, an average of a step count would stay at its first value.
        for averaged, live in zip(self.ema.module.buffers(), self.backend.module.buffers()):
            if not averaged.is_floating_point():
                averaged.copy_(live)

    def _save(self) -> None:
        self.checkpointer.save(self.step, self._write)

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> str:
        cfg, dist = self.cfg, self.dist
        self._resume()
        preemption = Preemption()
        monitor = Monitor(self.out, dist.is_main, cfg.trainer.max_steps, self.step, cfg.trainer.log_every)
        batches = iter(self.loader)
        consecutive_skips = 0
        try:
            while self.step < cfg.trainer.max_steps:
                outputs, samples, waited = None, 0, 0.0
                good = 0
                while good < cfg.engine.grad_accum:
                    start = time.perf_counter()
                    batch = _to_device(next(batches), dist.device, self.memory_format)
                    waited += time.perf_counter() - start
                    if self.preview is None:
                        self.preview = batch
                    result = self.backend.micro_batch(batch, _nonfinite_anywhere)
                    if result is None:
                        consecutive_skips = self._count_skip(consecutive_skips)
                        continue
                    good, outputs = good + 1, result
                    samples += int(batch["valid"].sum())
                norm = self.backend.step()
                if norm is None:
                    consecutive_skips = self._count_skip(consecutive_skips)
                    continue
                consecutive_skips = 0
                self.step += 1
                self._set_schedule_step()
                self.samples += samples
                if self.ema is not None:
                    self._update_ema()
                monitor.step(self.step, {k: v.detach() for k, v in outputs.items()}, samples * dist.world_size, waited,
                             {"lr": self.backend.lr, "grad_norm": norm, "nonfinite_skipped": self.nonfinite,
                              "samples_skipped": sum(self.loader.totals()["skipped"].values())})
                (preempted,) = any_rank(preemption.requested)
                if preempted or self.step % cfg.trainer.save_every == 0 or self.step == cfg.trainer.max_steps:
                    self._save()
                if preempted:
                    if dist.is_main:
                        (self.out / PREEMPTED_MARKER).write_text(f"{self.step}\n")
                        print(f"preempted: checkpoint at step {self.step}; run the same command to resume", flush=True)
                    return "preempted"
                if cfg.trainer.image_every and self.step % cfg.trainer.image_every == 0:
                    self._images(monitor)
            self._images(monitor)
            self._export(monitor)
            return "finished"
        finally:
            monitor.close()
            preemption.restore()

    def _count_skip(self, consecutive: int) -> int:
        self.nonfinite += 1
        if consecutive + 1 >= self.cfg.trainer.max_nonfinite_skips:
            raise NonFiniteLoss(f"{consecutive + 1} consecutive micro-batches with a NaN or Inf loss or gradient "
                                f"at step {self.step} (trainer.max_nonfinite_skips={self.cfg.trainer.max_nonfinite_skips})")
        return consecutive + 1

    def _images(self, monitor: Monitor) -> None:
        if self.draw_images is None or self.preview is None:
            return
        module = self.ema.module if self.ema is not None else self.backend.module
        was_training = module.training
        module.eval()
        with torch.no_grad():
            grids = self.draw_images(module, self.preview)
        module.train(was_training)
        monitor.images(self.step, grids)

    def _export(self, monitor: Monitor) -> None:
        """Writes `final/model.safetensors` (the EMA weights when there is an EMA) and `final/metrics.json`."""
        weights = ({key.removeprefix("module."): value for key, value in self.ema.state_dict().items()
                    if key.startswith("module.")} if self.ema is not None else self.backend.full_state_dict())
        if self.dist.is_main:
            final = self.out / "final.tmp"
            final.mkdir(exist_ok=True)
            safetensors.torch.save_file({k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v
                                         for k, v in weights.items()}, final / "model.safetensors")
            metrics = {"step": self.step, "samples": self.samples, "nonfinite_skipped": self.nonfinite,
                       **monitor.last, "data": self.loader.totals()}
            (final / "metrics.json").write_text(json.dumps(metrics, indent=1))
            final.replace(self.out / "final")
        barrier()


def _cpu_threads(cfg: TrainConfig) -> int:
    return cfg.engine.cpu_threads or free_cores(cfg.data.num_workers)


def _nonfinite_anywhere(loss: torch.Tensor) -> bool:
    (bad,) = any_rank(not bool(torch.isfinite(loss.detach()).all()))
    return bad


def _to_device(batch: dict, device: torch.device, memory_format: torch.memory_format) -> dict:
    """The batch's tensors on device, image batches (4-D) in memory_format."""
    def move(value: torch.Tensor) -> torch.Tensor:
        return value.to(device, non_blocking=True, memory_format=memory_format if value.dim() == 4 else torch.preserve_format)
    return {key: move(value) if torch.is_tensor(value) else value for key, value in batch.items()}


def _seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [value.tolist() if isinstance(value, np.ndarray) else value for value in np.random.get_state()]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
