"""The discrete-latent family end to end on tiny models: gumbel_vae; vqvae -> pretokenize -> pixelcnn ->
sample; vqvae2 -> pretokenize -> top and bottom pixelcnn priors -> hierarchical sampling."""
import json

import PIL.Image
import pytest
import torch

from pipeline.config import load_config
from pipeline.data.precomputed import split_codes
from pipeline.runs import load_run, run_stage
from stages import gumbel_vae, pixelcnn, pretokenize, sample, score, vqvae, vqvae2
from stages.shards import ShardsConfig, build

SMALL = ["data.num_workers=0", "data.batch_size=8", "trainer.max_steps=2", "trainer.log_every=1"]


@pytest.fixture(scope="module")
def vq_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("vq-path")
    build(ShardsConfig(out_dir=str(root / "shapes"), count=40, resolution=64, samples_per_shard=20))
    for module, name in ((vqvae, "vqvae"), (vqvae2, "vqvae2")):
        cfg = load_config(module.Config, f"configs/{name}/tiny.yaml",
                          [f"data.shards={root / 'shapes'}", f"trainer.out_dir={root / name}", *SMALL])
        assert run_stage(name, cfg) == 0
        tokens = load_config(pretokenize.Config, "configs/pretokenize/shapes.yaml",
                             [f"shards={root / 'shapes'}", f"autoencoder={root / name}", f"autoencoder_stage={name}",
                              f"out_dir={root / (name + '-tokens')}", "num_workers=0"])
        assert pretokenize.run(tokens) == 0
    priors = {"pixelcnn": ("tiny", "vqvae"), "top": ("vqvae2-top", "vqvae2"), "bottom": ("vqvae2-bottom", "vqvae2")}
    for name, (config, autoencoder) in priors.items():
        cfg = load_config(pixelcnn.Config, f"configs/pixelcnn/{config}.yaml",
                          [f"data.shards={root / (autoencoder + '-tokens')}", f"autoencoder={root / autoencoder}",
                           f"trainer.out_dir={root / name}", *SMALL])
        assert run_stage("pixelcnn", cfg) == 0
    return root


def test_gumbel_vae_stage_trains_and_draws_prior_samples(tmp_path):
    build(ShardsConfig(out_dir=str(tmp_path / "shapes"), count=20, resolution=64, samples_per_shard=20))
    cfg = load_config(gumbel_vae.Config, "configs/gumbel_vae/tiny.yaml",
                      [f"data.shards={tmp_path / 'shapes'}", f"trainer.out_dir={tmp_path / 'run'}", *SMALL,
                       "trainer.image_every=2"])
    assert gumbel_vae.run(cfg) == 0
    metrics = json.loads((tmp_path / "run" / "final" / "metrics.json").read_text())
    assert metrics["step"] == 2 and 1 <= metrics["perplexity"] <= 16 and metrics["temperature"] < 1
    assert {path.name.split("-")[0] for path in (tmp_path / "run" / "images").glob("*.png")} >= {"reconstructions", "samples"}


def test_vq_token_shards_hold_one_or_two_code_grids(vq_path):
    one = json.loads((vq_path / "vqvae-tokens" / "manifest.json").read_text())
    two = json.loads((vq_path / "vqvae2-tokens" / "manifest.json").read_text())
    assert (one["info"]["code_grids"], one["producer"]["stage"]) == ([8], "vqvae")
    assert (two["info"]["code_grids"], two["producer"]["stage"]) == ([8, 16], "vqvae2")
    assert two["members"]["image_tokens"] == {"dtype": "uint16", "shape": [64 + 256], "file": "image.npy",
                                              "max_value": 255}
    model = load_run(vq_path / "vqvae2").model
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    top, bottom = split_codes(pretokenize.encode(model, images), two["info"]["code_grids"])
    assert torch.equal(top, model.encode(images)[0]) and torch.equal(bottom, model.encode(images)[1])


def _sample(out, *overrides: str, **values) -> list[dict]:
    values = {"captions": "heldout:2", "out_dir": str(out), "images_per_caption": 2, "seed": 3, "batch_size": 4, **values}
    cfg = load_config(sample.Config, None, ["pixelcnn.top_k=16", *overrides], base=values)
    assert run_stage("sample", cfg) == 0
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_pixelcnn_samples_are_decoded_by_the_vqvae_into_the_sampler_outputs(vq_path, tmp_path):
    records = _sample(tmp_path / "a", run=str(vq_path / "pixelcnn"))
    _sample(tmp_path / "b", run=str(vq_path / "pixelcnn"))
    assert [r["file"] for r in records] == [f"{i:04d}.png" for i in range(4)]
    pixels = lambda folder: [PIL.Image.open(folder / r["file"]).tobytes() for r in records]  # noqa: E731
    assert pixels(tmp_path / "a") == pixels(tmp_path / "b")
    assert PIL.Image.open(tmp_path / "a" / "0000.png").size == (64, 64)
    assert (tmp_path / "a" / "grid.png").exists()
    assert run_stage("score", load_config(score.Config, None, [f"samples={tmp_path / 'a'}", f"out_dir={tmp_path / 's'}"])) == 0
    quality = json.loads((tmp_path / "s" / "quality.json").read_text())
    assert quality["samples"] == 4 and 0 <= quality["colour_and_shape_accuracy"] <= quality["colour_accuracy"] <= 1


def test_hierarchical_sampling_draws_top_then_bottom_codes(vq_path, tmp_path):
    top, bottom = load_run(vq_path / "top").model, load_run(vq_path / "bottom").model
    text = torch.randint(1, 22, (3, 16))
    top_codes = top.prior.generate(text, generator=torch.Generator().manual_seed(0))
    bottom_codes = bottom.prior.generate(text, condition=top_codes, generator=torch.Generator().manual_seed(0))
    assert top_codes.shape == (3, 64) and bottom_codes.shape == (3, 256)
    assert int(top_codes.max()) < 256 and int(bottom_codes.max()) < 256
    records = _sample(tmp_path / "h", f"pixelcnn.top_run={vq_path / 'top'}", run=str(vq_path / "bottom"))
    assert len(records) == 4 and PIL.Image.open(tmp_path / "h" / "0001.png").size == (64, 64)


def test_a_vqvae2_level_alone_cannot_sample_and_priors_check_their_grid(vq_path, tmp_path):
    with pytest.raises(ValueError, match="the top prior as pixelcnn.top_run"):
        _sample(tmp_path / "x", run=str(vq_path / "bottom"))
    cfg = load_config(pixelcnn.Config, "configs/pixelcnn/tiny.yaml",
                      [f"data.shards={vq_path / 'vqvae2-tokens'}", f"autoencoder={vq_path / 'vqvae2'}",
                       f"trainer.out_dir={tmp_path / 'p'}"])
    with pytest.raises(ValueError, match="level is 'single' but .* makes 2 code grid"):
        pixelcnn.run(cfg)
    assert not (tmp_path / "p").exists()
