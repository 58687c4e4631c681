"""Stage `resize`: every image in data/raw as a square 8-bit RGB array.

Writes data/resized/images_<size>.npy for each size in resize.image_size (N x size
x size x 3 uint8, memory-mappable), data/resized/index.csv (one row per
image: id = row in each array, path,
label, predefined split, original size and mode, sha256, duplicate group
and kind, and whether `split` must leave the image out) and
data/resized/geometry.json (the max_stretch used, for the model cards).
Unusable files are skipped and listed with their reason. Duplicates are found
by bytes, by decoded pixels and, as near-duplicates, by a perceptual hash
(imgcls/near_duplicates.py), so that `split` can keep each group together.
The same picture under two or more classes (conflicting labels) is reported
and, by resize.conflicting_labels, stops the stage, is left out of every split
(drop) or kept.
"""

import contextlib
import hashlib
import json
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from tqdm import tqdm

from imgcls.dataset import (
    GEOMETRY_FILE,
    INDEX_FILE,
    RAW_DIR,
    REPORTS_DIR,
    atomic_path,
    class_folders,
    image_files,
    images_file,
    require,
    write_csv,
    write_json,
)
from imgcls.errors import UserError, run_stage
from imgcls.images import BadImage, decode_image, image_size, shared_aspect_ratio
from imgcls.near_duplicates import hamming_distance, near_pairs, perceptual_hashes
from imgcls.params import load_params

REPORT_DIR = REPORTS_DIR / "resize"
# What _process tells about each file, in its order: why it is unusable ("" if usable), hashes, original size and mode.
DETAIL_COLUMNS = ["reason", "sha256", "pixel_hash", "width", "height", "mode"]
# Set once per worker process by _init_worker: decode_image's keyword arguments, and the output array of each size.
_settings = {}
_output = {}


def _init_worker(settings: dict, outputs: dict[int, Path]) -> None:
    _settings.update(settings)
    # Each worker writes its rows straight into the memory-mapped outputs: only a
    # few bytes of metadata per image travel back to the main process.
    _output.update({size: np.load(path, mmap_mode="r+") for size, path in outputs.items()})


def _process(task: tuple[int, Path]):
    """Decode one file into its row of the output; never raises for a bad file, returns its reason instead."""
    position, path = task
    data = path.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    # Each size is decoded on its own, smallest first: JPEG draft mode picks its
    # scale from the size asked for, so an array is the same whatever other sizes
    # are listed. The smallest size's decode gives the pixel hash.
    try:
        decoded = [decode_image(data, size=size, **_settings) for size in sorted(_output)]
    except BadImage as reason:
        return position, str(reason), sha256, "", 0, 0, ""
    for size, one in zip(sorted(_output), decoded):
        _output[size][position] = one.pixels
    first = decoded[0]
    return position, "", sha256, first.pixel_hash, first.original_width, first.original_height, first.original_mode


def _list_raw_files() -> pd.DataFrame:
    require(RAW_DIR, "data")
    rows = []
    for split, class_name, folder in class_folders(RAW_DIR):
        files = image_files(folder)
        if not files:
            raise UserError(f"class folder {folder} is empty: add images to it or delete the folder.")
        rows += [{"path": path.relative_to(RAW_DIR).as_posix(), "label": class_name, "source_split": split} for path in files]
    if not rows:
        raise UserError(f"{RAW_DIR} has no class folders: lay images out as {RAW_DIR}/<class>/<image>.")
    return pd.DataFrame(rows)


