import math

import pytest
import torch
from torch.distributions import Laplace, SigmoidTransform, TransformedDistribution

from pipeline.models.categorical import cosine_schedule, usage_gap
from pipeline.models.dvae import DiscreteVAE, DVAEConfig, logit_laplace_nll, map_pixels, unmap_pixels

SIZE = 32
TINY = {"image_size": SIZE, "n_hid": 16, "codebook_size": 64, "n_blk_per_group": 1}


def _tiny(**overrides) -> DiscreteVAE:
    torch.manual_seed(0)
    return DiscreteVAE(DVAEConfig(**{**TINY, **overrides}))


def _batch(n: int = 4, size: int = SIZE, seed: int = 1) -> dict:
    """Smooth random images (a colour gradient plus a blob each) in [-1, 1], all valid."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    a, b, c = (torch.rand(n, 3, 1, 1, generator=g) * 2 - 1 for _ in range(3))
    centre = torch.rand(n, 2, 1, 1, generator=g) * 2 - 1
    blob = torch.exp(-((xx - centre[:, :1]) ** 2 + (yy - centre[:, 1:]) ** 2) / 0.1)  # (n, 1, S, S)
    image = (a * xx + b * yy + c * blob).clamp(-1, 1)
    return {"image": image, "valid": torch.ones(n, dtype=torch.bool)}


def _seeded(model, batch, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return model(batch)



@pytest.fixture(scope="module")
def full() -> DiscreteVAE:
    torch.manual_seed(0)
    return DiscreteVAE(DVAEConfig()).eval()


def test_cosine_schedules_follow_the_paper():
    cfg = DVAEConfig()
    steps = range(0, 200_001, 500)
    tau = [cosine_schedule(s, cfg.temperature_start, cfg.temperature_end, cfg.temperature_steps) for s in steps]
    beta = [cosine_schedule(s, cfg.kl_weight_start, cfg.kl_weight_end, cfg.kl_weight_steps) for s in steps]
    assert tau[0] == 1.0 and cosine_schedule(150_000, 1.0, 1 / 16, 150_000) == 1 / 16 and tau[-1] == 1 / 16
    assert beta[0] == 0.0 and cosine_schedule(5_000, 0.0, 6.6, 5_000) == 6.6 and beta[-1] == 6.6
    assert all(a > b for a, b in zip(tau[:300], tau[1:301]))  # strictly falling until step 150k
    assert all(a >= b for a, b in zip(tau, tau[1:])) and all(a <= b for a, b in zip(beta, beta[1:]))
    assert cosine_schedule(75_000, 1.0, 1 / 16, 150_000) == pytest.approx((1 + 1 / 16) / 2)
    assert cosine_schedule(10 ** 9, 0.0, 6.6, 5_000) == 6.6


def test_the_schedules_read_the_step_buffer_which_round_trips():
    model, batch = _tiny(temperature_steps=4, kl_weight_steps=4), _batch()
    first = model(batch)
    assert first["temperature"] == 1.0 and first["kl_weight"] == 0.0 and int(model.step) == 0  # the loop sets it
    model.step.fill_(1)
    second = model(batch)
    assert second["temperature"] == pytest.approx(cosine_schedule(1, 1.0, 1 / 16, 4))
    assert second["kl_weight"] == pytest.approx(cosine_schedule(1, 0.0, 6.6, 4))
    model.step.fill_(2)
    assert "step" in model.state_dict() and not any("step" in k for k in model.encoder.state_dict())
    restored = _tiny(temperature_steps=4, kl_weight_steps=4)
    restored.load_state_dict(model.state_dict())
    assert int(restored.step) == 2 and restored.step.dtype == torch.long
    assert restored(batch)["temperature"] == pytest.approx(cosine_schedule(2, 1.0, 1 / 16, 4))


@pytest.mark.parametrize("straight_through", [False, True])
def test_gradients_reach_the_encoder_through_the_relaxation(straight_through):
    model = _tiny(straight_through=straight_through)
    codes = []
    model.decoder.register_forward_pre_hook(lambda module, args: codes.append(args[0]))
    out = model(_batch())
    assert out["kl_weight"] == 0  # no KL gradient: the encoder learns only through z
    out["loss"].backward()
    grad = model.encoder.blocks.input.w.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    (z,) = codes
    assert z.shape == (4, 64, 4, 4) and torch.allclose(z.sum(1), torch.ones(4, 4, 4))
    is_binary = bool(((z == 0) | (z == 1)).all())
    assert is_binary == straight_through
    if straight_through:
        assert torch.equal(z.sum(1), torch.ones(4, 4, 4))


def test_tiny_config_token_grid_and_round_trip():
    torch.manual_seed(0)
    model = DiscreteVAE(DVAEConfig(image_size=64, codebook_size=512, n_hid=32, n_blk_per_group=1)).eval()
    images = _batch(2, size=64)["image"]
    tokens = model.encode(images)
    assert model.tokens_per_side == 8 and tokens.shape == (2, 8, 8) and tokens.dtype == torch.long
    assert 0 <= tokens.min() and tokens.max() < 512
    recon = model.reconstruct(images)
    assert recon.shape == (2, 3, 64, 64) and -1 <= recon.min() and recon.max() <= 1


def test_full_config_token_grid(full):
    assert full.tokens_per_side == 32
    assert full.encode(torch.rand(1, 3, 256, 256) * 2 - 1).shape == (1, 32, 32)


def test_dall_e_weights_load_strictly_and_match(full):
    dall_e = pytest.importorskip("dall_e")
    torch.manual_seed(1)
    theirs_enc, theirs_dec = dall_e.Encoder(), dall_e.Decoder()
    full.encoder.load_state_dict(theirs_enc.state_dict(), strict=True)
    full.decoder.load_state_dict(theirs_dec.state_dict(), strict=True)
    for ours, theirs in ((full.encoder, theirs_enc), (full.decoder, theirs_dec)):
        assert [n for n, _ in ours.named_modules()] == [n for n, _ in theirs.named_modules()]
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(full.encoder(x), theirs_enc(x))
        z = torch.nn.functional.one_hot(torch.randint(0, 8192, (1, 4, 4)), 8192).permute(0, 3, 1, 2).float()
        out = full.decoder(z)
        assert out.shape == (1, 6, 32, 32) and torch.equal(out, theirs_dec(z))
        assert torch.equal(map_pixels(x), dall_e.map_pixels(x)) and torch.equal(unmap_pixels(x), dall_e.unmap_pixels(x))


def test_logit_laplace_nll_is_the_density_of_a_sigmoid_laplace():
    x = torch.rand(1000, dtype=torch.float64) * 0.8 + 0.1
    mu, log_scale = torch.randn(1000, dtype=torch.float64), torch.randn(1000, dtype=torch.float64) * 0.5
    reference = TransformedDistribution(Laplace(mu, log_scale.exp()), SigmoidTransform()).log_prob(x)
    assert torch.allclose(logit_laplace_nll(x, mu, log_scale), -reference)


def test_padding_samples_do_not_count():
    model, batch = _tiny().eval(), _batch()
    batch["valid"][3] = False
    other = {"image": batch["image"].clone(), "valid": batch["valid"]}
    other["image"][3] = -batch["image"][3]
    a, b = _seeded(model, batch), _seeded(model, other)
    for key in ("loss", "recon", "kl", "psnr", "perplexity", "dead_codes"):
        assert torch.allclose(a[key], b[key]), key
    assert not torch.allclose(a["loss"], _seeded(model, _batch())["loss"])


@pytest.mark.parametrize("recon", ["logit_laplace", "mse"])
def test_loss_falls_on_a_fixed_batch(recon):
    model, batch = _tiny(recon=recon), _batch()
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(60):
        out = model(batch)
        optimiser.zero_grad()
        out["loss"].backward()
        optimiser.step()
        losses.append(out["loss"].item())
    assert all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.1 * abs(first), (first, last)
    if recon == "mse":
        assert out["recon"] >= 0


def test_codebook_statistics_are_in_range():
    model = _tiny()
    out = model(_batch())
    assert 1 <= out["perplexity"] <= 64 and 0 <= out["dead_codes"] <= 64
    assert out["dead_codes"] == out["dead_codes"].round() and out["dead_codes"].dtype == torch.float32
    assert all(not v.requires_grad for k, v in out.items() if k != "loss")
    batch = _batch()
    batch["valid"][:] = False
    none = model(batch)
    assert none["perplexity"] == 1 and none["dead_codes"] == 64 and none["loss"] == 0


def test_usage_gap_measures_how_unevenly_a_batch_uses_the_codebook():
    valid = torch.ones(2, dtype=torch.bool)
    assert usage_gap(torch.zeros(2, 16, 4, 4), valid).abs() < 1e-6  # every code equally likely
    collapsed = torch.zeros(2, 16, 4, 4)
    collapsed[:, 3] = 50.0  # every position on code 3
    assert torch.isclose(usage_gap(collapsed, valid), torch.tensor(math.log(16)), atol=1e-4)
    spread = torch.full((2, 16, 4, 4), -50.0)
    spread.view(2, 16, 16)[:, torch.arange(16), torch.arange(16)] = 50.0  # each position its own code
    assert usage_gap(spread, valid).abs() < 1e-4  # confident per position, even over the batch
    assert usage_gap(collapsed, torch.zeros(2, dtype=torch.bool)) == 0


def test_the_diversity_weight_adds_the_usage_gap_over_the_positions():
    batch = _batch()
    plain, diverse = _tiny(), _tiny(diversity_weight=2.0)  # the same weights: _tiny seeds itself
    torch.manual_seed(1)
    a = plain(batch)
    torch.manual_seed(1)  # the same Gumbel noise
    b = diverse(batch)
    with torch.no_grad():
        logits = diverse.encoder(map_pixels((batch["image"] + 1) / 2))
    gap = usage_gap(logits, batch["valid"]) * diverse.tokens_per_side ** 2
    assert torch.isclose(b["diversity"], gap, rtol=1e-4) and gap > 0
    assert torch.isclose(b["loss"] - a["loss"], 2.0 * gap, rtol=1e-3)
