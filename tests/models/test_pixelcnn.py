import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.models import pixelcnn
from pipeline.models.autoregressive import sample_logits
from pipeline.models.pixelcnn import PixelCNN, PixelCNNConfig
from pipeline.models.pixelcnn_sampling import PixelCNNSampler
from pipeline.models.text import TextEncoderConfig

GRID, CODES, T = 4, 16, 16
SMALL = dict(codebook_size=CODES, grid=GRID, channels=16, layers=4, kernel_size=3, heads=2, caption_dropout=0.0,
             text=TextEncoderConfig(vocab_size=64, width=16, heads=2, max_length=8))
CONDITIONED = dict(condition_codebook_size=8, condition_grid=2)



def _model(**overrides) -> PixelCNN:
    torch.manual_seed(0)
    return PixelCNN(PixelCNNConfig(**{**SMALL, **overrides})).eval()


def _batch(n: int = 3, seed: int = 1, conditioned: bool = False) -> dict:
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(1, 64, (n, 8), generator=generator)
    text[:, 5:] = 0
    batch = {"text_tokens": text, "image_tokens": torch.randint(0, CODES, (n, T), generator=generator),
             "valid": torch.ones(n, dtype=torch.bool)}
    if conditioned:
        batch["condition_tokens"] = torch.randint(0, 8, (n, 4), generator=generator)
    return batch


def _dependence(model: PixelCNN, batch: dict) -> torch.Tensor:
    """(T, T): entry [p, q] = |d (random projection of logits at position p) / d (embedding at q)|,
    summed over channels and the batch. The embedding's output is made the differentiated leaf."""
    leaves = []

    def make_leaf(module, args, output):
        leaves.append(output.detach().requires_grad_())
        return leaves[-1]

    handle = model.embedding.register_forward_hook(make_leaf)
    codes = batch["image_tokens"].view(-1, GRID, GRID)
    logits = model.logits(codes, batch["text_tokens"], batch.get("condition_tokens")).flatten(2)  # (B, K, T)
    handle.remove()
    (x,) = leaves  # (B, g, g, C)
    projection = torch.randn(logits.shape[:2], generator=torch.Generator().manual_seed(0))  # (B, K)
    rows = []
    for p in range(T):
        (grad,) = torch.autograd.grad((logits[:, :, p] * projection).sum(), x, retain_graph=True)
        rows.append(grad.abs().sum((0, 3)).flatten())  # (T,)
    return torch.stack(rows)


@pytest.mark.parametrize("overrides", [{}, {"kernel_size": 5}, CONDITIONED,
                                       {"attention": True, "attention_every": 2}])
def test_each_position_depends_on_every_earlier_position_and_nothing_else(overrides):
    model = _model(**overrides)
    dependence = _dependence(model, _batch(conditioned="condition_grid" in overrides))
    earlier = torch.ones(T, T).tril(-1).bool()  # [p, q]: q before p in raster order
    assert torch.equal(dependence[~earlier], torch.zeros(int((~earlier).sum())))  # exactly, at and after p
    assert (dependence[earlier] > 0).all()  # no blind spot: 4 layers reach the whole 4 x 4 grid
    for p in range(GRID, T):  # explicitly: the position up and to the right, which a blind-spot PixelCNN misses
        if p % GRID < GRID - 1:
            assert dependence[p, p - GRID + 1] > 0, p


def test_attention_reaches_beyond_the_convolutions_and_stays_causal():
    plain, attending = _model(layers=1), _model(layers=1, attention=True, attention_every=1)
    batch = _batch()
    reach_plain, reach_attention = _dependence(plain, batch), _dependence(attending, batch)
    earlier = torch.ones(T, T).tril(-1).bool()
    assert reach_plain[T - 1, 0] == 0  # one 3 x 3 layer cannot see the far corner
    assert (reach_attention[earlier] > 0).all()
    assert torch.equal(reach_attention[~earlier], torch.zeros(int((~earlier).sum())))


def test_logits_depend_on_the_caption():
    model, batch = _model(), _batch()
    codes = batch["image_tokens"].view(-1, GRID, GRID)
    logits = model.logits(codes, batch["text_tokens"])
    assert logits.shape == (3, CODES, GRID, GRID)
    other = batch["text_tokens"].clone()
    other[:, 1] = (other[:, 1] % 63) + 1
    changed = (model.logits(codes, other) - logits).abs().amax(1)  # (B, g, g)
    assert (changed > 1e-6).all()  # every position, the first included


