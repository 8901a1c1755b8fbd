"""The one training loop every training stage runs.

A stage supplies a config (`TrainConfig` plus its `model` section), a function that builds its
training task (task.py: an `nn.Module` whose forward takes a batch dict and returns a dict with
`loss` and scalars to log, with optional hooks) and, optionally, a function that draws image grids.
The loop does the rest: process group, back end, data, checkpoints and resume, preemption,
non-finite steps, EMA, logging, export.

Resume: running again on an unfinished OUT_DIR loads the newest committed checkpoint (task,
optimizers, LR schedules, loss scaler, EMA, counters, RNG state per rank, data position per rank)
and continues with the next step and the next unseen batch. Operational settings may change in
between: with another worker count or world size the loader re-plans the rest of its epoch (ZeRO
stages 1-3 cannot change world size). A finished OUT_DIR is left as it is, unless
`trainer.max_steps` was raised: then training continues from its last checkpoint and the export
in `final/` is replaced at the new end.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Callable

import numpy as np
import safetensors.torch
import torch
from torch import nn

from pipeline.data.loader import StreamingLoader
from pipeline.data.precomputed import record_manifest
from pipeline.engine.backends import make_backend
from pipeline.engine.checkpoint import Checkpointer, finished_step, latest, step_of
from pipeline.engine.config import TrainConfig
from pipeline.engine.distributed import DistInfo, any_rank, barrier, free_cores, setup, teardown
from pipeline.engine.ema import make_average
from pipeline.engine.monitor import Monitor
from pipeline.engine.task import task_method
from pipeline.markers import PREEMPTED_EXIT_CODE, PREEMPTED_MARKER

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
    exported = finished_step(out)
    if exported is not None and exported >= cfg.trainer.max_steps:
        print(f"{out}: already finished at step {exported}; raise trainer.max_steps to train on", flush=True)
        return "finished"
    if exported is not None and latest(out / "checkpoints") is None:
        raise FileNotFoundError(f"{out}: trainer.max_steps is {cfg.trainer.max_steps}, but the run finished at step "
                                f"{exported} and no checkpoint is left to continue from")
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
            if cfg.data.kind == "precomputed":
                record_manifest(cfg.data.shards, self.out)
        _seed_everything(cfg.trainer.seed + dist.rank, cfg.trainer.deterministic)
        if dist.device.type == "cpu":
            threads = _cpu_threads(cfg)
            os.environ["OMP_NUM_THREADS"] = str(threads)  # else accelerate sets its own count over ours
            torch.set_num_threads(threads)
        self.memory_format = torch.channels_last if cfg.engine.channels_last else torch.preserve_format
        task = build_model(cfg).to(dist.device, memory_format=self.memory_format)
        self.backend = make_backend(task, cfg, dist)
        sharded = cfg.engine.backend == "deepspeed" and cfg.engine.zero_stage == 3
        self.ema = make_average(self.backend.module, cfg.trainer.ema_decay, sharded) if cfg.trainer.ema_decay else None
        self.loader = StreamingLoader(cfg.data, seed=cfg.trainer.seed, rank=dist.rank, world_size=dist.world_size)
        weights = sum(t.numel() * t.element_size() for t in self.backend.module.state_dict().values())
        moments = sum(2 * 4 * p.numel() for p in self.backend.module.parameters() if p.requires_grad)  # AdamW's, fp32
        expected = weights * (1 + (self.ema is not None)) + moments
        self.checkpointer = Checkpointer(self.out / "checkpoints", cfg.trainer.keep_checkpoints, dist, expected)
        self.step, self.samples, self.nonfinite = 0, 0, 0
        self._consecutive_skips = 0
        self.preview: dict | None = None  # the batch image grids are drawn from, fixed for the run

    # -- checkpoint state -------------------------------------------------------------------------
    def _write(self, folder: Path) -> None:
        self.backend.save(folder, self.dist.is_main)
        if self.ema is not None:
            ema = self.ema.state_dict()  # a collective under ZeRO-3
            if self.dist.is_main:
                safetensors.torch.save_file({k: v.contiguous() for k, v in ema.items()}, folder / "ema.safetensors")
        torch.save({"step": self.step, "samples": self.samples, "nonfinite": self.nonfinite,
                    "loader": self.loader.state_dict(), "rng": _rng_state()}, folder / f"rank-{self.dist.rank}.pt")

    def _resume(self) -> None:
        checkpoint = self.checkpointer.newest_intact()
        if checkpoint is None:
            return
        states = sorted(checkpoint.glob("rank-*.pt"), key=lambda path: int(path.stem.split("-")[1]))
        world = self.dist.world_size
        if len(states) != world and self.cfg.engine.backend == "deepspeed" and self.cfg.engine.zero_stage:
            raise ValueError(f"{checkpoint} was written by {len(states)} ranks with ZeRO stage {self.cfg.engine.zero_stage}, "
                             f"whose optimizer state is split per rank: resume it with {len(states)} ranks "
                             f"(launch.nnodes x launch.nproc_per_node), not {world}")
        self.backend.load(checkpoint)
        if self.ema is not None:
            self.ema.load(str(checkpoint / "ema.safetensors"))
        own = torch.load(states[self.dist.rank], weights_only=True) if self.dist.rank < len(states) else None
        if len(states) == world and self.loader.same_layout(own["loader"]):
            state = own
            self.loader.load_state_dict(state["loader"])
            _set_rng_state(state["rng"])
        else:  # another world size or worker count: the loader re-plans from every old rank's position
            every = [own if rank == self.dist.rank else torch.load(path, weights_only=True) for rank, path in enumerate(states)]
            self.loader.load_state_dict([rank_state["loader"] for rank_state in every])
            state = own if len(states) == world else every[0]
            if len(states) == world:
                _set_rng_state(own["rng"])
            else:  # the random streams of ranks that did not exist cannot continue: all start afresh
                _seed_everything(self.cfg.trainer.seed + self.dist.rank + 1_000_003 * state["step"],
                                 self.cfg.trainer.deterministic)
        self.step, self.samples, self.nonfinite = state["step"], state["samples"], state["nonfinite"]
        if self.dist.is_main:
            (self.out / PREEMPTED_MARKER).unlink(missing_ok=True)
            moved = f"; world size {len(states)} -> {world}" if len(states) != world else ""
            print(f"resumed from {checkpoint} (step {step_of(checkpoint)}){moved}", flush=True)

    def _save(self) -> None:
        self.checkpointer.save(self.step, self._write)

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> str:
        cfg, dist = self.cfg, self.dist
        self._resume()
        after_step = task_method(self.backend.module, "after_step")
        after_step(self.step)
        preemption = Preemption()
        monitor = Monitor(self.out, dist.is_main, cfg.trainer.max_steps, self.step, cfg.trainer.log_every)
        self._batches = iter(self.loader)
        try:
            while self.step < cfg.trainer.max_steps:
                trained = self._train_step()
                if trained is None:
                    continue  # no phase could take its step: it is tried again on new data
                outputs, scalars, samples, waited = trained
                self.step += 1
                after_step(self.step)
                self.samples += samples
                if self.ema is not None:
                    self.ema.update(self.backend.module)
                monitor.step(self.step, outputs, samples * dist.world_size, waited,
                             {"lr": self.backend.lr, **scalars, "nonfinite_skipped": self.nonfinite,
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

    def _train_step(self) -> tuple[dict, dict, int, float] | None:
        """One optimizer step of every phase, on grad_accum good micro-batches each (the same ones for
        every phase; a dropped micro-batch is replaced by the next one). Returns the outputs to log,
        the gradient norms, the valid samples trained on and the time spent waiting for data; None
        when no phase could take its step."""
        window: list[dict] = []
        waited, outputs, norms, samples = 0.0, {}, {}, 0
        for index, phase in enumerate(self.backend.phases):
            good = used = 0
            while good < self.cfg.engine.grad_accum:
                if used == len(window):
                    start = time.perf_counter()
                    window.append(_to_device(next(self._batches), self.dist.device, self.memory_format))
                    waited += time.perf_counter() - start
                    self.preview = window[-1] if self.preview is None else self.preview
                batch, used = window[used], used + 1
                result = self.backend.micro_batch(phase, batch, _nonfinite_anywhere)
                if result is None:
                    self._count_skip()
                    continue
                good += 1
                samples += int(batch["valid"].sum()) if index == 0 else 0
                outputs.update({key if index == 0 else f"{phase}/{key}": value.detach() for key, value in result.items()})
            norm = self.backend.step(phase)
            if norm is None:
                self._count_skip()
                continue
            norms["grad_norm" if index == 0 else f"{phase}/grad_norm"] = norm
        if len(norms) == len(self.backend.phases):
            self._consecutive_skips = 0
        return (outputs, norms, samples, waited) if norms else None

    def _count_skip(self) -> None:
        self.nonfinite += 1
        self._consecutive_skips += 1
        if self._consecutive_skips >= self.cfg.trainer.max_nonfinite_skips:
            raise NonFiniteLoss(f"{self._consecutive_skips} consecutive micro-batches with a NaN or Inf loss or gradient "
                                f"at step {self.step} (trainer.max_nonfinite_skips={self.cfg.trainer.max_nonfinite_skips})")

    def _images(self, monitor: Monitor) -> None:
        if self.draw_images is None or self.preview is None:
            return
        module = self.ema.module if self.ema is not None and self.ema.module is not None else self.backend.module
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
            shutil.rmtree(self.out / "final.old", ignore_errors=True)
            if (self.out / "final").exists():  # an earlier end, before trainer.max_steps was raised
                (self.out / "final").replace(self.out / "final.old")
            final.replace(self.out / "final")
            shutil.rmtree(self.out / "final.old", ignore_errors=True)
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
