"""The latent-diffusion stages through the real training loop, on shapes."""
import json

import safetensors.torch
import torch

from pipeline.config import load_config
from pipeline.runs import load_run, run_stage
from stages import kl_autoencoder
from stages.shards import ShardsConfig, build


def test_the_kl_autoencoder_trains_its_discriminator_from_the_start_step_and_logs_psnr_and_latent_std(tmp_path):
    build(ShardsConfig(out_dir=str(tmp_path / "shapes"), count=48, resolution=32, samples_per_shard=24))
    out = tmp_path / "klae"
    cfg = load_config(kl_autoencoder.Config, "configs/kl_autoencoder/tiny.yaml",
                      [f"data.shards={tmp_path / 'shapes'}", f"trainer.out_dir={out}", "data.resolution=32",
                       "model.image_size=32", "model.block_out_channels=[16,32]", "model.norm_num_groups=8",
                       "model.disc_start=3", "model.disc_channels=8", "data.batch_size=8", "data.num_workers=0",
                       "trainer.max_steps=6", "trainer.save_every=3", "trainer.log_every=1", "trainer.image_every=0"])
    assert run_stage("kl_autoencoder", cfg) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    assert all({"psnr", "latent_std", "kl", "l1", "discriminator/loss"} <= set(line) for line in lines)
    # after_step(3) is called once step 3 is taken: the adversarial terms count from step 4 on
    assert all(line["discriminator/loss"] == 0 and "adaptive_weight" not in line for line in lines[:3])
    assert all(line["discriminator/loss"] > 0 and line["adaptive_weight"] > 0 for line in lines[3:])
    weights = [safetensors.torch.load_file(out / "checkpoints" / f"step-0000000{step}" / "model.safetensors")
               for step in (3, 6)]
    discriminator = [key for key in weights[0] if key.startswith("discriminator.") and "running" not in key]
    assert discriminator and any(not torch.equal(weights[0][key], weights[1][key]) for key in discriminator)
    assert list((out / "images").iterdir())
    model = load_run(out).model
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert model.encode(images).mean.shape == (2, 4, 16, 16) and model.reconstruct(images).shape == images.shape


def test_latent_shards_hold_each_images_posterior_and_the_manifest_its_scale_factor(tmp_path):
    from pipeline.data.decode import decode_image
    from pipeline.data.loader import DataConfig, StreamingLoader
    from pipeline.data.precomputed import require
    from pipeline.data.tars import iter_raw_samples
    from stages import latents

    build(ShardsConfig(out_dir=str(tmp_path / "shapes"), count=40, resolution=32, samples_per_shard=20))
    klae = tmp_path / "klae"
    cfg = load_config(kl_autoencoder.Config, "configs/kl_autoencoder/tiny.yaml",
                      [f"data.shards={tmp_path / 'shapes'}", f"trainer.out_dir={klae}", "data.resolution=32",
                       "model.image_size=32", "model.block_out_channels=[16,32]", "model.norm_num_groups=8",
                       "model.disc_weight=0", "data.batch_size=8", "data.num_workers=0", "trainer.max_steps=2"])
    assert run_stage("kl_autoencoder", cfg) == 0
    out = tmp_path / "latents"
    latents_cfg = load_config(latents.Config, "configs/latents/shapes.yaml",
                              [f"shards={tmp_path / 'shapes'}", f"autoencoder={klae}", f"out_dir={out}", "num_workers=0"])
    assert run_stage("latents", latents_cfg) == 0
    manifest = require(str(out), ["latent_mean", "latent_logvar", "text_tokens"], klae)
    assert manifest["info"]["latent_shape"] == [4, 16, 16] and manifest["info"]["downsampling"] == 2
    stats = manifest["statistics"]
    expected = (stats["latent_mean"]["std"] ** 2 + torch.tensor(stats["latent_logvar"]["mean"]).exp().item()) ** -0.5
    assert abs(manifest["info"]["scale_factor"] - expected) < 1e-6 and manifest["samples"] == {"00000.tar": 20, "00001.tar": 20}
    # The stored posterior is the autoencoder's, to float16's precision.
    model = load_run(klae).model
    first = next(item for item in iter_raw_samples(str(tmp_path / "shapes" / "00000.tar")))
    with torch.no_grad():
        posterior = model.encode(decode_image(first.files["jpg"], 32)[None])
    loader = StreamingLoader(DataConfig(shards=str(out), kind="precomputed", batch_size=40, num_workers=0,
                                        shuffle_shards=False, shuffle_buffer=0))
    batch = next(iter(loader.epoch_batches()))
    row = batch["key"].index(first.key)
    assert torch.allclose(batch["latent_mean"][row], posterior.mean[0], atol=2e-3, rtol=1e-3)
    assert torch.allclose(batch["latent_logvar"][row], posterior.logvar[0], atol=2e-2, rtol=1e-3)
