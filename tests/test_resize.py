"""The resize stage on generated data: packed output, skip reports, duplicates, clear failures."""

import io
import shutil

import numpy as np
import pandas as pd
from PIL import Image

from conftest import make_dataset, tree_digest


def add_bad_files(folder):
    """One of each kind of unusable file, as users' folders really contain them."""
    good = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good, "JPEG")
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("not a photo")
    (folder / "truncated.jpg").write_bytes(good.getvalue()[:500])
    (folder / "corrupt.jpg").write_bytes(good.getvalue()[:200] + bytes(range(256)) * 8)
    Image.new("1", (3000, 3000)).save(folder / "bomb.png")


def test_resize_writes_one_packed_array_and_an_index(prepared):
    images = np.load(prepared.root / "data/resized/images_32.npy", mmap_mode="r")
    index = pd.read_csv(prepared.root / "data/resized/index.csv")
    assert images.shape == (36, 32, 32, 3) and images.dtype == np.uint8
    assert list(index["id"]) == list(range(36))
    assert sorted(index["label"].unique()) == ["class_0", "class_1", "class_2"]


def test_bad_files_are_skipped_and_reported_and_raw_data_is_untouched(project):
    source = project.params()["data"]["source"]
    add_bad_files(project.root.parent / "source" / "class_1")
    project.set_params(**{"resize.max_pixels": 4_000_000})
    project.stage("data")
    raw_before = tree_digest(project.root / "data/raw")
    result = project.stage("resize")
    skipped = pd.read_csv(project.root / "reports/resize/skipped.csv").set_index("path")["reason"]
    assert skipped["class_1/zero.jpg"] == "empty file (0 bytes)"
    assert skipped["class_1/notes.txt"].startswith("not an image")
    assert skipped["class_1/truncated.jpg"].startswith("truncated")
    assert skipped["class_1/corrupt.jpg"].startswith("corrupt")
    assert skipped["class_1/bomb.png"].startswith("too large")
    assert "5 skipped" in result.stdout
    assert tree_digest(project.root / "data/raw") == raw_before
    metrics = pd.read_json(project.root / "reports/resize/metrics.json", typ="series")
    assert metrics["skipped"] == 5 and metrics["images"] == 36
    assert source  # the generated source folder itself is never written to either


def test_on_error_fail_stops_and_names_the_files(project):
    add_bad_files(project.root.parent / "source" / "class_0")
    project.set_params(**{"resize.on_error": "fail", "resize.max_pixels": 4_000_000})
    project.stage("data")
    result = project.stage("resize", check=False)
    assert result.returncode == 2
    assert "5 unusable file(s)" in result.stderr and "class_0/zero.jpg: empty file" in result.stderr
    assert "resize.on_error: skip" in result.stderr
    assert not (project.root / "data/resized/images_32.npy").exists()


def test_a_class_with_no_usable_image_stops_with_its_name(project):
    folder = project.root.parent / "source" / "class_2"
    shutil.rmtree(folder)
    folder.mkdir()
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 nothing")
    project.stage("data")
    result = project.stage("resize", check=False)
    assert result.returncode == 2
    assert "no usable image left in class(es) class_2" in result.stderr


def test_an_empty_class_folder_stops_with_its_path(project):
    (project.root.parent / "source" / "class_empty").mkdir()
    project.stage("data")
    result = project.stage("resize", check=False)
    assert result.returncode == 2
    assert "class folder data/raw/class_empty is empty" in result.stderr


def test_byte_and_pixel_identical_duplicates_are_grouped(project):
    folder = project.root.parent / "source" / "class_0"
    shutil.copyfile(folder / "000.png", folder / "000_copy.png")
    Image.open(folder / "001.png").save(folder / "001_as.bmp")
    project.stage("data")
    project.stage("resize")
    duplicates = pd.read_csv(project.root / "reports/resize/duplicates.csv")
    kinds = duplicates.groupby("kind")["path"].apply(sorted).to_dict()
    assert kinds == {
        "byte-identical": ["class_0/000.png", "class_0/000_copy.png"],
        "pixel-identical": ["class_0/001.png", "class_0/001_as.bmp"],
    }
    index = pd.read_csv(project.root / "data/resized/index.csv").set_index("path")
    assert index.loc["class_0/000.png", "duplicate_group"] == index.loc["class_0/000_copy.png", "duplicate_group"] >= 0


def test_a_list_of_sizes_writes_one_array_per_size_each_as_if_alone(project):
    project.stage("data")
    project.stage("resize")
    alone = (project.root / "data/resized/images_32.npy").read_bytes()
    project.set_params(**{"resize.image_size": [48, 32]})
    result = project.stage("resize")
    assert "at 32 and 48 px" in result.stdout
    assert (project.root / "data/resized/images_32.npy").read_bytes() == alone
    assert np.load(project.root / "data/resized/images_48.npy").shape == (36, 48, 48, 3)


def test_resize_uses_several_workers_and_gives_the_same_bytes(project):
    project.stage("data")
    project.stage("resize")
    single = (project.root / "data/resized/images_32.npy").read_bytes()
    project.set_params(**{"resize.workers": 2})
    project.stage("resize")
    assert (project.root / "data/resized/images_32.npy").read_bytes() == single


def test_missing_raw_data_names_the_stage_to_run(project):
    result = project.stage("resize", check=False)
    assert result.returncode == 2
    assert "data/raw not found" in result.stderr and "dvc repro data" in result.stderr


def test_predefined_split_layout_is_resized_with_its_split(tmp_path, project):
    source = make_dataset(tmp_path / "with_splits", per_class=5, splits=("train", "valid", "test"))
    project.set_params(**{"data.source": str(source)})
    project.stage("data")
    project.stage("resize")
    index = pd.read_csv(project.root / "data/resized/index.csv")
    assert sorted(index["source_split"].unique()) == ["test", "train", "val"]
