"""A tiny task with two phases updated in turn (a generator, then a critic), for engine tests."""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.config import operational
from pipeline.engine.config import TrainConfig
from pipeline.engine.loop import exit_code, train
from pipeline.engine.task import Task

OUTPUT = "trainer.out_dir"
PIXELS = 3 * 8 * 8


@dataclass
class TwoPhaseConfig:
    width: int = 8
    signal_at_call: int = operational(-1)  # the task sends SIGUSR1 to its own process during this call


@dataclass
class Config(TrainConfig):
    model: TwoPhaseConfig = field(default_factory=TwoPhaseConfig)


class TwoPhase(Task):
    """The generator reconstructs 8x8 images and is pushed up the critic's score; the critic scores
    real images above reconstructions."""

    def __init__(self, cfg: TwoPhaseConfig) -> None:
        super().__init__()
        self.cfg, self.calls = cfg, 0
        self.pool = nn.AdaptiveAvgPool2d(8)
        self.generator = nn.Sequential(nn.Linear(PIXELS, cfg.width), nn.Tanh(), nn.Linear(cfg.width, PIXELS))
        self.critic = nn.Sequential(nn.Linear(PIXELS, cfg.width), nn.Tanh(), nn.Linear(cfg.width, 1))

    def phases(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "critic": self.critic}

    def forward(self, batch: dict, phase: str = "generator") -> dict:
        self.calls += 1
        if self.calls == self.cfg.signal_at_call:
            os.kill(os.getpid(), signal.SIGUSR1)
        real = self.pool(batch["image"]).flatten(1)  # (B, PIXELS)
        fake = self.generator(real)
        valid = batch["valid"].float()
        if phase == "generator":
            per_sample = (fake - real).pow(2).mean(1) - 0.1 * self.critic(fake).squeeze(1)
        else:
            per_sample = self.critic(fake).squeeze(1) - self.critic(real).squeeze(1)
        loss = (per_sample * valid).sum() / valid.sum().clamp(min=1)
        return {"loss": loss, "score": self.critic(real).mean().detach()}


def build_model(cfg: Config) -> nn.Module:
    return TwoPhase(cfg.model)


def run(cfg: Config) -> int:
    return exit_code(train(cfg, build_model))


def reference_weights(cfg: Config, steps: int) -> dict[str, torch.Tensor]:
    """The same training written out by hand, one process: two AdamWs in turn, each phase with only
    its own parameters trainable, clipped, on the loader's batches."""
    from pipeline.data.loader import StreamingLoader

    torch.manual_seed(cfg.trainer.seed)
    task = build_model(cfg)
    optimizers = {name: torch.optim.AdamW(part.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas,
                                               weight_decay=cfg.optim.weight_decay, foreach=False)
                  for name, part in task.phases().items()}
    batches = iter(StreamingLoader(cfg.data, seed=cfg.trainer.seed))
    for _ in range(steps):
        batch = next(batches)
        for name, optimizer in optimizers.items():
            for other, part in task.phases().items():
                part.requires_grad_(other == name)
            task(batch, phase=name)["loss"].backward()
            torch.nn.utils.clip_grad_norm_(list(task.phases()[name].parameters()), cfg.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return {key: value.detach() for key, value in task.state_dict().items()}