def test_logits_depend_on_the_spatial_condition():
    model, batch = _model(**CONDITIONED), _batch(conditioned=True)
    codes, text, condition = batch["image_tokens"].view(-1, GRID, GRID), batch["text_tokens"], batch["condition_tokens"]
    logits = model.logits(codes, text, condition)
    other = (condition + 1) % 8
    assert ((model.logits(codes, text, other) - logits).abs().amax(1) > 1e-6).all()
    corner = condition.clone()
    corner[:, 0] = (corner[:, 0] + 1) % 8  # the condition cell upsampled over grid rows and columns 0-1
    assert (model.logits(codes, text, corner)[:, :, 0, 0] - logits[:, :, 0, 0]).abs().amax() > 1e-6
    with pytest.raises(ValueError, match="condition"):
        model.logits(codes, text)
    with pytest.raises(ValueError, match="condition"):
        _model().logits(codes, text, condition)
    out = model(batch)
    assert math.isfinite(out["loss"].item())


def test_loss_is_the_mean_nll_per_code_over_valid_samples():
    model, batch = _model(), _batch()
    batch["valid"][2] = False
    out = model(batch)
    logits = model.logits(batch["image_tokens"].view(-1, GRID, GRID), batch["text_tokens"])
    nll = F.cross_entropy(logits.flatten(2), batch["image_tokens"], reduction="none").mean(1)  # (B,)
    assert torch.allclose(out["loss"], nll[:2].mean())
    assert torch.allclose(out["bits_per_code"], out["loss"] / math.log(2)) and not out["bits_per_code"].requires_grad
    assert out["loss"] > 0.5 * math.log(CODES)  # untrained: near uniform


def test_caption_dropout_in_training():
    batch = _batch()
    dropped = _model(caption_dropout=1.0).train()
    blank = {**batch, "text_tokens": torch.zeros_like(batch["text_tokens"])}
    assert torch.allclose(dropped(batch)["loss"], dropped.eval()(blank)["loss"])
    assert not torch.allclose(dropped(batch)["loss"], dropped(blank)["loss"])  # eval: no dropout
    model = _model(caption_dropout=0.5).train()
    out = model(batch)
    out["loss"].backward()
    assert math.isfinite(out["loss"].item()) and model.text.token_embedding.weight.grad is not None


