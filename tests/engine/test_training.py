"""The loop in one process: finishing, resuming after kill -9, preemption by signal."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

from pipeline.config import load_config
from pipeline.engine.checkpoint import committed, latest, step_of
from pipeline.engine.loop import train
from pipeline.engine.task import Task, decay_groups
from pipeline.markers import PREEMPTED_EXIT_CODE, PREEMPTED_MARKER
from pipeline.runs import run_stage
from tests.engine import toy_stage
from tests.engine.conftest import toy_overrides

STAGE = "tests.engine.toy_stage"


def _stage(args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "stage", STAGE, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def _weights(out: Path) -> dict:
    return safetensors.torch.load_file(out / "final" / "model.safetensors")


def test_a_finished_run_leaves_weights_config_images_and_metrics(shapes_shards, tmp_path):
    cfg = load_config(toy_stage.Config, None, toy_overrides(shapes_shards, tmp_path / "run", **{"trainer.max_steps": 6}))
    assert run_stage(STAGE, cfg) == 0
    out = tmp_path / "run"
    assert set(_weights(out)) == {"net.1.weight", "net.1.bias", "net.3.weight", "net.3.bias"}
    assert load_config(toy_stage.Config, out / "config.yaml") == cfg
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "mse", "lr", "grad_norm", "samples_per_s", "data_wait_fraction"} <= set(lines[0])
    assert json.loads((out / "final" / "metrics.json").read_text())["step"] == 6
    assert list((out / "tensorboard").iterdir())


class _Counting(toy_stage.ToyModel):
    """The toy model with an integer buffer, like the dVAE's schedule step."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.register_buffer("forwards", torch.zeros((), dtype=torch.long))

    def forward(self, batch: dict) -> dict:
        self.forwards += 1
        return super().forward(batch)


