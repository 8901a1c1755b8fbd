import torch

from pipeline.models.guidance import drop_captions, guide, with_null_captions


def _captions() -> torch.Tensor:
    text = torch.randint(1, 50, (64, 6), generator=torch.Generator().manual_seed(0))
    text[:, 4:] = 0
    return text


def test_drop_captions_blanks_whole_rows_with_one_draw_per_row():
    text = _captions()
    torch.manual_seed(1)
    dropped = drop_captions(text, 0.5)
    torch.manual_seed(1)
    expected = torch.rand(64) < 0.5  # the same single draw, so training runs reproduce
    assert torch.equal((dropped == 0).all(1), expected)
    assert torch.equal(dropped[~expected], text[~expected])
    assert 0 < int(expected.sum()) < 64
    assert (drop_captions(text, 1.0) == 0).all()


def test_drop_captions_at_zero_probability_draws_nothing():
    text = _captions()
    torch.manual_seed(2)
    assert drop_captions(text, 0.0) is text
    after = torch.rand(3)
    torch.manual_seed(2)
    assert torch.equal(after, torch.rand(3))


def test_with_null_captions_appends_all_padding_rows():
    text = _captions()
    doubled = with_null_captions(text)
    assert doubled.shape == (128, 6)
    assert torch.equal(doubled[:64], text) and (doubled[64:] == 0).all()


def test_guide():
    cond, uncond = torch.tensor([[1.0, 3.0]]), torch.tensor([[2.0, 0.0]])
    assert torch.equal(guide(cond, uncond, 1.0), cond)
    assert torch.equal(guide(cond, uncond, 0.0), uncond)
    assert torch.equal(guide(cond, uncond, 3.0), torch.tensor([[-1.0, 9.0]]))  # uncond + 3 (cond - uncond)
