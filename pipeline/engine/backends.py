"""The two back ends behind the training loop: accelerate (single-node stages, DDP across local
processes) and DeepSpeed (ZeRO 0-3, bf16/fp16, for the large multi-node stages).

Both offer the same small interface, so the loop never asks which one it has:
- `micro_batch(batch, skip)`: forward; if `skip(loss)` says so (the ranks agree), drop the micro-batch
  without a backward pass; else backward. Returns the model's outputs, or None when dropped.
- `step()`: at the end of an accumulation window: clip, optimizer and LR-schedule step. Returns the
  gradient norm, or None when the gradients were not finite on some rank and the step was skipped.
- `save(folder)` / `load(folder)`: model, optimizer, LR schedule and loss scaler.
- `full_state_dict()`: the whole model's weights (gathered under ZeRO-3), on every rank.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import safetensors.torch
import torch
from torch import nn

from pipeline.engine.config import TrainConfig
from pipeline.engine.distributed import DistInfo, any_rank

Skip = Callable[[torch.Tensor], bool]


def lr_factor(cfg: TrainConfig) -> Callable[[int], float]:
    """The LR multiplier at each optimizer step: linear warm-up, then constant or cosine decay."""
    optim, total = cfg.optim, cfg.trainer.max_steps

    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        if optim.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - optim.warmup_steps) / max(1, total - optim.warmup_steps))
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # foreach=False: the per-parameter path gives bit-identical results however the model is wrapped
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.optim.lr,
                             betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay, foreach=False)


def make_backend(model: nn.Module, cfg: TrainConfig, dist: DistInfo):
    if hasattr(model, "set_activation_checkpointing"):
        model.set_activation_checkpointing(cfg.engine.activation_checkpointing)
    if cfg.engine.backend == "deepspeed":
        return DeepSpeedBackend(model, cfg, dist)
    return AccelerateBackend(model, cfg, dist)


def _full_precision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: (value.float() if value.is_floating_point() else value).detach().cpu().contiguous()
            for key, value in state.items()}


class AccelerateBackend:
    def __init__(self, model: nn.Module, cfg: TrainConfig, dist: DistInfo) -> None:
        from accelerate import Accelerator

        self.cfg = cfg
        self.accelerator = Accelerator(cpu=dist.device.type == "cpu",
                                       mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.engine.precision])
        optimizer = make_optimizer(model, cfg)
        # The schedule is stepped here once per optimizer step, not by accelerate (which would step
        # it once per process).
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.module = self.accelerator.unwrap_model(self.model)
        self._micro = 0

    def micro_batch(self, batch: dict, skip: Skip) -> dict | None:
        accum = self.cfg.engine.grad_accum
        self._micro += 1
        last = self._micro == accum
        # DDP reduces gradients only on the window's last backward pass.
        with nullcontext() if last else self.accelerator.no_sync(self.model), self.accelerator.autocast():
            outputs = self.model(batch)
            if skip(outputs["loss"]):
                self._micro -= 1
                return None
            self.accelerator.backward(outputs["loss"] / accum)
        return outputs

    def step(self) -> float | None:
        self._micro = 0
        clip = self.cfg.optim.grad_clip or float("inf")
        norm = self.accelerator.clip_grad_norm_(self.model.parameters(), clip)
        norm = float(norm) if norm is not None else 0.0
        (bad,) = any_rank(not math.isfinite(norm))
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, folder: Path, is_main: bool) -> None:
        if not is_main:
            return  # DDP keeps identical weights and optimizer state on every rank
        safetensors.torch.save_file(_full_precision(self.module.state_dict()), folder / "model.safetensors")
        scaler = self.accelerator.scaler
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None}, folder / "optimizer.pt")

    def load(self, folder: Path) -> None:
        self.module.load_state_dict(safetensors.torch.load_file(folder / "model.safetensors"))
        state = torch.load(folder / "optimizer.pt", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return _full_precision(self.module.state_dict())


class DeepSpeedBackend:
    def __init__(self, model: nn.Module, cfg: TrainConfig, dist: DistInfo) -> None:
        import deepspeed

        engine_cfg = cfg.engine
        config = {
            "train_micro_batch_size_per_gpu": cfg.data.batch_size,
            "gradient_accumulation_steps": engine_cfg.grad_accum,
            "train_batch_size": cfg.data.batch_size * engine_cfg.grad_accum * dist.world_size,
            "gradient_clipping": cfg.optim.grad_clip,
            "zero_optimization": {"stage": engine_cfg.zero_stage},
            "bf16": {"enabled": engine_cfg.precision == "bf16"},
            "fp16": {"enabled": engine_cfg.precision == "fp16", "loss_scale": 0},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1,
        }
        optimizer = make_optimizer(model, cfg)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg)))
        self.module = self.engine.module
        self.zero_stage = engine_cfg.zero_stage
        self._dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[engine_cfg.precision]

    def micro_batch(self, batch: dict, skip: Skip) -> dict | None:
        if self._dtype != torch.float32:
            batch = {key: value.to(self._dtype) if torch.is_tensor(value) and value.is_floating_point() else value
                     for key, value in batch.items()}
        outputs = self.engine(batch)
        if skip(outputs["loss"]):
            return None  # no backward and no engine.step: DeepSpeed's window simply waits for another micro-batch
        self.engine.backward(outputs["loss"])
        self.engine.step()  # applies the update only at the end of the accumulation window
        return outputs

    def step(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else 0.0
        return norm if math.isfinite(norm) else None

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, folder: Path, is_main: bool) -> None:
        self.engine.save_checkpoint(str(folder), tag="deepspeed")

    def load(self, folder: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(folder), tag="deepspeed", load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {folder}")

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        if self.zero_stage < 3:
            return _full_precision(self.module.state_dict())
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
            return _full_precision(self.module.state_dict())
