"""The latent-diffusion stages through the real training loop, on shapes."""
import json
import shutil

import numpy as np
import PIL.Image
import pytest
import safetensors.torch
import torch

from pipeline import cli
from pipeline.config import ConfigError, load_config
from pipeline.data.decode import decode_image
from pipeline.data.loader import DataConfig, StreamingLoader
from pipeline.data.precomputed import require
from pipeline.data.tars import iter_raw_samples
from pipeline.runs import load_run, run_stage
from stages import kl_autoencoder, latents, ldm
from stages.shards import ShardsConfig, build
from tests.models.test_perceptual import write_vgg16


def test_the_kl_autoencoder_trains_its_discriminator_from_the_start_step_and_logs_psnr_and_latent_std(tmp_path):
    build(ShardsConfig(out_dir=str(tmp_path / "shapes"), count=48, resolution=32, samples_per_shard=24))
    out, vgg = tmp_path / "klae", write_vgg16(tmp_path / "vgg16.pth")
    overrides = [f"data.shards={tmp_path / 'shapes'}", f"trainer.out_dir={out}", "data.resolution=32",
                 "model.image_size=32", "model.block_out_channels=[16,32]", "model.norm_num_groups=8",
                 "model.disc_start=3", "model.disc_channels=8", "data.batch_size=8", "data.num_workers=0",
                 "trainer.max_steps=6", "trainer.save_every=3", "trainer.log_every=1", "trainer.image_every=0",
                 "model.perceptual_weight=1.0"]
    missing = load_config(kl_autoencoder.Config, "configs/kl_autoencoder/tiny.yaml",
                          [*overrides, f"model.perceptual_backbone={tmp_path / 'absent.pth'}",
                           f"trainer.out_dir={tmp_path / 'refused'}"])
    with pytest.raises(ValueError, match="model.perceptual_backbone: no file"):
        run_stage("kl_autoencoder", missing)
    assert not (tmp_path / "refused" / "checkpoints").exists()
    cfg = load_config(kl_autoencoder.Config, "configs/kl_autoencoder/tiny.yaml",
                      [*overrides, f"model.perceptual_backbone={vgg}"])
    assert run_stage("kl_autoencoder", cfg) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    assert all({"psnr", "latent_std", "kl", "l1", "lpips", "discriminator/loss"} <= set(line) for line in lines)
    vgg.unlink()  # decoding (latents, sampling) never needs the VGG weights, nor do they travel with the run
    assert set(load_run(out).model.state_dict()) == set(safetensors.torch.load_file(out / "final" / "model.safetensors"))
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


def _latents(root, autoencoder, out, *overrides: str):
    cfg = load_config(latents.Config, "configs/latents/shapes.yaml",
                      [f"shards={root / 'shapes'}", f"autoencoder={autoencoder}", f"out_dir={out}", "num_workers=0", *overrides])
    assert run_stage("latents", cfg) == 0
    return out


@pytest.fixture(scope="module")
def ldm_path(tmp_path_factory):
    """Shapes at 32 px -> a 2-step KL autoencoder (f=2) -> latent shards with the shapes vocabulary."""
    root = tmp_path_factory.mktemp("ldm-path")
    build(ShardsConfig(out_dir=str(root / "shapes"), count=40, resolution=32, samples_per_shard=20))
    cfg = load_config(kl_autoencoder.Config, "configs/kl_autoencoder/tiny.yaml",
                      [f"data.shards={root / 'shapes'}", f"trainer.out_dir={root / 'klae'}", "data.resolution=32",
                       "model.image_size=32", "model.block_out_channels=[16,32]", "model.norm_num_groups=8",
                       "model.disc_weight=0", "data.batch_size=8", "data.num_workers=0", "trainer.max_steps=2"])
    assert run_stage("kl_autoencoder", cfg) == 0
    _latents(root, root / "klae", root / "latents")
    return root


def test_latent_shards_hold_each_images_posterior_and_the_manifest_its_scale_factor(ldm_path):
    tmp_path, klae, out = ldm_path, ldm_path / "klae", ldm_path / "latents"
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


def _ldm(root, shards, out, *overrides: str) -> ldm.Config:
    return load_config(ldm.Config, "configs/ldm/tiny.yaml",
                       [f"data.shards={shards}", f"autoencoder={root / 'klae'}", f"trainer.out_dir={out}",
                        "data.batch_size=8", "data.num_workers=0", "trainer.max_steps=3", "trainer.log_every=1",
                        "trainer.save_every=3", "model.unet.block_out_channels=[16,32]", "model.unet.norm_num_groups=8",
                        "model.text.width=32", "model.latent_size=16", *overrides])


