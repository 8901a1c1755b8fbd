"""Precomputed shards: what an encoding stage (pretokenize, and the latent and CLIP-embedding stages
of the diffusion families) writes for later stages to train on, and how those stages read it.

Each input shard NAME.tar becomes NAME.tar holding, per sample, `KEY.txt` (the caption) and one
`.npy` file per member the encoder declared, e.g. `image_tokens: uint16[64]` in `KEY.image.npy`,
`latent: float16[4,8,8]` in `KEY.latent.npy`. `manifest.json` beside the shards records:

- `members`: name -> dtype, shape and file of each member;
- `producer`: what made the values (`weights_sha256` of the encoder run's final weights, its
  stage, the tokenizer and caption length); a consumer names the run it needs, and shards made by
  another are refused;
- `info`: facts about the values a consumer needs (the code grids and codebook size of token shards);
- `statistics`: per float member, the count, mean and standard deviation of all its values (for
  latents, the scale factor comes from them);
- the source shards, samples per shard and skipped samples by reason.

Integer members declare the largest value they can hold (`max_value`): one that does not fit the
member's dtype is refused before any shard is written.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from pipeline.data.samples import caption_of
from pipeline.data.tars import RawSample, Skip, expand_shards
from pipeline.files import sha256_of

MANIFEST = "manifest.json"
RUN_MANIFEST = "data-manifest.json"  # a training run's copy of the manifest of the shards it read
_FLOAT16_MAX = 65504.0


@dataclass(frozen=True)
class Member:
    """One array per sample: its dtype (a numpy name), shape, file suffix (KEY.<file>) and, for
    integers, the largest value its producer can make."""

    dtype: str
    shape: tuple[int, ...]
    file: str
    max_value: int | None = None

    def describe(self) -> str:
        return f"{self.dtype}[{','.join(map(str, self.shape))}]"

    def check_declared(self, name: str) -> None:
        """Raises ValueError when the declared range does not fit the dtype."""
        kind = np.dtype(self.dtype)
        if kind.kind in "iu" and self.max_value is not None and self.max_value > np.iinfo(kind).max:
            raise ValueError(f"member {name} ({self.describe()}): values up to {self.max_value} do not fit "
                             f"{self.dtype} (at most {np.iinfo(kind).max})")

    def check_values(self, name: str, values: torch.Tensor) -> None:
        """Raises ValueError when a batch (B, *shape) has another shape or values the dtype cannot hold."""
        if tuple(values.shape[1:]) != self.shape:
            raise ValueError(f"member {name}: expected {self.describe()} per sample, got shape {tuple(values.shape[1:])}")
        kind = np.dtype(self.dtype)
        if kind.kind in "iu":
            low, high = np.iinfo(kind).min, np.iinfo(kind).max
            if values.numel() and (int(values.min()) < low or int(values.max()) > high):
                raise ValueError(f"member {name}: value {int(values.max()) if int(values.max()) > high else int(values.min())} "
                                 f"does not fit {self.dtype} ({low}..{high})")
        elif not bool(torch.isfinite(values).all()) or (self.dtype == "float16" and float(values.abs().max()) > _FLOAT16_MAX):
            raise ValueError(f"member {name}: non-finite values, or values beyond float16's range ({_FLOAT16_MAX})")

    def to_bytes(self, values: torch.Tensor) -> bytes:
        buffer = io.BytesIO()
        np.save(buffer, values.detach().cpu().numpy().astype(self.dtype), allow_pickle=False)
        return buffer.getvalue()

    def from_bytes(self, data: bytes) -> torch.Tensor:
        """The member's array as a tensor: integers as int64 (indices), floats as float32."""
        array = np.load(io.BytesIO(data), allow_pickle=False)
        if array.dtype != np.dtype(self.dtype) or array.shape != self.shape:
            raise ValueError(f"expected {self.describe()}, got {array.dtype}[{','.join(map(str, array.shape))}]")
        return torch.from_numpy(array.astype(np.int64 if array.dtype.kind in "iu" else np.float32))

    def as_dict(self) -> dict:
        return {"dtype": self.dtype, "shape": list(self.shape), "file": self.file, "max_value": self.max_value}


def members_of(manifest: dict) -> dict[str, Member]:
    return {name: Member(spec["dtype"], tuple(spec["shape"]), spec["file"], spec.get("max_value"))
            for name, spec in manifest["members"].items()}


def sample_members(caption: str, values: dict[str, torch.Tensor], members: dict[str, Member]) -> dict[str, bytes]:
    """The tar members of one precomputed sample (without its key): the caption and each member."""
    return {"txt": caption.encode("utf-8"), **{members[name].file: members[name].to_bytes(value)
                                               for name, value in values.items()}}


