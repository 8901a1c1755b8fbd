"""What a user sees of a run, all from rank 0: a progress bar, TensorBoard scalars and images,
`metrics.jsonl` (one line per logged step, for reports) and image grids as PNG files."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.images import image_grid, to_pil


class Monitor:
    def __init__(self, out_dir: Path, enabled: bool, max_steps: int, start_step: int, log_every: int) -> None:
        self.out_dir, self.enabled, self.log_every, self.max_steps = out_dir, enabled, log_every, max_steps
        self._sums: dict[str, float] = {}
        self._count = 0
        self._samples = 0
        self._data_wait = 0.0
        self._window_start = time.perf_counter()
        self.last: dict[str, float] = {}
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1)
            self.bar = tqdm(total=max_steps, initial=start_step, desc=out_dir.name, unit="step", dynamic_ncols=True)
            self.metrics = open(out_dir / "metrics.jsonl", "a")

    def step(self, step: int, outputs: dict[str, torch.Tensor], samples: int, data_wait: float, extra: dict) -> None:
        """Records one optimizer step; every `log_every` steps and at the last writes the window's means."""
        if not self.enabled:
            return
        for key, value in outputs.items():
            if torch.is_tensor(value) and value.numel() == 1:
                self._sums[key] = self._sums.get(key, 0.0) + float(value)
        self._count += 1
        self._samples += samples
        self._data_wait += data_wait
        self.bar.update(1)
        if step % self.log_every and step != self.max_steps:
            return
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        scalars = {key: total / self._count for key, total in self._sums.items()}
        scalars |= {"samples_per_s": self._samples / elapsed, "data_wait_fraction": self._data_wait / elapsed, **extra}
        for key, value in scalars.items():
            self.writer.add_scalar(f"train/{key}", value, step)
        self.metrics.write(json.dumps({"step": step, **scalars}) + "\n")
        self.metrics.flush()
        self.bar.set_postfix(loss=f"{scalars.get('loss', float('nan')):.4g}",
                             samples_s=f"{scalars['samples_per_s']:.0f}", refresh=False)
        self.last = scalars
        self._sums, self._count, self._samples, self._data_wait = {}, 0, 0, 0.0
        self._window_start = time.perf_counter()

    def images(self, step: int, grids: dict[str, torch.Tensor], columns: int = 8) -> None:
        """Saves each batch of images in [-1, 1] as `images/NAME-step-NNNNNNNN.png` and in TensorBoard."""
        if not self.enabled:
            return
        folder = self.out_dir / "images"
        folder.mkdir(exist_ok=True)
        for name, images in grids.items():
            grid = image_grid([to_pil(image) for image in images], columns)
            grid.save(folder / f"{name}-step-{step:08d}.png")
            grid.save(folder / f"{name}.png")  # the latest, under a stable name
            self.writer.add_image(f"images/{name}", np.asarray(grid), step, dataformats="HWC")

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.writer.close()
            self.metrics.close()
