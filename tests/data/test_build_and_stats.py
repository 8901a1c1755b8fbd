import json
import subprocess
import sys
import tarfile

import PIL.Image
import pytest

from pipeline.config import load_config
from pipeline.data.stats import shard_stats
from stages.shards import ShardsConfig, build
from tests.conftest import jpeg_bytes, sample_members, write_tar


def _members(shard: str) -> list[str]:
    with tarfile.open(shard) as tar:
        return tar.getnames()


def test_shapes_shards_have_the_img2dataset_layout_and_are_deterministic(tmp_path):
    first = build(load_config(ShardsConfig, None, [f"out_dir={tmp_path}/a", "count=25", "samples_per_shard=10",
                                                   "resolution=32"]))
    again = build(load_config(ShardsConfig, None, [f"out_dir={tmp_path}/b", "count=25", "samples_per_shard=10",
                                                   "resolution=32"]))
    assert first["written"] == 25 and [s.rsplit("/", 1)[1] for s in first["shards"]] == ["00000.tar", "00001.tar",
                                                                                          "00002.tar"]
    assert sorted(_members(first["shards"][0])[:3]) == ["000000000.jpg", "000000000.json", "000000000.txt"]
    for a, b in zip(first["shards"], again["shards"]):
        with tarfile.open(a) as one, tarfile.open(b) as two:
            assert [one.extractfile(m).read() for m in one] == [two.extractfile(m).read() for m in two]
    assert json.loads((tmp_path / "a" / "sizes.json").read_text()) == {"00000.tar": 10, "00001.tar": 10,
                                                                        "00002.tar": 5}
    with tarfile.open(first["shards"][0]) as tar:
        assert all(not member.pax_headers and isinstance(member.mtime, int) for member in tar)  # one header each
        meta = json.loads(tar.extractfile("000000003.json").read())
        assert meta["caption"] == tar.extractfile("000000003.txt").read().decode()
        assert meta["shapes"]


def test_folder_and_table_sources(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for index, mode in enumerate(["RGB", "L", "RGBA"]):
        PIL.Image.new(mode, (20, 10)).save(images / f"img{index}.png")
        (images / f"img{index}.txt").write_text(f"picture {index}")
    PIL.Image.new("RGB", (8, 8)).save(images / "uncaptioned.jpg")
    (images / "broken.jpg").write_bytes(b"<html></html>")
    (images / "broken.txt").write_text("broken")
    result = build(ShardsConfig(out_dir=str(tmp_path / "from-folder"), source="folder", folder=str(images)))
    assert result["written"] == 3 and result["skipped"] == {"missing_caption": 1, "decode_error": 1}

    table = tmp_path / "table.csv"
    table.write_text("path,text\nimages/img0.png,first\nimages/img1.png,second\nimages/gone.png,lost\n")
    result = build(ShardsConfig(out_dir=str(tmp_path / "from-table"), source="table", table=str(table),
                                image_column="path", caption_column="text"))
    assert result["written"] == 2 and result["skipped"] == {"missing_image": 1}
    with tarfile.open(result["shards"][0]) as tar:
        assert tar.extractfile("000000001.txt").read() == b"second"
    with pytest.raises(ValueError, match="no column 'image'"):
        build(ShardsConfig(out_dir=str(tmp_path / "x"), source="table", table=str(table)))


def test_stats_reads_shards_that_img2dataset_wrote(tmp_path):
    # img2dataset: NNNNN.tar with KEY.jpg/.txt/.json, NNNNN_stats.json and NNNNN.parquet beside it; no sizes.json
    for shard in range(2):
        members = []
        for index in range(4):
            members += sample_members(f"{shard:05d}{index:04d}", f"photo {index}", jpeg_bytes(size=(64, 48)))
        write_tar(tmp_path / f"{shard:05d}.tar", members)
        (tmp_path / f"{shard:05d}_stats.json").write_text(json.dumps({"count": 5, "successes": 4}))
    (tmp_path / "00001_stats.json").unlink()  # counted from the tar instead
    stats = shard_stats(f"{tmp_path}/{{00000..00001}}.tar", num_workers=0)
    assert (stats["samples"], stats["shards"], stats["skipped"]) == (8, 2, {})
    assert stats["bytes"] > 0 and stats["images_per_second"] > 0


def test_cli_stats_json_reports_bad_data_instead_of_failing(tmp_path):
    write_tar(tmp_path / "00000.tar", sample_members("a") + [("b.jpg", b"<html>"), ("b.txt", b"x")])
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "shards", "stats", f"{tmp_path}/{{00000..00001}}.tar",
                          "--json", "--workers", "0"], capture_output=True, text=True, check=True)
    stats = json.loads(out.stdout)
    assert stats["samples"] == 1 and stats["shards"] == 2
    assert stats["skipped"] == {"decode_error": 1, "missing_shard": 1}


def test_cli_build_names_a_bad_key_before_any_work(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "shards", "build", "--out", str(tmp_path / "o"),
                          "cont=5"], capture_output=True, text=True)
    assert out.returncode == 2 and "unknown key 'cont'" in out.stderr and "did you mean 'count'" in out.stderr
    assert not (tmp_path / "o").exists()