def precomputed_sample(item: RawSample, members: dict[str, Member]) -> dict | Skip:
    """{caption, key, valid, and each member as a tensor}, or why the sample is unusable."""
    if any(member.file not in item.files for member in members.values()):
        return Skip("missing_member", item.shard, item.key)
    caption = caption_of(item)
    if isinstance(caption, Skip):
        return caption
    sample: dict = {"caption": caption, "key": item.key, "valid": True}
    for name, member in members.items():
        try:
            sample[name] = member.from_bytes(item.files[member.file])
        except (ValueError, OSError) as error:
            return Skip("decode_error", item.shard, item.key, f"{name}: {error}")
    return sample


def manifest_path(shards: str) -> Path:
    return Path(expand_shards(shards)[0]).parent / MANIFEST


def read_manifest(shards: str) -> dict:
    """The manifest beside precomputed shards (one written before members were declared is read
    as the token shards it describes)."""
    path = manifest_path(shards)
    if not path.exists():
        raise FileNotFoundError(f"{shards!r}: no {MANIFEST} beside the shards; were they written by a "
                                "precompute stage such as pretokenize?")
    manifest = json.loads(path.read_text())
    return manifest if "members" in manifest else _upgrade_token_manifest(manifest)


def record_manifest(shards: str, run_folder: str | Path) -> None:
    """Copies the shards' manifest into a training run's folder (RUN_MANIFEST), so that the run
    samples and exports with what it trained on after its shards are moved or deleted."""
    target = Path(run_folder) / RUN_MANIFEST
    partial = target.with_name(target.name + ".tmp")
    partial.write_text(json.dumps(read_manifest(shards), indent=1))
    partial.replace(target)


def require(shards: str, members: Iterable[str], producer_run: str | Path | None,
            trained_run: str | Path | None = None) -> dict:
    """The manifest of precomputed shards, after checking they hold `members` and were made by the
    trained run in folder `producer_run` (the sha256 of its final weights); a ValueError saying
    what differs and how to fix it otherwise. For a run trained on them (`trained_run`), the copy
    its training recorded is checked when it has one, rather than whatever the shards' folder holds now."""
    recorded = Path(trained_run) / RUN_MANIFEST if trained_run is not None else None
    if recorded is not None and recorded.exists():
        manifest, where = json.loads(recorded.read_text()), f"the shards {trained_run} trained on (its {RUN_MANIFEST})"
    else:
        manifest, where = read_manifest(shards), f"the shards in {manifest_path(shards).parent}"
    missing = sorted(set(members) - set(manifest["members"]))
    if missing:
        held = ", ".join(f"{name} {member.describe()}" for name, member in members_of(manifest).items())
        raise ValueError(f"{where} hold {held}; this stage needs {', '.join(missing)} too")
    if producer_run is not None:
        weights = Path(producer_run) / "final" / "model.safetensors"
        actual = sha256_of(weights) if weights.exists() else "(missing)"
        made_by = manifest["producer"]["weights_sha256"]
        if made_by != actual:
            raise ValueError(f"{where} were made by a {manifest['producer']['stage']} run with weights "
                             f"sha256 {made_by[:12]}..., "
                             f"but {str(producer_run)!r} has {actual[:12]}...: re-run the stage that made them with this "
                             "run, or point to the one that made them")
    return manifest


def split_codes(codes: torch.Tensor, grids: list[int]) -> list[torch.Tensor]:
    """Token shards' image_tokens (B, sum of side ** 2), every grid of the autoencoder flattened in
    raster order and concatenated (VQ-VAE-2: top, then bottom) -> one (B, side, side) grid per side."""
    return [part.view(-1, side, side) for part, side in zip(codes.split([side ** 2 for side in grids], 1), grids)]


def _upgrade_token_manifest(old: dict) -> dict:
    codes = sum(side ** 2 for side in old["code_grids"])
    return {"members": {"text_tokens": Member("uint16", (old["text_length"],), "text.npy").as_dict(),
                        "image_tokens": Member("uint16", (codes,), "image.npy", old["codebook_size"] - 1).as_dict()},
            "producer": {"weights_sha256": old["autoencoder_sha256"], "stage": old["autoencoder_stage"],
                         "tokenizer": old["tokenizer"], "text_length": old["text_length"]},
            "info": {"code_grids": old["code_grids"], "codebook_size": old["codebook_size"], "autoencoder": old["autoencoder"]},
            "statistics": {}, **{key: old[key] for key in ("source_shards", "samples", "skipped")}}

