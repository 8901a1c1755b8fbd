"""The contract between the training loop and what it trains.

A training task is an `nn.Module` whose `forward(batch)` returns a dict holding `loss` (a scalar the
loop minimises) and any other scalars to log. Everything else is optional; `Task` holds the
defaults, and a plain `nn.Module` is trained as a `Task` with every default:

- `after_step(step)`: called after every optimizer step with the number of steps taken (a resumed
  run calls it with its checkpoint's step before training). Schedules that follow training (a
  temperature, a KL weight) read the step here; a task may also constrain its weights here (CLIP
  clamps its logit scale).
- `param_groups(weight_decay)`: the optimizer's parameter groups. By default weight decay applies
  to weight matrices and convolution kernels only, never to biases, norms' gains and embeddings
  (`nn.Embedding`, and the parameters a module names in its `no_weight_decay`, such as a
  positional embedding or a codebook held as plain parameters).
- `set_activation_checkpointing(on)`: recompute activations in the backward pass
  (`engine.activation_checkpointing`); by default a task cannot, and asking is an error.
- `phases()`: the parts of the task updated in turn, each by its own optimizer, learning-rate
  schedule and back-end engine, in order, each step: a generator, then a discriminator. By default
  one phase, `train`, holds the whole task. With several, the loop calls `forward(batch, phase=NAME)`
  once per phase on the same batches, with only that phase's parameters trainable; every trainable
  parameter belongs to exactly one phase. Each phase's outputs are logged (after the first phase,
  prefixed `NAME/`); all phases are checkpointed and resumed together.

Diffusion tasks keep the network apart from the noise process: the network is a module the task
holds, the noise, its targets and its loss live in the task.
"""
from __future__ import annotations

from typing import Any

from torch import nn

SINGLE_PHASE = "train"
_NO_DECAY_MODULES = (nn.Embedding, nn.EmbeddingBag, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm,
                     nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


class Task(nn.Module):
    """A training task with the default behaviour of every optional part of the contract."""

    def after_step(self, step: int) -> None:
        """Called after each optimizer step with the number of steps taken."""

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        return decay_groups(self, weight_decay)

    def set_activation_checkpointing(self, on: bool) -> None:
        if on:
            raise ValueError(f"engine.activation_checkpointing: {type(self).__name__} does not support it")

    def phases(self) -> dict[str, nn.Module]:
        return {SINGLE_PHASE: self}


def task_method(model: nn.Module, name: str):
    """`model`'s own implementation of the Task method `name`, or Task's default for a plain module."""
    return getattr(model, name) if isinstance(model, Task) else getattr(Task, name).__get__(model)


def decay_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: with `weight_decay` the weights of at least two
    dimensions outside norms and embeddings, without it the rest (biases, gains, embeddings, and
    the parameters a module lists in `no_weight_decay`)."""
    decay, no_decay = [], []
    for owner in module.modules():
        for name, parameter in owner.named_parameters(recurse=False):
            if not parameter.requires_grad:
                continue
            exempt = (parameter.dim() < 2 or isinstance(owner, _NO_DECAY_MODULES)
                      or name in getattr(owner, "no_weight_decay", ()))
            (no_decay if exempt else decay).append(parameter)
    return [group for group in ({"params": decay, "weight_decay": weight_decay},
                                {"params": no_decay, "weight_decay": 0.0}) if group["params"]]


def phase_parameters(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Each phase's trainable parameters; a ValueError when a trainable parameter of the task is in
    no phase or in two."""
    phases = task_method(model, "phases")()
    owner: dict[int, str] = {}
    for name, part in phases.items():
        for parameter in part.parameters():
            if parameter.requires_grad and owner.setdefault(id(parameter), name) != name:
                raise ValueError(f"{type(model).__name__}: a parameter is in phases {owner[id(parameter)]!r} and {name!r}")
    stray = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in owner]
    if stray:
        raise ValueError(f"{type(model).__name__}: trainable parameters in no phase: {', '.join(stray[:5])}")
    return {name: [p for p in part.parameters() if p.requires_grad] for name, part in phases.items()}


class PhaseModule(nn.Module):
    """One phase of a task with several, as a module a back end can wrap (DDP, a DeepSpeed engine):
    its parameters are the phase's part; its forward runs the whole task in that phase."""

    def __init__(self, task: nn.Module, phase: str, part: nn.Module) -> None:
        super().__init__()
        self.part = part
        object.__setattr__(self, "task", task)  # not a submodule: the rest of the task is not this phase's
        self.phase = phase

    def forward(self, batch: dict) -> dict:
        return self.task(batch, phase=self.phase)
