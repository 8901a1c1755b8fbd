"""The configs every training stage shares: optimizer, trainer, engine (back end) and launch.

A training stage's config is `TrainConfig` plus its own `model` section. Fields declared
`operational` change how a run executes, not its result: the run cache ignores them, and a run
resumes across a change of them. Raising the `extendable` `trainer.max_steps` continues a run."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from pipeline.config import extendable, operational
from pipeline.data.loader import DataConfig
from pipeline.launch.config import LaunchConfig, launch_field
from pipeline.ranges import Decay, FieldError, Fraction, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Range


@dataclass
class OptimConfig:
    lr: PositiveFloat = 1e-3
    betas: tuple[Decay, Decay] = (0.9, 0.999)
    weight_decay: NonNegativeFloat = 0.0
    schedule: Literal["constant", "cosine"] = "cosine"
    warmup_steps: NonNegativeInt = 0
    min_lr_ratio: Fraction = 0.1  # cosine ends at lr * min_lr_ratio
    grad_clip: NonNegativeFloat = 1.0  # max global gradient norm; 0 turns clipping off


@dataclass
class TrainerConfig:
    out_dir: str = ""
    max_steps: PositiveInt = extendable(1000)  # raised on a finished or unfinished run: it continues from its last checkpoint
    save_every: PositiveInt = operational(200)  # checkpoint every N optimizer steps (and at the end, and on SIGTERM/SIGUSR1)
    keep_checkpoints: PositiveInt = operational(2)  # committed checkpoints kept; older ones go once a newer one is committed
    seed: NonNegativeInt = 0
    log_every: PositiveInt = operational(10)
    image_every: NonNegativeInt = operational(0)  # image grids every N steps; 0: only at the end
    ema_decay: Decay = 0.0  # 0 turns the EMA off; e.g. 0.999
    max_nonfinite_skips: PositiveInt = operational(10)  # consecutive skipped micro-batches with NaN/Inf before the run stops
    deterministic: bool = False  # torch.use_deterministic_algorithms

    def validate(self) -> None:
        if not self.out_dir:
            raise ValueError("out_dir is required")
        if Path(self.out_dir).exists() and not Path(self.out_dir).is_dir():
            raise FieldError("out_dir", f"must be a folder: {self.out_dir!r} is a file, not a folder")


@dataclass
class EngineConfig:
    backend: Literal["accelerate", "deepspeed"] = "accelerate"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    zero_stage: Annotated[int, Range(0, 3)] = 0  # DeepSpeed ZeRO stage
    grad_accum: PositiveInt = 1  # micro-batches per optimizer step
    # Models that support it recompute activations in the backward pass: the same result, less memory.
    activation_checkpointing: bool = operational(False)
    timeout_s: PositiveInt = operational(600)  # a collective waiting longer than this fails the run instead of hanging
    cpu_threads: NonNegativeInt = operational(0)  # torch threads per process on CPU; 0: this node's cores shared out, data workers counted
    # Convolutional models: weights and image batches in NHWC (channels-last) order, which oneDNN and
    # cuDNN convolve faster (a tiny dVAE's training step on 2 CPU cores: 244 -> 184 ms).
    channels_last: bool = operational(False)

    def validate(self) -> None:
        if self.zero_stage and self.backend != "deepspeed":
            raise ValueError("zero_stage needs backend 'deepspeed'")
        if self.channels_last and self.backend == "deepspeed":
            raise ValueError("channels_last needs backend 'accelerate': DeepSpeed keeps parameters in flat contiguous buffers")


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    launch: LaunchConfig = launch_field()

    def validate(self) -> None:
        if not self.data.shards:
            raise ValueError("data.shards is required")
        image_size = getattr(getattr(self, "model", None), "image_size", None)  # stages that add an image model
        if image_size is not None and image_size != self.data.resolution:
            raise ValueError(f"model.image_size ({image_size}) must equal data.resolution ({self.data.resolution})")
