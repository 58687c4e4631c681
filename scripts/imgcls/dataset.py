"""Where each stage's data lives, how it is read, and how outputs are written safely.

The resized images are one packed uint8 array per size (`images_<size>.npy`,
memory-mapped on read) beside an index CSV with one row per image. DVC hashes
a directory output file by file, so tens of thousands of small JPEGs make every
`dvc status` slow; a few files keep it instant whatever the dataset's size.

pandas is imported only where a table is read, so the photo server (which
imports this module for its paths) runs without it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from imgcls.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

RAW_DIR = Path("data/raw")
RESIZED_DIR = Path("data/resized")
INDEX_FILE = RESIZED_DIR / "index.csv"
GEOMETRY_FILE = RESIZED_DIR / "geometry.json"  # what resize.max_stretch: auto chose, for the model cards
SPLIT_DIR = Path("data/split")
MANIFEST_FILE = SPLIT_DIR / "manifest.csv"
CLASSES_FILE = SPLIT_DIR / "classes.txt"
HOLDOUT_DIR = Path("data/holdout")
REPORTS_DIR = Path("reports")
MODELS_DIR = Path("models")

# Folder names of a predefined split in a source, and the split each one means.
PREDEFINED_SPLITS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
SPLITS = ("train", "val", "test")
# Validation photos held back from every choice a trainer makes, to set the `unknown` threshold on.
CALIBRATION = "calibration"
# How the split summary and a model card describe a validation split that split.val 0 left out.
NO_VALIDATION = "none (split.val: 0)"
# Photos a reviewer removed from every split, one path (as in the manifest) a line.
EXCLUDE_FILE = Path("data/exclude.txt")


def class_folders(raw: Path = RAW_DIR) -> list[tuple[str, str, Path]]:
    """(predefined split or "", class name, folder) for every class folder of a raw dataset."""
    top = sorted(entry for entry in Path(raw).iterdir() if entry.is_dir())
    if top and all(entry.name in SPLITS for entry in top):
        return [
            (split.name, folder.name, folder)
            for split in top
            for folder in sorted(entry for entry in split.iterdir() if entry.is_dir())
        ]
    return [("", folder.name, folder) for folder in top]


def image_files(folder: Path) -> list[Path]:
    """Every file below a class folder, in a stable order (sub-folders included)."""
    return sorted(path for path in folder.rglob("*") if path.is_file())


def require(path: Path, produced_by: str) -> Path:
    """Fail with the command to run when an upstream output is missing."""
    if not Path(path).exists():
        raise UserError(f"{path} not found: it is made by the '{produced_by}' stage; run `dvc repro {produced_by}`.")
    return Path(path)


@contextlib.contextmanager
def atomic_path(path: Path | str):
    """Yield a temporary path beside `path`; move it into place only if the block succeeds.

    An interrupted or failed stage therefore never leaves a half-written file
    that a later stage would read as if it were complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(descriptor)
    try:
        yield Path(temporary)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes files private; outputs are ordinary files
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_json(path: Path | str, data) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_csv(path: Path | str, frame: pd.DataFrame) -> None:
    with atomic_path(path) as temporary:
        frame.to_csv(temporary, index=False)


def load_class_names() -> list[str]:
    """The ordered class list every model stage uses: label index i means class_names[i]."""
    text = require(CLASSES_FILE, "split").read_text()
    return [line for line in text.splitlines() if line]


def load_manifest() -> pd.DataFrame:
    import pandas as pd  # here, not above: the serving path imports this module for its paths, without pandas

    # Class names stay text even when they look like numbers (digits' classes are "0".."9").
    return pd.read_csv(require(MANIFEST_FILE, "split"), keep_default_na=False, dtype={"label": str, "path": str})


def images_file(size: int) -> Path:
    return RESIZED_DIR / f"images_{size}.npy"


def resized_max_stretch() -> float:
    """The max_stretch the resized arrays were made with (resize's geometry.json; 1, padding only, before it)."""
    if GEOMETRY_FILE.exists():
        return float(json.loads(GEOMETRY_FILE.read_text())["max_stretch"])
    return 1.0


def load_images(size: int) -> np.ndarray:
    """All images resized to `size` as a read-only memory map: (N, size, size, 3) uint8, row i = index id i."""
    path = images_file(size)
    if not path.exists() and INDEX_FILE.exists():
        raise UserError(f"{RESIZED_DIR} has no {size} px images: the model needs them, so resize.image_size"
                        f" must include {size}; run `dvc repro` (or `dvc repro resize split`) after changing it.")
    return np.load(require(path, "resize"), mmap_mode="r")


def load_split(split: str, size: int, manifest: pd.DataFrame | None = None, images: np.ndarray | None = None):
    """Return (images, labels, rows) of one split at one size: uint8 pixels in memory, int labels, manifest rows."""
    if split not in (*SPLITS, CALIBRATION):
        raise ValueError(f"split must be one of {(*SPLITS, CALIBRATION)}, got {split!r}")
    manifest = load_manifest() if manifest is None else manifest
    images = load_images(size) if images is None else images
    rows = manifest[manifest["split"] == split].reset_index(drop=True)
    if len(rows) and rows["id"].max() >= len(images):
        raise UserError(f"{MANIFEST_FILE} does not match {images_file(size)}: rerun `dvc repro split`.")
    pixels = np.asarray(images[rows["id"].to_numpy()])
    return pixels, rows["label_index"].to_numpy(dtype=np.int64), rows


def load_training_data(image_size: int, stage: str = "", validation_optional: bool = False):
    """(class names, (train pixels, labels), (val pixels, labels)) at one size of resize.image_size, for a trainer.

    An empty val split (split.val: 0) stops `stage` unless it can train without one (validation_optional).
    """
    class_names = load_class_names()
    manifest = load_manifest()
    images = load_images(image_size)
    train_pixels, train_labels, _ = load_split("train", image_size, manifest, images)
    val_pixels, val_labels, _ = load_split("val", image_size, manifest, images)
    if len(val_labels) == 0 and not validation_optional:
        raise UserError(f"the val split is empty (split.val: 0?), and {stage or 'this stage'} needs validation"
                        " photos: it chooses its model and fits its temperature on them. Set"
                        " split.val above 0 (e.g. 0.15) in params.yaml and run `dvc repro split`; only train_cnn"
                        " trains without a validation split.")
    if len(train_labels) == 0:
        raise UserError("the train split is empty: check the split fractions in params.yaml and run `dvc repro split`.")
    return class_names, (train_pixels, train_labels), (val_pixels, val_labels)
