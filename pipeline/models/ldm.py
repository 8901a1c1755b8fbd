"""Text-to-image latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
Diffusion Models"): a UNet denoises the latents of a KL autoencoder, attending to a text encoder's
token states through cross-attention.

The networks are diffusers' `UNet2DConditionModel` and transformers' `CLIPTextModel` (Stable
Diffusion's pair); the task owns the noise and the loss (pipeline/models/diffusion.py). Training
reads precomputed posteriors (the `latents` stage): z = (mean + exp(logvar / 2) eps) * scale_factor
with scale_factor = 1 / std(z) over the data, so the UNet sees latents of unit variance. Each
caption becomes the null caption, the tokens of the empty caption (as Stable Diffusion's pipeline
makes them for its unconditional branch), with probability `caption_dropout` (10%), so that one
network learns the conditional and the unconditional prediction that classifier-free guidance
combines. The text encoder trains with the UNet, or stays frozen (`text.train: false`, a pretrained one).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from diffusers import UNet2DConditionModel
from torch import Tensor, nn

from pipeline.engine.task import Task
from pipeline.models.diffusion import DiffusionConfig, NoiseSchedule
from pipeline.models.guidance import drop_captions
from pipeline.ranges import Fraction, PositiveInt

BlockKind = Literal["cross_attention", "plain"]  # a resolution with or without cross-attention to the text


@dataclass
class UNetConfig:
    block_out_channels: tuple[PositiveInt, ...] = (320, 640, 1280, 1280)  # one resolution each, halving after each but the last
    blocks: tuple[BlockKind, ...] = ("cross_attention", "cross_attention", "cross_attention", "plain")
    layers_per_block: PositiveInt = 2
    attention_head_dim: PositiveInt = 8  # Stable Diffusion 1.x: 8 heads ("attention_head_dim" in diffusers' naming)
    norm_num_groups: PositiveInt = 32
    # Also add the attention-pooled text states to the timestep embedding, which every ResNet block
    # sees (Imagen's and unCLIP's conditioning; Stable Diffusion has cross-attention only).
    pooled_text: bool = False

    def validate(self) -> None:
        if len(self.blocks) != len(self.block_out_channels):
            raise ValueError(f"blocks has {len(self.blocks)} entries, block_out_channels {len(self.block_out_channels)}: "
                             "one kind per resolution")
        if any(width % self.norm_num_groups for width in self.block_out_channels):
            raise ValueError(f"norm_num_groups {self.norm_num_groups} must divide every block_out_channels entry")
        if any(width % self.attention_head_dim for width in self.block_out_channels):
            raise ValueError(f"attention_head_dim {self.attention_head_dim} (the heads) must divide every "
                             "block_out_channels entry")


@dataclass
class TextEncoderConfig:
    """A CLIP text transformer, randomly initialised from these sizes unless `pretrained` names one."""

    pretrained: str = ""  # 'hf:/local/folder' of a transformers CLIPTextModel (its own sizes then apply)
    width: PositiveInt = 768
    layers: PositiveInt = 12
    heads: PositiveInt = 12
    train: bool = True  # false: frozen (a pretrained encoder), its states computed without gradients

    def validate(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")


@dataclass
class LDMConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    caption_dropout: Fraction = 0.1
    # What the latent shards hold (checked against their manifest): latents (channels, size, size),
    # captions of text_length tokens from a vocabulary of text_vocab_size ids.
    latent_channels: PositiveInt = 4
    latent_size: PositiveInt = 64
    text_vocab_size: PositiveInt = 49408
    text_length: PositiveInt = 77

    def validate(self) -> None:
        halvings = len(self.unet.block_out_channels) - 1
        if self.latent_size % 2 ** halvings:
            raise ValueError(f"latent_size {self.latent_size} is not divisible by 2 ** {halvings}, "
                             "the UNet's downsampling")


def unet_for(cfg: UNetConfig, latent_shape: tuple[int, int, int], text_config) -> UNet2DConditionModel:
    """diffusers' conditional UNet for latents of `latent_shape` (C, H, W), randomly initialised,
    attending to the states of a text encoder of config `text_config` (a transformers CLIPTextConfig)."""
    down = tuple("CrossAttnDownBlock2D" if kind == "cross_attention" else "DownBlock2D" for kind in cfg.blocks)
    up = tuple("CrossAttnUpBlock2D" if kind == "cross_attention" else "UpBlock2D" for kind in reversed(cfg.blocks))
    return UNet2DConditionModel(sample_size=latent_shape[1], in_channels=latent_shape[0], out_channels=latent_shape[0],
                                block_out_channels=tuple(cfg.block_out_channels), down_block_types=down, up_block_types=up,
                                layers_per_block=cfg.layers_per_block, cross_attention_dim=text_config.hidden_size,
                                attention_head_dim=cfg.attention_head_dim, norm_num_groups=cfg.norm_num_groups,
                                addition_embed_type="text" if cfg.pooled_text else None,
                                addition_embed_type_num_heads=text_config.num_attention_heads)


class LatentDiffusion(Task):
    """The training task: given a batch of precomputed posteriors and caption tokens, the diffusion
    loss of the UNet's prediction. `text_encoder` maps tokens (B, L) to states (B, L, D) as
    transformers' CLIPTextModel does (`.last_hidden_state`). The latents' scale factor and the
    null caption's tokens come from the data (`set_data`) and are saved with the weights, so a
    trained run samples with what it trained with."""

    def __init__(self, cfg: LDMConfig, text_encoder: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        self.text_encoder = text_encoder
        self.text_encoder.requires_grad_(cfg.text.train)
        latent_shape = (cfg.latent_channels, cfg.latent_size, cfg.latent_size)
        self.unet = unet_for(cfg.unet, latent_shape, text_encoder.config)
        self.schedule = NoiseSchedule(cfg.diffusion)
        self.register_buffer("scale_factor", torch.tensor(1.0))
        self.register_buffer("null_tokens", torch.zeros(cfg.text_length, dtype=torch.long))  # the empty caption's tokens

    def set_data(self, scale_factor: float, null_tokens: Tensor) -> None:
        """The latent shards' scale factor, and the empty caption's tokens (L,) in their tokenizer."""
        self.scale_factor.fill_(scale_factor)
        self.null_tokens.copy_(null_tokens)

    def set_activation_checkpointing(self, on: bool) -> None:
        if on:
            self.unet.enable_gradient_checkpointing()
        else:
            self.unet.disable_gradient_checkpointing()

    def encode_text(self, tokens: Tensor) -> Tensor:
        """Caption tokens (B, L) -> the text encoder's token states (B, L, D)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.cfg.text.train):
            return self.text_encoder(tokens).last_hidden_state

    def predict(self, latents: Tensor, t: Tensor, text_states: Tensor) -> Tensor:
        """The UNet's output (epsilon, v or x0, per the diffusion config) for noised, scaled latents."""
        return self.unet(latents, t, encoder_hidden_states=text_states).sample

    def forward(self, batch: dict) -> dict[str, Tensor]:
        mean, logvar, valid = batch["latent_mean"], batch["latent_logvar"], batch["valid"]
        z = (mean + (0.5 * logvar).exp() * torch.randn_like(mean)) * self.scale_factor
        tokens = drop_captions(batch["text_tokens"], self.cfg.caption_dropout if self.training else 0.0, self.null_tokens)
        noise = self.schedule.sample_noise(z)
        t = self.schedule.sample_timesteps(len(z), z.device)
        prediction = self.predict(self.schedule.add_noise(z, noise, t), t, self.encode_text(tokens))
        return {"loss": self.schedule.loss(prediction, z, noise, t, valid), "latent_std": z.detach().std()}
