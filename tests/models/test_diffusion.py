"""The diffusion core against diffusers' reference implementation of the same process, its
identities, min-SNR weights and noise offset, and a tiny model it trains that diffusers' samplers
then sample correctly."""
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr
from torch import nn

from pipeline.config import ConfigError, load_config
from pipeline.models.diffusion import DiffusionConfig, NoiseSchedule
from pipeline.models.diffusion_sampling import denoise, initial_noise, make_scheduler
from pipeline.models.guidance import guide

SCHEDULES = {"linear": ("linear", 1e-4, 0.02), "scaled_linear": ("scaled_linear", 0.00085, 0.012),
             "cosine": ("squaredcos_cap_v2", 0.00085, 0.012)}


def _reference(cfg: DiffusionConfig) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=cfg.steps, beta_schedule=SCHEDULES[cfg.schedule][0], beta_start=cfg.beta_start,
                         beta_end=cfg.beta_end, prediction_type=cfg.prediction, rescale_betas_zero_snr=cfg.zero_terminal_snr)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_the_schedules_match_diffusers(schedule, zero_terminal_snr):
    _, start, end = SCHEDULES[schedule]
    cfg = DiffusionConfig(schedule=schedule, beta_start=start, beta_end=end, prediction="v_prediction",
                          zero_terminal_snr=zero_terminal_snr)
    ours, theirs = NoiseSchedule(cfg).alphas_cumprod, _reference(cfg).alphas_cumprod
    assert torch.allclose(ours, theirs, atol=1e-6)
    if zero_terminal_snr:
        assert ours[-1] == 0
    else:
        assert ours[-1] > 0


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_noising_targets_and_conversions(prediction):
    cfg = DiffusionConfig(prediction=prediction)
    schedule, reference = NoiseSchedule(cfg), _reference(cfg)
    x0, noise = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    x_t = schedule.add_noise(x0, noise, t)
    assert torch.allclose(x_t, reference.add_noise(x0, noise, t), atol=1e-5)
    target = schedule.target(x0, noise, t)
    expected = {"epsilon": noise, "sample": x0, "v_prediction": reference.get_velocity(x0, noise, t)}[prediction]
    assert torch.allclose(target, expected, atol=1e-5)
    assert torch.allclose(schedule.predicted_x0(target, x_t, t), x0, atol=2e-3)  # epsilon at t=0: divided by ~1
    assert torch.allclose(schedule.predicted_noise(target, x_t, t)[1:], noise[1:], atol=2e-3)  # x0 at t=0: sigma ~ 0.03


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_min_snr_gamma_weights_are_the_x0_weight_for_each_target(prediction):
    cfg = DiffusionConfig(prediction=prediction, loss_weighting="min_snr", min_snr_gamma=5.0)
    schedule = NoiseSchedule(cfg)
    t = torch.arange(0, 1000, 37)
    snr = compute_snr(_reference(cfg), t)
    clipped = snr.clamp(max=5.0)
    expected = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}[prediction]
    assert torch.allclose(schedule.loss_weight(t), expected, rtol=1e-5)
    assert torch.equal(NoiseSchedule(DiffusionConfig(prediction=prediction)).loss_weight(t), torch.ones(len(t)))


def test_the_loss_is_the_weighted_error_over_valid_samples_only():
    schedule = NoiseSchedule(DiffusionConfig(loss_weighting="min_snr"))
    x0, noise, t = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3), torch.tensor([10, 500, 900, 999])
    prediction = noise + 0.5
    valid = torch.tensor([True, True, True, False])
    expected = (schedule.loss_weight(t)[:3] * 0.25).mean()
    assert torch.allclose(schedule.loss(prediction, x0, noise, t, valid), expected)


def test_noise_offset_shifts_each_sample_and_channel_by_a_constant():
    schedule = NoiseSchedule(DiffusionConfig(noise_offset=0.1))
    noise = schedule.sample_noise(torch.zeros(2000, 3, 16, 16), torch.Generator().manual_seed(0))
    means = noise.mean((2, 3))  # N(0, 1/256) from the noise, N(0, 0.01) from the offset
    assert means.var().item() == pytest.approx(0.01 + 1 / 256, rel=0.1)
    plain = NoiseSchedule(DiffusionConfig()).sample_noise(torch.zeros(2000, 3, 16, 16), torch.Generator().manual_seed(0))
    assert plain.mean((2, 3)).var().item() == pytest.approx(1 / 256, rel=0.1)


