"""Benchmark section `near_duplicates`: perceptual hashing and the near-duplicate search on CIFAR-10's 60,000 images.

Reads the JPEG copy of CIFAR-10 (../shared/data/datasets/cifar10-jpeg.tar.gz
beside the project, or CIFAR10_JPEG=path), decodes every image at 32 px as
resize does, then times the hashing and the bucketed search of
imgcls/near_duplicates.py against two baselines: numpy comparing every pair
in blocks (all 1.8 billion), and a plain Python loop over pairs (measured on
the first 3,000 images, whose 4.5 million pairs it compares one at a time).
"""

import io
import os
import tarfile
import time
from pathlib import Path

import numpy as np

from imgcls.images import decode_image
from imgcls.near_duplicates import all_pairs, near_pairs, perceptual_hashes
from imgcls.params import load_params

ARCHIVE = Path(os.environ.get("CIFAR10_JPEG", Path(__file__).resolve().parents[2] / "shared/data/datasets/cifar10-jpeg.tar.gz"))
BASELINE_IMAGES = 3_000


def load_cifar10(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Every image of the archive decoded at `size` px, and its split folder (train or test)."""
    pixels, splits = [], []
    with tarfile.open(ARCHIVE) as archive:
        for member in archive:
            if member.isfile() and member.name.lower().endswith((".jpg", ".jpeg", ".png")):
                data = archive.extractfile(member).read()
                pixels.append(decode_image(io.BytesIO(data), size=size).pixels)
                splits.append("test" if "/test/" in f"/{member.name}" else "train")
    return np.stack(pixels), np.array(splits)


def python_loop_pairs(hashes: np.ndarray, max_distance: int) -> int:
    """The baseline: every pair compared one at a time in Python."""
    values = [int(value) for value in hashes]
    found = 0
    for first in range(len(values)):
        for second in range(first + 1, len(values)):
            found += (values[first] ^ values[second]).bit_count() <= max_distance
    return found


def run(workdir: Path) -> list[dict]:
    if not ARCHIVE.exists():
        print(f"({ARCHIVE} not found: near_duplicates section skipped)")
        return []
    distance = load_params(workdir / "params.yaml").resize.near_duplicate_distance
    pixels, splits = load_cifar10()
    started = time.perf_counter()
    hashes = perceptual_hashes(pixels)
    hash_seconds = time.perf_counter() - started
    started = time.perf_counter()
    first, second, _ = near_pairs(hashes, distance)
    search_seconds = time.perf_counter() - started
    started = time.perf_counter()
    every_pair = all_pairs(hashes, distance)
    all_pairs_seconds = time.perf_counter() - started
    if len(every_pair[0]) != len(first):
        raise SystemExit(f"the bucketed search found {len(first)} pairs, comparing every pair {len(every_pair[0])}")
    pairs = len(hashes) * (len(hashes) - 1) // 2
    started = time.perf_counter()
    python_loop_pairs(hashes[:BASELINE_IMAGES], distance)
    baseline_seconds = time.perf_counter() - started
    baseline_rate = BASELINE_IMAGES * (BASELINE_IMAGES - 1) / 2 / baseline_seconds
    across = int((splits[first] != splits[second]).sum())
    return [{
        "benchmark": f"near-duplicate search, CIFAR-10 ({len(hashes):,} images, distance <= {distance})",
        "value": f"{search_seconds:.2f} s (buckets); hashing {hash_seconds:.1f} s",
        "baseline": f"{all_pairs_seconds:.1f} s (numpy, every pair in blocks); {pairs / baseline_rate:.0f} s"
                    f" extrapolated (plain Python loop, {baseline_rate / 1e6:.1f} M pairs/s)",
        "ratio": f"{all_pairs_seconds / search_seconds:.0f}x; {pairs / baseline_rate / search_seconds:.0f}x",
        "note": f"{len(first):,} pairs found (the same by both searches), {across:,} of them across the official"
                " train and test splits",
    }]
