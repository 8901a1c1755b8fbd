"""Hostile or broken data costs bounded work per sample and is counted; it never takes the process down."""
import io
import json
import re
import tarfile
import time
import tracemalloc

import PIL.Image
import PIL.ImageFile
import pytest

from pipeline.data.decode import DecodeError, decode_image
from pipeline.data.loader import StreamingLoader
from pipeline.data.stream import DataErrorBudgetExceeded
from tests.conftest import jpeg_bytes, sample_members, write_tar
from tests.data.test_loader import _config, _valid_keys


def _png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.new("L", size, 128).save(buffer, "PNG")
    return buffer.getvalue()


def _keys(loader: StreamingLoader) -> list[str]:
    return sorted(key for batch in loader.epoch_batches() for key in _valid_keys(batch))


def test_a_long_thin_image_is_refused_from_its_header_before_decoding():
    data = _png((1, 1_000_000))  # 2 KB; resized to 32 px wide it took 6.3 GB and 13 s
    start = time.perf_counter()
    with pytest.raises(DecodeError) as refused:
        decode_image(data, 32)
    assert refused.value.reason == "extreme_aspect_ratio"
    assert time.perf_counter() - start < 0.5


def test_the_pixel_limit_counts_the_pixels_to_decode():
    with pytest.raises(DecodeError) as refused:
        decode_image(_png((200, 100)), 16, max_pixels=10_000)
    assert refused.value.reason == "image_too_large"
    # JPEG decodes at 1/8 scale for a 16 px target: 25 x 25 pixels
    assert decode_image(jpeg_bytes(size=(200, 200)), 16, max_pixels=1_000).shape == (3, 16, 16)


def test_decompression_bombs_and_memory_errors_are_decode_errors_with_their_reason(monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 100)  # PIL itself refuses twice that
        with pytest.raises(DecodeError) as bomb:
            decode_image(_png((50, 30)), 16)
    assert bomb.value.reason == "image_too_large"

    def exhausted(image):
        raise MemoryError
    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", exhausted)
    with pytest.raises(DecodeError) as memory:
        decode_image(_png((50, 30)), 16)
    assert memory.value.reason == "out_of_memory"


def test_the_loader_skips_costly_images_quickly_and_counts_them_by_reason(tmp_path):
    shard = write_tar(tmp_path / "00000.tar", sample_members("a") + sample_members("thin", image=_png((1, 1_000_000)))
                      + sample_members("large", image=_png((1500, 1500))) + sample_members("b"))
    start = time.perf_counter()
    loader = StreamingLoader(_config(str(shard), max_image_pixels=1_500_000))
    assert _keys(loader) == ["a", "b"]
    assert time.perf_counter() - start < 3
    assert loader.totals()["skipped"] == {"extreme_aspect_ratio": 1, "image_too_large": 1}


def _write_raw_members(handle, members: list[tuple[str, bytes]]) -> None:
    for name, data in members:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        handle.write(info.tobuf(tarfile.GNU_FORMAT) + data + bytes(-len(data) % 512))


@pytest.mark.parametrize("declared,data_present,reason", [
    (65 * 2**20, True, "oversized_member"),  # over the 64 MiB default: a hole in a sparse file, then sample b
    (8 * 2**30, False, "truncated_tar"),  # a header declaring 8 GiB, and the file ends
])
def test_a_huge_member_is_skipped_without_reading_it_into_memory(tmp_path, declared, data_present, reason):
    shard = tmp_path / "00000.tar"
    with open(shard, "wb") as handle:
        _write_raw_members(handle, sample_members("a"))
        info = tarfile.TarInfo("big.jpg")
        info.size = declared
        handle.write(info.tobuf(tarfile.GNU_FORMAT))
        if data_present:
            handle.seek(declared + -declared % 512, io.SEEK_CUR)
            _write_raw_members(handle, [("big.txt", b"x")] + sample_members("b"))
            handle.write(bytes(1024))  # the end-of-archive marker
        else:
            handle.write(b"\xff" * 1000)
    tracemalloc.start()
    try:
        loader = StreamingLoader(_config(str(shard)))
        keys = _keys(loader)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert keys == (["a", "b"] if data_present else ["a"])
    assert loader.totals()["skipped"] == {reason: 1}
    assert peak < 16 * 2**20


