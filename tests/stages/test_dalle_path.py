"""pretokenize, the prior stage and sampling, end to end on tiny models."""
import hashlib
import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import PIL.Image
import pytest
import safetensors.torch
import torch

from pipeline import precompute
from pipeline.config import ConfigError, dump_config, load_config
from pipeline.data.text import make_tokenizer
from pipeline.describe import describe
from pipeline.runs import run_stage
from stages import dalle, dvae, pretokenize, sample


def _keys(folder) -> list[str]:
    keys = []
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            keys += [name.split(".")[0] for name in tar.getnames() if name.endswith(".txt")]
    return keys


def _check_caption_tokens(folder) -> None:
    """Every sample's KEY.text.npy is its caption through the manifest's tokenizer."""
    manifest = json.loads((folder / "manifest.json").read_text())
    tokenize = make_tokenizer(manifest["producer"]["tokenizer"], manifest["producer"]["text_length"])
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {name: tar.extractfile(name).read() for name in tar.getnames()}
        keys = sorted(name.split(".")[0] for name in members if name.endswith(".txt"))
        captions = [members[f"{key}.txt"].decode() for key in keys]
        tokens = np.stack([np.load(io.BytesIO(members[f"{key}.text.npy"])) for key in keys])
        assert tokens.dtype == np.uint16
        assert np.array_equal(tokens, tokenize(captions).numpy())


def test_token_shards_hold_every_image_key_once_with_the_manifest(dalle_path):
    assert sorted(_keys(dalle_path / "tokens")) == sorted(_keys(dalle_path / "shapes"))
    assert len(set(_keys(dalle_path / "tokens"))) == 90
    manifest = json.loads((dalle_path / "tokens" / "manifest.json").read_text())
    assert manifest["samples"] == {"00000.tar": 30, "00001.tar": 30, "00002.tar": 30}
    assert manifest["info"] == {"code_grids": [8], "codebook_size": 512, "autoencoder": str((dalle_path / "dvae").resolve())}
    assert len(manifest["producer"]["weights_sha256"]) == 64 and manifest["producer"]["stage"] == "dvae"
    assert manifest["members"] == {
        "text_tokens": {"dtype": "uint16", "shape": [16], "file": "text.npy", "max_value": 21},
        "image_tokens": {"dtype": "uint16", "shape": [64], "file": "image.npy", "max_value": 511}}
    _check_caption_tokens(dalle_path / "tokens")
    with tarfile.open(dalle_path / "tokens" / "00000.tar") as tar:
        assert all(not member.pax_headers for member in tar)  # whole-second mtimes: one header per member
        image = np.load(io.BytesIO(tar.extractfile("000000000.image.npy").read()))
        assert image.dtype == np.uint16 and image.shape == (64,) and image.max() < 512


def _pretokenize(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           "-m", "pipeline.cli", "stage", "pretokenize", "-c", "configs/pretokenize/shapes.yaml",
                           *args], capture_output=True, text=True, timeout=300)


def test_pretokenize_over_two_ranks_is_disjoint_resumable_and_idempotent(dalle_path, tmp_path):
    out = tmp_path / "tokens"
    # batches of 8: several per 30-sample shard, written by one writer each
    args = [f"shards={dalle_path / 'shapes'}", f"autoencoder={dalle_path / 'dvae'}", f"out_dir={out}", "num_workers=1",
            "batch_size=8"]
    first = _pretokenize(args)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert sorted(_keys(out)) == sorted(_keys(dalle_path / "shapes"))
    # A rank killed part way: one shard unfinished (no stats file) and a half-written temporary.
    (out / "00001_stats.json").unlink()
    (out / "00001.tar").unlink()
    (out / ".00001.tar.tmp").write_bytes(b"half a tar")
    finished = {name: (out / name).stat().st_mtime_ns for name in ("00000.tar", "00002.tar")}
    again = _pretokenize(args)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert {name: (out / name).stat().st_mtime_ns for name in finished} == finished  # not redone
    keys = _keys(out)
    assert len(keys) == len(set(keys)) == 90 and sorted(keys) == sorted(_keys(dalle_path / "shapes"))
    _check_caption_tokens(out)  # tokenized in the loader workers