def test_the_ldm_stage_trains_the_unet_and_text_encoder_on_latent_shards_and_keeps_the_scale_factor(ldm_path):
    out = ldm_path / "ldm"
    assert run_stage("ldm", _ldm(ldm_path, ldm_path / "latents", out)) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3] and all(0.5 < line["latent_std"] < 2 for line in lines)
    trained = load_run(out)
    manifest = json.loads((ldm_path / "latents" / "manifest.json").read_text())
    assert trained.model.scale_factor.item() == pytest.approx(manifest["info"]["scale_factor"])
    first = safetensors.torch.load_file(out / "checkpoints" / "step-00000003" / "model.safetensors")
    assert any(key.startswith("text_encoder.") for key in first) and any(key.startswith("unet.") for key in first)
    assert (out / "checkpoints" / "step-00000003" / "ema.safetensors").exists()  # the tiny config keeps an EMA


def test_a_pretrained_text_encoder_from_a_local_folder_can_stay_frozen(ldm_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = ldm_path / "clip-text"
    CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=16)).save_pretrained(folder)
    shards = _latents(ldm_path, ldm_path / "klae", ldm_path / "latents-bpe", "tokenizer=open_clip:ViT-B-32")
    out = ldm_path / "ldm-frozen"
    cfg = _ldm(ldm_path, shards, out, f"model.text.pretrained=hf:{folder}", "model.text.train=false",
               "model.text_vocab_size=49408")
    assert run_stage("ldm", cfg) == 0
    trained = safetensors.torch.load_file(out / "final" / "model.safetensors")
    original = CLIPTextModel.from_pretrained(folder).state_dict()
    text = {key.removeprefix("text_encoder."): value for key, value in trained.items() if key.startswith("text_encoder.")}
    assert text and text.keys() <= original.keys()
    assert all(torch.equal(text[key], original[key]) for key in text)  # frozen: not one step moved it
    words = _ldm(ldm_path, ldm_path / "latents", out / "x", f"model.text.pretrained=hf:{folder}")
    with pytest.raises(ValueError, match="reads CLIP's token ids"):
        ldm.check_latents(words)
    with pytest.raises(ValueError, match="model.latent_size is 8 but the latent shards have 16"):
        ldm.check_latents(_ldm(ldm_path, ldm_path / "latents", out / "y", "model.latent_size=8"))


def test_latent_shards_of_another_autoencoder_are_refused(ldm_path, tmp_path):
    cfg = _ldm(ldm_path, ldm_path / "latents", tmp_path / "ldm")
    cfg.autoencoder = str(tmp_path / "another")
    with pytest.raises(ValueError, match="were made by a kl_autoencoder run with weights"):
        ldm.run(cfg)
    with pytest.raises(ConfigError, match="data.kind"):
        load_config(ldm.Config, None, ["data.shards=x", "autoencoder=x", "trainer.out_dir=x"])
    with pytest.raises(ConfigError, match="latent_size 15 is not divisible by 2 \\*\\* 1"):
        load_config(ldm.Config, "configs/ldm/tiny.yaml", ["data.shards=x", "autoencoder=x", "trainer.out_dir=x",
                                                          "model.latent_size=15"])


def _samples(run, out, *options: str) -> list:
    assert cli.main(["sample", str(run), "--captions", "a red circle", "--out", str(out), "images_per_caption=3",
                     *options]) == 0
    return [torch.from_numpy(np.asarray(PIL.Image.open(out / f"{i:04d}.png"))) for i in range(3)]


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++", "euler"])
def test_t2i_sample_draws_from_a_latent_diffusion_run_one_seed_per_image(ldm_path, scheduler):
    run = ldm_path / "ldm-sampled"
    if not (run / "final").exists():
        assert run_stage("ldm", _ldm(ldm_path, ldm_path / "latents", run)) == 0
    one = _samples(run, ldm_path / f"one-{scheduler}", f"ldm.scheduler={scheduler}", "ldm.steps=4", "batch_size=1")
    three = _samples(run, ldm_path / f"three-{scheduler}", f"ldm.scheduler={scheduler}", "ldm.steps=4", "batch_size=3")
    assert one[0].shape == (32, 32, 3)
    # An image depends on its caption and seed only, not on the batch it was drawn in (8-bit pixels).
    assert all((a.int() - b.int()).abs().max() <= 1 for a, b in zip(one, three))
    assert not torch.equal(one[0], one[1])  # each image its own seed
    records = [json.loads(line) for line in (ldm_path / f"one-{scheduler}" / "samples.jsonl").read_text().splitlines()]
    assert [record["seed"] for record in records] == [0, 1, 2]


