import open_clip
import pytest
import torch
from torch.distributions import Normal

from pipeline.models.cvae import CVAE, CVAEConfig
from pipeline.models.text import TextEncoderConfig
from pipeline.models.vae import VAE, VAEConfig, gaussian_kl

SIZE = 32


@pytest.fixture(scope="module")
def tokenize():
    return open_clip.get_tokenizer("ViT-B-32", context_length=16)


def _vae(**overrides) -> VAE:
    torch.manual_seed(0)
    return VAE(VAEConfig(image_size=SIZE, channels=8, latent_dim=8, **overrides))


def _cvae(**overrides) -> CVAE:
    torch.manual_seed(0)
    text = TextEncoderConfig(width=16, heads=2, max_length=16)
    return CVAE(CVAEConfig(image_size=SIZE, channels=8, latent_dim=8, text=text, **overrides))


def _batch(tokenize, n: int = 4, captions=("a red circle", "a blue square")) -> dict:
    generator = torch.Generator().manual_seed(1)
    caption = [captions[i % len(captions)] for i in range(n)]
    return {"image": torch.rand(n, 3, SIZE, SIZE, generator=generator) * 2 - 1,
            "valid": torch.ones(n, dtype=torch.bool), "tokens": tokenize(caption).long(), "caption": caption}


def _gaussian_nll(x, x_hat, sigma: float = 0.1):
    return (0.5 * (x - x_hat).pow(2) / sigma ** 2).sum((1, 2, 3))


def _seeded(model, batch, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return model(batch)


def _monte_carlo_kl(mu, logvar, prior_mu, prior_logvar, samples: int = 200_000):
    q, p = Normal(mu, (0.5 * logvar).exp()), Normal(prior_mu, (0.5 * prior_logvar).exp())
    z = q.sample((samples,))  # (S, B, D)
    return (q.log_prob(z) - p.log_prob(z)).sum(-1).mean(0)  # (B,)


@pytest.mark.parametrize("against_prior", [False, True], ids=["standard-normal", "two-gaussians"])
def test_analytic_kl_matches_monte_carlo(against_prior):
    torch.manual_seed(0)
    mu, logvar = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64) * 0.5
    if against_prior:
        prior_mu, prior_logvar = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64) * 0.5
        analytic = gaussian_kl(mu, logvar, prior_mu, prior_logvar)
    else:
        prior_mu, prior_logvar = torch.zeros_like(mu), torch.zeros_like(logvar)
        analytic = gaussian_kl(mu, logvar)
    torch.testing.assert_close(analytic, _monte_carlo_kl(mu, logvar, prior_mu, prior_logvar), rtol=0.02, atol=0.01)


def test_two_gaussian_kl_against_standard_normal_is_the_special_case():
    mu, logvar = torch.randn(5, 3), torch.randn(5, 3)
    torch.testing.assert_close(gaussian_kl(mu, logvar, torch.zeros(5, 3), torch.zeros(5, 3)), gaussian_kl(mu, logvar))


def test_beta_one_is_the_vae_loss_and_beta_weights_the_kl(tokenize):
    vae, batch = _vae(), _batch(tokenize)
    out = _seeded(vae, batch)
    torch.manual_seed(0)  # the same eps as the forward pass
    mu, logvar = vae.encode(batch["image"])
    x_hat = vae.decode(mu + (0.5 * logvar).exp() * torch.randn_like(mu))
    recon = _gaussian_nll(batch["image"], x_hat)
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)
    torch.testing.assert_close(out["loss"], (recon + kl).mean())
    torch.testing.assert_close(out["recon"], recon.mean().detach())
    torch.testing.assert_close(out["kl"], kl.mean().detach())

    beta_vae = _vae(beta=4.0)
    beta_vae.load_state_dict(vae.state_dict())
    torch.testing.assert_close(_seeded(beta_vae, batch)["loss"], out["recon"] + 4 * out["kl"])


def test_alpha_one_is_the_cvae_loss_and_alpha_zero_the_gsnn_loss(tokenize):
    cvae, batch = _cvae(alpha=1.0), _batch(tokenize)
    x = batch["image"]
    torch.manual_seed(0)  # forward draws the CVAE path's eps first, then the GSNN path's
    y = cvae.text(batch["tokens"])
    mu_q, logvar_q = cvae.recognition(x, y)
    mu_p, logvar_p = cvae.prior(y)
    eps_q, eps_p = torch.randn_like(mu_q), torch.randn_like(mu_p)
    recon = _gaussian_nll(x, cvae.generator(mu_q + (0.5 * logvar_q).exp() * eps_q, y))
    kl = 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p).pow(2)) / logvar_p.exp() - 1).sum(1)
    recon_gsnn = _gaussian_nll(x, cvae.generator(mu_p + (0.5 * logvar_p).exp() * eps_p, y))

    out = _seeded(cvae, batch)
    torch.testing.assert_close(out["loss"], (recon + kl).mean())
    torch.testing.assert_close(out["loss_gsnn"], recon_gsnn.mean().detach())
    gsnn = _cvae(alpha=0.0)
    gsnn.load_state_dict(cvae.state_dict())
    torch.testing.assert_close(_seeded(gsnn, batch)["loss"], recon_gsnn.mean())
    hybrid = _cvae(alpha=0.25)
    hybrid.load_state_dict(cvae.state_dict())
    torch.testing.assert_close(_seeded(hybrid, batch)["loss"], 0.25 * (recon + kl).mean() + 0.75 * recon_gsnn.mean())