def test_the_prior_refuses_tokens_made_by_another_dvae(dalle_path, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    for path in (dalle_path / "tokens").iterdir():
        (tokens / path.name).write_bytes(path.read_bytes())
    manifest = json.loads((tokens / "manifest.json").read_text())
    manifest["producer"]["weights_sha256"] = "0" * 64
    (tokens / "manifest.json").write_text(json.dumps(manifest))
    cfg = load_config(dalle.Config, "configs/dalle/tiny.yaml",
                      [f"data.shards={tokens}", f"dvae={dalle_path / 'dvae'}", f"trainer.out_dir={tmp_path / 'p'}"])
    with pytest.raises(ValueError, match="made by a dvae run with weights sha256 000000000000"):
        dalle.run(cfg)
    assert not (tmp_path / "p").exists()


def test_the_prior_trains_with_deepspeed_zero3_over_two_processes(dalle_path, tmp_path):
    out = tmp_path / "prior"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pipeline.cli",
         "stage", "dalle", "-c", "configs/dalle/tiny.yaml", f"data.shards={dalle_path / 'tokens'}",
         f"dvae={dalle_path / 'dvae'}", f"trainer.out_dir={out}", "trainer.max_steps=2", "data.num_workers=0",
         "data.batch_size=4", "engine.backend=deepspeed", "engine.zero_stage=3", "engine.precision=bf16"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    weights = out / "final" / "model.safetensors"
    assert weights.exists()
    state = safetensors.torch.load_file(weights)
    assert state["image_head.weight"].shape == (512, 128)  # gathered from the ZeRO-3 shards, whole


def _untrained_dvae(dalle_path, folder, *overrides: str):
    """A dvae run folder holding a randomly initialised tiny dVAE: a stand-in for another trained one."""
    cfg = load_config(dvae.Config, "configs/dvae/tiny.yaml",
                      [f"data.shards={dalle_path / 'shapes'}", f"trainer.out_dir={folder}", *overrides])
    (folder / "final").mkdir(parents=True)
    safetensors.torch.save_file(dvae.build_model(cfg).state_dict(), folder / "final" / "model.safetensors")
    dump_config(cfg, folder / "config.yaml")
    return folder


def _tokens_config(shards, autoencoder, out) -> pretokenize.Config:
    return load_config(pretokenize.Config, "configs/pretokenize/shapes.yaml",
                       [f"shards={shards}", f"autoencoder={autoencoder}", f"out_dir={out}", "num_workers=0"])


def test_pretokenize_refuses_ids_that_do_not_fit_uint16_before_writing_anything(dalle_path, tmp_path, monkeypatch):
    big = _untrained_dvae(dalle_path, tmp_path / "big", "model.codebook_size=70000")
    with pytest.raises(ValueError, match=r"member image_tokens \(uint16\[64\]\): values up to 69999 do not fit uint16 "
                                         r"\(at most 65535\)"):
        pretokenize.run(_tokens_config(dalle_path / "shapes", big, tmp_path / "tokens"))
    monkeypatch.setattr(precompute, "make_tokenizer", lambda spec, length: lambda captions: torch.full(
        (len(captions), length), 70000))
    with pytest.raises(ValueError, match=r"member text_tokens: value 70000 does not fit uint16 \(0..65535\)"):
        pretokenize.run(_tokens_config(dalle_path / "shapes", dalle_path / "dvae", tmp_path / "tokens"))
    assert not list((tmp_path / "tokens").glob("*.tar"))


def test_a_shard_that_cannot_be_opened_fails_the_stage_and_is_retried(dalle_path, tmp_path):
    out, absent = tmp_path / "tokens", tmp_path / "absent.tar"
    shards = f"{dalle_path / 'shapes' / '00000.tar'}::{absent}"
    with pytest.raises(FileNotFoundError, match=f"1 shard\\(s\\) could not be opened: {absent}; the others are finished"):
        pretokenize.run(_tokens_config(shards, dalle_path / "dvae", out))
    assert (out / "00000_stats.json").exists() and not (out / "absent_stats.json").exists()
    assert not (out / "absent.tar").exists() and not (out / "manifest.json").exists()
    finished = (out / "00000.tar").stat().st_mtime_ns
    absent.write_bytes((dalle_path / "shapes" / "00001.tar").read_bytes())  # back again
    assert pretokenize.run(_tokens_config(shards, dalle_path / "dvae", out)) == 0
    assert (out / "00000.tar").stat().st_mtime_ns == finished
    assert json.loads((out / "manifest.json").read_text())["samples"] == {"00000.tar": 30, "absent.tar": 30}


def test_shards_made_by_another_autoencoder_are_made_again(dalle_path, tmp_path):
    out = tmp_path / "tokens"
    out.mkdir()
    for shard in (dalle_path / "tokens").glob("*"):  # finished with the fixture's dVAE
        (out / shard.name).write_bytes(shard.read_bytes())
    other = _untrained_dvae(dalle_path, tmp_path / "other")
    assert pretokenize.run(_tokens_config(dalle_path / "shapes", other, out)) == 0
    weights_hash = json.loads((out / "manifest.json").read_text())["producer"]["weights_sha256"]
    assert weights_hash == hashlib.sha256((other / "final" / "model.safetensors").read_bytes()).hexdigest()
    for name in ("00000", "00001", "00002"):
        assert json.loads((out / f"{name}_stats.json").read_text())["made_by"]["producer"]["weights_sha256"] == weights_hash
        assert (out / f"{name}.tar").read_bytes() != (dalle_path / "tokens" / f"{name}.tar").read_bytes()


def _sample(dalle_path, out, *overrides: str, **extra) -> list[dict]:
    values = {"run": str(dalle_path / "prior"), "captions": "heldout:3", "out_dir": str(out),
              "images_per_caption": 2, "seed": 7, "batch_size": 4, **extra}
    assert run_stage("sample", load_config(sample.Config, None, ["dalle.top_k=16", *overrides], base=values)) == 0
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_sampling_is_reproducible_and_writes_images_captions_and_a_grid(dalle_path, tmp_path):
    records = _sample(dalle_path, tmp_path / "a")
    _sample(dalle_path, tmp_path / "b")
    _sample(dalle_path, tmp_path / "c", seed=8)
    assert [r["file"] for r in records] == [f"{i:04d}.png" for i in range(6)]
    assert [r["caption"] for r in records][::2] == sample.read_captions("heldout:3")
    pixels = lambda folder: [PIL.Image.open(folder / r["file"]).tobytes() for r in records]  # noqa: E731
    assert pixels(tmp_path / "a") == pixels(tmp_path / "b") != pixels(tmp_path / "c")
    assert PIL.Image.open(tmp_path / "a" / "0000.png").size == (64, 64)
    assert PIL.Image.open(tmp_path / "a" / "grid.png").size[1] == 3 * 128  # one row per caption


def test_a_samples_caption_and_seed_give_its_image_in_any_batch(dalle_path, tmp_path):
    records = _sample(dalle_path, tmp_path / "batched", "dalle.guidance_scale=2")  # 6 images, batches of 4
    alone = _sample(dalle_path, tmp_path / "alone", "dalle.guidance_scale=2", captions=records[3]["caption"],
                    seed=records[3]["seed"], images_per_caption=1, batch_size=1)
    pixels = lambda folder, record: PIL.Image.open(folder / record["file"]).tobytes()  # noqa: E731
    assert pixels(tmp_path / "batched", records[3]) == pixels(tmp_path / "alone", alone[0])


@pytest.mark.parametrize("setting", ["dalle.temperature=0", "dalle.top_k=0", "dalle.top_p=0", "dalle.top_p=1.5",
                                     "pixelcnn.top_k=0", pytest.param("device=cuda", marks=pytest.mark.skipif(
                                         torch.cuda.is_available(), reason="a GPU is here"))])
def test_sampling_settings_are_checked_before_loading_anything(setting):
    key = setting.split("=")[0].rsplit(".", 1)[-1]
    with pytest.raises(ConfigError, match=key):
        load_config(sample.Config, None, ["run=x", "captions=a cat", "out_dir=y", setting])


def test_clip_reranking_from_a_local_checkpoint(dalle_path, tmp_path):
    import open_clip

    model = open_clip.create_model("ViT-B-32", pretrained=None)
    checkpoint = tmp_path / "clip.pt"
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    records = _sample(dalle_path, tmp_path / "ranked", clip_checkpoint=str(checkpoint), candidates=2)
    assert len(records) == 6 and (tmp_path / "ranked" / "grid.png").exists()


def test_describe_sizes_the_paper_prior_without_allocating_it():
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "describe", "configs/dalle/12B.yaml"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "stage dalle: 12,5" in result.stdout and "ZeRO 3, bf16, 512 ranks" in result.stdout


def test_describe_of_a_missing_file_says_the_file_is_missing(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "describe", str(tmp_path / "dale.yaml")],
                            capture_output=True, text=True, timeout=120)
    # Before: "unknown stage", from the name of the folder the file would have been in.
    assert result.returncode == 2 and f"{tmp_path / 'dale.yaml'}: no such config file" in result.stderr, result.stderr


