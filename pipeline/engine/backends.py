"""The two back ends behind the training loop: accelerate (single-node stages, DDP across local
processes) and DeepSpeed (ZeRO 0-3, bf16/fp16, for the large multi-node stages).

Both train each phase of a task (task.py; most tasks have one) with its own optimizer, LR schedule
and wrapper (a DDP module, a DeepSpeed engine), and offer the same small interface, so the loop
never asks which one it has:
- `micro_batch(phase, batch, skip)`: forward; if `skip(loss)` says so (the ranks agree), drop the
  micro-batch without a backward pass; else backward. Returns the task's outputs, or None when dropped.
- `step(phase)`: at the end of an accumulation window: clip, optimizer and LR-schedule step. Returns
  the gradient norm, or None when the gradients were not finite on some rank and the step was skipped.
- `save(folder)` / `load(folder)`: the task, optimizers, LR schedules and loss scalers.
- `full_state_dict()`: the whole task's weights (gathered under ZeRO-3), on every rank.
While a phase runs, only its parameters are trainable: a phase's loss never reaches another's
gradients (or their DDP and ZeRO reductions).
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import safetensors.torch
import torch
from torch import nn

from pipeline.engine.config import TrainConfig
from pipeline.engine.distributed import DistInfo, any_rank
from pipeline.engine.task import SINGLE_PHASE, PhaseModule, phase_parameters, task_method

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


def make_backend(task: nn.Module, cfg: TrainConfig, dist: DistInfo):
    task_method(task, "set_activation_checkpointing")(cfg.engine.activation_checkpointing)
    if cfg.engine.backend == "deepspeed":
        return DeepSpeedBackend(task, cfg, dist)
    return AccelerateBackend(task, cfg, dist)


@dataclass
class _Phase:
    """What one phase trains with: its parameters, its wrapped module, optimizer and LR schedule."""

    parameters: list[nn.Parameter]
    model: Any  # the DDP-wrapped module, or the DeepSpeed engine
    optimizer: Any
    scheduler: Any


def _phases(task: nn.Module, cfg: TrainConfig) -> dict[str, tuple[list[nn.Parameter], nn.Module, torch.optim.Optimizer]]:
    """Per phase: its trainable parameters, the module to wrap (the task itself when it has one
    phase) and an AdamW over its share of the task's parameter groups."""
    parameters = phase_parameters(task)
    groups = task_method(task, "param_groups")(cfg.optim.weight_decay)
    parts = task_method(task, "phases")()
    phases = {}
    for name, mine in parameters.items():
        ids = {id(p) for p in mine}
        own = [{**group, "params": [p for p in group["params"] if id(p) in ids]} for group in groups]
        # foreach=False: the per-parameter path gives bit-identical results however the model is wrapped
        optimizer = torch.optim.AdamW([group for group in own if group["params"]], lr=cfg.optim.lr,
                                      betas=cfg.optim.betas, foreach=False)
        module = task if len(parameters) == 1 else PhaseModule(task, name, parts[name])
        phases[name] = (mine, module, optimizer)
    return phases


class _Backend:
    """What both back ends share: the phases and which of them is trainable."""

    def __init__(self, task: nn.Module) -> None:
        self.module = task  # the unwrapped task
        self.phases: dict[str, _Phase] = {}
        self._active: str | None = None

    def _activate(self, phase: str) -> _Phase:
        """Makes only `phase`'s parameters trainable (nothing to do for a task of one phase)."""
        if phase != self._active and len(self.phases) > 1:
            for name, other in self.phases.items():
                for parameter in other.parameters:
                    parameter.requires_grad_(name == phase)
            self._active = phase
        return self.phases[phase]

    @property
    def lr(self) -> float:
        return next(iter(self.phases.values())).scheduler.get_last_lr()[0]


def _full_precision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: (value.float() if value.is_floating_point() else value).detach().cpu().contiguous()
            for key, value in state.items()}


