"""Latent diffusion against diffusers' own ways of training and sampling, measured in the same run. Not a test.

    python benchmarks/ldm.py                                   # the CPU demo's shapes (configs/ldm/tiny.yaml)
    python benchmarks/ldm.py --ldm configs/ldm/sd15.yaml --autoencoder configs/kl_autoencoder/f8.yaml \\
        --resolution 256 --batch-size 32 --sample-batch 8      # Stable Diffusion's shape at 256 px, on a GPU

Training: our `ldm` step on precomputed posteriors (what the `latents` stage writes; z drawn from the
stored mean and log-variance) against the step of diffusers' `examples/text_to_image/train_text_to_image.py`,
which encodes every batch's pixels with the VAE (`vae.encode(x).latent_dist.sample() * scaling_factor`)
before the same noise, UNet and loss. Both sides train the same UNet (one copy of the weights each)
under a frozen text encoder, as that script does, with AdamW, at the same batch and precision (bf16
autocast on a GPU). The ratio is theirs / ours (> 1: ours is faster).

Sampling: `ldm.Sampler` against `StableDiffusionPipeline` assembled from the same UNet, text encoder and
autoencoder (what `t2i export` writes), with DPM-Solver++, the same steps, guidance and batch, captions
tokenized by open_clip's BPE on our side and the CLIP tokenizer built from it on theirs. It prints
images/s of each, the ratio ours / theirs, and the largest pixel difference (the two should agree).

Each time is the median of --rounds, the sides alternating; weights are random (speed does not depend on them).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from pipeline.config import load_config
from pipeline.data.text import make_tokenizer, save_clip_tokenizer
from pipeline.models.diffusion_sampling import make_scheduler
from pipeline.models.kl_autoencoder import KLAutoencoder
from stages import kl_autoencoder, ldm

TOKENIZER = "open_clip:ViT-B-32"
PLACEHOLDERS = ["data.shards=unused", "autoencoder=unused", "trainer.out_dir=unused"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_pair(rounds: int, device: torch.device, ours, theirs) -> tuple[float, float]:
    times: dict = {ours: [], theirs: []}
    for _ in range(rounds):
        for side in times:
            _sync(device)
            start = time.perf_counter()
            side()
            _sync(device)
            times[side].append(time.perf_counter() - start)
    return statistics.median(times[ours]), statistics.median(times[theirs])


def build(args: argparse.Namespace, device: torch.device) -> tuple[ldm.LatentDiffusion, KLAutoencoder]:
    cfg = load_config(ldm.Config, args.ldm, [*PLACEHOLDERS, "model.text_vocab_size=49408", "model.text_length=77",
                                             "model.text.train=false"])
    ae_cfg = load_config(kl_autoencoder.Config, args.autoencoder, [*PLACEHOLDERS[:1], *PLACEHOLDERS[2:],
                                                                   f"data.resolution={args.resolution}",
                                                                   f"model.image_size={args.resolution}"])
    cfg.model.latent_size = args.resolution // ae_cfg.model.downsampling
    cfg.model.validate()
    if ae_cfg.model.latent_channels != cfg.model.latent_channels:
        raise SystemExit(f"{args.autoencoder} makes {ae_cfg.model.latent_channels} latent channels, {args.ldm} takes "
                         f"{cfg.model.latent_channels}")
    torch.manual_seed(0)
    model = ldm.build_model(cfg).to(device)
    model.set_data(0.18215, make_tokenizer(TOKENIZER, 77)([""])[0])
    return model, KLAutoencoder(ae_cfg.model).to(device).eval()


def bench_training(model: ldm.LatentDiffusion, autoencoder: KLAutoencoder, args: argparse.Namespace,
                   device: torch.device) -> None:
    m, b = model.cfg, args.batch_size
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ours, theirs = model, copy.deepcopy(model)
    optimizers = {side: torch.optim.AdamW([p for p in side.parameters() if p.requires_grad], lr=1e-5)
                  for side in (ours, theirs)}
    latent = (b, m.latent_channels, m.latent_size, m.latent_size)
    tokens = torch.randint(1, 49407, (b, 77), device=device)
    stored = {"latent_mean": torch.randn(latent, device=device), "latent_logvar": torch.full(latent, -6.0, device=device),
              "text_tokens": tokens, "valid": torch.ones(b, dtype=torch.bool, device=device)}
    pixels = torch.rand(b, 3, args.resolution, args.resolution, device=device) * 2 - 1
    schedule = theirs.schedule

    def our_step() -> None:
        with torch.autocast(device.type, dtype, enabled=dtype != torch.float32):
            loss = ours(stored)["loss"]
        loss.backward()
        optimizers[ours].step()
        optimizers[ours].zero_grad(set_to_none=True)

    def their_step() -> None:  # train_text_to_image.py's loop body
        with torch.autocast(device.type, dtype, enabled=dtype != torch.float32):
            with torch.no_grad():
                latents = autoencoder.encode(pixels).sample() * theirs.scale_factor
                states = theirs.text_encoder(tokens, return_dict=False)[0]
            noise = torch.randn_like(latents)
            t = torch.randint(0, m.diffusion.steps, (b,), device=device)
            prediction = theirs.unet(schedule.add_noise(latents, noise, t), t, states, return_dict=False)[0]
            loss = F.mse_loss(prediction.float(), noise.float())
        loss.backward()
        optimizers[theirs].step()
        optimizers[theirs].zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up: allocator, kernels, optimizer state
        our_step()
        their_step()
    ours_s, theirs_s = _median_pair(args.rounds, device, our_step, their_step)
    print(f"training step, batch {b}, {args.resolution} px images, latents {latent[1:]} ({dtype}):")
    print(f"    ours (precomputed posteriors):         {ours_s * 1000:9.1f} ms   {b / ours_s:8.1f} images/s")
    print(f"    diffusers' example (VAE every step):   {theirs_s * 1000:9.1f} ms   {b / theirs_s:8.1f} images/s")
    print(f"    ratio (theirs / ours):                 {theirs_s / ours_s:9.2f}")


def bench_sampling(model: ldm.LatentDiffusion, autoencoder: KLAutoencoder, args: argparse.Namespace,
                   device: torch.device) -> None:
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    options = ldm.SamplerConfig(scheduler="dpm++", steps=args.steps, guidance_scale=args.guidance)
    sampler = ldm.Sampler(model, autoencoder, make_tokenizer(TOKENIZER, 77), options, device)
    with tempfile.TemporaryDirectory() as folder:
        save_clip_tokenizer(TOKENIZER, 77, folder)
        tokenizer = CLIPTokenizer.from_pretrained(folder)
    vae = copy.deepcopy(autoencoder.autoencoder)
    vae.register_to_config(scaling_factor=float(model.scale_factor))
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=model.text_encoder, tokenizer=tokenizer, unet=model.unet,
                                       scheduler=make_scheduler(model.cfg.diffusion, "dpm++"), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False).to(device)
    pipeline.set_progress_bar_config(disable=True)
    n = args.sample_batch
    captions, seeds = [f"a photo of thing number {i}" for i in range(n)], list(range(n))
    images: dict = {}

    def ours() -> None:
        images["ours"] = sampler.sample(captions, seeds) / 2 + 0.5

    def theirs() -> None:
        images["theirs"] = pipeline(captions, num_inference_steps=args.steps, guidance_scale=args.guidance,
                                    output_type="pt", generator=[torch.Generator().manual_seed(s) for s in seeds]).images

    ours_s, theirs_s = _median_pair(args.rounds, device, ours, theirs)
    difference = (images["ours"].float().cpu() - images["theirs"].float().cpu()).abs().max().item()
    print(f"sampling, batch {n}, DPM-Solver++ {args.steps} steps, guidance {args.guidance}:")
    print(f"    ours (ldm.Sampler):                    {ours_s:9.2f} s    {n / ours_s:8.2f} images/s")
    print(f"    StableDiffusionPipeline:               {theirs_s:9.2f} s    {n / theirs_s:8.2f} images/s")
    print(f"    ratio (ours / theirs, images/s):       {theirs_s / ours_s:9.2f}   largest pixel difference {difference:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ldm", default="configs/ldm/tiny.yaml")
    parser.add_argument("--autoencoder", default="configs/kl_autoencoder/tiny.yaml")
    parser.add_argument("--resolution", type=int, default=64, help="image side in pixels")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch")
    parser.add_argument("--sample-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25, help="sampling steps")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads on CPU (0: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, autoencoder = build(args, device)
    print(f"{args.ldm} (UNet {sum(p.numel() for p in model.unet.parameters()) / 1e6:.1f}M) with {args.autoencoder} "
          f"on {device}" + (f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""))
    bench_training(model, autoencoder, args, device)
    bench_sampling(model, autoencoder, args, device)


if __name__ == "__main__":
    main()
