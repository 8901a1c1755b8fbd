"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models", appendix G), trained as its `contperceptual` loss does.

The network is diffusers' `AutoencoderKL`: an image x (3, H, W) in [-1, 1] maps to a diagonal
Gaussian q(z|x) over latents (latent_channels, H/f, W/f), f = 2 ** (len(block_out_channels) - 1),
and a latent back to an image. Per image, summed over its pixels and latent entries,

    L_rec = sum |x - D(z)| + perceptual_weight * LPIPS(x, D(z)) * C * H * W,   z ~ q(z|x)
    L = L_rec + kl_weight * KL(q(z|x) || N(0, I)) + lambda * disc_factor * L_G,

with kl_weight 1e-6 and LPIPS over VGG16 (pipeline/perceptual.py; LDM's weight is 1), counted
at every pixel as taming's loss broadcasts it. With `disc_weight` > 0 a PatchGAN discriminator (Isola et al. 2017) is trained
in its own phase with the hinge loss 0.5 (relu(1 - D(x)) + relu(1 + D(x_hat))) per patch, and the generator's
adversarial term L_G = -D(x_hat) is weighted adaptively (Esser et al. 2021, "Taming Transformers"):
lambda = disc_weight * ||grad L_rec|| / (||grad L_G|| + 1e-4) at the decoder's last layer, clamped
to [0, 1e4]. Both start at step `disc_start` (disc_factor 0 before, 1 after).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL
from torch import Tensor, nn

from pipeline.engine.task import SINGLE_PHASE, Task
from pipeline.models.reduction import valid_mean
from pipeline.models.vae import psnr
from pipeline.ranges import NonNegativeFloat, NonNegativeInt, PositiveInt

AUTOENCODER, DISCRIMINATOR = "autoencoder", "discriminator"


@dataclass
class KLAutoencoderConfig:
    image_size: PositiveInt = 256  # divisible by the downsampling factor f
    latent_channels: PositiveInt = 4
    block_out_channels: tuple[PositiveInt, ...] = (128, 256, 512, 512)  # f = 2 ** (blocks - 1): 8 here
    layers_per_block: PositiveInt = 2
    norm_num_groups: PositiveInt = 32  # divides every block's width
    kl_weight: NonNegativeFloat = 1e-6
    perceptual_weight: NonNegativeFloat = 0.0  # 0: no LPIPS term (LDM: 1.0)
    perceptual_backbone: str = ""  # the VGG16 weights LPIPS needs: a local torchvision state dict (vgg16-397923af.pth)
    disc_weight: NonNegativeFloat = 0.0  # 0: no discriminator (LDM: 0.5)
    disc_start: NonNegativeInt = 50_001  # the step from which the discriminator trains and counts
    disc_layers: PositiveInt = 3  # stride-2 convolutions of the PatchGAN
    disc_channels: PositiveInt = 64

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def validate(self) -> None:
        if not self.block_out_channels:
            raise ValueError("block_out_channels is empty: it needs one entry per resolution")
        if self.image_size % self.downsampling:
            raise ValueError(f"image_size {self.image_size} is not divisible by the downsampling factor {self.downsampling}")
        if any(width % self.norm_num_groups for width in self.block_out_channels):
            raise ValueError(f"norm_num_groups {self.norm_num_groups} must divide every block_out_channels entry")
        if self.perceptual_weight and not self.perceptual_backbone:
            raise ValueError("perceptual_weight > 0 needs perceptual_backbone: a local torchvision VGG16 state dict "
                             "(vgg16-397923af.pth)")


def autoencoder_kl(cfg: KLAutoencoderConfig) -> AutoencoderKL:
    """The diffusers network of the config (randomly initialised)."""
    blocks = len(cfg.block_out_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
                         up_block_types=("UpDecoderBlock2D",) * blocks, block_out_channels=tuple(cfg.block_out_channels),
                         layers_per_block=cfg.layers_per_block, latent_channels=cfg.latent_channels,
                         norm_num_groups=cfg.norm_num_groups, sample_size=cfg.image_size)


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix's NLayerDiscriminator): a logit per overlapping patch of the image."""

    def __init__(self, layers: int, channels: int) -> None:
        super().__init__()
        modules: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for n in range(1, layers + 1):
            wider = channels * min(2 ** n, 8)
            stride = 2 if n < layers else 1
            modules += [nn.Conv2d(width, wider, 4, stride, 1, bias=False), nn.BatchNorm2d(wider), nn.LeakyReLU(0.2)]
            width = wider
        modules.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*modules)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class KLAutoencoder(Task):
    """The training task: the autoencoder, and with disc_weight > 0 the discriminator, in two phases.
    `perceptual` is the LPIPS network, needed in training when perceptual_weight > 0; it is frozen
    and kept out of the module tree, so neither optimizers nor saved weights hold it."""

    def __init__(self, cfg: KLAutoencoderConfig, perceptual: nn.Module | None = None) -> None:
        super().__init__()
        cfg.validate()
        self.cfg, self.step = cfg, 0
        self._perceptual = (perceptual,)  # a tuple: not registered as a submodule
        self.autoencoder = autoencoder_kl(cfg)
        self.discriminator = PatchDiscriminator(cfg.disc_layers, cfg.disc_channels) if cfg.disc_weight > 0 else None

    def after_step(self, step: int) -> None:
        self.step = step

    def phases(self) -> dict[str, nn.Module]:
        if self.discriminator is None:
            return {SINGLE_PHASE: self}
        return {AUTOENCODER: self.autoencoder, DISCRIMINATOR: self.discriminator}

    def set_activation_checkpointing(self, on: bool) -> None:
        if on:
            self.autoencoder.enable_gradient_checkpointing()
        else:
            self.autoencoder.disable_gradient_checkpointing()

    @property
    def adversarial(self) -> bool:
        """Whether the discriminator trains and counts at this step."""
        return self.discriminator is not None and self.step >= self.cfg.disc_start

    def encode(self, images: Tensor):
        """q(z|x): diffusers' DiagonalGaussianDistribution (mean, logvar, sample(generator), mode())."""
        return self.autoencoder.encode(images).latent_dist

    def decode(self, latents: Tensor) -> Tensor:
        return self.autoencoder.decode(latents).sample

    def reconstruct(self, images: Tensor) -> Tensor:
        return self.decode(self.encode(images).mode()).clamp(-1, 1)

    def forward(self, batch: dict, phase: str = SINGLE_PHASE) -> dict[str, Tensor]:
        x, valid = batch["image"], batch["valid"]
        if phase == DISCRIMINATOR:
            return self._discriminator_loss(x, valid)
        posterior = self.encode(x)
        z = posterior.sample()
        x_hat = self.decode(z)
        error = (x - x_hat).abs().flatten(1)
        reconstruction, kl = error.sum(1), posterior.kl()
        out = {"l1": valid_mean(error.detach().mean(1), valid), "kl": valid_mean(kl, valid).detach(),
               "psnr": psnr(x, x_hat.detach(), valid), "latent_std": z.detach().std()}
        if self.cfg.perceptual_weight:
            distance = self.perceptual(x, x_hat)
            reconstruction = reconstruction + self.cfg.perceptual_weight * distance * x[0].numel()
            out["lpips"] = valid_mean(distance, valid).detach()
        loss = valid_mean(reconstruction + self.cfg.kl_weight * kl, valid)
        if self.adversarial:
            generator_loss = valid_mean(-self.discriminator(x_hat).flatten(1).mean(1), valid)
            weight = self._adaptive_weight(valid_mean(reconstruction, valid), generator_loss)
            loss = loss + weight * generator_loss
            out |= {"generator_loss": generator_loss.detach(), "adaptive_weight": weight}
        return {"loss": loss, **out}

    def perceptual(self, x: Tensor, x_hat: Tensor) -> Tensor:
        """LPIPS(x, x_hat) per image (B,), computed in fp32."""
        (network,) = self._perceptual
        if network is None:
            raise ValueError("perceptual_weight > 0 but the task was built without its LPIPS network (training builds it)")
        return network.to(x.device)(x.float(), x_hat.float()).flatten()

    def _adaptive_weight(self, reconstruction: Tensor, generator_loss: Tensor) -> Tensor:
        if not torch.is_grad_enabled():  # evaluation: no gradients to balance
            return torch.tensor(self.cfg.disc_weight, device=reconstruction.device)
        last = self.autoencoder.decoder.conv_out.weight
        (rec_grad,) = torch.autograd.grad(reconstruction, last, retain_graph=True)
        (gan_grad,) = torch.autograd.grad(generator_loss, last, retain_graph=True)
        return (rec_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0, 1e4).detach() * self.cfg.disc_weight

    def _discriminator_loss(self, x: Tensor, valid: Tensor) -> dict[str, Tensor]:
        if not self.adversarial:  # before disc_start a loss of 0, as taming's: its optimizer steps on zero gradients
            return {"loss": sum(p.sum() for p in self.discriminator.parameters()) * 0.0}
        with torch.no_grad():
            x_hat = self.decode(self.encode(x).sample())
        real, fake = self.discriminator(x).flatten(1), self.discriminator(x_hat).flatten(1)  # a logit per patch
        hinge = 0.5 * (torch.relu(1 - real).mean(1) + torch.relu(1 + fake).mean(1))
        return {"loss": valid_mean(hinge, valid), "logits_real": valid_mean(real.mean(1), valid).detach(),
                "logits_fake": valid_mean(fake.mean(1), valid).detach()}