def _duplicate_groups(index: pd.DataFrame, max_distance: int) -> pd.Series:
    """Group id (lowest member id) of images that are identical or near-duplicates, else -1.

    Byte-identical files decode to identical pixels, so grouping by pixel hash
    catches both kinds; pairs whose perceptual hashes differ in at most
    `max_distance` bits (none when it is 0) join their groups, transitively.
    """
    identical_to = index.groupby("pixel_hash")["id"].transform("min").to_numpy()
    first, second = index["id"].to_numpy(), identical_to
    if max_distance > 0:
        near_first, near_second, _ = near_pairs(index["phash"].to_numpy(), max_distance)
        first, second = np.concatenate([first, near_first]), np.concatenate([second, near_second])
    links = coo_matrix((np.ones(len(first)), (first, second)), shape=(len(index), len(index)))
    _, component = connected_components(links, directed=False)
    group = pd.Series(index["id"].to_numpy()).groupby(component).transform("min")
    sizes = pd.Series(component).map(pd.Series(component).value_counts())
    return group.where(sizes > 1, -1)


def _duplicate_kinds(index: pd.DataFrame) -> pd.Series:
    """Per member of a group: byte-identical, pixel-identical or near-duplicate (the group's loosest kind)."""
    members = index.groupby("duplicate_group")
    kind = np.where(members["sha256"].transform("nunique") == 1, "byte-identical",
                    np.where(members["pixel_hash"].transform("nunique") == 1, "pixel-identical", "near-duplicate"))
    return pd.Series(np.where(index["duplicate_group"] >= 0, kind, ""), index=index.index)


def _conflicting_labels(index: pd.DataFrame) -> pd.Series:
    """True for each image whose identical pixels also sit under another class."""
    return index.groupby("pixel_hash")["label"].transform("nunique") > 1


def _duplicates_report(index: pd.DataFrame) -> pd.DataFrame:
    members = index[index["duplicate_group"] >= 0].copy()
    members["labels_agree"] = members.groupby("duplicate_group")["label"].transform("nunique") == 1
    # Bits in which each member's perceptual hash differs from its group's first image's (0: identical).
    first_hash = members.groupby("duplicate_group")["phash"].transform("first")
    members["hash_distance"] = hamming_distance(members["phash"].to_numpy(), first_hash.to_numpy())
    members = members.rename(columns={"duplicate_kind": "kind"})
    columns = ["duplicate_group", "kind", "labels_agree", "conflicting_labels", "hash_distance", "id", "path", "label",
               "source_split"]
    return members[columns].sort_values(["duplicate_group", "id"])


def _check_conflicting_labels(index: pd.DataFrame, policy: str) -> None:
    """Warn about (or stop at) identical images filed under more than one class."""
    conflicting = index[index["conflicting_labels"]]
    if conflicting.empty:
        return
    groups = conflicting["pixel_hash"].nunique()
    if policy == "fail":
        examples = "\n".join(f"  {', '.join(rows['path'])}"
                             for _, rows in list(conflicting.groupby("pixel_hash", sort=False))[:10])
        raise UserError(
            f"{len(conflicting)} images are the same picture under more than one class ({groups} groups;"
            f" resize.conflicting_labels is 'fail'):\n{examples}\n"
            "Keep each picture under its one right class in the source (delete the wrong copies), or set"
            " resize.conflicting_labels: drop (leave every copy out) or keep."
        )
    action = ("all copies are left out of every split" if policy == "drop"
              else "they are kept, each group in one split, where one of each group's labels is wrong")
    print(f"warning: {len(conflicting)} images are the same picture under more than one class ({groups} groups,"
          f" labels_agree=False in {REPORT_DIR / 'duplicates.csv'}); resize.conflicting_labels is {policy!r}: {action}.")


def _keep_rows(path: Path, rows: np.ndarray) -> None:
    """Rewrite the array at `path` with only `rows`, in order (the usable images), chunk by chunk."""
    pixels = np.load(path, mmap_mode="r")
    compact_file = path.with_name(path.name + ".compact.npy")
    compact = np.lib.format.open_memmap(compact_file, mode="w+", dtype=np.uint8, shape=(len(rows),) + pixels.shape[1:])
    for start in range(0, len(rows), 1024):
        chunk = rows[start:start + 1024]
        compact[start:start + len(chunk)] = pixels[chunk]
    compact.flush()
    del compact, pixels
    os.replace(compact_file, path)


