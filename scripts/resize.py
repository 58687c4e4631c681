"""Stage `resize`: every image in data/raw as a square 8-bit RGB array.

Writes data/resized/images_<size>.npy for each size in resize.image_size (N x size
x size x 3 uint8, memory-mappable) and data/resized/index.csv (one row per
image: id = row in each array, path,
label, predefined split, original size and mode, sha256, duplicate group).
Unusable files are skipped and listed with their reason; duplicates are found
by bytes and by decoded pixels so that `split` can keep them together.
"""

import contextlib
import hashlib
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from imgcls.dataset import (
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
from imgcls.images import BadImage, decode_image
from imgcls.params import load_params

REPORT_DIR = REPORTS_DIR / "resize"
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


def _duplicate_groups(index: pd.DataFrame) -> pd.Series:
    """Group id (lowest member id) of images whose decoded pixels are identical, else -1.

    Byte-identical files decode to identical pixels, so one grouping by pixel
    hash catches both kinds; the report tells them apart.
    """
    group = index.groupby("pixel_hash")["id"].transform("min")
    sizes = index.groupby("pixel_hash")["id"].transform("size")
    return group.where(sizes > 1, -1)


def _duplicates_report(index: pd.DataFrame) -> pd.DataFrame:
    members = index[index["duplicate_group"] >= 0].copy()
    same_bytes = members.groupby("duplicate_group")["sha256"].transform("nunique") == 1
    members["kind"] = np.where(same_bytes, "byte-identical", "pixel-identical")
    members["labels_agree"] = members.groupby("duplicate_group")["label"].transform("nunique") == 1
    columns = ["duplicate_group", "kind", "labels_agree", "id", "path", "label", "source_split"]
    return members[columns].sort_values(["duplicate_group", "id"])


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


def main() -> None:
    params = load_params().resize
    files = _list_raw_files()
    workers = params.workers or len(os.sched_getaffinity(0))
    settings = {"aspect": params.aspect, "background": tuple(params.background), "max_pixels": params.max_pixels}
    tasks = [(position, RAW_DIR / path) for position, path in enumerate(files["path"])]
    details = [None] * len(files)

    with contextlib.ExitStack() as stack:
        # One array per size, each written under a temporary name and moved into place only at the end.
        outputs = {size: stack.enter_context(atomic_path(images_file(size))) for size in params.sizes}
        for size, path in outputs.items():
            np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(len(files), size, size, 3)).flush()
        started = time.perf_counter()
        with multiprocessing.Pool(workers, initializer=_init_worker, initargs=(settings, outputs)) as pool:
            results = pool.imap_unordered(_process, tasks, chunksize=16)
            for position, *detail in tqdm(results, total=len(tasks), desc="resize", unit="img", mininterval=2):
                details[position] = detail
        decode_seconds = time.perf_counter() - started
        files[["reason", "sha256", "pixel_hash", "width", "height", "mode"]] = pd.DataFrame(details)

        skipped = files[files["reason"] != ""]
        if len(skipped) and params.on_error == "fail":
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

        index = usable.drop(columns=["reason"]).reset_index(drop=True)
        index.insert(0, "id", np.arange(len(index)))
        index["duplicate_group"] = _duplicate_groups(index)
        duplicates = _duplicates_report(index)
        write_csv(INDEX_FILE, index.drop(columns=["pixel_hash"]))
        write_csv(REPORT_DIR / "duplicates.csv", duplicates)

    metrics = {
        "files": len(files),
        "images": len(index),
        "skipped": len(skipped),
        "classes": int(index["label"].nunique()),
        "duplicate_groups": int(duplicates["duplicate_group"].nunique()),
        "duplicate_images": len(duplicates),
        "image_size": params.image_size,
    }
    write_json(REPORT_DIR / "metrics.json", metrics)
    print(f"resize: decoded {len(files)} files in {decode_seconds:.2f} s ({len(files) / decode_seconds:.0f} files/s,"
          f" {workers} workers)")
    sizes = " and ".join(f"{size}" for size in params.sizes)
    print(f"resize: {metrics['images']} images at {sizes} px, {metrics['skipped']} skipped,"
          f" {metrics['duplicate_groups']} duplicate groups ({metrics['duplicate_images']} images)")


if __name__ == "__main__":
    run_stage(main)
