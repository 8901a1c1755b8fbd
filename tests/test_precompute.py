"""The precompute machinery and format (pipeline/precompute.py, pipeline/data/precomputed.py) with an
encoder of its own: declared members of any dtype, per-member statistics, the loader reading them,
consumers refused for missing members or another producer, out-of-range values refused."""
import io
import json
import tarfile

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from pipeline.data.loader import DataConfig, StreamingLoader
from pipeline.data.precomputed import Member, read_manifest, require
from pipeline.engine.distributed import DistInfo
from pipeline.files import sha256_of
from pipeline.precompute import precompute
from stages.shards import ShardsConfig, build

WORDS = "words:configs/tokenizers/shapes-words.txt"
ONE_RANK = DistInfo(0, 1, 0, torch.device("cpu"))


class MeanColours:
    """Each image's mean colour over its four quadrants, times `scale`: a float member."""

    def __init__(self, weights_sha256: str, scale: float = 1.0) -> None:
        self.members = {"latent": Member("float16", (3, 2, 2), "latent.npy"),
                        "text_tokens": Member("uint16", (8,), "text.npy", max_value=21)}
        self.producer = {"weights_sha256": weights_sha256, "stage": "toy"}
        self.info = {"quadrants": 4}
        self.resolution, self.tokenizer, self.text_length, self.scale = 16, WORDS, 8, scale

    def encode(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"latent": F.adaptive_avg_pool2d(batch["image"], 2) * self.scale, "text_tokens": batch["text_tokens"]}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    build(ShardsConfig(out_dir=str(out), count=40, resolution=32, samples_per_shard=20))
    return out


@pytest.fixture
def producer_run(tmp_path):
    """A run folder whose final weights the encoder's producer names."""
    (tmp_path / "run" / "final").mkdir(parents=True)
    safetensors.torch.save_file({"w": torch.ones(2)}, tmp_path / "run" / "final" / "model.safetensors")
    return tmp_path / "run"


def _members(shard, key: str) -> dict[str, np.ndarray]:
    with tarfile.open(shard) as tar:
        return {name.split(".", 1)[1]: np.load(io.BytesIO(tar.extractfile(name).read()))
                for name in tar.getnames() if name.startswith(key + ".") and name.endswith(".npy")}


def test_declared_members_are_written_with_their_dtypes_and_statistics(shapes, producer_run, tmp_path):
    out = tmp_path / "latents"
    precompute(MeanColours(sha256_of(producer_run / "final" / "model.safetensors")), str(shapes), out, batch_size=8,
               num_workers=1, dist=ONE_RANK)
    manifest = read_manifest(str(out))
    assert manifest["members"]["latent"] == {"dtype": "float16", "shape": [3, 2, 2], "file": "latent.npy", "max_value": None}
    assert manifest["info"] == {"quadrants": 4} and manifest["samples"] == {"00000.tar": 20, "00001.tar": 20}
    first = _members(out / "00000.tar", "000000000")
    assert first["latent.npy"].dtype == np.float16 and first["latent.npy"].shape == (3, 2, 2)
    assert first["text.npy"].dtype == np.uint16 and first["text.npy"].shape == (8,)
    values = np.concatenate([_members(out / shard, f"{index:09d}")["latent.npy"].ravel().astype(np.float64)
                             for shard, keys in (("00000.tar", range(20)), ("00001.tar", range(20, 40)))
                             for index in keys])
    stats = manifest["statistics"]["latent"]
    assert stats["count"] == values.size == 40 * 12
    assert stats["mean"] == pytest.approx(values.mean()) and stats["std"] == pytest.approx(values.std())
    assert "text_tokens" not in manifest["statistics"]  # integers: no statistics

    loader = StreamingLoader(DataConfig(shards=str(out), kind="precomputed", batch_size=8, num_workers=0))
    batch = next(iter(loader))
    assert batch["latent"].shape == (8, 3, 2, 2) and batch["latent"].dtype == torch.float32
    assert batch["text_tokens"].shape == (8, 8) and batch["text_tokens"].dtype == torch.int64

    assert require(str(out), ["latent"], producer_run)["producer"]["stage"] == "toy"
    with pytest.raises(ValueError, match=r"hold latent float16\[3,2,2\], text_tokens uint16\[8\]; this stage needs "
                                         r"clip_image too"):
        require(str(out), ["latent", "clip_image"], producer_run)
    safetensors.torch.save_file({"w": torch.zeros(2)}, producer_run / "final" / "model.safetensors")  # retrained
    with pytest.raises(ValueError, match="were made by a toy run with weights sha256"):
        require(str(out), ["latent"], producer_run)


def test_a_rerun_keeps_finished_shards_and_another_producer_makes_them_again(shapes, tmp_path):
    out = tmp_path / "latents"
    precompute(MeanColours("a" * 64), str(shapes), out, batch_size=8, num_workers=0, dist=ONE_RANK)
    stamps = {path.name: path.stat().st_mtime_ns for path in out.glob("*.tar")}
    precompute(MeanColours("a" * 64), str(shapes), out, batch_size=8, num_workers=0, dist=ONE_RANK)
    assert {path.name: path.stat().st_mtime_ns for path in out.glob("*.tar")} == stamps
    precompute(MeanColours("b" * 64, scale=2.0), str(shapes), out, batch_size=8, num_workers=0, dist=ONE_RANK)
    assert read_manifest(str(out))["producer"]["weights_sha256"] == "b" * 64
    assert all(json.loads((out / f"0000{i}_stats.json").read_text())["made_by"]["producer"]["weights_sha256"] == "b" * 64
               for i in (0, 1))


def test_values_out_of_a_members_range_are_refused_before_any_shard_is_written(shapes, tmp_path):
    with pytest.raises(ValueError, match="beyond float16's range"):
        precompute(MeanColours("a" * 64, scale=1e6), str(shapes), tmp_path / "big", batch_size=8, num_workers=0,
                   dist=ONE_RANK)
    assert not list((tmp_path / "big").glob("*.tar"))
    encoder = MeanColours("a" * 64)
    encoder.members["text_tokens"] = Member("uint8", (8,), "text.npy", max_value=300)
    with pytest.raises(ValueError, match=r"member text_tokens \(uint8\[8\]\): values up to 300 do not fit uint8"):
        precompute(encoder, str(shapes), tmp_path / "wide", batch_size=8, num_workers=0, dist=ONE_RANK)
    assert not (tmp_path / "wide").exists()


def test_a_token_manifest_from_before_members_reads_as_its_members(tmp_path):
    old = {"source_shards": ["a.tar"], "samples": {"a.tar": 3}, "skipped": {}, "autoencoder": "/runs/dvae",
           "autoencoder_stage": "dvae", "autoencoder_sha256": "c" * 64, "tokenizer": WORDS, "text_length": 16,
           "code_grids": [8], "codebook_size": 512}
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    (tmp_path / "a.tar").write_bytes(b"")
    manifest = read_manifest(str(tmp_path / "a.tar"))
    assert manifest["members"]["image_tokens"] == {"dtype": "uint16", "shape": [64], "file": "image.npy", "max_value": 511}
    assert manifest["producer"]["weights_sha256"] == "c" * 64 and manifest["info"]["code_grids"] == [8]


def test_writing_over_the_source_shards_is_refused(shapes):
    with pytest.raises(ValueError, match="holds the source shards, which the outputs would replace"):
        precompute(MeanColours("a" * 64), str(shapes), shapes, batch_size=8, num_workers=0, dist=ONE_RANK)
