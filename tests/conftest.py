import io
import subprocess
import sys
import tarfile
from pathlib import Path

import PIL.Image
import pytest


def jpeg_bytes(colour=(200, 30, 30), size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", size, colour).save(buffer, "JPEG")
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar shard with exactly these members, in this order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def sample_members(key: str, caption: str | None = "a red square", image: bytes | None = None) -> list:
    members = [(f"{key}.jpg", jpeg_bytes() if image is None else image)]
    if caption is not None:
        members.append((f"{key}.txt", caption.encode()))
    members.append((f"{key}.json", b"{}"))
    return members


@pytest.fixture
def make_shards(tmp_path):
    """make_shards([3, 5, 1]) writes shards of those many good samples; returns their paths."""
    def make(sizes: list[int], folder: str = "shards") -> list[str]:
        root = tmp_path / folder
        root.mkdir(exist_ok=True)
        paths = []
        for shard, size in enumerate(sizes):
            members = []
            for index in range(size):
                members += sample_members(f"s{shard:03d}_{index:04d}", f"caption {shard} {index}",
                                          jpeg_bytes((shard * 40 % 256, index * 7 % 256, 90)))
            paths.append(str(write_tar(root / f"{shard:05d}.tar", members)))
        return paths
    return make


def t2i_run(path: Path, *args: str) -> subprocess.CompletedProcess:
    """`t2i run PIPELINE ARGS` in its own process."""
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(path), *args],
                          capture_output=True, text=True, timeout=600)


def stages_started(result: subprocess.CompletedProcess, pipeline: str = "p") -> list[str]:
    """The stages a `t2i run` of pipeline `pipeline` started, in order (from its "log" lines)."""
    return [line.split()[1].rstrip(":") for line in result.stdout.splitlines()
            if line.startswith(f"[{pipeline}] ") and line.endswith("log.txt") and " log " in line]
