"""The split stage: seeded, stratified, duplicate-aware, honouring a source's own split."""

import shutil

import pandas as pd
import pytest

from conftest import make_dataset, make_photo


def manifest(project) -> pd.DataFrame:
    return pd.read_csv(project.root / "data/split/manifest.csv")


def test_split_is_stratified_seeded_and_writes_the_class_file(prepared):
    first = manifest(prepared)
    counts = first.groupby(["label", "split"]).size().unstack()
    assert set(first["split"]) == {"train", "val", "calibration", "test", "holdout"}
    assert (counts[["train", "val", "test"]] >= 1).all().all()
    assert (counts["holdout"] == 1).all()
    assert (prepared.root / "data/split/classes.txt").read_text() == "class_0\nclass_1\nclass_2\n"
    prepared.stage("split")
    assert manifest(prepared).equals(first)
    table = pd.read_csv(prepared.root / "reports/split/counts.csv")
    assert list(table.columns) == ["class", "train", "val", "test", "calibration", "holdout", "total"]


def test_held_out_photos_are_copied_for_predict_new(prepared):
    rows = manifest(prepared).query("split == 'holdout'")
    copied = sorted(p.relative_to(prepared.root / "data/holdout").as_posix()
                    for p in (prepared.root / "data/holdout").rglob("*.png"))
    assert copied == sorted(f"{row.label}/{row.path.split('/')[-1]}" for row in rows.itertuples())


def test_another_seed_gives_another_split(prepared):
    first = manifest(prepared)
    prepared.set_params(**{"split.seed": 7})
    prepared.stage("split")
    assert not manifest(prepared)["split"].equals(first["split"])


def test_duplicates_always_land_in_the_same_split(project):
    folder = project.root.parent / "source" / "class_1"
    for number in range(6):
        shutil.copyfile(folder / f"{number:03d}.png", folder / f"{number:03d}_copy.png")
    for name in ("data", "resize", "split"):
        project.stage(name)
    rows = manifest(project)
    rows["stem"] = rows["path"].str.replace("_copy", "")
    assert (rows.groupby("stem")["split"].nunique() == 1).all()


def test_fractions_that_do_not_sum_to_one_are_refused(prepared):
    prepared.set_params(**{"split.train": 0.8, "split.val": 0.3})
    result = prepared.stage("split", check=False)
    assert result.returncode == 2
    assert "split: train + val + test must sum to 1, got 0.8 + 0.3 + 0.15 = 1.25" in result.stderr


def test_a_class_too_small_to_split_is_named_with_its_count(project):
    folder = project.root.parent / "source" / "class_2"
    for path in sorted(folder.iterdir())[3:]:
        path.unlink()
    for name in ("data", "resize"):
        project.stage(name)
    result = project.stage("split", check=False)
    assert result.returncode == 2
    assert "class 'class_2' has 3 distinct image(s)" in result.stderr
    assert "needs at least 4" in result.stderr and "split.holdout_per_class" in result.stderr


def test_a_predefined_split_is_kept_and_only_validation_is_carved(tmp_path, project):
    source = make_dataset(tmp_path / "with_splits", per_class=10, splits=("train", "test"))
    project.set_params(**{"data.source": str(source)})
    for name in ("data", "resize", "split"):
        project.stage(name)
    rows = manifest(project)
    assert (rows[rows["path"].str.startswith("test/")]["split"] == "test").all()
    from_train = rows[rows["path"].str.startswith("train/")]["split"]
    assert set(from_train) == {"train", "val", "calibration", "holdout"}
    summary = pd.read_json(project.root / "reports/split/summary.json", typ="series")
    assert summary["splits"]["test"]["how"] == "predefined"
    assert summary["splits"]["val"]["how"] == "carved from train"


def leak_a_copy(source):
    """The same photo in train/ and, byte for byte, in test/."""
    shutil.copyfile(source / "train/class_0/000.png", source / "test/class_0/leaked.png")
    return ["test/class_0/leaked.png", "train/class_0/000.png"], "byte-identical"


