import itertools
import json
import tarfile
import typing
from collections import Counter

import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.data.loader import DataConfig, StreamingLoader
from pipeline.data.stream import DataErrorBudgetExceeded
from pipeline.ranges import range_of
from tests.conftest import jpeg_bytes, sample_members, write_tar


def _config(shards, **overrides) -> DataConfig:
    values = dict(shards=shards, resolution=16, batch_size=4, num_workers=0, shuffle_buffer=8)
    values.update(overrides)
    return DataConfig(**values)


def _valid_keys(batch) -> list[str]:
    return [key for key, valid in zip(batch["key"], batch["valid"]) if valid]


def test_batches_have_images_captions_and_tokens(make_shards):
    shards = make_shards([6])
    loader = StreamingLoader(_config(shards[0], tokenizer="open_clip:ViT-B-32", text_length=20))
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["tokens"].shape == (4, 20) and batch["tokens"].dtype == torch.long
    assert all(caption.startswith("caption 0") for caption in batch["caption"])


@pytest.mark.parametrize("workers", [0, 2])
def test_exactly_once_over_two_ranks_and_two_workers_with_uneven_shards(make_shards, workers):
    shards = make_shards([7, 1, 12, 3, 5])  # 28 samples, very uneven
    pattern = shards[0].replace("00000.tar", "{00000..00004}.tar")
    seen, steps = Counter(), []
    for rank in range(2):
        loader = StreamingLoader(_config(pattern, num_workers=workers, batch_size=3), rank=rank, world_size=2)
        batches = list(loader.epoch_batches())
        steps.append(len(batches))
        assert len(batches) == loader.steps_per_epoch
        for batch in batches:
            seen.update(_valid_keys(batch))
    assert steps[0] == steps[1] == 5  # ceil(14 / 3)
    assert len(seen) == 28 and set(seen.values()) == {1}


def test_a_new_epoch_reshuffles_and_again_sees_every_key(make_shards):
    shards = make_shards([5, 5, 5])
    loader = StreamingLoader(_config(f"{shards[0].rsplit('/', 1)[0]}", batch_size=5))
    first = [key for batch in loader.epoch_batches() for key in _valid_keys(batch)]
    loader._finish_epoch()
    second = [key for batch in loader.epoch_batches() for key in _valid_keys(batch)]
    assert sorted(first) == sorted(second) and len(set(first)) == 15
    assert first != second


def test_resampled_mode_runs_past_the_end_of_the_data(make_shards):
    shards = make_shards([3, 2])
    loader = StreamingLoader(_config(shards[0] + "::" + shards[1], mode="resampled", num_workers=2))
    assert loader.steps_per_epoch is None
    batches = list(itertools.islice(iter(loader), 12))  # 48 samples from 5
    assert len(batches) == 12 and all(batch["valid"].all() for batch in batches)


def _snapshot(batch) -> tuple:
    return tuple(batch["key"]), batch["image"].sum().item()


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("mode", ["epoch", "resampled"])
def test_resume_after_n_batches_yields_the_batches_an_uninterrupted_run_yields(make_shards, workers, mode):
    shards = make_shards([9, 4, 11])
    cfg = _config(shards[0].rsplit("/", 1)[0], num_workers=workers, batch_size=3, mode=mode,
                  crop="random", shuffle_buffer=5)
    straight = [_snapshot(batch) for batch in itertools.islice(iter(StreamingLoader(cfg, seed=3)), 14)]

    first = StreamingLoader(cfg, seed=3)
    stream = iter(first)
    head = [_snapshot(next(stream)) for _ in range(5)]
    state = first.state_dict()
    resumed = StreamingLoader(cfg, seed=3)
    resumed.load_state_dict(state)
    tail = [_snapshot(batch) for batch in itertools.islice(iter(resumed), 9)]  # crosses the epoch end (8 steps)
    assert head + tail == straight


def test_resume_refuses_a_changed_layout(make_shards):
    shards = make_shards([6])
    loader = StreamingLoader(_config(shards[0], batch_size=2))
    state = loader.state_dict()
    with pytest.raises(ValueError, match="batch_size 2 -> 3"):
        StreamingLoader(_config(shards[0], batch_size=3)).load_state_dict(state)