class AccelerateBackend(_Backend):
    def __init__(self, task: nn.Module, cfg: TrainConfig, dist: DistInfo) -> None:
        from accelerate import Accelerator

        super().__init__(task)
        self.cfg = cfg
        phases = _phases(task, cfg)
        if len(phases) > 1 and cfg.engine.precision == "fp16":
            raise ValueError("engine.precision: fp16 loss scaling with several optimizers is not supported "
                             "on the accelerate back end; use bf16")
        self.accelerator = Accelerator(cpu=dist.device.type == "cpu",
                                       mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.engine.precision])
        for name, (parameters, module, optimizer) in phases.items():
            # The schedule is stepped here once per optimizer step, not by accelerate (which would step
            # it once per process).
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
            model, optimizer = self.accelerator.prepare(module, optimizer)
            self.phases[name] = _Phase(parameters, model, optimizer, scheduler)
        self._micro = 0

    def micro_batch(self, phase: str, batch: dict, skip: Skip) -> dict | None:
        current = self._activate(phase)
        accum = self.cfg.engine.grad_accum
        self._micro += 1
        last = self._micro == accum
        # DDP reduces gradients only on the window's last backward pass.
        with nullcontext() if last else self.accelerator.no_sync(current.model), self.accelerator.autocast():
            outputs = current.model(batch)
            if skip(outputs["loss"]):
                self._micro -= 1
                return None
            self.accelerator.backward(outputs["loss"] / accum)
        return outputs

    def step(self, phase: str) -> float | None:
        current = self.phases[phase]
        self._micro = 0
        clip = self.cfg.optim.grad_clip or float("inf")
        norm = self.accelerator.clip_grad_norm_(current.parameters, clip)
        norm = float(norm) if norm is not None else 0.0
        (bad,) = any_rank(not math.isfinite(norm))
        if bad:
            current.optimizer.zero_grad(set_to_none=True)
            return None
        current.optimizer.step()
        current.scheduler.step()
        current.optimizer.zero_grad(set_to_none=True)
        return norm

    def save(self, folder: Path, is_main: bool) -> None:
        if not is_main:
            return  # DDP keeps identical weights and optimizer state on every rank
        safetensors.torch.save_file(_full_precision(self.module.state_dict()), folder / "model.safetensors")
        scaler = self.accelerator.scaler
        torch.save({"phases": {name: {"optimizer": phase.optimizer.state_dict(), "scheduler": phase.scheduler.state_dict()}
                               for name, phase in self.phases.items()},
                    "scaler": scaler.state_dict() if scaler is not None else None}, folder / "optimizer.pt")

    def load(self, folder: Path) -> None:
        self.module.load_state_dict(safetensors.torch.load_file(folder / "model.safetensors"))
        state = torch.load(folder / "optimizer.pt", weights_only=True)
        if "phases" not in state:  # written before tasks had phases and parameter groups
            state["phases"] = {SINGLE_PHASE: _regrouped(state, self.phases[SINGLE_PHASE], self.module)}
        for name, phase in self.phases.items():
            phase.optimizer.load_state_dict(state["phases"][name]["optimizer"])
            phase.scheduler.load_state_dict(state["phases"][name]["scheduler"])
        if state["scaler"] is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return _full_precision(self.module.state_dict())


def _regrouped(state: dict, phase: _Phase, task: nn.Module) -> dict:
    """An optimizer and LR-schedule state of one parameter group over the task's trainable
    parameters (checkpoints from before parameter groups) laid out for the phase's groups."""
    old_order = [id(p) for p in task.parameters() if p.requires_grad]
    groups = phase.optimizer.state_dict()["param_groups"]  # the new groups, with indices into new_order
    new_order = [id(p) for group in phase.optimizer.param_groups for p in group["params"]]
    (old_group,) = state["optimizer"]["param_groups"]
    moved = {new_order.index(old_order[index]): value for index, value in state["optimizer"]["state"].items()}
    hyper = {key: value for key, value in old_group.items() if key not in ("params", "weight_decay")}
    scheduler = dict(state["scheduler"])
    for key in ("base_lrs", "_last_lr", "lr_lambdas"):
        if key in scheduler:
            scheduler[key] = scheduler[key] * len(groups)
    return {"optimizer": {"state": moved, "param_groups": [{**group, **hyper} for group in groups]},
            "scheduler": scheduler}


class DeepSpeedBackend(_Backend):
    def __init__(self, task: nn.Module, cfg: TrainConfig, dist: DistInfo) -> None:
        import deepspeed

        super().__init__(task)
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
        phases = _phases(task, cfg)
        self._dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[engine_cfg.precision]
        if len(phases) > 1:
            if engine_cfg.zero_stage == 3:
                raise ValueError("engine.zero_stage: a task with several phases trains with ZeRO stages 0-2")
            task.to(self._dtype)  # each engine casts its own phase only: the rest of the task (frozen parts) too
        for name, (parameters, module, optimizer) in phases.items():
            engine, _, _, scheduler = deepspeed.initialize(
                model=module, optimizer=optimizer, config=config,
                lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg)))
            self.phases[name] = _Phase(parameters, engine, engine.optimizer, scheduler)
        self.zero_stage = engine_cfg.zero_stage

    def micro_batch(self, phase: str, batch: dict, skip: Skip) -> dict | None:
        engine = self._activate(phase).model
        if self._dtype != torch.float32:
            batch = {key: value.to(self._dtype) if torch.is_tensor(value) and value.is_floating_point() else value
                     for key, value in batch.items()}
        outputs = engine(batch)
        if skip(outputs["loss"]):
            return None  # no backward and no engine.step: DeepSpeed's window simply waits for another micro-batch
        engine.backward(outputs["loss"])
        engine.step()  # applies the update only at the end of the accumulation window
        return outputs

    def step(self, phase: str) -> float | None:
        norm = self.phases[phase].model.get_global_grad_norm()
        norm = float(norm) if norm is not None else 0.0
        return norm if math.isfinite(norm) else None

    def save(self, folder: Path, is_main: bool) -> None:
        for name, phase in self.phases.items():
            phase.model.save_checkpoint(str(folder), tag=self._tag(name))
        if len(self.phases) > 1 and is_main:  # buffers and frozen weights of the task that no engine holds
            safetensors.torch.save_file(self.full_state_dict(), folder / "model.safetensors")

    def load(self, folder: Path) -> None:
        if len(self.phases) > 1:
            self.module.load_state_dict(safetensors.torch.load_file(folder / "model.safetensors"))
        for name, phase in self.phases.items():
            path, _ = phase.model.load_checkpoint(str(folder), tag=self._tag(name), load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
            if path is None:
                raise RuntimeError(f"DeepSpeed found no checkpoint {self._tag(name)!r} in {folder}")

    def _tag(self, phase: str) -> str:
        return "deepspeed" if len(self.phases) == 1 else f"deepspeed-{phase}"

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        if self.zero_stage < 3:
            return _full_precision(self.module.state_dict())
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
            return _full_precision(self.module.state_dict())