def test_describe_counts_the_logits_and_each_backends_bytes_per_parameter():
    base = {"trainer": {"out_dir": "x"}, "data": {"shards": "x"}, "dvae": "x"}
    cfg = load_config(dalle.Config, "configs/dalle/1node.yaml", base=base)  # DeepSpeed ZeRO 2, bf16, batch 16
    report = describe(dalle, cfg)
    m = cfg.model
    logits = 16 * ((256 - 1) * (m.text_vocab_size + 256) + 1024 * 8192)  # text[1:] and the image, per batch
    assert report["logits_gib"] == pytest.approx(logits * 10 / 2 ** 30)  # > 3 GiB: more than the activations
    assert report["weights_gib"] == pytest.approx(report["parameters"] * 2 / 2 ** 30)
    assert report["optimizer_gib"] == pytest.approx(report["parameters"] * 12 / 8 / 2 ** 30)  # sharded over 8
    accelerate = load_config(dalle.Config, "configs/dalle/1node.yaml", ["engine.backend=accelerate",
                                                                        "engine.zero_stage=0"], base=base)
    report = describe(dalle, accelerate)  # autocast: fp32 weights and gradients, whatever the precision
    assert report["weights_gib"] == report["gradients_gib"] == pytest.approx(report["parameters"] * 4 / 2 ** 30)
    assert report["optimizer_gib"] == pytest.approx(report["parameters"] * 8 / 2 ** 30)


def test_t2i_sample_takes_its_options_from_the_config_and_its_flags_over_a_config_file(dalle_path, tmp_path):
    from pipeline.cli import main

    out = tmp_path / "cli"
    assert main(["sample", str(dalle_path / "prior"), "--captions", "a small red circle: the only one", "--out", str(out),
                 "-c", "configs/sample/heldout.yaml", "images_per_caption=1", "dalle.top_k=4"]) == 0
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [record["caption"] for record in records] == ["a small red circle: the only one"]  # not heldout:24
    used = load_config(sample.Config, out / "config.yaml")
    assert used.dalle.top_k == 4 and used.dalle.guidance_scale == 2.0 and used.stage == ""


def test_the_sample_stages_hash_leaves_out_what_cannot_change_its_samples():
    from pipeline.config import result_hash

    def digest(*overrides: str) -> str:
        return result_hash(load_config(sample.Config, None, ["run=r", "captions=c", "out_dir=o", "stage=dalle", *overrides]))
    assert digest("pixelcnn.top_k=3") == digest() == digest("candidates=9")  # another family; CLIP unused
    assert digest("dalle.top_k=3") != digest() != digest("clip_checkpoint=m.pt")
