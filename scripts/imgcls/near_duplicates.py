"""Near-duplicate images: a perceptual hash of each resized image, and the pairs whose hashes are close.

The hash is a DCT hash (pHash): the image in grey, averaged down to 32 x 32,
its 8 x 8 lowest-frequency DCT coefficients, and one bit per coefficient
saying whether it is above their median. A JPEG re-encode, a resize or a
small crop changes few of the 64 bits; two different photos differ in about
half. Two images are near-duplicates when their hashes differ in at most
`max_distance` bits (the Hamming distance).

Resampling and the DCT are one matrix on each side, so hashing is two matrix
products per image. The search never compares every pair: split into
max_distance + 1 chunks of bits, two hashes that differ in at most
max_distance bits agree exactly on at least one chunk (the pigeonhole
principle), so only hashes that share a chunk's value (a bucket, found by
sorting on it) are compared, all in numpy. For large distances, where buckets
grow too coarse, every pair is compared in blocks of XOR and bit counts.
"""

import numpy as np

HASH_SIDE = 32  # the grey image the DCT is taken of
LOW_FREQUENCIES = 8  # 8 x 8 coefficients: a 64-bit hash
# Pairs compared per block of the all-pairs search (bounds its memory: 8 bytes each for the XOR).
BLOCK_PAIRS = 1 << 22
# Up to this distance the search goes through buckets: chunks of at least 64 / 8 = 8 bits.
BUCKETED_UP_TO = 7
# ITU-R BT.601 luma weights, as Pillow's convert("L").
GREY_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _area_resampling(size: int, side: int) -> np.ndarray:
    """(side, size) matrix averaging `size` pixels into `side` cells, each pixel weighed by its overlap."""
    edges = np.linspace(0, size, side + 1)
    starts, ends = np.arange(size), np.arange(size) + 1
    overlap = np.clip(np.minimum(ends[None, :], edges[1:, None]) - np.maximum(starts[None, :], edges[:-1, None]), 0, None)
    return overlap / overlap.sum(axis=1, keepdims=True)


def _dct_basis(count: int, side: int) -> np.ndarray:
    """The first `count` rows of the orthonormal DCT-II matrix of length `side`."""
    frequency, position = np.arange(count)[:, None], np.arange(side)[None, :]
    basis = np.cos(np.pi * (2 * position + 1) * frequency / (2 * side)) * np.sqrt(2 / side)
    basis[0] /= np.sqrt(2)
    return basis


def perceptual_hashes(images: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """The 64-bit DCT hash of each (N, size, size, 3) uint8 image, as an (N,) uint64 array."""
    size = images.shape[1]
    # Averaging to 32 x 32 then taking the low frequencies is one (8, size) matrix per side.
    projection = (_dct_basis(LOW_FREQUENCIES, HASH_SIDE) @ _area_resampling(size, HASH_SIDE)).astype(np.float32)
    hashes = np.empty(len(images), dtype=np.uint64)
    for start in range(0, len(images), chunk):
        grey = np.asarray(images[start:start + chunk], dtype=np.float32) @ GREY_WEIGHTS
        coefficients = (projection @ grey @ projection.T).reshape(len(grey), -1)
        bits = coefficients > np.median(coefficients, axis=1, keepdims=True)
        hashes[start:start + chunk] = np.packbits(bits, axis=1).view(">u8").ravel()
    return hashes


def near_pairs(hashes: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first, second, distance) of every pair first < second whose hashes differ in at most `max_distance` bits."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    if max_distance <= BUCKETED_UP_TO:
        return bucketed_pairs(hashes, max_distance)
    return all_pairs(hashes, max_distance)


def bucketed_pairs(hashes: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """near_pairs by the pigeonhole principle: compare only hashes that agree on one of max_distance + 1 chunks."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    found = [], []
    bounds = np.linspace(0, 64, max_distance + 2).astype(int)
    for low, high in zip(bounds[:-1], bounds[1:]):
        chunk = (hashes >> np.uint64(low)) & np.uint64((1 << int(high - low)) - 1)
        order = np.argsort(chunk, kind="stable")
        ordered = chunk[order]
        # In sorted order a bucket is a run of equal values: pair each position with the one `offset`
        # later while they still share the run; no pair at one offset means none at any larger one.
        offset = 1
        while offset < len(ordered):
            same = np.flatnonzero(ordered[:-offset] == ordered[offset:])
            if not len(same):
                break
            first, second = order[same], order[same + offset]
            close = np.bitwise_count(hashes[first] ^ hashes[second]) <= max_distance
            found[0].append(np.minimum(first, second)[close])
            found[1].append(np.maximum(first, second)[close])
            offset += 1
    if not found[0]:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint8)
    # A pair that agrees on several chunks was found once per chunk.
    pairs = np.unique(np.stack([np.concatenate(found[0]), np.concatenate(found[1])], axis=1), axis=0)
    first, second = pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)
    return first, second, np.bitwise_count(hashes[first] ^ hashes[second]).astype(np.uint8)


def all_pairs(hashes: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """near_pairs by comparing every hash with every later one, in blocks."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    count = len(hashes)
    found = [], [], []
    rows_per_block = max(1, BLOCK_PAIRS // max(count, 1))
    for start in range(0, count, rows_per_block):
        block = hashes[start:start + rows_per_block]
        # Each row is compared with itself and every later hash only: each pair once.
        distances = np.bitwise_count(block[:, None] ^ hashes[None, start:])
        rows, columns = np.nonzero(distances <= max_distance)
        later = columns > rows
        rows, columns = rows[later], columns[later]
        found[0].append(start + rows)
        found[1].append(start + columns)
        found[2].append(distances[rows, columns])
    if not count:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint8)
    return tuple(np.concatenate(part) for part in found)


def hamming_distance(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Bits in which two hashes (or arrays of hashes) differ."""
    return np.bitwise_count(np.asarray(first, dtype=np.uint64) ^ np.asarray(second, dtype=np.uint64))