def test_loss_falls_on_a_fixed_batch():
    model, batch = _model(attention=True, attention_every=2).train(), _batch()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        out = model(batch)
        optimiser.zero_grad()
        out["loss"].backward()
        optimiser.step()
        losses.append(out["loss"].item())
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.parametrize("overrides", [{}, CONDITIONED])
def test_generate_shapes_range_and_reproducibility(overrides):
    model, batch = _model(**overrides), _batch(2, conditioned=bool(overrides))
    text, condition = batch["text_tokens"], batch.get("condition_tokens")
    codes = model.generate(text, condition, generator=torch.Generator().manual_seed(5))
    assert codes.shape == (2, T) and codes.dtype == torch.long and 0 <= codes.min() and codes.max() < CODES
    again = model.generate(text, condition, generator=torch.Generator().manual_seed(5))
    assert torch.equal(codes, again)
    other = model.generate(text, condition, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(codes, other)
    guided = model.generate(text, condition, top_k=4, guidance_scale=3.0, generator=torch.Generator().manual_seed(5))
    assert guided.shape == (2, T) and 0 <= guided.min() and guided.max() < CODES


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_greedy_generation_picks_the_argmax_in_raster_order(guidance_scale):
    """With top_k = 1 each code is the argmax of the (guided) logits given the codes before it; since
    those logits ignore later codes, the final grid's logits reproduce every choice."""
    model, text = _model(), _batch(2)["text_tokens"]
    codes = model.generate(text, top_k=1, guidance_scale=guidance_scale)
    grid = codes.view(2, GRID, GRID)
    cond, uncond = model.logits(grid, text), model.logits(grid, torch.zeros_like(text))
    guided = uncond + guidance_scale * (cond - uncond)  # (B, K, g, g)
    assert torch.equal(guided.argmax(1).flatten(1), codes)


# The sampler's configurations: attention after the last layer (every 2 of 4) and before it (every 3 of 4),
# with a spatial condition, kernel sizes 3 and 5, on grids of 4 and 5.
SAMPLED = [{}, {"kernel_size": 5}, CONDITIONED, {"attention": True, "attention_every": 2},
           {**CONDITIONED, "attention": True, "attention_every": 3, "kernel_size": 5, "grid": 5}]


def _inputs(model: PixelCNN, n: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Captions (n, 8) and, when the model is conditioned, condition codes (n, cg^2)."""
    batch = _batch(n, seed, conditioned=model.conditioned)
    return batch["text_tokens"], batch.get("condition_tokens")


@pytest.mark.parametrize("overrides", SAMPLED)
def test_the_sampler_gives_the_full_networks_logits_at_every_position(overrides):
    """Teacher-forced with random codes: at each position the incremental logits equal those of the whole
    network run on the final grid, which at p depend on the codes before p only."""
    model = _model(**overrides)
    text, condition = _inputs(model)
    grid = model.cfg.grid
    codes = torch.randint(0, CODES, (3, grid * grid), generator=torch.Generator().manual_seed(2))
    full = model.logits(codes.view(3, grid, grid), text, condition).flatten(2)  # (B, K, T)
    sampler = PixelCNNSampler(model, text, condition)
    for p in range(grid * grid):
        torch.testing.assert_close(sampler.logits(), full[:, :, p], atol=1e-5, rtol=0, msg=f"position {p}")
        sampler.commit(codes[:, p])


@pytest.mark.parametrize("overrides", [{}, SAMPLED[-1]])
@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_generate_samples_from_the_full_networks_logits(overrides, guidance_scale, monkeypatch):
    """The logits generate samples from, guided or not, equal the full network's given the sampled codes."""
    model = _model(**overrides)
    text, condition = _inputs(model)
    seen = []

    def recording(logits, *args, **kwargs):
        seen.append(logits)
        return sample_logits(logits, *args, **kwargs)

    monkeypatch.setattr(pixelcnn, "sample_logits", recording)
    codes = model.generate(text, condition, temperature=0.9, guidance_scale=guidance_scale,
                           generator=torch.Generator().manual_seed(3))
    grid = codes.view(3, model.cfg.grid, model.cfg.grid)
    cond, uncond = model.logits(grid, text, condition), model.logits(grid, torch.zeros_like(text), condition)
    full = (uncond + guidance_scale * (cond - uncond)).flatten(2)  # (B, K, T)
    assert len(seen) == codes.shape[1]
    for p, logits in enumerate(seen):
        torch.testing.assert_close(logits, full[:, :, p], atol=1e-5, rtol=1e-5, msg=f"position {p}")


def _naive_generate(model: PixelCNN, text, condition, guidance_scale, **sampling) -> torch.Tensor:
    """The sampler before the incremental one: the whole network recomputed for every position."""
    grid = model.cfg.grid
    codes = torch.zeros(text.shape[0], grid, grid, dtype=torch.long)
    for p in range(grid * grid):
        i, j = divmod(p, grid)
        logits = model.logits(codes, text, condition)[:, :, i, j]
        if guidance_scale != 1:
            uncond = model.logits(codes, torch.zeros_like(text), condition)[:, :, i, j]
            logits = uncond + guidance_scale * (logits - uncond)
        codes[:, i, j] = sample_logits(logits, **sampling)
    return codes.flatten(1)


@pytest.mark.parametrize("overrides", [{}, SAMPLED[-1]])
@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_generate_draws_the_codes_of_the_naive_loop(overrides, guidance_scale):
    """Greedy, and sampled with one generator per row: the same codes as recomputing the whole network."""
    model = _model(**overrides)
    text, condition = _inputs(model)
    greedy = model.generate(text, condition, top_k=1, guidance_scale=guidance_scale)
    assert torch.equal(greedy, _naive_generate(model, text, condition, guidance_scale, top_k=1))
    generators = lambda: [torch.Generator().manual_seed(10 + row) for row in range(3)]
    sampled = model.generate(text, condition, temperature=0.8, top_k=6, guidance_scale=guidance_scale,
                             generator=generators())
    naive = _naive_generate(model, text, condition, guidance_scale, temperature=0.8, top_k=6, generator=generators())
    assert torch.equal(sampled, naive) and not torch.equal(sampled, greedy)
