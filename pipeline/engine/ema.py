"""The exponential moving average of a model's weights (`trainer.ema_decay`), kept in fp32.

Two forms with one interface: `update(module)` after each optimizer step, and `state_dict()` /
`load(path)` in torch's `AveragedModel` layout ('module.<name>' for every parameter and
buffer, and 'n_averaged') whichever form wrote it, so checkpoints and final weights move between
world sizes and ZeRO stages.
- `FullAverage`: an `AveragedModel` of the whole module, on ranks that hold every weight.
- `ShardedAverage`: under DeepSpeed ZeRO-3 a rank holds only its partition of each parameter
  (`param.ds_tensor`), so it averages only that; `state_dict` gathers the partitions and is a
  collective (every rank calls it).
As AveragedModel does, the first update copies the weights; floating buffers are averaged too,
integer ones (counters) copied, since a rounded average of a counter would never move.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

N_AVERAGED = "n_averaged"


def exponential_average(module: nn.Module, decay: float) -> AveragedModel:
    """The EMA of `module`'s parameters and buffers, kept in fp32 whatever the module's precision:
    in bf16 a step of (1 - decay) times the difference rounds away (DeepSpeed's bf16 weights would
    leave an EMA of 0.9999 where it started)."""
    if all(p.dtype == torch.float32 for p in module.parameters() if p.is_floating_point()):
        return AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

    def step(average: Tensor, live: Tensor, count: Tensor) -> Tensor:
        return torch.lerp(average, live.to(average.dtype), 1 - decay) if average.is_floating_point() else live

    return AveragedModel(module, avg_fn=step, use_buffers=True).float()


class FullAverage:
    def __init__(self, module: nn.Module, decay: float) -> None:
        self.averaged = exponential_average(module, decay)

    @property
    def module(self) -> nn.Module:
        """The averaged copy of the whole module."""
        return self.averaged.module

    def update(self, module: nn.Module) -> None:
        self.averaged.update_parameters(module)
        for averaged, live in zip(self.averaged.module.buffers(), module.buffers()):
            if not averaged.is_floating_point():
                averaged.copy_(live)

    def state_dict(self) -> dict[str, Tensor]:
        return self.averaged.state_dict()

    def load(self, path: str) -> None:
        self.averaged.load_state_dict(_read(path, lambda key, tensor: tensor))


class ShardedAverage:
    """The average of this rank's ZeRO-3 partitions. A parameter's partition is the slice
    [rank * n, (rank + 1) * n) of its flattened values, zero-padded to world * n (DeepSpeed's
    layout: `partition_parameters._partition_param`)."""

    module = None  # no rank holds the whole average: sampling from it needs a gathered copy

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay, self.n_averaged = decay, 0
        self.parameters = dict(module.named_parameters())
        self.shards = {name: p.ds_tensor.detach().float().clone() for name, p in self.parameters.items()}
        saved = module.state_dict().keys()  # persistent buffers only, as AveragedModel's state dict holds
        self.live_buffers = {name: b for name, b in module.named_buffers() if name in saved}
        self.buffers = {name: b.detach().float().clone() if b.is_floating_point() else b.detach().clone()
                        for name, b in self.live_buffers.items()}

    def update(self, module: nn.Module) -> None:  # `module` is the one given at construction
        weight = 1.0 if self.n_averaged == 0 else 1 - self.decay
        live = self.live_buffers
        with torch.no_grad():
            for name, shard in self.shards.items():
                shard.lerp_(self.parameters[name].ds_tensor.float(), weight)
            for name, average in self.buffers.items():
                if average.is_floating_point():
                    average.lerp_(live[name].float(), weight)
                else:
                    average.copy_(live[name])
        self.n_averaged += 1

    def state_dict(self) -> dict[str, Tensor]:
        """The full average, gathered from every rank's partitions (a collective)."""
        world, state = dist.get_world_size(), {}
        for name, shard in self.shards.items():
            pieces = [torch.empty_like(shard) for _ in range(world)]
            dist.all_gather(pieces, shard)
            param = self.parameters[name]
            state[f"module.{name}"] = torch.cat(pieces)[: param.ds_numel].view(param.ds_shape)
        state |= {f"module.{name}": buffer for name, buffer in self.buffers.items()}
        return state | {N_AVERAGED: torch.tensor(self.n_averaged, dtype=torch.long)}

    def load(self, path: str) -> None:
        """Takes this rank's partitions from a full average on disk, one tensor in memory at a time."""
        for key, tensor in _read(path, self._partition).items():
            name = key.removeprefix("module.")
            if key == N_AVERAGED:
                self.n_averaged = int(tensor)
            elif name in self.shards:
                self.shards[name].copy_(tensor)
            else:
                self.buffers[name].copy_(tensor)

    def _partition(self, key: str, tensor: Tensor) -> Tensor:
        name = key.removeprefix("module.")
        if name not in self.shards:
            return tensor
        size = self.shards[name].numel()
        flat = tensor.float().flatten()[dist.get_rank() * size:][:size]
        return torch.cat([flat, flat.new_zeros(size - flat.numel())])


def make_average(module: nn.Module, decay: float, sharded: bool) -> FullAverage | ShardedAverage:
    """The EMA for `module`; `sharded` when it trains under ZeRO-3 (its parameters partitioned)."""
    return ShardedAverage(module, decay) if sharded else FullAverage(module, decay)


def _read(path: str, keep) -> dict[str, Tensor]:
    with safe_open(path, framework="pt") as file:
        return {key: keep(key, file.get_tensor(key)) for key in file.keys()}
