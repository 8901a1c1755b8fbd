"""A tiny training stage for engine tests, with knobs to inject a NaN loss or a signal."""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.config import operational
from pipeline.engine.config import TrainConfig
from pipeline.engine.loop import exit_code, train

OUTPUT = "trainer.out_dir"


@dataclass
class ToyModelConfig:
    width: int = 8
    nan_on_rank: int = -1  # this rank's loss is NaN at call `nan_at_call`
    nan_at_call: int = -1
    data_free: bool = False  # the loss depends on the weights alone: every world size follows one trajectory
    # Interruptions, which change when a run stops, not what it computes:
    signal_at_call: int = operational(-1)  # the model sends SIGUSR1 to its own process during this call
    sleep_s: float = operational(0.0)  # slows each step, so a test can kill the run between checkpoints
    hang_on_rank: int = operational(-1)  # this rank stops responding at call `hang_at_call`, as a dead rank would
    hang_at_call: int = operational(-1)
    crash_on_resume: bool = operational(False)  # loading a checkpoint raises, as a resume that cannot succeed would


@dataclass
class Config(TrainConfig):
    model: ToyModelConfig = field(default_factory=ToyModelConfig)


class ToyModel(nn.Module):
    def __init__(self, cfg: ToyModelConfig, image_size: int) -> None:
        super().__init__()
        self.cfg, self.calls = cfg, 0
        pixels = 3 * 8 * 8
        self.pool = nn.AdaptiveAvgPool2d(8)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(pixels, cfg.width), nn.Tanh(), nn.Linear(cfg.width, pixels))
        if cfg.crash_on_resume:
            self.register_load_state_dict_pre_hook(_refuse_to_load)

    def forward(self, batch: dict) -> dict:
        self.calls += 1
        target = self.pool(batch["image"])
        noisy = target + 0.1 * torch.randn_like(target)  # uses the RNG, so resume must restore it
        if self.cfg.data_free:
            noisy, target = torch.ones_like(target), torch.full_like(target, 0.5)
        error = (self.net(noisy).view_as(target) - target).pow(2).flatten(1).mean(1)
        valid = batch["valid"].float()
        loss = (error * valid).sum() / valid.sum().clamp(min=1)
        if self.calls == self.cfg.nan_at_call and int(os.environ.get("RANK", 0)) == self.cfg.nan_on_rank:
            loss = loss * float("nan")
        if self.calls == self.cfg.signal_at_call:
            os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(self.cfg.sleep_s)
        if self.calls == self.cfg.hang_at_call and int(os.environ.get("RANK", 0)) == self.cfg.hang_on_rank:
            time.sleep(3600)
        return {"loss": loss, "mse": loss.detach()}


def _refuse_to_load(*args) -> None:
    raise RuntimeError("toy stage: model.crash_on_resume is set")


def run(cfg: Config) -> int:
    return exit_code(train(cfg, lambda c: ToyModel(c.model, c.data.resolution)))
