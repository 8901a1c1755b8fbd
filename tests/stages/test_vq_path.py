"""The discrete-latent family end to end on tiny models: gumbel_vae; vqvae -> pretokenize -> pixelcnn ->
sample; vqvae2 -> pretokenize -> top and bottom pixelcnn priors -> hierarchical sampling."""
import json

import PIL.Image
import pytest
import torch

from pipeline.config import load_config
from pipeline.runs import load_run, run_stage
from stages import gumbel_vae, pixelcnn, pretokenize, sample, vqvae, vqvae2
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
    assert (one["code_grids"], one["autoencoder_stage"]) == ([8], "vqvae")
    assert (two["code_grids"], two["autoencoder_stage"]) == ([8, 16], "vqvae2")
    model = load_run(vq_path / "vqvae2").model
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    top, bottom = pretokenize.split_codes(pretokenize.encode(model, images), two["code_grids"])
    assert torch.equal(top, model.encode(images)[0]) and torch.equal(bottom, model.encode(images)[1])


def _sample(out, **values) -> list[dict]:
    values = {"captions": "heldout:2", "out_dir": str(out), "images_per_caption": 2, "top_k": 16, "seed": 3,
              "batch_size": 4, "prior": "pixelcnn", "score": True, **values}
    assert sample.run(load_config(sample.Config, None, base=values)) == 0
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_pixelcnn_samples_are_decoded_by_the_vqvae_into_the_sampler_outputs(vq_path, tmp_path):
    records = _sample(tmp_path / "a", run=str(vq_path / "pixelcnn"))
    _sample(tmp_path / "b", run=str(vq_path / "pixelcnn"))
    assert [r["file"] for r in records] == [f"{i:04d}.png" for i in range(4)]
    pixels = lambda folder: [PIL.Image.open(folder / r["file"]).tobytes() for r in records]  # noqa: E731
    assert pixels(tmp_path / "a") == pixels(tmp_path / "b")
    assert PIL.Image.open(tmp_path / "a" / "0000.png").size == (64, 64)
    assert (tmp_path / "a" / "grid.png").exists() and json.loads((tmp_path / "a" / "quality.json").read_text())["samples"] == 4


def test_hierarchical_sampling_draws_top_then_bottom_codes(vq_path, tmp_path):
    top, _ = sample.load_prior(vq_path / "top", "pixelcnn")
    bottom, _ = sample.load_prior(vq_path / "bottom", "pixelcnn")
    text = torch.randint(1, 22, (3, 16))
    top_codes = top.prior.generate(text, generator=torch.Generator().manual_seed(0))
    bottom_codes = bottom.prior.generate(text, condition=top_codes, generator=torch.Generator().manual_seed(0))
    assert top_codes.shape == (3, 64) and bottom_codes.shape == (3, 256)
    assert int(top_codes.max()) < 256 and int(bottom_codes.max()) < 256
    records = _sample(tmp_path / "h", run=str(vq_path / "bottom"), top_run=str(vq_path / "top"))
    assert len(records) == 4 and PIL.Image.open(tmp_path / "h" / "0001.png").size == (64, 64)


def test_a_vqvae2_level_alone_cannot_sample_and_priors_check_their_grid(vq_path, tmp_path):
    with pytest.raises(ValueError, match="top_run"):
        _sample(tmp_path / "x", run=str(vq_path / "bottom"))
    cfg = load_config(pixelcnn.Config, "configs/pixelcnn/tiny.yaml",
                      [f"data.shards={vq_path / 'vqvae2-tokens'}", f"autoencoder={vq_path / 'vqvae2'}",
                       f"trainer.out_dir={tmp_path / 'p'}"])
    with pytest.raises(ValueError, match="level is 'single' but .* makes 2 code grid"):
        pixelcnn.run(cfg)
    assert not (tmp_path / "p").exists()
