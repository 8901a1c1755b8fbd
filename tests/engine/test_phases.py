"""Tasks with several phases (task.py): each phase trains only its own parameters with its own
optimizer, on both back ends, checkpointed and resumed like one."""
import subprocess
import sys

import pytest
import safetensors.torch
import torch
from torch import nn

from pipeline.config import load_config
from pipeline.engine.checkpoint import latest, step_of
from pipeline.engine.loop import train
from pipeline.engine.task import Task, decay_groups, phase_parameters
from pipeline.models.text import TextEncoder, TextEncoderConfig
from tests.engine import two_phase_stage
from tests.engine.conftest import toy_overrides

STAGE = "tests.engine.two_phase_stage"


def _weights(out) -> dict:
    return safetensors.torch.load_file(out / "final" / "model.safetensors")


def _stage(args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    launcher = (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [])
    return subprocess.run([sys.executable, *launcher, "-m", "pipeline.cli", "stage", STAGE, *args],
                          capture_output=True, text=True, timeout=300)


def test_the_loop_trains_each_phase_in_turn_as_a_hand_written_loop_does(shapes_shards, tmp_path):
    cfg = load_config(two_phase_stage.Config, None, toy_overrides(shapes_shards, tmp_path / "run",
                                                                  **{"trainer.max_steps": 5}))
    assert train(cfg, two_phase_stage.build_model) == "finished"
    got, expected = _weights(tmp_path / "run"), two_phase_stage.reference_weights(cfg, 5)
    assert set(got) == set(expected)
    assert all(torch.equal(got[key], expected[key]) for key in expected)
    initial = two_phase_stage.build_model(cfg).state_dict()
    assert all(not torch.equal(got[key], initial[key]) for key in expected)  # both phases trained
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert '"critic/loss"' in metrics and '"critic/grad_norm"' in metrics and '"grad_norm"' in metrics


def test_a_preempted_two_phase_run_resumes_to_the_weights_of_an_uninterrupted_one(shapes_shards, tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert _stage(toy_overrides(shapes_shards, straight, **{"trainer.max_steps": 6})).returncode == 0
    first = _stage(toy_overrides(shapes_shards, stopped, **{"trainer.max_steps": 6, "model.signal_at_call": 7}))
    assert first.returncode == 75 and step_of(latest(stopped / "checkpoints")) == 4, first.stdout + first.stderr
    resumed = _stage(toy_overrides(shapes_shards, stopped, **{"trainer.max_steps": 6}))
    assert resumed.returncode == 0 and "(step 4)" in resumed.stdout, resumed.stdout + resumed.stderr
    expected, got = _weights(straight), _weights(stopped)
    assert all(torch.equal(expected[key], got[key]) for key in expected)


def test_deepspeed_trains_the_phases_as_ddp_does_over_two_ranks_and_resumes_them(shapes_shards, tmp_path):
    results = {}
    for backend, extra in (("accelerate", {}), ("deepspeed", {"engine.zero_stage": 2})):
        out = tmp_path / backend
        result = _stage(toy_overrides(shapes_shards, out, **{"engine.backend": backend, **extra,
                                                              "trainer.max_steps": 4, "trainer.save_every": 2}), nproc=2)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        results[backend] = _weights(out)
    assert sorted((tmp_path / "deepspeed" / "checkpoints" / "step-00000004").glob("deepspeed-*")) == [
        tmp_path / "deepspeed" / "checkpoints" / "step-00000004" / name for name in ("deepspeed-critic", "deepspeed-generator")]
    for key, value in results["accelerate"].items():
        torch.testing.assert_close(results["deepspeed"][key], value, rtol=1e-4, atol=1e-5)
    # Preempted at step 2 and resumed, the DeepSpeed run ends where the uninterrupted one did.
    resumed = tmp_path / "resumed"
    common = {"engine.backend": "deepspeed", "engine.zero_stage": 2, "trainer.max_steps": 4, "trainer.save_every": 2}
    first = _stage(toy_overrides(shapes_shards, resumed, **common, **{"model.signal_at_call": 3}), nproc=2)
    assert first.returncode != 0 and step_of(latest(resumed / "checkpoints")) == 2, first.stdout[-3000:]
    again = _stage(toy_overrides(shapes_shards, resumed, **common), nproc=2)
    assert again.returncode == 0 and "(step 2)" in again.stdout, again.stdout[-3000:] + again.stderr[-3000:]
    for key, value in results["deepspeed"].items():
        torch.testing.assert_close(_weights(resumed)[key], value, rtol=1e-5, atol=1e-6)


class _Layers(Task):
    no_weight_decay = ("position",)

    def __init__(self) -> None:
        super().__init__()
        self.embedding, self.norm, self.linear = nn.Embedding(5, 4), nn.LayerNorm(4), nn.Linear(4, 4)
        self.position = nn.Parameter(torch.zeros(3, 4))  # an embedding held as a plain parameter
        self.frozen = nn.Linear(4, 4).requires_grad_(False)


def test_weight_decay_skips_biases_norms_and_embeddings_and_frozen_weights_train_in_no_phase():
    task = _Layers()
    decay, no_decay = decay_groups(task, 0.1)
    assert decay == {"params": [task.linear.weight], "weight_decay": 0.1}
    assert {id(p) for p in no_decay["params"]} == {id(task.embedding.weight), id(task.norm.weight), id(task.norm.bias),
                                                   id(task.linear.bias), id(task.position)}
    assert phase_parameters(task) == {"train": [task.position, task.embedding.weight, task.norm.weight, task.norm.bias,
                                                task.linear.weight, task.linear.bias]}  # not the frozen ones
    text = TextEncoder(TextEncoderConfig())  # the models' own plain-parameter embeddings are declared
    assert any(p is text.positional_embedding for p in decay_groups(text, 0.1)[1]["params"])


class _Overlapping(Task):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)

    def phases(self) -> dict[str, nn.Module]:
        return {"one": self.a, "two": nn.ModuleList([self.a])}


def test_a_parameter_in_two_phases_or_in_none_is_refused():
    with pytest.raises(ValueError, match="in phases 'one' and 'two'"):
        phase_parameters(_Overlapping())
    task = _Overlapping()
    task.phases = lambda: {"one": task.a}
    with pytest.raises(ValueError, match="trainable parameters in no phase: b.weight, b.bias"):
        phase_parameters(task)


def test_activation_checkpointing_is_refused_by_a_task_that_cannot_do_it(shapes_shards, tmp_path):
    cfg = load_config(two_phase_stage.Config, None, toy_overrides(shapes_shards, tmp_path / "run", **{
        "engine.activation_checkpointing": True}))
    with pytest.raises(ValueError, match="engine.activation_checkpointing: TwoPhase does not support it"):
        train(cfg, two_phase_stage.build_model)