def test_guidance_and_a_negative_caption_change_the_images(ldm_path):
    run = ldm_path / "ldm-sampled"
    if not (run / "final").exists():
        assert run_stage("ldm", _ldm(ldm_path, ldm_path / "latents", run)) == 0
    plain = _samples(run, ldm_path / "plain", "ldm.steps=3", "ldm.guidance_scale=1")
    guided = _samples(run, ldm_path / "guided", "ldm.steps=3", "ldm.guidance_scale=7")
    negative = _samples(run, ldm_path / "negative", "ldm.steps=3", "ldm.guidance_scale=7", "ldm.negative_caption=a blue square")
    assert not torch.equal(plain[0], guided[0]) and not torch.equal(guided[0], negative[0])


def test_a_run_samples_with_the_manifest_it_recorded_after_its_latent_shards_are_gone(ldm_path, tmp_path):
    shards, run = tmp_path / "latents", tmp_path / "ldm"
    shutil.copytree(ldm_path / "latents", shards)
    assert run_stage("ldm", _ldm(ldm_path, shards, run)) == 0
    assert json.loads((run / "data-manifest.json").read_text()) == json.loads((shards / "manifest.json").read_text())
    before = _samples(run, tmp_path / "before", "ldm.steps=3")
    shutil.rmtree(shards)
    after = _samples(run, tmp_path / "after", "ldm.steps=3")
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    # the recorded copy is still checked against the autoencoder the run names
    recorded = json.loads((run / "data-manifest.json").read_text())
    recorded["producer"]["weights_sha256"] = "0" * 64
    (run / "data-manifest.json").write_text(json.dumps(recorded))
    with pytest.raises(ValueError, match="trained on \\(its data-manifest.json\\) were made by a kl_autoencoder run"):
        ldm.Sampler.from_run(str(run), ldm.SamplerConfig(steps=3), torch.device("cpu"))


@pytest.mark.parametrize("scheduler, guidance", [("dpm++", 5.0), ("ddim", 1.0), ("euler", 3.0)])
def test_the_diffusers_export_loads_offline_and_draws_the_images_t2i_sample_draws(ldm_path, scheduler, guidance):
    from diffusers import StableDiffusionPipeline

    from pipeline.models.diffusion_sampling import make_scheduler

    run = ldm_path / "ldm-bpe"
    if not (run / "final").exists():  # open_clip's BPE captions: a CLIP tokenizer can give their ids
        shards = ldm_path / "latents-bpe"
        if not shards.exists():
            _latents(ldm_path, ldm_path / "klae", shards, "tokenizer=open_clip:ViT-B-32")
        assert run_stage("ldm", _ldm(ldm_path, shards, run, "model.text_vocab_size=49408")) == 0
    exported = ldm_path / "exported"
    if not exported.exists():
        assert cli.main(["export", str(run), "--format", "diffusers", str(exported)]) == 0
    assert cli.main(["export", str(run), "--format", "diffusers", str(exported)]) == 2  # never over a folder
    pipeline = StableDiffusionPipeline.from_pretrained(exported, local_files_only=True)
    pipeline.scheduler = make_scheduler(load_run(run).cfg.model.diffusion, scheduler)
    captions, seeds = ["a red circle", "two blue squares"], [3, 11]
    options = ldm.SamplerConfig(scheduler=scheduler, steps=4, guidance_scale=guidance)
    ours = ldm.Sampler.from_run(str(run), options, torch.device("cpu")).sample(captions, seeds)
    theirs = pipeline(captions, num_inference_steps=4, guidance_scale=guidance, output_type="pt",
                      generator=[torch.Generator().manual_seed(seed) for seed in seeds]).images
    assert theirs.shape == (2, 3, 32, 32)
    assert (ours / 2 + 0.5 - theirs).abs().max() < 1e-4


def test_describe_sizes_the_stable_diffusion_shape_without_latent_shards():
    from pipeline.describe import describe

    base = {"trainer": {"out_dir": "x"}, "data": {"shards": "x"}, "autoencoder": "x"}
    report = describe(ldm, load_config(ldm.Config, "configs/ldm/sd15.yaml", base=base))
    # SD 1.5: an 859.5M UNet and a 123M CLIP ViT-L/14 text transformer; ~2.4 TFLOP a 512 px image
    assert 980e6 < report["parameters"] < 985e6
    assert 2.3e12 < report["flops_per_sample"] < 2.6e12