def test_final_weights_are_the_ema_and_its_counters_follow_the_model(shapes_shards, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(toy_stage.Config, None, toy_overrides(shapes_shards, out, **{"trainer.max_steps": 5,
                                                                                    "trainer.ema_decay": 0.5}))
    assert train(cfg, lambda c: _Counting(c.model, c.data.resolution)) == "finished"
    live = safetensors.torch.load_file(latest(out / "checkpoints") / "model.safetensors")
    final = _weights(out)
    assert int(live["forwards"]) == int(final["forwards"]) == 5
    assert not torch.equal(final["net.1.weight"], live["net.1.weight"])  # an average of the steps' weights


class _Scheduled(toy_stage.ToyModel, Task):
    """The toy model with a schedule that follows the optimizer steps through `after_step`,
    recording the step each forward pass sees."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.seen: list[int] = []

    def after_step(self, step: int) -> None:
        self.step.fill_(step)

    def forward(self, batch: dict) -> dict:
        self.seen.append(int(self.step))
        return super().forward(batch)


def test_after_step_counts_optimizer_steps_not_forward_passes(shapes_shards, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(toy_stage.Config, None, toy_overrides(shapes_shards, out, **{"trainer.max_steps": 3,
                                                                                    "engine.grad_accum": 2}))
    models: list[_Scheduled] = []

    def build(c: toy_stage.Config) -> _Scheduled:
        models.append(_Scheduled(c.model, c.data.resolution))
        return models[-1]
    assert train(cfg, build) == "finished"
    assert models[0].seen == [0, 0, 1, 1, 2, 2] and int(_weights(out)["step"]) == 3


@pytest.mark.parametrize("workers", [0, 2])
def test_kill_9_and_resume_gives_the_parameters_of_an_uninterrupted_run(shapes_shards, tmp_path, workers):
    n = 6
    common = {"data.num_workers": workers, "data.batch_size": 4}  # 24 batches per epoch: resume crosses none
    straight = tmp_path / "straight"
    assert _stage(toy_overrides(shapes_shards, straight, **common, **{"trainer.max_steps": 2 * n})).wait() == 0

    killed = tmp_path / "killed"
    slow = toy_overrides(shapes_shards, killed, **common, **{"trainer.max_steps": 2 * n, "trainer.save_every": n,
                                                              "model.sleep_s": 0.3})
    process = _stage(slow)
    deadline = time.time() + 120
    while latest(killed / "checkpoints") is None:
        assert process.poll() is None and time.time() < deadline, process.stdout.read()
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert step_of(latest(killed / "checkpoints")) == n and not (killed / "final").exists()

    resumed = _stage(toy_overrides(shapes_shards, killed, **common, **{"trainer.max_steps": 2 * n}))
    output = resumed.communicate()[0]
    assert resumed.returncode == 0, output
    assert f"resumed from {killed / 'checkpoints' / f'step-{n:08d}'}" in output
    expected, got = _weights(straight), _weights(killed)
    assert all(torch.equal(expected[key], got[key]) for key in expected)


def test_sigusr1_inside_a_step_checkpoints_that_step_exits_preempted_and_resumes_there(shapes_shards, tmp_path):
    out = tmp_path / "run"
    args = toy_overrides(shapes_shards, out, **{"trainer.max_steps": 10, "trainer.save_every": 100,
                                                "model.signal_at_call": 4})
    process = _stage(args)
    output = process.communicate()[0]
    assert process.returncode == PREEMPTED_EXIT_CODE, output
    assert step_of(latest(out / "checkpoints")) == 4  # the step the signal arrived in, completed
    assert (out / PREEMPTED_MARKER).exists() and not (out / "final").exists()

    resumed = _stage(toy_overrides(shapes_shards, out, **{"trainer.max_steps": 10, "trainer.save_every": 100}))
    output = resumed.communicate()[0]
    assert resumed.returncode == 0, output
    assert "(step 4)" in output and not (out / PREEMPTED_MARKER).exists()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))  # no step trained twice, none missing


class _Conv(nn.Module):
    """Records, per call, whether its input batch and its weight are channels-last."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.seen = nn.Conv2d(3, 3, 3, padding=1), []

    def forward(self, batch: dict) -> dict:
        self.seen.append((batch["image"].is_contiguous(memory_format=torch.channels_last),
                          self.conv.weight.is_contiguous(memory_format=torch.channels_last)))
        loss = (self.conv(batch["image"]) - batch["image"]).pow(2).mean()
        return {"loss": loss}


@pytest.mark.parametrize("channels_last", [False, True])
def test_channels_last_puts_weights_and_image_batches_in_nhwc_and_saves_plain_weights(shapes_shards, tmp_path,
                                                                                       channels_last):
    models = []
    cfg = load_config(toy_stage.Config, None, toy_overrides(shapes_shards, tmp_path / "run", **{
        "trainer.max_steps": 3, "engine.channels_last": channels_last}))
    train(cfg, lambda c: models.append(_Conv()) or models[0])
    assert models[0].seen == [(channels_last, channels_last)] * 3
    weights = _weights(tmp_path / "run")
    assert all(value.is_contiguous() for value in weights.values())
    fresh = _Conv()
    fresh.load_state_dict(weights)
    image = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fresh.conv(image), models[0].conv(image.contiguous(memory_format=torch.channels_last)))


def test_a_checkpoint_from_before_parameter_groups_resumes_exactly(shapes_shards, tmp_path):
    straight, old = tmp_path / "straight", tmp_path / "old"
    assert _stage(toy_overrides(shapes_shards, straight, **{"trainer.max_steps": 4})).wait() == 0
    assert _stage(toy_overrides(shapes_shards, old, **{"trainer.max_steps": 4, "trainer.save_every": 2})).wait() == 0
    for leftover in (old / "final", old / "checkpoints" / "step-00000004"):
        shutil.rmtree(leftover)
    # Rewrite step 2's optimizer.pt as the loop wrote it before tasks had phases and parameter groups:
    # one AdamW group over the model's trainable parameters, in their order.
    path = old / "checkpoints" / "step-00000002" / "optimizer.pt"
    state = torch.load(path, weights_only=True)["phases"]["train"]
    model = toy_stage.ToyModel(toy_stage.ToyModelConfig(), 32)
    grouped = [id(p) for group in decay_groups(model, 0.0) for p in group["params"]]
    order = [grouped.index(id(p)) for p in model.parameters()]
    group = {**state["optimizer"]["param_groups"][0], "params": list(range(len(order)))}
    scheduler = {**state["scheduler"], "base_lrs": state["scheduler"]["base_lrs"][:1],
                 "_last_lr": state["scheduler"]["_last_lr"][:1], "lr_lambdas": [None]}
    torch.save({"optimizer": {"state": {i: state["optimizer"]["state"][j] for i, j in enumerate(order)},
                              "param_groups": [group]}, "scheduler": scheduler, "scaler": None}, path)
    (path.parent / "COMMITTED").write_text("2\n")  # that loop's marker held no checksums either
    resumed = _stage(toy_overrides(shapes_shards, old, **{"trainer.max_steps": 4}))
    assert resumed.wait() == 0 and "(step 2)" in resumed.stdout.read()
    expected, got = _weights(straight), _weights(old)
    assert all(torch.equal(expected[key], got[key]) for key in expected)


