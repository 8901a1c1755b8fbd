"""Caption tokenizers, built from a short spec string so loader workers can make their own."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import torch

Tokenize = Callable[[list[str]], torch.Tensor]


def make_tokenizer(spec: str, length: int) -> Tokenize:
    """`open_clip:MODEL` (open_clip's BPE, ships with the package, works offline), `hf:PATH` (a
    transformers tokenizer saved in a local folder; its ids shifted up by one, so that 0 is the
    padding whatever the tokenizer's pad id) or `words:FILE` (a word list, one per line: word
    i is token i + 2, 0 pads, 1 is any other word; for small-vocabulary data such as the shapes).
    Returns a function from captions to a (len(captions), length) LongTensor, padded with 0 and
    truncated: the priors treat 0, and only 0, as padding."""
    check_tokenizer(spec)
    kind, _, name = spec.partition(":")
    if kind == "words":
        ids = {word: i for i, word in enumerate(_word_list(name), 2)}
        return lambda captions: _pad([[ids.get(word, 1) for word in _WORD.findall(c.lower())] for c in captions], length)
    if kind == "open_clip":
        import open_clip

        tokenizer = open_clip.get_tokenizer(name, context_length=length)
        return lambda captions: tokenizer(captions).long()
    from transformers import AutoTokenizer  # kind == "hf"

    tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)

    def tokenize(captions: list[str]) -> torch.Tensor:
        encoded = tokenizer(captions, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
        return (encoded.input_ids.long() + 1).masked_fill(encoded.attention_mask == 0, 0)
    return tokenize


def check_tokenizer(spec: str) -> None:
    """Raises the error make_tokenizer would for a malformed spec or a missing word list, without
    loading a tokenizer library, so that a config is checked before any work starts."""
    kind, _, name = spec.partition(":")
    if kind not in ("open_clip", "hf", "words") or not name:
        raise ValueError(f"tokenizer must look like 'open_clip:ViT-B-32', 'hf:/path/to/tokenizer' or 'words:FILE', got {spec!r}")
    if kind == "words":
        _word_list(name)


def vocab_size(spec: str) -> int:
    """The number of token ids the tokenizer `spec` (as for make_tokenizer) can produce."""
    check_tokenizer(spec)
    kind, _, name = spec.partition(":")
    if kind == "words":
        return len(_word_list(name)) + 2
    if kind == "open_clip":
        import open_clip

        return open_clip.get_tokenizer(name).vocab_size
    from transformers import AutoTokenizer  # kind == "hf"

    return len(AutoTokenizer.from_pretrained(name, local_files_only=True)) + 1  # the ids shifted by one, 0 pads


def portable(spec: str) -> str:
    """The spec with a word list's path made absolute, so that it reads the same from any folder."""
    kind, _, name = spec.partition(":")
    return f"words:{Path(name).resolve()}" if kind == "words" else spec


_WORD = re.compile(r"[a-z0-9]+")


def _word_list(path: str) -> list[str]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"tokenizer words:{path}: no such word list")
    return Path(path).read_text().split()


def _pad(rows: list[list[int]], length: int) -> torch.Tensor:
    tokens = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, :len(row[:length])] = torch.tensor(row[:length], dtype=torch.long)
    return tokens


def save_clip_tokenizer(spec: str, length: int, folder: str | Path) -> None:
    """Writes a transformers `CLIPTokenizer` to `folder` that gives the ids `make_tokenizer(spec,
    length)` gives, padding and the empty caption included: from open_clip's BPE vocabulary (which
    ships with the package: offline) for `open_clip:` specs, padded with id 0 as open_clip pads;
    a copy of the tokenizer for `hf:` specs is refused, its ids being shifted here."""
    kind, _, _ = spec.partition(":")
    if kind != "open_clip":
        raise ValueError(f"a CLIP tokenizer can be written for open_clip: tokenizers only, not {spec!r}")
    import gzip
    import json

    import open_clip
    from open_clip.tokenizer import SimpleTokenizer, bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    if not isinstance(open_clip.get_tokenizer(spec.partition(":")[2]), SimpleTokenizer):
        raise ValueError(f"{spec!r} is not open_clip's CLIP BPE tokenizer: no CLIP tokenizer can be written for it")

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    units = list(bytes_to_unicode().values())
    vocab = [*units, *(unit + "</w>" for unit in units), *("".join(merge.split()) for merge in merges),
             "<|startoftext|>", "<|endoftext|>"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    pad = vocab[0]  # open_clip pads with id 0
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad, model_max_length=length)
    tokenizer.save_pretrained(folder)
