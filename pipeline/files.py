"""Small file helpers shared by runs, checkpoints, the run cache and precomputed shards: checksums
that recognise the weights and files a thing was made from, and JSON records written atomically."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def sha256_of(path: str | Path) -> str:
    """The sha256 hex digest of a file's contents, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: str | Path, value: dict) -> None:
    """Writes `value` as JSON under a temporary name, then renames it: a reader sees the old file
    or the whole new one, never half of it."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(value, indent=1))
    os.replace(temporary, path)
