"""Shard lists, shard sizes and raw samples read from webdataset tar shards.

A raw sample is the group of consecutive tar members sharing a key (`KEY.jpg`, `KEY.txt`,
`KEY.json`), the layout img2dataset writes. Reading never raises on bad data: a shard that cannot
be opened or ends early, and a sample with a member too large to hold, yield a `Skip` instead, so
the caller can count it.
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

# The largest tar member read into memory; a larger one is skipped unread. No image or precomputed
# member of a training sample comes near it; a damaged or hostile header can declare gigabytes.
MAX_MEMBER_BYTES = 64 * 2**20


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
    count: int = 1  # the samples it stands for


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
    """The sample count written beside a local shard: our `sizes.json` or img2dataset's `*_stats.json`.
    Raises ValueError naming the file when it is not JSON or its count is not a non-negative integer."""
    if not is_local(url):
        return None
    path = local_path(url)
    folder, name = os.path.split(path)
    sizes_file = os.path.join(folder, "sizes.json")
    if os.path.exists(sizes_file):
        sizes = _read_json_object(sizes_file)
        if name in sizes:
            return _sample_count(sizes[name], sizes_file, name)
    stats_file = os.path.join(folder, name.rsplit(".", 1)[0] + "_stats.json")
    if os.path.exists(stats_file):
        stats = _read_json_object(stats_file)
        if "successes" in stats:
            return _sample_count(stats["successes"], stats_file, "successes")
    return None


def _read_json_object(path: str) -> dict:
    try:
        with open(path) as handle:
            value = json.load(handle)
    except ValueError as error:  # not JSON, or not text
        raise ValueError(f"{path}: malformed shard sizes, not JSON ({error})") from error
    if not isinstance(value, dict):
        raise ValueError(f"{path}: malformed shard sizes, expected a JSON object, got {type(value).__name__}")
    return value


def _sample_count(value: object, path: str, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{path}: malformed shard sizes, {key!r} must be a sample count (an integer >= 0), "
                         f"got {value!r}")
    return value


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


def iter_raw_samples(url: str, skip: int = 0, headers_only: bool = False,
                     max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[RawSample | Skip]:
    """Yields the shard's raw samples in tar order, after dropping the first `skip` of them; each
    item stands for one sample of the shard.

    A sample with a member larger than `max_member_bytes` yields Skip('oversized_member') without
    that member being read. A shard that cannot be opened yields Skip('missing_shard'); one that
    ends in the middle, or without the end-of-archive marker, yields the complete samples before
    the damage, then Skip('truncated_tar'), standing for the sample being read (the first one
    after `skip` when the damage lies before it). Nothing follows either."""
    try:
        stream = open_shard(url)
    except OSError as error:
        yield Skip("missing_shard", url, detail=str(error))
        return
    current: RawSample | None = None
    oversized: Skip | None = None  # why `current` is not read, once one of its members was too large
    seen = 0
    try:
        # Counting keys of a local file can seek past member data; everything else streams.
        mode = "r:*" if headers_only and is_local(url) else "r|*"
        with stream, tarfile.open(fileobj=stream, mode=mode, tarinfo=_EndMarkedTarInfo) as tar:
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
                            yield oversized or current
                    current, oversized = RawSample(key, url), None
                if seen < skip or headers_only or oversized:
                    continue
                if member.size > max_member_bytes:  # left unread: the tar reader steps over its data
                    oversized = Skip("oversized_member", url, key,
                                     f"{member.name}: {member.size} bytes > {max_member_bytes}")
                    current.files.clear()
                    continue
                handle = tar.extractfile(member)
                data = handle.read() if handle else b""
                if len(data) != member.size:  # a streamed tar can end mid-member without an error
                    raise EOFError(f"{member.name}: {len(data)} of {member.size} bytes")
                current.files[extension] = data
    except (tarfile.TarError, EOFError, OSError, ValueError) as error:
        # The sample being read when the data ended is damaged: the skip stands for it.
        key = current.key if current is not None and seen >= skip else ""
        yield Skip("truncated_tar", url, key=key, detail=str(error) or type(error).__name__)
        return
    if current is not None and seen >= skip:
        yield oversized or current


class _EndMarkedTarInfo(tarfile.TarInfo):
    """Tar headers for which only the end-of-archive marker (a zero block) ends the archive:
    tarfile itself also ends quietly where the data ends at a member boundary or a header is
    damaged, which would drop the rest of a cut shard without a word."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:  # the marker
            raise
        except tarfile.HeaderError as error:
            raise tarfile.ReadError(f"no end-of-archive marker at byte {tar.offset}: {error}") from None
