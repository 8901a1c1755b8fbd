"""Caption tokenizers, built from a short spec string so loader workers can make their own."""
from __future__ import annotations

from typing import Callable

import torch

Tokenize = Callable[[list[str]], torch.Tensor]


def make_tokenizer(spec: str, length: int) -> Tokenize:
    """`open_clip:MODEL` (open_clip's BPE, ships with the package, works offline) or `hf:PATH`
    (a transformers tokenizer saved in a local folder). Returns a function from captions to a
    (len(captions), length) LongTensor, padded and truncated."""
    kind, _, name = spec.partition(":")
    if kind == "open_clip":
        import open_clip

        tokenizer = open_clip.get_tokenizer(name, context_length=length)
        return lambda captions: tokenizer(captions).long()
    if kind == "hf":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
        return lambda captions: tokenizer(captions, padding="max_length", truncation=True, max_length=length,
                                          return_tensors="pt").input_ids.long()
    raise ValueError(f"tokenizer must look like 'open_clip:ViT-B-32' or 'hf:/path/to/tokenizer', got {spec!r}")
