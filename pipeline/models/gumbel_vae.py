"""The Gumbel-softmax VAE (Jang et al. 2017, "Categorical Reparameterization with Gumbel-Softmax"):
a VAE whose latent z is N independent categorical variables of K categories each.

The encoder maps an image x to the logits of q(z|x) = prod_n Cat(z_n; softmax(logits_n)); the decoder
maps the N relaxed one-hots y_n, flattened to N * K values, to the mean of p(x|y). Per image,

    L(x) = -log p(x|y) + kl_weight * sum_n KL(q(z_n|x) || U(K)),   y_n = softmax((logits_n + g_n) / tau),

with one relaxed sample y, g_n ~ Gumbel(0, 1) (categorical.gumbel_softmax), and the KL that of the
categorical q, not of its relaxation, to the uniform prior. -log p(x|y) is vae.py's fixed-scale
Gaussian or Laplace. With `hard` the decoder sees exact one-hots while the gradient is the relaxed
one: the paper's Straight-Through Gumbel-softmax estimator.

The paper anneals tau = max(0.5, exp(-r t)) over training steps t; here tau falls from
temperature_start to the same floor of 0.5 along the cosine schedule DiscreteVAE uses, read from a
`step` buffer. Lower temperatures give samples closer to one-hot but gradients of higher variance
(section 2 of the paper). Sampling draws every z_n uniformly from the prior as a one-hot and decodes it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.engine.task import Task
from pipeline.models.categorical import codebook_usage, cosine_schedule, gumbel_softmax, kl_to_uniform
from pipeline.models.reduction import valid_mean
from pipeline.models.vae import Decoder, check_stages, conv_block, psnr, reconstruction_nll
from pipeline.ranges import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt


@dataclass
class GumbelVAEConfig:
    image_size: PositiveInt = 32  # divisible by 2 ** len(channel_mult)
    channels: PositiveInt = 32  # width of the first conv stage
    channel_mult: tuple[PositiveInt, ...] = (1, 2, 4)  # one stride-2 stage per entry
    latent_variables: PositiveInt = 32  # N categorical variables
    categories: PositiveInt = 16  # K categories per variable
    temperature_start: PositiveFloat = 1.0
    temperature_end: PositiveFloat = 0.5  # the paper's floor
    temperature_steps: NonNegativeInt = 10_000  # cosine anneal length; 0: temperature_end from the start
    hard: bool = False  # straight-through: one-hot forward, relaxed gradient
    kl_weight: NonNegativeFloat = 1.0
    recon: Literal["gaussian", "laplace"] = "gaussian"
    recon_sigma: PositiveFloat = 0.1  # fixed decoder scale (Gaussian std or Laplace b), images in [-1, 1]

    def validate(self) -> None:
        check_stages(self.image_size, self.channel_mult)


class LogitEncoder(nn.Module):
    """Image (B, 3, R, R) -> logits (B, K, N): vae.py's stride-2 conv blocks, then a linear head.
    K comes first because gumbel_softmax and kl_to_uniform work over dim 1."""

    def __init__(self, cfg: GumbelVAEConfig) -> None:
        super().__init__()
        check_stages(cfg.image_size, cfg.channel_mult)
        widths = [cfg.channels * mult for mult in cfg.channel_mult]
        side = cfg.image_size // 2 ** len(widths)
        self.shape = (cfg.categories, cfg.latent_variables)
        self.features = nn.Sequential(*[conv_block(c_in, width, stride=2)
                                        for c_in, width in zip([3, *widths[:-1]], widths)])
        self.head = nn.Linear(widths[-1] * side * side, cfg.categories * cfg.latent_variables)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1)).view(-1, *self.shape)  # (B, K, N)


class GumbelVAE(Task):
    """The Gumbel-softmax VAE. The temperature schedule reads the buffer `step`, the optimizer steps
    taken so far, which `after_step` sets (the training task's hook: pipeline/engine/task.py); it
    travels with the state dict, so that a resumed run continues the schedule."""
    step: Tensor  # () long

    def __init__(self, cfg: GumbelVAEConfig) -> None:
        super().__init__()
        if cfg.recon not in ("gaussian", "laplace"):
            raise ValueError(f"recon must be 'gaussian' or 'laplace', got {cfg.recon!r}")
        self.cfg = cfg
        self.encoder = LogitEncoder(cfg)
        self.decoder = Decoder(cfg.image_size, cfg.channels, cfg.channel_mult, cfg.categories * cfg.latent_variables)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def after_step(self, step: int) -> None:
        self.step.fill_(step)

    def temperature(self) -> float:
        """tau at the current step."""
        cfg = self.cfg
        return cosine_schedule(int(self.step), cfg.temperature_start, cfg.temperature_end, cfg.temperature_steps)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """`loss` = mean over valid samples of recon + kl_weight * kl, recon summed over pixels and kl
        over the N variables. Detached: `recon`, `kl`, this step's `temperature`, `psnr` (dB) and the
        `perplexity` of the valid samples' argmax categories, in [1, K]."""
        cfg, x, valid = self.cfg, batch["image"], batch["valid"]  # (B, 3, R, R), (B,)
        temperature = self.temperature()
        logits = self.encoder(x)  # (B, K, N)
        y = gumbel_softmax(logits, temperature, cfg.hard)  # (B, K, N), sums to 1 over K
        x_hat = self.decoder(y.flatten(1))  # (B, 3, R, R)
        recon = reconstruction_nll(x, x_hat, cfg.recon, cfg.recon_sigma)  # (B,)
        kl = kl_to_uniform(logits)  # (B,)
        perplexity, _ = codebook_usage(logits.argmax(1), valid, cfg.categories)
        return {"loss": valid_mean(recon + cfg.kl_weight * kl, valid),
                "recon": valid_mean(recon, valid).detach(), "kl": valid_mean(kl, valid).detach(),
                "temperature": x.new_tensor(temperature), "psnr": psnr(x, x_hat, valid), "perplexity": perplexity}

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images (B, 3, R, R) in [-1, 1] -> codes (B, N), the argmax categories of q(z|x)."""
        return self.encoder(images).argmax(1)

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """Codes (B, N) -> images (B, 3, R, R) in [-1, 1], the decoded one-hots."""
        y = F.one_hot(codes, self.cfg.categories).transpose(1, 2).float()  # (B, K, N), as the encoder lays out
        return self.decoder(y.flatten(1)).clamp(-1, 1)

    def reconstruct(self, images: Tensor) -> Tensor:
        """decode(encode(images)), (B, 3, R, R) in [-1, 1]."""
        return self.decode(self.encode(images))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n images (n, 3, R, R) in [-1, 1] decoded from codes drawn uniformly from the prior; drawn on
        the generator's device, so a CPU generator gives the same codes on any accelerator."""
        device = self.step.device
        source = generator.device if generator is not None else device
        codes = torch.randint(self.cfg.categories, (n, self.cfg.latent_variables), generator=generator, device=source)
        return self.decode(codes.to(device))
