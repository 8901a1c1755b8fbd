import math

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from pipeline.models.categorical import cosine_schedule, gumbel_softmax, kl_to_uniform
from pipeline.models.gumbel_vae import GumbelVAE, GumbelVAEConfig

SIZE, N, K = 16, 8, 4
TINY = {"image_size": SIZE, "channels": 8, "channel_mult": (1, 2), "latent_variables": N, "categories": K}



def _tiny(**overrides) -> GumbelVAE:
    torch.manual_seed(0)
    return GumbelVAE(GumbelVAEConfig(**{**TINY, **overrides}))


def _batch(n: int = 4, seed: int = 1) -> dict:
    """Smooth random images (a colour gradient each) in [-1, 1], all valid."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.linspace(-1, 1, SIZE)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    a, b = (torch.rand(n, 3, 1, 1, generator=g) * 2 - 1 for _ in range(2))
    return {"image": (a * xx + b * yy).clamp(-1, 1), "valid": torch.ones(n, dtype=torch.bool)}


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -torch.special.xlogy(p, p).sum(1)


def test_relaxed_samples_approach_one_hot_as_temperature_falls():
    logits = torch.randn(4096, 16, generator=torch.Generator().manual_seed(0))
    taus = [10.0, 2.0, 1.0, 0.5, 0.1, 0.01]
    max_prob, entropy = [], []
    for tau in taus:
        torch.manual_seed(1)  # the same Gumbel noise at every temperature
        y = gumbel_softmax(logits, tau, hard=False)
        assert torch.allclose(y.sum(1), torch.ones(4096))
        max_prob.append(y.max(1).values.mean().item())
        entropy.append(_entropy(y).mean().item())
    assert all(a > b for a, b in zip(entropy, entropy[1:])), entropy
    assert all(a < b for a, b in zip(max_prob, max_prob[1:])), max_prob
    assert max_prob[-1] > 0.99 and entropy[-1] < 0.05
    assert max_prob[0] < 0.2  # near uniform (1/16) at tau = 10


def test_argmax_of_the_samples_follows_the_categorical():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(20_000, 4)
    torch.manual_seed(0)
    frequency = torch.bincount(gumbel_softmax(logits, 0.5, hard=False).argmax(1), minlength=4) / 20_000
    assert torch.allclose(frequency, logits[0].softmax(0), atol=0.015)


def test_bf16_logits_get_full_precision_noise():
    # One code of 8192 has probability e^6 / (e^6 + 8191) = 4.7%. With the noise drawn in bf16 (capped
    # at 5.5) it would win whenever its own noise beat -0.5: 79% of the time.
    logits = torch.zeros(2000, 8192, dtype=torch.bfloat16)
    logits[:, 0] = 6
    torch.manual_seed(0)
    y = gumbel_softmax(logits, 1.0, hard=False)
    assert y.dtype == torch.bfloat16
    assert abs((y.argmax(1) == 0).float().mean().item() - logits[0].float().softmax(0)[0].item()) < 0.015


def test_hard_samples_are_one_hot_and_pass_gradients():
    logits = torch.randn(64, K, N, requires_grad=True)
    torch.manual_seed(0)
    y = gumbel_softmax(logits, 0.5, hard=True)
    assert ((y == 0) | (y == 1)).all() and torch.equal(y.sum(1), torch.ones(64, N))
    (y * torch.randn_like(y)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("hard", [False, True])
def test_decoder_sees_one_hots_only_when_hard_and_the_encoder_learns_through_them(hard):
    model = _tiny(hard=hard, kl_weight=0.0)  # no KL gradient: the encoder learns only through y
    inputs = []
    model.decoder.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    model(_batch())["loss"].backward()
    (y,) = inputs
    y = y.view(4, K, N)
    assert torch.allclose(y.sum(1), torch.ones(4, N))
    assert bool(((y == 0) | (y == 1)).all()) == hard
    grad = model.encoder.head.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_kl_is_zero_for_uniform_logits_and_sums_over_the_variables():
    assert torch.equal(kl_to_uniform(torch.zeros(3, K, N)), torch.zeros(3))
    model, batch = _tiny().eval(), _batch()
    torch.manual_seed(0)
    logits = model.encoder(batch["image"])  # (B, K, N)
    per_variable = kl_divergence(Categorical(logits=logits.transpose(1, 2)),
                                 Categorical(logits=torch.zeros(4, N, K)))  # (B, N)
    torch.manual_seed(0)
    out = model(batch)
    assert torch.allclose(out["kl"], per_variable.sum(1).mean(), atol=1e-5)
    assert out["kl"] > 0
    with torch.no_grad():  # a constant head: every q(z_n|x) uniform
        model.encoder.head.weight.zero_()
        model.encoder.head.bias.zero_()
    out = model(batch)
    assert out["kl"].abs() < 1e-6 and out["perplexity"] == 1  # argmax ties all pick category 0


def test_temperature_follows_the_step_buffer():
    model, batch = _tiny(temperature_steps=4), _batch()
    assert model(batch)["temperature"] == 1.0 and int(model.step) == 0  # the training loop sets it
    model.step.fill_(1)
    assert model(batch)["temperature"] == pytest.approx(cosine_schedule(1, 1.0, 0.5, 4))
    model.step.fill_(2)
    restored = _tiny(temperature_steps=4)
    restored.load_state_dict(model.state_dict())
    assert int(restored.step) == 2 and restored.step.dtype == torch.long
    assert restored(batch)["temperature"] == pytest.approx(cosine_schedule(2, 1.0, 0.5, 4))
    restored.step.fill_(100)
    assert restored(batch)["temperature"] == 0.5


def test_outputs_are_detached_and_in_range():
    model = _tiny()
    out = model(_batch())
    assert out["loss"].requires_grad and all(not v.requires_grad for k, v in out.items() if k != "loss")
    assert 1 <= out["perplexity"] <= K and out["recon"] > 0 and math.isfinite(out["psnr"])


def test_padding_samples_do_not_count():
    model, batch = _tiny().eval(), _batch()
    batch["valid"][3] = False
    other = {"image": batch["image"].clone(), "valid": batch["valid"]}
    other["image"][3] = -batch["image"][3]
    torch.manual_seed(0)
    a = model(batch)
    torch.manual_seed(0)
    b = model(other)
    for key in ("loss", "recon", "kl", "psnr", "perplexity"):
        assert torch.allclose(a[key], b[key]), key


def test_sample_reconstruct_and_encode_shapes():
    model = _tiny().eval()
    images = model.sample(5, generator=torch.Generator().manual_seed(3))
    assert images.shape == (5, 3, SIZE, SIZE) and -1 <= images.min() and images.max() <= 1
    assert torch.equal(images, model.sample(5, generator=torch.Generator().manual_seed(3)))
    codes = model.encode(_batch()["image"])
    assert codes.shape == (4, N) and codes.dtype == torch.long and 0 <= codes.min() and codes.max() < K
    recon = model.reconstruct(_batch()["image"])
    assert recon.shape == (4, 3, SIZE, SIZE) and -1 <= recon.min() and recon.max() <= 1


@pytest.mark.parametrize("overrides", [{}, {"hard": True, "recon": "laplace"}])
def test_loss_falls_on_a_fixed_batch(overrides):
    model, batch = _tiny(**overrides), _batch()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    losses = []
    for _ in range(40):
        out = model(batch)
        optimiser.zero_grad()
        out["loss"].backward()
        optimiser.step()
        losses.append(out["loss"].item())
    assert all(math.isfinite(loss) for loss in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)
