"""The resize stage on generated data: packed output, skip reports, duplicates, clear failures."""

import io
import json
import shutil

import numpy as np
import pandas as pd
from PIL import Image

from conftest import make_dataset, make_photo, tree_digest


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


def test_a_new_photo_is_decoded_for_a_model_as_resize_decoded_its_training_photos(project, monkeypatch):
    # The card carries resize's geometry, max_stretch included, so predict_new and serve see what training saw.
    from imgcls.params import ResizeParams
    from imgcls.predict import decode_for_model
    from imgcls.training import model_card

    project.stage("data")
    make_photo(3, width=160, height=120).save(project.root / "data/raw/class_0/wide.png")
    project.set_params(**{"resize.max_stretch": 1.2})
    project.stage("resize")
    index = pd.read_csv(project.root / "data/resized/index.csv")
    row = int(index.loc[index["path"].str.endswith("wide.png"), "id"].iloc[0])
    monkeypatch.chdir(project.root)
    card = model_card("cnn", ["class_0"], ResizeParams.model_validate(project.params()["resize"]), 32, 0.5)
    assert card["max_stretch"] == 1.2
    decoded = decode_for_model(project.root / "data/raw/class_0/wide.png", card)
    assert np.array_equal(decoded, np.load(project.root / "data/resized/images_32.npy")[row])
    assert (decoded[0, :, :] == 255).all() and not (decoded[4, :, :] == 255).all()  # 1.2 of 4:3: a thin letterbox


def test_max_stretch_auto_fills_the_square_when_the_photos_share_a_shape_and_pads_them_when_not(project):
    project.stage("data")
    raw = project.root / "data/raw"
    for number, old in enumerate(sorted(raw.glob("*/*.png"))):  # every photo 4:3, landscape or portrait
        old.unlink()
        make_photo(number, *((64, 48) if number % 2 else (48, 64))).save(old)
    result = project.stage("resize")
    assert "max_stretch auto: 1.333" in result.stdout
    assert abs(json.loads((project.root / "data/resized/geometry.json").read_text())["max_stretch"] - 4 / 3) < 1e-9
    assert not (np.load(project.root / "data/resized/images_32.npy") == 255).all(axis=(2, 3)).any()  # no letterbox

    make_photo(99, 90, 30).save(raw / "class_0" / "panorama.png")
    for number, old in enumerate(sorted(raw.glob("class_1/*.png"))):  # now a third of them square
        make_photo(number, 48, 48).save(old)
    result = project.stage("resize")
    assert "max_stretch auto: 1 (no one shape" in result.stdout
    assert json.loads((project.root / "data/resized/geometry.json").read_text()) == {"max_stretch": 1.0}


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