def test_sigterm_to_the_whole_process_group_with_loader_workers_checkpoints_and_resumes(shapes_shards, tmp_path):
    # What SLURM's requeue, preemption and scancel do: every process of the job gets SIGTERM, the
    # loader workers too; the run must still checkpoint at its step boundary, not die with them.
    out = tmp_path / "run"
    args = toy_overrides(shapes_shards, out, **{"trainer.max_steps": 12, "trainer.save_every": 100,
                                                "data.num_workers": 2, "model.sleep_s": 0.3})
    process = _stage(args, start_new_session=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 3:
        assert process.poll() is None and time.time() < deadline, process.stdout.read()
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == PREEMPTED_EXIT_CODE, output
    stopped = step_of(latest(out / "checkpoints"))
    assert 3 <= stopped < 12 and (out / PREEMPTED_MARKER).exists()
    resumed = _stage(toy_overrides(shapes_shards, out, **{"trainer.max_steps": 12, "data.num_workers": 2}))
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0 and f"(step {stopped})" in output, output
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))  # no step trained twice, none missing


class _Canary:
    """A pickle that, once loaded, creates a file: what a malicious checkpoint would run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.mark.parametrize("backend", ["accelerate", "deepspeed"])
def test_a_damaged_newest_checkpoint_is_never_loaded_and_the_run_resumes_from_the_one_before(shapes_shards, tmp_path,
                                                                                               backend):
    out, canary = tmp_path / "run", tmp_path / "canary"
    common = {"trainer.max_steps": 6, "engine.backend": backend, "trainer.keep_checkpoints": 3}
    stopped = _stage(toy_overrides(shapes_shards, out, **common, **{"trainer.save_every": 2, "model.signal_at_call": 5}))
    assert stopped.wait() == PREEMPTED_EXIT_CODE, stopped.stdout.read()
    assert [step_of(path) for path in committed(out / "checkpoints")] == [2, 4, 5]
    newest = out / "checkpoints" / "step-00000005"
    if backend == "accelerate":  # flipped bytes in the weights, which load without complaint
        weights = (newest / "model.safetensors").read_bytes()
        (newest / "model.safetensors").write_bytes(weights[:-16] + bytes(16))
    else:  # a pickle in place of DeepSpeed's model states, which it would unpickle
        torch.save(_Canary(canary), newest / "deepspeed" / "mp_rank_00_model_states.pt")
    resumed = _stage(toy_overrides(shapes_shards, out, **common))
    output = resumed.communicate()[0]
    assert resumed.returncode == 0, output
    assert f"checkpoint {newest} is damaged (" in output and "(step 4)" in output
    assert not canary.exists() and (out / "checkpoints" / "damaged-step-00000005").exists()
    assert json.loads((out / "final" / "metrics.json").read_text())["step"] == 6


def test_the_ema_of_a_bf16_model_is_kept_in_fp32_and_moves():
    from pipeline.engine.ema import exponential_average

    live = nn.Linear(4, 4).to(torch.bfloat16)
    ema = exponential_average(live, 0.999)
    ema.update_parameters(live)  # the first update copies
    start = ema.module.weight.detach().clone()
    with torch.no_grad():
        live.weight += 0.05
    for _ in range(100):
        ema.update_parameters(live)
    moved = (ema.module.weight - start).mean().item()
    # Before: a bf16 EMA, whose steps of 5e-5 round away, stayed where it started.
    assert ema.module.weight.dtype == torch.float32 and moved == pytest.approx(0.05 * (1 - 0.999 ** 100), rel=0.1)