@pytest.fixture
def corrupt_shards(tmp_path):
    """One shard for each kind of bad input, with two good samples around each fault."""
    good = lambda key: sample_members(key)  # noqa: E731
    root = tmp_path / "corrupt"
    root.mkdir()
    write_tar(root / "00000.tar", good("a0") + [("a1.jpg", b"<html><body>404</body></html>"), ("a1.txt", b"x")]
              + good("a2"))
    write_tar(root / "00001.tar", good("b0") + [("b1.jpg", b""), ("b1.txt", b"x")] + good("b2"))
    write_tar(root / "00002.tar", good("c0") + sample_members("c1", caption=None) + good("c2"))
    write_tar(root / "00003.tar", good("d0") + good("d1") + good("dup"))
    write_tar(root / "00004.tar", good("dup") + good("e1"))  # the same key across a tar boundary
    truncated = root / "00005.tar"
    write_tar(truncated, good("f0") + good("f1") + [("f2.jpg", jpeg_bytes(size=(300, 300)))] + good("f3"))
    with tarfile.open(truncated) as tar:
        cut = tar.getmember("f2.jpg").offset_data + 100  # in the middle of f2's image
    truncated.write_bytes(truncated.read_bytes()[:cut])
    return root


@pytest.mark.parametrize("declared_sizes", [False, True])
def test_bad_input_is_skipped_counted_by_reason_and_the_run_continues(corrupt_shards, declared_sizes):
    if declared_sizes:  # damage is then found while streaming, not while counting
        sizes = {f"{index:05d}.tar": 3 for index in range(6)} | {"00004.tar": 2, "00005.tar": 4}
        (corrupt_shards / "sizes.json").write_text(json.dumps(sizes))
    pattern = f"{corrupt_shards}/{{00000..00006}}.tar"  # 00006 does not exist
    loader = StreamingLoader(_config(pattern, shuffle_shards=False, shuffle_buffer=0, budget_min_samples=10**6))
    keys = [key for batch in loader.epoch_batches() for key in _valid_keys(batch)]
    totals = loader.totals()
    # Declared, the truncated shard's lost sample f3 is counted too (counted from headers, it never was planned).
    lost = {"missing_samples": 1} if declared_sizes else {}
    assert totals["skipped"] == {"decode_error": 1, "empty_file": 1, "missing_caption": 1, "duplicate_key": 1,
                                 "truncated_tar": 1, "missing_shard": 1, **lost}
    assert sorted(keys) == ["a0", "a2", "b0", "b2", "c0", "c2", "d0", "d1", "dup", "e1", "f0", "f1"]
    assert totals["samples"] == 12
    assert totals["bad_shards"][f"{corrupt_shards}/00006.tar"] == 1


def test_over_the_error_budget_the_run_fails_naming_the_worst_shards(corrupt_shards, tmp_path):
    bad = tmp_path / "bad.tar"
    members = [[(f"k{index}.jpg", b"<html></html>"), (f"k{index}.txt", b"x")] for index in range(10)]
    write_tar(bad, [member for pair in members for member in pair])
    cfg = _config(f"{bad}::{corrupt_shards}/00000.tar", shuffle_shards=False, max_bad_fraction=0.2,
                  budget_min_samples=5)
    with pytest.raises(DataErrorBudgetExceeded, match=rf"decode_error.*worst shards: {bad} \(\d+\)"):
        list(StreamingLoader(cfg).epoch_batches())


def test_no_samples_at_all_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no samples"):
        StreamingLoader(_config(f"{tmp_path}/missing-{{0..3}}.tar"))


def test_shards_stream_through_pipe_commands(make_shards):
    shards = make_shards([5, 3])
    pattern = "::".join(f"pipe:cat {path}" for path in shards)
    loader = StreamingLoader(_config(pattern, batch_size=4, shuffle_shards=False))
    assert loader.sizes == [5, 3]  # counted by streaming the tar headers through the pipe
    keys = [key for batch in loader.epoch_batches() for key in _valid_keys(batch)]
    assert sorted(keys) == sorted(f"s{s:03d}_{i:04d}" for s, n in enumerate([5, 3]) for i in range(n))


def test_every_number_in_the_data_config_declares_its_range():
    for name, hint in typing.get_type_hints(DataConfig, include_extras=True).items():
        base = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
        if base in (int, float):
            assert range_of(hint) is not None, name
    with pytest.raises(ConfigError, match=r"key 'resolution' must be in \[8, 4096\], got 4"):
        load_config(DataConfig, overrides=["resolution=4"])
    with pytest.raises(ConfigError, match="key 'max_aspect_ratio' must be >= 1"):
        load_config(DataConfig, overrides=["max_aspect_ratio=0.5"])
