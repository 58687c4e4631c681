"""Bring a dataset into data/raw as `<class>/<file>` or `<split>/<class>/<file>`.

Downloads go through Keras' cache (`keras.utils.get_file`, which honours
KERAS_HOME), so a pre-seeded cache makes every source work offline.
"""

import os
import pickle
import shutil
import tarfile
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
from PIL import Image

from imgcls.dataset import PREDEFINED_SPLITS, class_folders, image_files
from imgcls.errors import UserError

GEAR_URL = "https://challenge.blob.core.windows.net/challengefiles/gear_images.zip"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
BUILTIN_SOURCES = ("gear", "cifar10", "digits")
# Operating-system litter that is never part of a dataset.
JUNK_NAMES = {"__MACOSX", ".DS_Store", "Thumbs.db", "desktop.ini"}


def keras_cache_dir() -> Path:
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))


def download(url: str, filename: str, sha256: str | None = None) -> Path:
    """Return the cached file for `url`, downloading it into the Keras cache if needed."""
    import keras  # imported here: it is slow to import and only downloads need it

    cached = keras_cache_dir() / "datasets" / filename
    try:
        return Path(keras.utils.get_file(filename, origin=url, file_hash=sha256, cache_subdir="datasets"))
    except Exception as error:  # get_file raises a bare Exception for network failures
        raise UserError(
            f"could not download {url}\n  ({error})\n"
            f"  It is looked for in the Keras cache as {cached} (set KERAS_HOME to use another cache).\n"
            "  Offline, copy the file there (or run `make run KERAS_CACHE=/path/to/keras-cache`),\n"
            "  point data.source at a local folder or archive of class folders,\n"
            "  or use data.source: digits, which needs no network at all."
        ) from None


def _is_junk(path: Path) -> bool:
    return path.name in JUNK_NAMES or path.name.startswith("._")


def _dataset_root(folder: Path) -> Path:
    """Skip wrapper folders (`gear_images/`) down to the folder holding the class or split folders."""
    while True:
        entries = [entry for entry in folder.iterdir() if not _is_junk(entry)]
        subfolders = [entry for entry in entries if entry.is_dir()]
        if len(subfolders) == 1 and len(entries) == 1:
            folder = subfolders[0]
        else:
            return folder


def _copy_class_folders(source_root: Path, destination: Path) -> None:
    """Copy the class folders (or split/class folders) of `source_root` into `destination`."""
    root = _dataset_root(source_root)
    folders = sorted(entry for entry in root.iterdir() if entry.is_dir() and not _is_junk(entry))
    if not folders:
        raise UserError(f"{root} has no sub-folders: lay the images out as one sub-folder per class.")
    split_folders = [folder for folder in folders if folder.name.lower() in PREDEFINED_SPLITS]
    if split_folders and len(split_folders) != len(folders):
        others = ", ".join(folder.name for folder in folders if folder not in split_folders)
        raise UserError(
            f"{root} mixes split folders ({', '.join(f.name for f in split_folders)}) with other folders ({others}):"
            " use either <class>/ folders or train/, val/ (or valid/), test/ folders each holding <class>/ folders."
        )
    ignore = shutil.ignore_patterns(*JUNK_NAMES, "._*")
    for folder in folders:
        target = destination / PREDEFINED_SPLITS.get(folder.name.lower(), folder.name) if split_folders else destination / folder.name
        if target.exists():
            raise UserError(f"{root} has two folders that both mean '{target.name}': keep one.")
        shutil.copytree(folder, target, ignore=ignore)


def _extract_archive(archive: Path, destination: Path) -> None:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as opened:
            opened.extractall(destination)  # zipfile drops absolute paths and '..' parts
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as opened:
            opened.extractall(destination, filter="data")  # refuses links and paths outside destination
    else:
        raise UserError(f"{archive} is neither a zip nor a tar archive: give a folder, a .zip or a .tar(.gz).")


def limit_per_class(raw: Path, limit: int, seed: int) -> None:
    """Keep a seeded random subset of `limit` files in every class folder (in every split folder)."""
    if limit == 0:
        return
    for _, _, folder in class_folders(raw):
        files = image_files(folder)
        rng = np.random.default_rng([seed, len(files)])
        for index in sorted(rng.permutation(len(files))[limit:]):
            files[index].unlink()


def _write_cifar10(archive: Path, destination: Path) -> None:
    """Export the pickled CIFAR-10 batches as PNG files under train/<class>/ and test/<class>/."""
    with tarfile.open(archive) as opened:
        members = {Path(member.name).name: member for member in opened.getmembers() if member.isfile()}

        def unpickle(name):
            if name not in members:
                raise UserError(f"{archive} has no '{name}': it is not the CIFAR-10 python archive.")
            return pickle.load(opened.extractfile(members[name]), encoding="bytes")

        class_names = [name.decode() for name in unpickle("batches.meta")[b"label_names"]]
        batches = [("train", f"data_batch_{number}") for number in range(1, 6)] + [("test", "test_batch")]
        for split, batch_name in batches:
            batch = unpickle(batch_name)
            # Rows are channel-major: 1024 red, 1024 green, then 1024 blue values.
            pixels = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            for position, (image, label) in enumerate(zip(pixels, batch[b"labels"])):
                folder = destination / split / class_names[label]
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(folder / f"{batch_name}_{position:05d}.png")


def _write_digits(destination: Path) -> None:
    from sklearn.datasets import load_digits  # imported here: only this source needs scikit-learn

    digits = load_digits()
    for position, (image, label) in enumerate(zip(digits.images, digits.target)):
        folder = destination / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        # 8x8 values in 0..16; scaled to 0..255 so they read as ordinary greyscale photos.
        Image.fromarray((image * 255 / 16).round().astype(np.uint8), mode="L").save(folder / f"{position:04d}.png")


def fetch_source(source: str, destination: Path, scratch: Path) -> str:
    """Fill `destination` from `source`; `scratch` is an empty folder for downloads and extraction.

    Returns a one-line description of where the data came from.
    """
    if source == "gear":
        archive = download(GEAR_URL, "gear_images.zip")
        _extract_archive(archive, scratch)
        _copy_class_folders(scratch, destination)
        return f"gear photos from {archive}"
    if source == "cifar10":
        archive = download(CIFAR10_URL, "cifar-10-batches-py.tar.gz", sha256=CIFAR10_SHA256)
        _write_cifar10(archive, destination)
        return f"CIFAR-10 from {archive}"
    if source == "digits":
        _write_digits(destination)
        return "scikit-learn's handwritten digits"
    if urlparse(source).scheme in ("http", "https"):
        filename = Path(urlparse(source).path).name or "dataset"
        archive = download(source, filename)
        _extract_archive(archive, scratch)
        _copy_class_folders(scratch, destination)
        return f"{source} (cached as {archive})"
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(
            f"data.source = {source!r} is neither one of {', '.join(BUILTIN_SOURCES)}, an http(s) URL,"
            " nor an existing folder or archive."
        )
    if path.is_dir():
        _copy_class_folders(path, destination)
    else:
        _extract_archive(path, scratch)
        _copy_class_folders(scratch, destination)
    return f"{path}"
