"""Shard lists, shard sizes and raw samples read from webdataset tar shards.

A raw sample is the group of consecutive tar members sharing a key (`KEY.jpg`, `KEY.txt`,
`KEY.json`), the layout img2dataset writes. Reading never raises on bad data: a shard that cannot
be opened or ends early yields a `Skip` event instead, so the caller can count it.
"""
from __future__ import annotations

import json
import os
import re
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator

import webdataset

_KEY_AND_EXTENSION = re.compile(r"^((?:.*/|)[^./][^.]*)\.([^/]*)$")


@dataclass
class RawSample:
    """One key's members, still undecoded."""

    key: str
    shard: str
    files: dict[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class Skip:
    """Something that was not turned into a sample, and why."""

    reason: str
    shard: str
    key: str = ""
    detail: str = ""


def whole_second_mtime() -> int:
    """The mtime our writers give tar members (webdataset's `mtime=`): now, in whole seconds.
    webdataset's default is a float, and tarfile stores a float mtime in a pax header before every
    member, which doubles the headers readers parse: token shards read 2.9x slower, at twice the size."""
    return int(time.time())


def expand_shards(pattern: str) -> list[str]:
    """Expands '::'-separated brace patterns (`data-{00000..00099}.tar`) into shard URLs; a local
    folder stands for the `.tar` files in it. Local paths, `pipe:` commands and anything else
    webdataset.gopen opens are kept as given."""
    urls: list[str] = []
    for part in pattern.split("::"):
        part = part.strip()
        if part and os.path.isdir(part):
            urls.extend(sorted(str(path) for path in Path(part).glob("*.tar")))
        elif part:
            urls.extend(webdataset.shardlists.expand_urls(part))
    if not urls:
        raise ValueError(f"no shards in pattern {pattern!r}")
    return urls


def is_local(url: str) -> bool:
    """Whether a shard URL is a file on this machine (a path or file:)."""
    return not re.match(r"^[a-z][a-z0-9+]*:", url) or url.startswith("file:")


def local_path(url: str) -> str:
    """The file path of a local shard URL."""
    return url[len("file:"):] if url.startswith("file:") else url


def open_shard(url: str) -> IO[bytes]:
    """Opens a shard as a byte stream: local file, `pipe:CMD`, http(s), or any gopen scheme."""
    if is_local(url):
        return open(local_path(url), "rb")
    return webdataset.gopen(url, "rb")


def _declared_sizes(url: str) -> int | None:
    """The sample count written beside a local shard: our `sizes.json` or img2dataset's `*_stats.json`."""
    if not is_local(url):
        return None
    path = local_path(url)
    folder, name = os.path.split(path)
    sizes_file = os.path.join(folder, "sizes.json")
    if os.path.exists(sizes_file):
        with open(sizes_file) as handle:
            sizes = json.load(handle)
        if name in sizes:
            return int(sizes[name])
    stats_file = os.path.join(folder, name.rsplit(".", 1)[0] + "_stats.json")
    if os.path.exists(stats_file):
        with open(stats_file) as handle:
            stats = json.load(handle)
        if "successes" in stats:
            return int(stats["successes"])
    return None


def shard_size(url: str) -> tuple[int, str | None]:
    """Number of complete raw samples (keys) in a shard, and the problem found while counting:
    None, 'missing_shard' or 'truncated_tar'.

    Uses a declared size when there is one (then damage is found later, while reading), else
    counts keys in the tar headers."""
    declared = _declared_sizes(url)
    if declared is not None:
        return declared, None
    count = 0
    for item in iter_raw_samples(url, headers_only=True):
        if isinstance(item, Skip):
            return count, item.reason
        count += 1
    return count, None


def iter_raw_samples(url: str, skip: int = 0, headers_only: bool = False) -> Iterator[RawSample | Skip]:
    """Yields the shard's raw samples in tar order, after dropping the first `skip` of them.

    A shard that cannot be opened yields Skip('missing_shard'); one that ends in the middle yields
    the complete samples before the damage, then Skip('truncated_tar')."""
    try:
        stream = open_shard(url)
    except OSError as error:
        yield Skip("missing_shard", url, detail=str(error))
        return
    current: RawSample | None = None
    seen = 0
    try:
        # Counting keys of a local file can seek past member data; everything else streams.
        mode = "r:*" if headers_only and is_local(url) else "r|*"
        with stream, tarfile.open(fileobj=stream, mode=mode) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                match = _KEY_AND_EXTENSION.match(member.name)
                if not match:
                    continue
                key, extension = match.group(1), match.group(2).lower()
                if current is None or key != current.key:
                    if current is not None:
                        seen += 1
                        if seen > skip:
                            yield current
                    current = RawSample(key, url)
                if seen >= skip and not headers_only:
                    handle = tar.extractfile(member)
                    data = handle.read() if handle else b""
                    if len(data) != member.size:  # a streamed tar can end mid-member without an error
                        raise EOFError(f"{member.name}: {len(data)} of {member.size} bytes")
                    current.files[extension] = data
    except (tarfile.TarError, EOFError, OSError, ValueError) as error:
        # The sample being read when the data ended is damaged: the skip event stands for it.
        yield Skip("truncated_tar", url, key=current.key if current else "", detail=str(error) or type(error).__name__)
        return
    if current is not None and seen + 1 > skip:
        yield current
