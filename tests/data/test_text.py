"""Caption tokenizers: the word-list tokenizer the shapes configs use, and vocabulary sizes."""
import os

import pytest
import torch

from pipeline.data import shapes
from pipeline.data.text import make_tokenizer, portable, vocab_size

WORDS = "configs/tokenizers/shapes-words.txt"


def test_word_list_tokenizer_pads_truncates_and_marks_unknown_words():
    tokenize = make_tokenizer(f"words:{WORDS}", 6)
    tokens = tokenize(["A small red circle", "a purple hexagon!", "a large blue square above a small green triangle"])
    words = open(WORDS).read().split()
    assert tokens.shape == (3, 6) and tokens.dtype == torch.long
    assert tokens[0].tolist() == [words.index(w) + 2 for w in ("a", "small", "red", "circle")] + [0, 0]
    assert tokens[1].tolist() == [words.index("a") + 2, words.index("purple") + 2, 1, 0, 0, 0]  # 1: unknown
    assert (tokens[2] > 1).all()  # truncated to 6 known words
    assert vocab_size(f"words:{WORDS}") == len(words) + 2 == 22


def test_the_shapes_word_list_covers_every_caption_the_generator_writes():
    tokenize = make_tokenizer(f"words:{WORDS}", 16)
    captions = [shapes.generate(i, 0, 64).caption for i in range(300)]
    tokens = tokenize(captions)
    assert not (tokens == 1).any() and (tokens[:, -1] == 0).all()  # no unknown word, room to spare


def test_a_transformers_tokenizer_pads_with_zero_whatever_its_pad_id(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"the": 0, "<pad>": 1, "[UNK]": 2, "a": 3, "red": 4, "circle": 5}  # pad id 1, like RoBERTa's
    words = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", unk_token="[UNK]").save_pretrained(tmp_path)
    tokens = make_tokenizer(f"hf:{tmp_path}", 5)(["a red circle", "the blue"])
    assert tokens.tolist() == [[4, 5, 6, 0, 0], [1, 3, 0, 0, 0]]  # each id + 1; only padding is 0
    assert vocab_size(f"hf:{tmp_path}") == 7


def test_a_word_list_spec_is_made_absolute_for_the_manifest(tmp_path):
    spec = portable(f"words:{WORDS}")
    assert spec == f"words:{os.path.abspath(WORDS)}" and portable("open_clip:ViT-B-32") == "open_clip:ViT-B-32"
    with pytest.raises(FileNotFoundError, match="no such word list"):
        make_tokenizer(f"words:{tmp_path / 'missing.txt'}", 8)
    with pytest.raises(ValueError, match="words:FILE"):
        vocab_size("bpe:thing")


def test_pretokenize_checks_its_tokenizer_before_any_work(tmp_path):
    from pipeline.config import load_config
    from stages import pretokenize

    base = [f"out_dir={tmp_path / 'out'}", f"shards={tmp_path / 'none'}", f"autoencoder={tmp_path / 'none'}"]
    for spec, error in ((f"words:{tmp_path / 'missing.txt'}", "no such word list"), ("bpe:thing", "words:FILE"),
                        ("open_clip", "words:FILE")):
        with pytest.raises((ValueError, FileNotFoundError), match=error):
            load_config(pretokenize.Config, None, [*base, f"tokenizer={spec}"])
    assert load_config(pretokenize.Config, None, [*base, f"tokenizer=words:{WORDS}"]).tokenizer == f"words:{WORDS}"
    assert not (tmp_path / "out").exists()
