"""Loader throughput against a plain PIL decode-and-resize loop over the same images.

Not a test. Writes synthetic shapes shards, then times (a) StreamingLoader reading them with N
workers and (b) N processes that decode and resize the same JPEG bytes with PIL, already in
memory (no tar parsing, no batching, no tensors): the physical bound for this decode work.
Prints both rates and the ratio (aim: >= 0.9).

    python benchmarks/data.py --count 3000 --source-resolution 256 --resolution 64 --workers 2
"""
from __future__ import annotations

import argparse
import io
import tarfile
import tempfile
import time
from multiprocessing import Pool

import PIL.Image

from pipeline.data.build import shapes_examples, write_shards
from pipeline.data.loader import DataConfig, StreamingLoader


def _plain_decode(args: tuple[bytes, int]) -> int:
    data, resolution = args
    image = PIL.Image.open(io.BytesIO(data)).convert("RGB")
    width, height = image.size
    scale = resolution / min(width, height)
    image = image.resize((round(width * scale), round(height * scale)), PIL.Image.BICUBIC)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution)).size[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--source-resolution", type=int, default=256)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        shards = write_shards(shapes_examples(args.count, args.source_resolution, seed=0), folder, 500, args.count)
        images = []
        for shard in shards:
            with tarfile.open(shard) as tar:
                images += [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")]

        cfg = DataConfig(shards=folder, resolution=args.resolution, batch_size=args.batch_size,
                         num_workers=args.workers, shuffle_buffer=256)
        loader = StreamingLoader(cfg)
        start = time.perf_counter()
        seen = sum(int(batch["valid"].sum()) for batch in loader.epoch_batches())
        loader_rate = seen / (time.perf_counter() - start)

        with Pool(max(1, args.workers)) as pool:
            pool.map(_plain_decode, [(images[0], args.resolution)] * 8)  # start the processes first
            start = time.perf_counter()
            pool.map(_plain_decode, [(data, args.resolution) for data in images], chunksize=64)
            plain_rate = len(images) / (time.perf_counter() - start)

    print(f"images: {len(images)} JPEG {args.source_resolution}px -> {args.resolution}px, {args.workers} worker(s)")
    print(f"StreamingLoader (tar + decode + batch): {loader_rate:8.1f} images/s  (worker start-up included)")
    print(f"plain PIL decode-and-resize loop:       {plain_rate:8.1f} images/s  (bytes already in memory)")
    print(f"ratio: {loader_rate / plain_rate:.2f}")


if __name__ == "__main__":
    main()