@pytest.mark.parametrize("make", [_vae, _cvae], ids=["vae", "cvae"])
def test_padding_samples_do_not_count(make, tokenize, monkeypatch):
    monkeypatch.setattr(torch, "randn_like", torch.zeros_like)  # z = mean: the same for any batch size
    model, batch = make(), _batch(tokenize, n=2)
    padded = {**batch, "valid": torch.tensor([True, False])}
    padded["tokens"][1] = 0  # an empty caption: a blank padding sample
    first = {key: value[:1] for key, value in batch.items()}
    out, expected = model(padded), model(first)
    for name, value in expected.items():
        torch.testing.assert_close(out[name], value, msg=name)


@pytest.mark.parametrize("make", [_vae, _cvae], ids=["vae", "cvae"])
def test_gradients_reach_every_network(make, tokenize):
    model = make()
    model(_batch(tokenize))["loss"].backward()
    for name, child in model.named_children():
        grads = [p.grad for p in child.parameters()]
        assert all(g is not None for g in grads), name
        assert sum(g.norm() for g in grads) > 0, name


def test_outputs_are_images_in_range(tokenize):
    vae, cvae, batch = _vae(), _cvae(), _batch(tokenize, n=3)
    for images in [vae.reconstruct(batch["image"]), vae.sample(3), cvae.sample(batch["tokens"]),
                   cvae.reconstruct(batch["image"], batch["tokens"])]:
        assert images.shape == (3, 3, SIZE, SIZE) and not images.requires_grad
        assert images.min() >= -1 and images.max() <= 1
    same = [vae.sample(2, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(*same)
    out = vae(batch)
    assert {"loss", "recon", "kl", "psnr"} <= out.keys() and out["loss"].dim() == 0
    assert {"loss", "recon", "kl", "loss_cvae", "loss_gsnn", "psnr"} <= cvae(batch).keys()


def test_cvae_samples_depend_on_the_caption(tokenize):
    cvae = _cvae()
    tokens = tokenize(["a red circle", "a blue square"]).long()
    first, second = cvae.sample(tokens, torch.Generator().manual_seed(0)).unbind(0)
    assert not torch.allclose(first, second, atol=1e-4)
    mu_p = cvae.prior(cvae.text(tokens))[0]
    assert not torch.allclose(mu_p[0], mu_p[1], atol=1e-4)


def _fit(model, batches, steps: int, lr: float) -> list[float]:
    optimizer = torch.optim.Adam(model.parameters(), lr)
    losses = []
    for step in range(steps):
        loss = model(batches(step))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_vae_loss_falls_on_a_fixed_batch():
    coarse = torch.rand(8, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    batch = {"image": coarse.repeat_interleave(SIZE // 4, 2).repeat_interleave(SIZE // 4, 3),  # 8x8 blocks
             "valid": torch.ones(8, dtype=torch.bool)}
    losses = _fit(_vae(), lambda step: batch, steps=100, lr=3e-3)
    assert sum(losses[-10:]) < 0.3 * sum(losses[:10]), (losses[:3], losses[-3:])


def test_cvae_learns_the_colour_the_caption_names(tokenize):
    colours = {"red": torch.tensor([1.0, -1, -1]), "blue": torch.tensor([-1.0, -1, 1])}
    tokens = {name: tokenize([name]).long() for name in colours}
    generator = torch.Generator().manual_seed(0)

    def batch(step: int) -> dict:
        names = [("red", "blue")[i % 2] for i in range(16)]
        mean = torch.stack([colours[name] for name in names])[:, :, None, None]  # (B, 3, 1, 1)
        noise = 0.2 * torch.randn(16, 3, SIZE, SIZE, generator=generator)
        return {"image": (mean + noise).clamp(-1, 1), "valid": torch.ones(16, dtype=torch.bool),
                "tokens": torch.cat([tokens[name] for name in names]), "caption": names}

    cvae = _cvae()
    _fit(cvae, batch, steps=150, lr=3e-3)
    redness = {name: (lambda s: (s[:, 0] - s[:, 2]).mean().item())(
        cvae.sample(tokens[name].repeat(8, 1), torch.Generator().manual_seed(1))) for name in colours}
    assert redness["red"] > 1.0 and redness["blue"] < -1.0, redness