def test_the_ldm_stage_trains_with_deepspeed_zero3_bf16_and_an_ema_over_two_processes_and_exports(ldm_path, tmp_path):
    import subprocess
    import sys

    from diffusers import StableDiffusionPipeline

    shards = ldm_path / "latents-bpe"
    if not shards.exists():
        _latents(ldm_path, ldm_path / "klae", shards, "tokenizer=open_clip:ViT-B-32")
    out = tmp_path / "zero3"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pipeline.cli",
         "stage", "ldm", "-c", "configs/ldm/tiny.yaml", f"data.shards={shards}", f"autoencoder={ldm_path / 'klae'}",
         f"trainer.out_dir={out}", "data.batch_size=4", "data.num_workers=0", "trainer.max_steps=3",
         "model.unet.block_out_channels=[16,32]", "model.unet.norm_num_groups=8", "model.text.width=32",
         "model.latent_size=16", "model.text_vocab_size=49408", "model.unet.pooled_text=true", "trainer.ema_decay=0.5",
         "engine.backend=deepspeed", "engine.zero_stage=3", "engine.precision=bf16"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    final = safetensors.torch.load_file(out / "final" / "model.safetensors")
    ema = safetensors.torch.load_file(out / "checkpoints" / "step-00000003" / "ema.safetensors")
    assert int(ema["n_averaged"]) == 3
    # final/ holds the EMA, gathered whole from the ranks' partitions, in fp32
    for key, value in final.items():
        assert torch.equal(value, ema[f"module.{key}"].to(value.dtype)), key
    assert final["unet.conv_in.weight"].shape == (16, 4, 3, 3) and final["unet.conv_in.weight"].dtype == torch.float32
    exported = tmp_path / "exported"
    assert cli.main(["export", str(out), "--format", "diffusers", str(exported)]) == 0
    pipeline = StableDiffusionPipeline.from_pretrained(exported, local_files_only=True)
    assert torch.equal(pipeline.unet.state_dict()["conv_in.weight"], final["unet.conv_in.weight"])
    image = pipeline(["a red circle"], num_inference_steps=2, output_type="pt",
                     generator=[torch.Generator().manual_seed(0)]).images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()


def test_a_killed_ldm_run_resumes_to_the_weights_of_an_uninterrupted_one(ldm_path, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from pipeline.engine.checkpoint import latest, step_of

    def stage(out):
        arguments = [f"data.shards={ldm_path / 'latents'}", f"autoencoder={ldm_path / 'klae'}", f"trainer.out_dir={out}",
                     "data.batch_size=8", "data.num_workers=0", "trainer.max_steps=4", "trainer.save_every=2",
                     "model.unet.block_out_channels=[16,32]", "model.unet.norm_num_groups=8", "model.text.width=32",
                     "model.latent_size=16", "trainer.image_every=1", "trainer.deterministic=true"]
        return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "stage", "ldm", "-c", "configs/ldm/tiny.yaml",
                                 *arguments], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert stage(straight).wait() == 0
    process, deadline = stage(killed), time.time() + 300
    while latest(killed / "checkpoints") is None:  # each step draws its images: seconds to kill it in
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert step_of(latest(killed / "checkpoints")) == 2 and not (killed / "final").exists()
    resumed = stage(killed)
    output = resumed.communicate()[0]
    assert resumed.returncode == 0 and "resumed from" in output, output[-3000:]
    expected, got = (safetensors.torch.load_file(run / "checkpoints" / "step-00000004" / "model.safetensors")
                     for run in (straight, killed))
    assert expected.keys() == got.keys() and all(torch.equal(expected[key], got[key]) for key in expected)
    drawn = {path.name for path in (killed / "images").iterdir()}  # samples of held-out captions during training
    assert {"samples-step-00000001.png", "samples-step-00000003.png", "samples-step-00000004.png"} <= drawn


def test_score_reads_an_autoencoders_reconstructions_of_held_out_images_with_the_oracle(ldm_path, monkeypatch):
    from pipeline.models.kl_autoencoder import KLAutoencoder
    from stages import score

    run = ldm_path / "ldm-sampled"
    if not (run / "final").exists():
        assert run_stage("ldm", _ldm(ldm_path, ldm_path / "latents", run)) == 0
    _samples(run, ldm_path / "scored", "ldm.steps=2")
    cfg = load_config(score.Config, None, [f"samples={ldm_path / 'scored'}", f"out_dir={ldm_path / 'score'}",
                                           f"autoencoder={ldm_path / 'klae'}", "reconstructions=16"])
    assert run_stage("score", cfg) == 0
    rebuilt = json.loads((ldm_path / "score" / "quality.json").read_text())["reconstructions"]
    assert rebuilt["images"] == 16 and 5 < rebuilt["psnr"] < 40 and 0 <= rebuilt["oracle_agreement"] < 1  # 2 steps
    assert "held-out images" in (ldm_path / "score" / "report.html").read_text()
    monkeypatch.setattr(KLAutoencoder, "reconstruct", lambda self, images: images + 0.01)  # a near-perfect one
    perfect = score.score_reconstructions(str(ldm_path / "klae"), 16)
    assert perfect["oracle_agreement"] == 1 and perfect["psnr"] == pytest.approx(10 * np.log10(4 / 1e-4), rel=1e-3)