def _max_stretch(params, files: pd.DataFrame) -> float:
    """resize.max_stretch, or for auto: the shape (long to short side) 90% of the photos share, else 1 (pad only).

    Photos of one shape (one camera's 4:3) are all lengthened alike, so they fill the square and every object
    keeps its proportions relative to the others; photos of many shapes (product shots) would each be
    distorted differently, so they are only padded. Only aspect pad stretches. Recorded in
    data/resized/geometry.json for the model cards.
    """
    if params.aspect != "pad":
        return 1.0
    if params.max_stretch != "auto":
        return float(params.max_stretch)
    max_stretch = shared_aspect_ratio(image_size(RAW_DIR / path, params.max_pixels) for path in files["path"])
    print(f"resize: max_stretch auto: {max_stretch:.4g}" + (
        " (at least 90% of the photos have this shape: they fill the square)" if max_stretch > 1
        else " (no one shape other than square is shared by 90% of the photos: they are padded)"))
    return max_stretch


def _decode_files(files: pd.DataFrame, outputs: dict[int, Path], params, workers: int, max_stretch: float
                  ) -> tuple[pd.DataFrame, float]:
    """Decode every file into its row of each output array, in parallel.

    Returns one row of details per file (DETAIL_COLUMNS; a reason when it is
    unusable) and the seconds the decoding took.
    """
    for size, path in outputs.items():
        np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(len(files), size, size, 3)).flush()
    settings = {"aspect": params.aspect, "background": tuple(params.background), "max_pixels": params.max_pixels,
                "max_stretch": max_stretch}
    tasks = [(position, RAW_DIR / path) for position, path in enumerate(files["path"])]
    details = [None] * len(files)
    started = time.perf_counter()
    with multiprocessing.Pool(workers, initializer=_init_worker, initargs=(settings, outputs)) as pool:
        results = pool.imap_unordered(_process, tasks, chunksize=16)
        for position, *detail in tqdm(results, total=len(tasks), desc="resize", unit="img", mininterval=2):
            details[position] = detail
        # Let the workers exit on their own: leaving the block terminates the pool, by signals.
        pool.close()
        pool.join()
    return pd.DataFrame(details), time.perf_counter() - started


