import pytest
import torch

from pipeline.models.vqvae2 import VQVAE2, VQVAE2Config

SIZE = 32
TINY = {"image_size": SIZE, "channels": 16, "res_blocks": 1, "res_channels": 8, "code_dim": 8, "codebook_size": 32}



def _tiny(**overrides) -> VQVAE2:
    torch.manual_seed(0)
    return VQVAE2(VQVAE2Config(**{**TINY, **overrides}))


def _images(n: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, SIZE, SIZE, generator=g) * 2 - 1


def test_encode_shapes_and_round_trip():
    model = _tiny()
    assert model.top_side == 4 and model.bottom_side == 8
    top, bottom = model.encode(_images())
    assert top.shape == (2, 4, 4) and bottom.shape == (2, 8, 8)
    assert top.dtype == bottom.dtype == torch.long and top.max() < 32 and bottom.max() < 32
    images = model.decode(top, bottom)
    assert images.shape == (2, 3, SIZE, SIZE) and -1 <= images.min() and images.max() <= 1
    assert torch.equal(model.reconstruct(_images()), images)


def test_decoding_depends_on_the_top_codes():
    model = _tiny().eval()
    top, bottom = model.encode(_images())
    other_top = (top + 1) % 32
    assert not torch.allclose(model.decode(top, bottom), model.decode(other_top, bottom), atol=1e-4)


def test_bottom_codes_are_conditioned_on_the_top():
    model = _tiny().eval()
    with torch.no_grad():
        h_bottom = model.encoder_bottom(_images())
        top, _ = model.encode(_images())
        z_top = model.quantizer_top.lookup(top)
        a = model._bottom_latent(h_bottom, z_top)
        b = model._bottom_latent(h_bottom, model.quantizer_top.lookup((top + 1) % 32))
    assert a.shape == (2, 8, 8, 8) and not torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("ema, beta", [(False, 0.25), (True, 0.0)])
def test_gradients_reach_both_encoders(ema, beta):
    """With EMA and beta = 0 the loss is the reconstruction alone: the encoders learn only through
    the straight-through paths of both levels."""
    model = _tiny(ema=ema, beta=beta)
    out = model({"image": _images(), "valid": torch.ones(2, dtype=torch.bool)})
    assert {"loss", "recon", "vq_top", "vq_bottom", "psnr", "perplexity_top", "perplexity_bottom",
            "dead_codes_top", "dead_codes_bottom"} == set(out)
    assert all(not v.requires_grad for k, v in out.items() if k != "loss")
    out["loss"].backward()
    modules = [model.encoder_bottom, model.encoder_top, model.decoder_top, model.upsample_top, model.decoder]
    if not ema:
        modules += [model.quantizer_top, model.quantizer_bottom]
    for module in modules:
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(g.abs().sum() for g in grads) > 0