@pytest.mark.parametrize("bad", ["prediction=epsilon", "beta_start=0.02"])
def test_configs_that_make_no_sense_are_refused(bad):
    with pytest.raises(ConfigError, match="zero_terminal_snr|betas must grow"):
        load_config(DiffusionConfig, overrides=["zero_terminal_snr=true", "prediction=v_prediction", bad]
                    if bad.startswith("prediction") else [bad])


class _Denoiser(nn.Module):
    """A small MLP for 2-D points, conditioned on the step and on a class (0, 1, or 2 = none)."""

    def __init__(self) -> None:
        super().__init__()
        self.classes = nn.Embedding(3, 32)
        self.net = nn.Sequential(nn.Linear(2 + 32 + 16, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(), nn.Linear(128, 2))

    def forward(self, x, t, label):
        t = t.float().view(-1, 1) / 1000
        freqs = torch.arange(8, dtype=torch.float32) + 1
        steps = torch.cat([torch.sin(t * freqs * 3), torch.cos(t * freqs * 3)], 1)
        return self.net(torch.cat([x, self.classes(label), steps], 1))


@pytest.mark.parametrize("prediction, scheduler, zero_snr", [("epsilon", "ddim", False), ("v_prediction", "dpm++", False),
                                                             ("epsilon", "euler", False), ("v_prediction", "euler", True),
                                                             ("sample", "ddim", True)])
def test_a_model_trained_with_the_core_samples_its_classes_with_each_scheduler(prediction, scheduler, zero_snr):
    torch.manual_seed(0)
    cfg = DiffusionConfig(schedule="cosine", prediction=prediction, loss_weighting="min_snr", zero_terminal_snr=zero_snr)
    schedule, model = NoiseSchedule(cfg), _Denoiser()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    centres = torch.tensor([[-2.0, 0.0], [2.0, 0.0]])
    for _ in range(1500):
        label = torch.randint(0, 2, (256,))
        x0 = centres[label] + 0.1 * torch.randn(256, 2)
        label = torch.where(torch.rand(256) < 0.1, 2, label)  # caption dropout: the unconditional class
        noise, t = schedule.sample_noise(x0), schedule.sample_timesteps(256, "cpu")
        loss = schedule.loss(model(schedule.add_noise(x0, noise, t), t, label), x0, noise, t, torch.ones(256, dtype=torch.bool))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    wanted = torch.tensor([0] * 32 + [1] * 32)

    def predict(x, t):
        both = model(torch.cat([x, x]), t.expand(2 * len(x)), torch.cat([wanted, torch.full_like(wanted, 2)]))
        return guide(*both.chunk(2), 2.0)

    noise = initial_noise((64, 2), [torch.Generator().manual_seed(i) for i in range(64)], "cpu")
    with torch.no_grad():
        samples = denoise(predict, make_scheduler(cfg, scheduler), noise, steps=25)
    distance = (samples - centres[wanted]).norm(dim=1)
    assert torch.isfinite(samples).all() and (distance < 0.6).float().mean() > 0.9, distance


def test_noise_levels_stay_exact_for_bf16_latents():
    schedule = NoiseSchedule(DiffusionConfig(prediction="v_prediction"))
    x0, noise, t = torch.zeros(3, 4, 2, 2, dtype=torch.bfloat16), torch.ones(3, 4, 2, 2, dtype=torch.bfloat16), torch.tensor([0, 1, 5])
    sigma = (1 - schedule.alphas_cumprod[t]).sqrt()
    # Before: abar rounded to bf16 made sigma 0 at t = 0 and 1, and 0.0625 for 0.072 at t = 5.
    assert torch.allclose(schedule.add_noise(x0, noise, t).float()[:, 0, 0, 0], sigma, rtol=1e-2)
    assert schedule.target(x0, noise, t).dtype == torch.float32 and schedule.add_noise(x0, noise, t).dtype == torch.bfloat16