def _leave_out_unusable(files: pd.DataFrame, outputs: dict[int, Path], on_error: str
                        ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(usable, skipped) files: skipped ones are listed in skipped.csv and their rows dropped from the arrays.

    Stops when resize.on_error is 'fail' and a file is unusable, or when a class has no usable image left.
    """
    skipped = files[files["reason"] != ""]
    if len(skipped) and on_error == "fail":
        examples = "\n".join(f"  {row.path}: {row.reason}" for row in skipped.head(10).itertuples())
        raise UserError(
            f"{len(skipped)} unusable file(s) in {RAW_DIR} (resize.on_error is 'fail'):\n{examples}\n"
            "Remove or fix them in the source, or set resize.on_error: skip to leave them out."
        )
    usable = files[files["reason"] == ""]
    empty = sorted(set(files["label"]) - set(usable["label"]))
    if empty:
        raise UserError(
            f"no usable image left in class(es) {', '.join(empty)} (see {REPORT_DIR / 'skipped.csv'} for why):"
            f" add readable images to {RAW_DIR}/<class>/ or remove the class folder."
        )
    write_csv(REPORT_DIR / "skipped.csv", skipped[["path", "label", "reason"]])
    if len(skipped):
        for path in outputs.values():
            _keep_rows(path, usable.index.to_numpy())
    return usable, skipped


def _index_images(usable: pd.DataFrame, smallest: Path, params) -> pd.DataFrame:
    """One row per usable image, numbered like the arrays, with its duplicate group and whether split leaves it out.

    `smallest` is the array of the smallest size, whose perceptual hashes find the near-duplicates.
    """
    index = usable.drop(columns=["reason"]).reset_index(drop=True)
    index.insert(0, "id", np.arange(len(index)))
    index["conflicting_labels"] = _conflicting_labels(index)
    _check_conflicting_labels(index, params.conflicting_labels)
    # The perceptual hash of each image's smallest array: the same whatever other sizes are listed.
    index["phash"] = perceptual_hashes(np.load(smallest, mmap_mode="r"))
    index["duplicate_group"] = _duplicate_groups(index, params.near_duplicate_distance)
    index["duplicate_kind"] = _duplicate_kinds(index)
    # split leaves these rows out of every split.
    index["left_out"] = np.where(index["conflicting_labels"] & (params.conflicting_labels == "drop"),
                                 "conflicting labels", "")
    return index


def _write_index(index: pd.DataFrame, duplicates: pd.DataFrame) -> None:
    """data/resized/index.csv for split, and the duplicate groups' report."""
    # The hashes stay out of the index: split needs only the groups, and new pixels with the same
    # groups then leave index.csv unchanged, so DVC skips split.
    write_csv(INDEX_FILE, index.drop(columns=["pixel_hash", "phash", "conflicting_labels"]))
    write_csv(REPORT_DIR / "duplicates.csv", duplicates)


def _metrics(files: pd.DataFrame, index: pd.DataFrame, skipped: pd.DataFrame, duplicates: pd.DataFrame,
             image_size) -> dict:
    """reports/resize/metrics.json: how many files became images, and how many duplicates they hold."""
    near = duplicates[duplicates["kind"] == "near-duplicate"]
    return {
        "files": len(files),
        "images": len(index),
        "skipped": len(skipped),
        "classes": int(index["label"].nunique()),
        "duplicate_groups": int(duplicates["duplicate_group"].nunique()),
        "duplicate_images": len(duplicates),
        "near_duplicate_groups": int(near["duplicate_group"].nunique()),
        "near_duplicate_images": len(near),
        "conflicting_label_images": int(index["conflicting_labels"].sum()),
        "left_out_images": int((index["left_out"] != "").sum()),
        "image_size": image_size,
    }


def _print_summary(metrics: dict, decode_seconds: float, workers: int, params) -> None:
    """Two lines: how fast the files were decoded, and what became of them."""
    files = metrics["files"]
    print(f"resize: decoded {files} files in {decode_seconds:.2f} s ({files / decode_seconds:.0f} files/s,"
          f" {workers} workers)")
    sizes = " and ".join(f"{size}" for size in params.sizes)
    print(f"resize: {metrics['images']} images at {sizes} px, {metrics['skipped']} skipped,"
          f" {metrics['duplicate_groups']} duplicate groups ({metrics['duplicate_images']} images), of which"
          f" {metrics['near_duplicate_groups']} near-duplicate groups ({metrics['near_duplicate_images']} images;"
          f" hash distance <= {params.near_duplicate_distance})")


def main() -> None:
    params = load_params().resize
    files = _list_raw_files()
    workers = params.workers or len(os.sched_getaffinity(0))
    max_stretch = _max_stretch(params, files)
    with contextlib.ExitStack() as stack:
        # One array per size, each written under a temporary name and moved into place only at the end.
        outputs = {size: stack.enter_context(atomic_path(images_file(size))) for size in params.sizes}
        stack.enter_context(atomic_path(GEOMETRY_FILE)).write_text(json.dumps({"max_stretch": max_stretch}) + "\n")
        details, decode_seconds = _decode_files(files, outputs, params, workers, max_stretch)
        files[DETAIL_COLUMNS] = details
        usable, skipped = _leave_out_unusable(files, outputs, params.on_error)
        index = _index_images(usable, outputs[params.sizes[0]], params)
        duplicates = _duplicates_report(index)
        _write_index(index, duplicates)
    metrics = _metrics(files, index, skipped, duplicates, params.image_size)
    write_json(REPORT_DIR / "metrics.json", metrics)
    _print_summary(metrics, decode_seconds, workers, params)


if __name__ == "__main__":
    run_stage(main)