def _shard(folder, count: int) -> str:
    members = [member for index in range(count) for member in sample_members(f"k{index:04d}")]
    return str(write_tar(folder / "00000.tar", members))


def _cut(shard: str, *, before: str | None = None, inside: str | None = None) -> None:
    """Cuts the shard's file at the header of member `before`, or 100 bytes into the data of `inside`."""
    with tarfile.open(shard) as tar:
        cut = tar.getmember(before).offset if before else tar.getmember(inside).offset_data + 100
    with open(shard, "r+b") as handle:
        handle.truncate(cut)


@pytest.mark.parametrize("declared", [False, True])
def test_a_tar_cut_at_a_member_boundary_is_counted(tmp_path, declared):
    shard = _shard(tmp_path, 8)
    _cut(shard, before="k0004.jpg")
    if declared:
        (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": 8}))
    loader = StreamingLoader(_config(shard, shuffle_buffer=0, budget_min_samples=10**6))
    # The sample being read when the data ended may lack members: it goes with the damage.
    assert _keys(loader) == ["k0000", "k0001", "k0002"]
    lost = {"missing_samples": 4} if declared else {}  # k0004..k0007: known only from the declared size
    assert loader.totals()["skipped"] == {"truncated_tar": 1, **lost}


def test_the_samples_a_cut_loses_count_toward_the_error_budget(tmp_path):
    shard = _shard(tmp_path, 40)
    _cut(shard, inside="k0010.jpg")
    (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": 40}))
    # 10 samples read, 30 lost: one truncated_tar alone would be 1 of 11, under the budget
    cfg = _config(shard, max_bad_fraction=0.2, budget_min_samples=10)
    with pytest.raises(DataErrorBudgetExceeded, match="missing_samples 29"):
        list(StreamingLoader(cfg).epoch_batches())


def test_a_sizes_file_claiming_more_than_a_shard_holds_counts_the_shortfall(make_shards):
    shards = make_shards([4, 4])
    folder = shards[0].rsplit("/", 1)[0]
    with open(f"{folder}/sizes.json", "w") as handle:
        json.dump({"00000.tar": 8, "00001.tar": 4}, handle)
    loader = StreamingLoader(_config(folder, shuffle_shards=False, budget_min_samples=10**6))
    assert len(_keys(loader)) == 8
    totals = loader.totals()
    assert totals["padded"] == 4
    assert totals["skipped"] == {"missing_samples": 4} and totals["bad_shards"] == {shards[0]: 4}


@pytest.mark.parametrize("shuffle_buffer", [0, 3, 4])
def test_a_resume_counts_a_shards_shortfall_once(tmp_path, shuffle_buffer):
    shard = _shard(tmp_path, 14)
    _cut(shard, inside="k0009.jpg")
    (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": 20}))
    cfg = _config(shard, batch_size=2, shuffle_buffer=shuffle_buffer, shuffle_shards=False, budget_min_samples=10**6)
    straight = StreamingLoader(cfg)
    every = _keys(straight)
    for stop in range(1, straight.steps_per_epoch):  # stopped after each batch, the padding ones too
        first, batches = StreamingLoader(cfg), []
        for batch in first.epoch_batches():
            batches.append(batch)
            if len(batches) == stop:
                break
        resumed = StreamingLoader(cfg)
        resumed.load_state_dict(first.state_dict())
        # Before: stopped in the padding, the resumed loader read the shard's end again and counted it twice.
        assert sorted([key for batch in batches for key in _valid_keys(batch)] + _keys(resumed)) == every
        assert resumed.totals()["skipped"] == straight.totals()["skipped"], stop


@pytest.mark.parametrize("name,content", [
    ("sizes.json", "{not json"), ("sizes.json", '{"00000.tar": "many"}'), ("sizes.json", '{"00000.tar": -3}'),
    ("sizes.json", "[4]"), ("00000_stats.json", '{"successes": 2.5}'),
])
def test_a_malformed_sizes_file_is_an_error_naming_it(make_shards, name, content):
    shards = make_shards([4])
    path = f"{shards[0].rsplit('/', 1)[0]}/{name}"
    with open(path, "w") as handle:
        handle.write(content)
    with pytest.raises(ValueError, match=re.escape(path)):
        StreamingLoader(_config(shards[0]))
