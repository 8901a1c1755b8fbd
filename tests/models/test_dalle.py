import pytest
import torch

from pipeline.models import dalle
from pipeline.models.dalle import DALLE, PRESETS, DALLEConfig, attention_mask, flops_per_sample, layer_attention

SMALL = dict(text_vocab_size=64, text_length=8, image_vocab_size=32, image_grid=4, width=32, depth=4, heads=4,
             conv_kernel=3, caption_dropout=0.0)



def _model(**overrides) -> DALLE:
    torch.manual_seed(0)
    return DALLE(DALLEConfig(**{**SMALL, **overrides})).eval()


def _batch(cfg: DALLEConfig, n: int = 3, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(1, cfg.text_vocab_size, (n, cfg.text_length), generator=generator)
    text[:, 5:] = 0
    image = torch.randint(0, cfg.image_vocab_size, (n, cfg.image_grid ** 2), generator=generator)
    return {"text_tokens": text, "image_tokens": image, "valid": torch.ones(n, dtype=torch.bool)}


@pytest.mark.parametrize("attention", ["dense", "sparse"])
def test_cached_logits_equal_uncached(attention):
    model = _model(attention=attention)
    batch = _batch(model.cfg)
    plain = model.logits(batch["text_tokens"], batch["image_tokens"])
    cached = model.logits(batch["text_tokens"], batch["image_tokens"], use_cache=True)
    for a, b in zip(plain, cached):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_kv_cache_writes_into_its_buffers_and_refuses_to_overflow():
    cache = dalle.KVCache(capacity=5)
    parts = [torch.randn(2, 4, n, 8, generator=torch.Generator().manual_seed(n)) for n in (3, 1, 1)]
    for step, part in enumerate(parts):
        k, v = cache.append(part, -part)
        assert len(cache) == k.shape[2] == 3 + step
        assert k.data_ptr() == cache.keys.data_ptr() and v.data_ptr() == cache.values.data_ptr()  # views, no copy
    assert cache.keys.shape == (2, 4, 5, 8)
    assert torch.equal(k, torch.cat(parts, 2)) and torch.equal(v, -torch.cat(parts, 2))
    with pytest.raises(ValueError, match="capacity 5 holds 5 positions: cannot append 1 more"):
        cache.append(parts[-1], parts[-1])
    assert len(cache) == 5


@pytest.mark.parametrize("attention", ["dense", "sparse"])
def test_no_token_sees_the_future(attention):
    model = _model(attention=attention)
    batch = _batch(model.cfg, n=1)
    text, image = batch["text_tokens"], batch["image_tokens"]
    text_logits, image_logits = model.logits(text, image)
    for k in range(model.cfg.image_grid ** 2):  # change image tokens k.. : logits for tokens 0..k stay
        changed = image.clone()
        changed[:, k:] = (changed[:, k:] + 1) % model.cfg.image_vocab_size
        t, i = model.logits(text, changed)
        assert torch.equal(t, text_logits)
        torch.testing.assert_close(i[:, :k + 1], image_logits[:, :k + 1], atol=0, rtol=0)
        if k + 1 < image.shape[1]:
            assert not torch.allclose(i[:, k + 1], image_logits[:, k + 1])
    changed = text.clone()
    changed[:, 3] = 7  # text position 3: logits predicting text 1..3 stay, the rest change
    t, i = model.logits(changed, image)
    torch.testing.assert_close(t[:, :3], text_logits[:, :3], atol=0, rtol=0)
    assert not torch.allclose(t[:, 3], text_logits[:, 3]) and not torch.allclose(i, image_logits)


def test_sparse_masks_match_their_definitions():
    cfg = DALLEConfig(**{**SMALL, "attention": "sparse", "depth": 8})
    assert [layer_attention(cfg, i) for i in range(8)] == ["row", "row", "column", "row", "row", "row", "column",
                                                            "conv"]
    lt, g = cfg.text_length, cfg.image_grid
    masks = {kind: attention_mask(cfg, kind) for kind in ("dense", "row", "column", "conv")}
    for i in range(cfg.sequence_length):
        for j in range(cfg.sequence_length):
            dense = j <= i
            assert masks["dense"][i, j] == dense
            if i < lt or j < lt:  # text queries and text keys: plain causal
                assert all(masks[kind][i, j] == dense for kind in ("row", "column", "conv"))
                continue
            (ri, ci), (rj, cj) = divmod(i - lt, g), divmod(j - lt, g)
            assert masks["row"][i, j] == (dense and (ri == rj or (ri == rj + 1 and cj >= ci)))
            assert masks["column"][i, j] == (dense and ci == cj)
            d = i - j  # the conv window, wrapping around the sides: one row back, one column either way
            assert masks["conv"][i, j] == (d in (0, 1) or d in (g - 1, g, g + 1))


@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_a_sparse_layer_sees_only_its_mask(kind, monkeypatch):
    monkeypatch.setattr(dalle, "layer_attention", lambda cfg, layer: kind)
    model = _model(attention="sparse", depth=1)
    batch = _batch(model.cfg, n=1)
    text, image = batch["text_tokens"], batch["image_tokens"]
    _, base = model.logits(text, image)
    g, query = model.cfg.image_grid, 9  # image logits[10] come from the position holding image token 9
    window = {"row": lambda d: d <= g, "column": lambda d: d % g == 0, "conv": lambda d: d in (0, 1, g - 1, g, g + 1)}
    for source in range(query + 1):
        changed = image.clone()
        changed[:, source] = (changed[:, source] + 1) % model.cfg.image_vocab_size
        _, out = model.logits(text, changed)
        assert torch.equal(out[:, query + 1], base[:, query + 1]) != window[kind](query - source), source
    changed = text.clone()
    changed[:, 1] = 9  # every image token sees all the text
    assert not torch.allclose(model.logits(changed, image)[1][:, query + 1], base[:, query + 1])


def test_loss_is_the_weighted_sum_and_zero_weight_cuts_the_text_head():
    model = _model(text_loss_weight=0.3)
    out = model(_batch(model.cfg))
    assert torch.equal(out["loss"], 0.3 * out["loss_text"] + 0.7 * out["loss_image"])
    model = _model(text_loss_weight=0.0)
    model(_batch(model.cfg))["loss"].backward()
    assert torch.count_nonzero(model.text_head.weight.grad) == 0
    assert torch.count_nonzero(model.text_embedding.weight.grad) > 0  # the image still reads the text


def test_each_pad_position_is_its_own_token():
    model = _model()
    v = model.cfg.text_vocab_size
    text = torch.tensor([[5, 6, 7, 0, 0, 0, 0, 0], [5, 6, 7, 8, 0, 0, 0, 0]])  # padding from 3, from 4
    assert model.text_ids(text).tolist() == [[5, 6, 7, v + 3, v + 4, v + 5, v + 6, v + 7],
                                             [5, 6, 7, 8, v + 4, v + 5, v + 6, v + 7]]
    embedded = model._embed_text(text)  # (2, Lt, W)
    torch.testing.assert_close(embedded[0, 3], model.text_embedding.weight[v + 3] + model.text_position.weight[3])
    torch.testing.assert_close(embedded[0, 4:], embedded[1, 4:])
    assert not torch.allclose(embedded[0, 3], embedded[1, 3])
    assert not torch.allclose(model.text_embedding.weight[v + 3], model.text_embedding.weight[v + 4])


def test_caption_dropout():
    model = _model(caption_dropout=1.0).train()
    batch = _batch(model.cfg)
    torch.manual_seed(3)
    dropped = model(batch)["loss"]
    torch.manual_seed(3)
    blank = model({**batch, "text_tokens": torch.zeros_like(batch["text_tokens"])})["loss"]
    torch.testing.assert_close(dropped, blank)
    model.eval()
    kept = model(batch)["loss"]
    model.cfg.caption_dropout = 0.0
    torch.testing.assert_close(kept, model(batch)["loss"])
    assert not torch.allclose(kept, dropped)


def test_padding_samples_do_not_count():
    model = _model()
    batch = _batch(model.cfg, n=2)
    junk = _batch(model.cfg, n=2, seed=9)
    padded = {key: torch.cat([batch[key], junk[key]]) for key in batch}
    padded["valid"] = torch.tensor([True, True, False, False])
    out, out_padded = model(batch), model(padded)
    for key in out:
        torch.testing.assert_close(out[key], out_padded[key])


def test_generate():
    model = _model()
    text = _batch(model.cfg, n=2)["text_tokens"]
    draw = lambda seed, **kw: model.generate(text, generator=torch.Generator().manual_seed(seed), **kw)
    tokens = draw(0)
    assert tokens.shape == (2, model.cfg.image_grid ** 2) and tokens.dtype == torch.long
    assert 0 <= tokens.min() and tokens.max() < model.cfg.image_vocab_size
    assert torch.equal(tokens, draw(0)) and not torch.equal(tokens, draw(1))
    assert draw(0, top_k=5, top_p=0.9, temperature=0.7, guidance_scale=3.0).shape == tokens.shape
    greedy = draw(0, top_k=1)  # greedy: each token is the argmax given the ones before
    assert torch.equal(greedy, model.logits(text, greedy)[1].argmax(-1))
    assert torch.equal(draw(5, top_p=0.0), greedy)
    guided = draw(0, top_k=1, guidance_scale=3.0)
    cond, uncond = model.logits(text, guided)[1], model.logits(torch.zeros_like(text), guided)[1]
    assert torch.equal(guided, (uncond + 3.0 * (cond - uncond)).argmax(-1))


def test_activation_checkpointing_gives_the_same_gradients():
    model = _model().train()
    batch = _batch(model.cfg)
    grads = []
    for enabled in (False, True):
        model.zero_grad()
        model.set_activation_checkpointing(enabled)
        model(batch)["loss"].backward()
        grads.append(model.blocks[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("name, target", [("12B", 12e9), ("1.3B", 1.3e9)])
def test_presets_build_on_meta(name, target):
    with torch.device("meta"):
        model = DALLE(PRESETS[name])
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - target) < 0.1 * target, count
    assert flops_per_sample(PRESETS[name]) > 6 * count * PRESETS[name].sequence_length * 0.9


def test_tiny_preset_runs():
    torch.manual_seed(0)
    cfg = PRESETS["tiny"]
    model = DALLE(cfg).eval()
    out = model(_batch(cfg, n=1))
    assert out["loss"].isfinite() and out["loss_text"] > 0 and out["loss_image"] > 0


def test_loss_falls_on_a_fixed_batch():
    model = _model(attention="sparse").train()
    batch = _batch(model.cfg, n=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(50):
        loss = model(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