def add_near_duplicates(folder, seed):
    """A photo, its JPEG re-encode, a half-size copy and a copy with 5% of each side cropped off (centred)."""
    photo = make_photo(seed)
    width, height = photo.size
    photo.save(folder / f"photo_{seed}.png")
    photo.save(folder / f"photo_{seed}_reencoded.jpg", quality=75)
    photo.resize((width // 2, height // 2)).save(folder / f"photo_{seed}_half.png")
    photo.crop((width // 40, height // 40, width - width // 40, height - height // 40)).save(folder / f"photo_{seed}_crop.png")
    return sorted(f"{folder.name}/{path.name}" for path in folder.glob(f"photo_{seed}*"))


def test_near_duplicates_are_grouped_but_different_photos_of_a_class_are_not(project):
    source = project.root.parent / "source"
    first = add_near_duplicates(source / "class_0", seed=1)
    second = add_near_duplicates(source / "class_1", seed=2)
    for seed in range(10, 16):  # other photo-like images of class_0: never near-duplicates
        make_photo(seed).save(source / "class_0" / f"other_{seed}.png")
    project.stage("data")
    result = project.stage("resize")
    duplicates = pd.read_csv(project.root / "reports/resize/duplicates.csv")
    groups = sorted(sorted(rows["path"]) for _, rows in duplicates.groupby("duplicate_group"))
    assert groups == sorted([first, second])
    assert set(duplicates["kind"]) == {"near-duplicate"} and duplicates["hash_distance"].max() <= 4
    metrics = pd.read_json(project.root / "reports/resize/metrics.json", typ="series")
    assert metrics["near_duplicate_groups"] == 2 and metrics["near_duplicate_images"] == 8
    assert "2 near-duplicate groups (8 images" in result.stdout
    # The split keeps each group in one split.
    project.stage("split")
    manifest = pd.read_csv(project.root / "data/split/manifest.csv").set_index("path")
    index = pd.read_csv(project.root / "data/resized/index.csv").set_index("path")
    holdout = sorted(index.index.difference(manifest.index))
    for group in (first, second):
        assert manifest.reindex(group)["split"].nunique() == 1 and not set(group) & set(holdout)
    # 0 turns near-duplicate search off.
    project.set_params(**{"resize.near_duplicate_distance": 0})
    project.stage("resize")
    assert pd.read_csv(project.root / "reports/resize/duplicates.csv").empty


def copy_across_classes(project):
    """The same picture filed under class_0 and class_1 (a labelling mistake), as users' folders contain them."""
    source = project.root.parent / "source"
    shutil.copyfile(source / "class_0" / "000.png", source / "class_1" / "000_also.png")
    project.stage("data")
    return ["class_0/000.png", "class_1/000_also.png"]


def test_conflicting_labels_drop_leaves_every_copy_out_of_every_split(project):
    copies = copy_across_classes(project)
    result = project.stage("resize")
    assert "warning: 2 images are the same picture under more than one class (1 groups" in result.stdout
    assert "reports/resize/duplicates.csv" in result.stdout and "left out of every split" in result.stdout
    metrics = pd.read_json(project.root / "reports/resize/metrics.json", typ="series")
    assert metrics["conflicting_label_images"] == 2 and metrics["left_out_images"] == 2
    duplicates = pd.read_csv(project.root / "reports/resize/duplicates.csv")
    assert sorted(duplicates["path"]) == copies and not duplicates["labels_agree"].any()
    split = project.stage("split")
    assert "left out 2 images filed under more than one class" in split.stdout
    manifest = pd.read_csv(project.root / "data/split/manifest.csv")
    assert not set(copies) & set(manifest["path"]) and len(manifest) == 37 - 2


def test_conflicting_labels_keep_keeps_them_in_one_split(project):
    copies = copy_across_classes(project)
    project.set_params(**{"resize.conflicting_labels": "keep"})
    result = project.stage("resize")
    assert "warning: 2 images are the same picture under more than one class" in result.stdout
    project.stage("split")
    manifest = pd.read_csv(project.root / "data/split/manifest.csv").set_index("path")
    assert manifest.reindex(copies)["split"].nunique() == 1


def test_conflicting_labels_fail_stops_and_names_the_files(project):
    copy_across_classes(project)
    project.set_params(**{"resize.conflicting_labels": "fail"})
    result = project.stage("resize", check=False)
    assert result.returncode == 2
    assert "2 images are the same picture under more than one class" in result.stderr
    assert "class_0/000.png, class_1/000_also.png" in result.stderr and "resize.conflicting_labels: drop" in result.stderr
    assert not (project.root / "data/resized/index.csv").exists()


def test_the_bucketed_near_duplicate_search_finds_exactly_what_comparing_every_pair_finds():
    from imgcls.near_duplicates import all_pairs, bucketed_pairs

    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, 3000, dtype=np.uint64)
    # Plant copies with 1 to 6 random bits flipped, so every distance up to 6 occurs.
    flips = [np.bitwise_or.reduce(np.uint64(1) << rng.choice(64, size=count, replace=False).astype(np.uint64))
             for count in rng.integers(1, 7, 500)]
    hashes = np.concatenate([hashes, hashes[:500] ^ np.array(flips, dtype=np.uint64)])
    for distance in (0, 1, 3, 4, 6):
        bucketed, every = bucketed_pairs(hashes, distance), all_pairs(hashes, distance)
        order = np.lexsort((every[1], every[0]))
        for found, expected in zip(bucketed, every):
            np.testing.assert_array_equal(found, expected[order])
        assert len(bucketed[0]) > 0 or distance == 0
