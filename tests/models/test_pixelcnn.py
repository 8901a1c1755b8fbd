import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.models.pixelcnn import PixelCNN, PixelCNNConfig
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