def leak_a_reencoded_photo(source):
    """A photo in train/ and its JPEG re-encode in test/: a near-duplicate."""
    photo = make_photo(seed=1)
    photo.save(source / "train/class_0/photo.png")
    photo.save(source / "test/class_0/photo_reencoded.jpg", quality=75)
    return ["test/class_0/photo_reencoded.jpg", "train/class_0/photo.png"], "near-duplicate"


@pytest.mark.parametrize("leak", [leak_a_copy, leak_a_reencoded_photo])
def test_duplicates_a_predefined_split_leaks_are_reported(tmp_path, project, leak):
    source = make_dataset(tmp_path / "with_splits", per_class=6, splits=("train", "test"))
    paths, kind = leak(source)
    project.set_params(**{"data.source": str(source)})
    for name in ("data", "resize"):
        project.stage(name)
    result = project.stage("split")
    near = 2 if kind == "near-duplicate" else 0
    assert f"puts 2 duplicate images in more than one split ({near} of them near-duplicates)" in result.stdout
    leaks = pd.read_csv(project.root / "reports/split/duplicates_across_splits.csv")
    assert sorted(leaks["path"]) == paths and set(leaks["duplicate_kind"]) == {kind}
    summary = pd.read_json(project.root / "reports/split/summary.json", typ="series")
    assert summary["near_duplicate_images_across_splits"] == near


def test_missing_upstream_output_names_the_stage(project):
    result = project.stage("split", check=False)
    assert result.returncode == 2
    assert "data/resized/index.csv not found" in result.stderr and "dvc repro resize" in result.stderr


def test_class_names_that_look_like_numbers_stay_names(tmp_path, project):
    # scikit-learn's digits arrive as classes "0".."9": reading them back as numbers broke the holdout copy.
    source = make_dataset(tmp_path / "numbered", per_class=10)
    for folder in sorted(source.iterdir()):
        folder.rename(source / folder.name.removeprefix("class_"))
    project.set_params(**{"data.source": str(source)})
    for name in ("data", "resize", "split"):
        project.stage(name)
    assert (project.root / "data/split/classes.txt").read_text() == "0\n1\n2\n"
    assert sorted(path.name for path in (project.root / "data/holdout").iterdir()) == ["0", "1", "2"]


def test_half_of_each_class_s_validation_photos_become_the_calibration_split(project):
    source = make_dataset(project.root.parent / "bigger", per_class=40)
    project.set_params(**{"data.source": str(source)})
    for name in ("data", "resize", "split"):
        project.stage(name)
    counts = manifest(project).groupby(["label", "split"]).size().unstack(fill_value=0)
    # 39 photos a class after the held-out one: about 6 carved for val (0.15), half of them held back
    # (counted in groups: near-duplicates move together).
    assert counts["calibration"].between(2, 4).all() and counts["val"].between(2, 5).all()
    before = manifest(project)
    project.set_params(**{"split.calibration": 0})
    project.stage("split")
    after = manifest(project)
    assert "calibration" not in set(after["split"])
    # Only the held-back photos move, back to val: train and test are the same photos.
    moved = before["split"] != after["split"]
    assert set(before.loc[moved, "split"]) == {"calibration"} and set(after.loc[moved, "split"]) == {"val"}


def test_photos_listed_in_exclude_txt_leave_every_split_and_raw_data_is_untouched(prepared):
    rows = manifest(prepared)
    listed = [rows.query("split == 'train'")["path"].iloc[0], rows.query("split == 'test'")["path"].iloc[0]]
    (prepared.root / "data/exclude.txt").write_text("# reviewed\n" + "\n".join(listed) + "\nclass_0/missing.png\n")
    result = prepared.stage("split")
    after = manifest(prepared)
    assert not after["path"].isin(listed).any() and len(after) == len(rows) - 2
    assert all((prepared.root / "data/raw" / path).exists() for path in listed)
    assert "split: excluded 2 photos listed in data/exclude.txt" in result.stdout
    assert "lists 1 paths that are not in the data (e.g. class_0/missing.png)" in result.stdout
    summary = pd.read_json(prepared.root / "reports/split/summary.json", typ="series")
    assert summary["excluded"] == 2
