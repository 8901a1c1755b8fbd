"""Resuming across a changed worker count or world size: the loader re-plans the rest of the epoch."""
import itertools
import logging
from collections import Counter

import pytest

from pipeline.data.loader import DataConfig, StreamingLoader

SIZES = [7, 1, 12, 3, 5, 9, 6]  # 43 samples, uneven
OLD_WORLD, OLD_WORKERS = 2, 2


def _config(shards, **overrides) -> DataConfig:
    values = dict(shards=shards, resolution=16, batch_size=3, num_workers=OLD_WORKERS, shuffle_buffer=6)
    values.update(overrides)
    return DataConfig(**values)


def _valid_keys(batch) -> list[str]:
    return [key for key, valid in zip(batch["key"], batch["valid"]) if valid]


def _snapshot(batch) -> tuple:
    return tuple(batch["key"]), batch["image"].sum().item()


def _loaders(cfg, world_size: int, state=None) -> list[StreamingLoader]:
    """One loader per rank, each resumed from `state` when given."""
    loaders = [StreamingLoader(cfg, seed=5, rank=rank, world_size=world_size) for rank in range(world_size)]
    if state is not None:
        for loader in loaders:
            loader.load_state_dict(state)
    return loaders


def _run_part_way(loaders, batches: int) -> tuple[Counter, list[dict]]:
    """Valid keys of each rank's next `batches` batches, and every rank's state after them."""
    seen = Counter()
    for loader in loaders:
        stream = loader.epoch_batches()
        for batch in itertools.islice(stream, batches):
            seen.update(_valid_keys(batch))
        stream.close()
    return seen, [loader.state_dict() for loader in loaders]


@pytest.fixture
def shards(make_shards):
    return make_shards(SIZES)[0].rsplit("/", 1)[0]


@pytest.mark.parametrize("buffer", [0, 1, 6])
@pytest.mark.parametrize("world_size, workers", [(1, 2), (3, 2), (2, 0), (2, 1), (2, 3), (1, 0), (3, 3)])
def test_the_rest_of_the_epoch_is_replanned_over_the_new_ranks_and_workers(shards, buffer, world_size, workers,
                                                                           caplog):
    seen, states = _run_part_way(_loaders(_config(shards, shuffle_buffer=buffer), OLD_WORLD), 3)
    with caplog.at_level(logging.INFO, logger="t2i.data"):
        new = _loaders(_config(shards, shuffle_buffer=buffer, num_workers=workers), world_size, states)
    assert "re-planned the rest of epoch 0" in caplog.text and "samples remain" in caplog.text
    assert sum(loader.totals()["samples"] for loader in new) == sum(seen.values())  # carried over, once
    steps = []
    for loader in new:
        batches = list(loader.epoch_batches())
        steps.append(len(batches))
        assert len(batches) == loader.steps_per_epoch
        for batch in batches:
            seen.update(_valid_keys(batch))
    assert len(set(steps)) == 1
    assert len(seen) == sum(SIZES)
    if buffer <= 1:
        assert set(seen.values()) == {1}
    else:
        twice = [key for key, count in seen.items() if count == 2]
        assert max(seen.values()) <= 2 and len(twice) <= (buffer - 1) * OLD_WORKERS * OLD_WORLD
    assert sum(loader.totals()["samples"] for loader in new) == sum(seen.values())


@pytest.mark.parametrize("as_list", [False, True])
@pytest.mark.parametrize("mode", ["epoch", "resampled"])
def test_a_replanned_run_resumes_exactly_within_the_new_layout(shards, mode, as_list):
    old = _config(shards, crop="random", shuffle_buffer=5, mode=mode)
    _, states = _run_part_way(_loaders(old, OLD_WORLD), 3)
    new = _config(shards, crop="random", shuffle_buffer=5, num_workers=3, mode=mode)
    # 6 batches: past the end of the re-planned epoch (4 batches per rank); resampled mode runs on.
    straight = [[_snapshot(batch) for batch in itertools.islice(loader.epoch_batches(), 6)]
                for loader in _loaders(new, 3, states)]

    first = _loaders(new, 3, states)
    heads = [[_snapshot(batch) for batch in itertools.islice(loader.epoch_batches(), 2)] for loader in first]
    checkpoint = [loader.state_dict() for loader in first]
    for rank, loader in enumerate(_loaders(new, 3)):
        loader.load_state_dict(checkpoint if as_list else checkpoint[rank])
        tail = [_snapshot(batch) for batch in itertools.islice(loader.epoch_batches(), 4)]
        assert heads[rank] + tail == straight[rank]


def test_a_replanned_epoch_replanned_again_still_yields_every_key_once(shards):
    seen, states = _run_part_way(_loaders(_config(shards, shuffle_buffer=0), OLD_WORLD), 3)
    more, states = _run_part_way(_loaders(_config(shards, shuffle_buffer=0, num_workers=3), 3, states), 1)
    rest, _ = _run_part_way(_loaders(_config(shards, shuffle_buffer=0, num_workers=0), 1, states), 10**6)
    everything = seen + more + rest
    assert len(everything) == sum(SIZES) and set(everything.values()) == {1}


def test_the_epoch_after_a_replanned_one_is_a_normal_whole_epoch(shards):
    _, states = _run_part_way(_loaders(_config(shards), OLD_WORLD), 3)
    new = _config(shards, num_workers=3)
    seen = Counter()
    for rank, loader in enumerate(_loaders(new, 3, states)):
        list(loader.epoch_batches())
        loader._finish_epoch()
        batches = list(loader.epoch_batches())
        fresh = StreamingLoader(new, seed=5, rank=rank, world_size=3)
        fresh._finish_epoch()
        assert [_snapshot(batch) for batch in batches] == [_snapshot(batch) for batch in fresh.epoch_batches()]
        seen.update(key for batch in batches for key in _valid_keys(batch))
    assert len(seen) == sum(SIZES) and set(seen.values()) == {1}


def test_resampled_mode_draws_afresh_after_a_replan(shards):
    old = _config(shards, mode="resampled")
    seen, states = _run_part_way(_loaders(old, OLD_WORLD), 3)
    new = _config(shards, mode="resampled", num_workers=3)
    resumed = _loaders(new, 3, states)
    assert sum(loader.totals()["samples"] for loader in resumed) == sum(seen.values())
    for resumed_rank, fresh_rank in zip(resumed, _loaders(new, 3)):
        batches = list(itertools.islice(resumed_rank.epoch_batches(), 4))
        assert all(batch["valid"].all() for batch in batches)
        assert resumed_rank.state_dict()["replans"] == 1
        assert [_snapshot(batch) for batch in batches] != [
            _snapshot(batch) for batch in itertools.islice(fresh_rank.epoch_batches(), 4)]


def test_a_change_of_batch_size_or_shards_is_still_refused(shards, make_shards):
    _, states = _run_part_way(_loaders(_config(shards), OLD_WORLD), 1)
    fewer = make_shards(SIZES[:6], folder="fewer")[0].rsplit("/", 1)[0]
    for state in (states, states[0]):
        with pytest.raises(ValueError, match="batch_size 3 -> 4 changed since the checkpoint"):
            StreamingLoader(_config(shards, batch_size=4)).load_state_dict(state)
        with pytest.raises(ValueError, match="shards 7 -> 6"):
            StreamingLoader(_config(fewer)).load_state_dict(state)
    with pytest.raises(ValueError, match="needs the states of all 2 ranks"):
        StreamingLoader(_config(shards, num_workers=3), rank=0, world_size=3).load_state_dict(states[0])
