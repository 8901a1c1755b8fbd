import pytest
import torch
from torch.autograd import grad

from pipeline.models.vq import VectorQuantizer
from pipeline.models.vqvae import VQVAE, VQVAEConfig

SIZE = 32
TINY = {"image_size": SIZE, "channels": 16, "res_blocks": 1, "res_channels": 8, "code_dim": 8, "codebook_size": 32}



def _tiny(**overrides) -> VQVAE:
    torch.manual_seed(0)
    return VQVAE(VQVAEConfig(**{**TINY, **overrides}))


def _batch(n: int = 4, size: int = SIZE, seed: int = 1) -> dict:
    """Smooth random images (a colour gradient plus a blob each) in [-1, 1], all valid."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    a, b, c = (torch.rand(n, 3, 1, 1, generator=g) * 2 - 1 for _ in range(3))
    centre = torch.rand(n, 2, 1, 1, generator=g) * 2 - 1
    blob = torch.exp(-((xx - centre[:, :1]) ** 2 + (yy - centre[:, 1:]) ** 2) / 0.1)  # (n, 1, S, S)
    return {"image": (a * xx + b * yy + c * blob).clamp(-1, 1), "valid": torch.ones(n, dtype=torch.bool)}


def _flat(z_e: torch.Tensor) -> torch.Tensor:
    return z_e.detach().permute(0, 2, 3, 1).reshape(-1, z_e.shape[1])  # (B h w, D)


def test_codes_are_the_nearest_entries_and_lookup_inverts_them():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(64, 8, restart=False)
    z_e = torch.randn(3, 8, 5, 4)
    out = quantizer(z_e)
    expected = torch.cdist(_flat(z_e), quantizer.codebook.detach()).argmin(1).view(3, 5, 4)
    assert out.codes.dtype == torch.long and torch.equal(out.codes, expected)
    assert torch.equal(quantizer.assign(z_e), expected)
    entries = quantizer.lookup(out.codes)
    assert entries.shape == (3, 8, 5, 4) and torch.allclose(out.z_q, entries)
    assert torch.allclose(out.z_q, quantizer.codebook.detach()[expected].permute(0, 3, 1, 2))


def test_gradients_follow_the_stop_gradients():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(16, 4, beta=0.25, restart=False)
    z_e = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = quantizer(z_e)
    codebook, z = quantizer.codebook, _flat(z_e)
    codes = out.codes.flatten()
    e = codebook.detach()[codes]  # (B h w, D)

    def grads(term):
        return grad(term, [z_e, codebook], retain_graph=True, allow_unused=True, materialize_grads=True)

    # The codebook term moves only the codebook, by 2 (e - z) summed over the vectors each code took.
    to_z, to_codebook = grads(out.codebook_loss.sum())
    assert torch.equal(to_z, torch.zeros_like(z_e))
    assert torch.allclose(to_codebook, torch.zeros(16, 4).index_add_(0, codes, 2 * (e - z)), atol=1e-6)
    # The commitment term moves only the encoder output, by 2 (z - e).
    to_z, to_codebook = grads(out.commitment_loss.sum())
    assert torch.equal(to_codebook, torch.zeros_like(codebook))
    assert torch.allclose(_flat(to_z), 2 * (z - e), atol=1e-6)
    # The decoder's gradient reaches z_e unchanged (straight-through) and never the codebook.
    upstream = torch.randn_like(out.z_q)
    to_z, to_codebook = grads((out.z_q * upstream).sum())
    assert torch.equal(to_z, upstream) and torch.equal(to_codebook, torch.zeros_like(codebook))
    assert torch.allclose(out.loss, out.codebook_loss + 0.25 * out.commitment_loss)
    assert torch.allclose(out.codebook_loss, (z - e).pow(2).view(2, 9, 4).sum((1, 2)))


def test_ema_codebook_is_a_buffer_without_a_codebook_loss():
    quantizer = VectorQuantizer(16, 4, beta=0.25, ema=True)
    assert not list(quantizer.parameters())
    assert {"codebook", "cluster_size", "embed_sum"} <= set(quantizer.state_dict())
    z_e = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = quantizer(z_e)
    assert torch.equal(out.codebook_loss, torch.zeros(2))
    assert torch.allclose(out.loss, 0.25 * out.commitment_loss) and out.loss.requires_grad


def test_ema_update_matches_the_formula():
    decay, eps = 0.9, 0.1  # a large eps, so that the smoothing shows
    quantizer = VectorQuantizer(3, 2, ema=True, decay=decay, eps=eps, restart=False)
    old = torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]])
    quantizer.codebook.copy_(old)
    quantizer.embed_sum.copy_(old)
    vectors = torch.tensor([[0.1, 0.0], [0.9, 1.2], [1.1, 0.8], [-0.2, 0.1]])  # codes 0, 1, 1, 0
    z_e = torch.stack([vectors.T.reshape(2, 1, 4), torch.full((2, 1, 4), 5.0)])  # (2, 2, 1, 4), sample 1 padding
    out = quantizer(z_e, valid=torch.tensor([True, False]))
    assert out.codes[0].flatten().tolist() == [0, 1, 1, 0]

    counts = torch.tensor([2.0, 2.0, 0.0])
    sums = torch.tensor([[-0.1, 0.1], [2.0, 2.0], [0.0, 0.0]])
    cluster_size = decay * 1 + (1 - decay) * counts
    embed_sum = decay * old + (1 - decay) * sums
    n = cluster_size.sum()
    smoothed = (cluster_size + eps) / (n + 3 * eps) * n
    assert torch.allclose(quantizer.cluster_size, cluster_size)
    assert torch.allclose(quantizer.embed_sum, embed_sum)
    assert torch.allclose(quantizer.codebook, embed_sum / smoothed[:, None])

    state = {k: v.clone() for k, v in quantizer.state_dict().items()}
    quantizer.eval()(z_e)  # evaluation leaves the statistics alone
    assert all(torch.equal(v, quantizer.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("ema", [False, True])
def test_dead_codes_restart_onto_valid_encoder_outputs(ema):
    torch.manual_seed(0)
    quantizer = VectorQuantizer(8, 4, ema=ema)
    with torch.no_grad():
        quantizer.codebook[7] = 100.0  # far from every input: never chosen
        quantizer.cluster_size.fill_(100.0)  # the others stay well above the threshold
        quantizer.cluster_size[7] = 0.5
    before = quantizer.codebook.detach().clone()
    z_e = torch.randn(2, 4, 3, 3)
    out = quantizer(z_e, valid=torch.tensor([True, False]))
    assert not (out.codes == 7).any()
    restarted = quantizer.codebook.detach()[7]
    assert torch.cdist(restarted[None], _flat(z_e[:1])).min() == 0  # a vector of the valid sample
    assert quantizer.cluster_size[7] == 1.0
    if ema:
        assert torch.equal(quantizer.embed_sum[7], restarted)
    else:
        assert torch.equal(quantizer.codebook.detach()[:7], before[:7])
    assert (quantizer.cluster_size[:7] > 1).all()


def test_vqvae_shapes_and_metrics():
    model = _tiny()
    batch = _batch()
    out = model(batch)
    assert set(out) == {"loss", "recon", "vq", "psnr", "perplexity", "dead_codes"}
    assert out["loss"].shape == () and out["loss"].requires_grad
    assert all(not v.requires_grad for k, v in out.items() if k != "loss")
    assert 1 <= out["perplexity"] <= 32 and 0 <= out["dead_codes"] <= 32
    assert torch.allclose(out["loss"], out["recon"] + out["vq"])
    assert model.tokens_per_side == 4 and model.cfg.codebook_size == 32
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = model.encode(batch["image"])  # in training mode, still no state change
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert tokens.shape == (4, 4, 4) and tokens.dtype == torch.long and 0 <= tokens.min() and tokens.max() < 32
    images = model.decode(tokens)
    assert images.shape == (4, 3, SIZE, SIZE) and -1 <= images.min() and images.max() <= 1
    assert torch.equal(model.reconstruct(batch["image"]), images)
    assert VQVAE(VQVAEConfig()).tokens_per_side == 8


def test_padding_samples_do_not_count():
    model, batch = _tiny().eval(), _batch()
    batch["valid"][3] = False
    other = {"image": batch["image"].clone(), "valid": batch["valid"]}
    other["image"][3] = -batch["image"][3]
    a, b = model(batch), model(other)
    for key in a:
        assert torch.allclose(a[key], b[key]), key


@pytest.mark.parametrize("ema", [False, True])
def test_loss_falls_on_a_fixed_batch(ema):
    model, batch = _tiny(ema=ema), _batch()
    optimiser = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(40):
        out = model(batch)
        optimiser.zero_grad()
        out["loss"].backward()
        optimiser.step()
        losses.append(out["loss"].item())
    assert all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    assert out["perplexity"] > 4  # restarts keep several codes in use, not the single one chosen at init
