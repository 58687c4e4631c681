"""The label audit: planted label errors are found and ranked first, and a reviewed exclusion list removes them."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from conftest import COLOURS, TINY_CNN, TINY_TRANSFER
from imgcls.label_audit import out_of_fold_probabilities, pixel_features, rank_label_issues


def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 handwritten digits as 32 x 32 RGB photos (each 8 x 8 pixel a 4 x 4 block), and labels."""
    digits = load_digits()
    grey = np.kron((digits.images / 16 * 255).astype(np.uint8), np.ones((4, 4), dtype=np.uint8))
    return np.repeat(grey[..., None], 3, axis=-1), digits.target


@pytest.mark.parametrize("flip_seed", [0, 1, 2])
def test_digits_with_5_percent_of_labels_flipped_are_found_at_80_percent_recall_and_precision(flip_seed):
    images, labels = digit_images()
    rng = np.random.default_rng(flip_seed)
    flipped = rng.random(len(labels)) < 0.05
    given = labels.copy()
    given[flipped] = (labels[flipped] + rng.integers(1, 10, flipped.sum())) % 10  # always another digit
    probabilities, summary = out_of_fold_probabilities(pixel_features(images), given, 10, folds=5, seed=0)
    issues = rank_label_issues(given, probabilities, "prune_by_class")
    found = flipped[issues["row"]]
    recall, precision = found.sum() / flipped.sum(), found.mean()
    print(f"flip seed {flip_seed}: {flipped.sum()} flipped, {len(issues)} flagged, recall {recall:.3f},"
          f" precision {precision:.3f}, {summary}")
    assert recall >= 0.8 and precision >= 0.8
    # Ranked by the given label's probability: the top of the list is almost all planted errors.
    assert found[:40].mean() >= 0.9
    assert (issues["suggested"].to_numpy()[found] == labels[issues["row"].to_numpy()[found]]).mean() >= 0.9


def test_a_class_with_a_single_photo_is_named():
    with pytest.raises(Exception, match="at least 2 train/val photos of every class"):
        out_of_fold_probabilities(np.zeros((5, 4)), np.array([0, 0, 0, 0, 1]), 2, folds=5, seed=0)


def colour_photos(root: Path, planted: list[tuple[str, str]]) -> list[str]:
    """12 noisy photos of one colour per class (class_c/NNN.png); each (colour's class, folder) in `planted` adds
    a photo of the first class's colour filed under the second. Returns the planted photos' paths."""
    rng = np.random.default_rng(0)
    for class_index in range(3):
        (root / f"class_{class_index}").mkdir(parents=True)
    paths = [f"class_{class_index}/{number:03d}.png" for class_index in range(3) for number in range(12)]
    paths += [f"{folder}/planted_{number}.png" for number, (_, folder) in enumerate(planted)]
    colours = [int(path[6]) for path in paths[:36]] + [int(colour[6]) for colour, _ in planted]
    for path, colour in zip(paths, colours):
        pixels = rng.normal(COLOURS[colour], 40, size=(40, 40, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / path)
    return paths[36:]


def test_the_audit_stage_ranks_planted_errors_first_and_excluding_them_reruns_split_onward(project, tmp_path):
    # Two red photos (class_0's colour) filed under class_1, two green ones (class_1's) under class_2.
    planted = colour_photos(tmp_path / "colours", [("class_0", "class_1")] * 2 + [("class_1", "class_2")] * 2)
    project.set_params(**TINY_CNN, **TINY_TRANSFER, **{"data.source": str(tmp_path / "colours")})
    project.dvc("repro", "audit")

    table = pd.read_csv(project.root / "reports/audit/label_issues.csv")
    assert list(table.columns) == ["rank", "photo", "split", "given_label", "suggested_label", "score",
                                   "suggested_probability", "scored_by"]
    metrics = json.loads((project.root / "reports/audit/metrics.json").read_text())
    assert metrics["classifier"]["features"] == "pixels"  # train_transfer.weights: none in tests
    assert metrics["label_issues"] == len(table) and metrics["photos"] == 40 - 3  # one a class held out
    manifest = pd.read_csv(project.root / "data/split/manifest.csv").set_index("path")
    # The cross-validated ones (train, val, calibration) head the list, with the right class suggested; a test
    # photo is scored by the tiny trained models, which may not know the colours yet.
    cross_validated = [path for path in planted if manifest.loc[path, "split"] in ("train", "val", "calibration")]
    assert len(cross_validated) >= 2
    assert set(table["photo"].head(len(cross_validated))) == set(cross_validated)
    top = table.head(len(cross_validated)).set_index("photo")
    assert all(top.loc[path, "suggested_label"] == ("class_0" if path.startswith("class_1") else "class_1")
               for path in cross_validated)
    test_rows = table[table["split"] == "test"]
    assert test_rows["scored_by"].str.startswith("mean of trained models (cnn, transfer)").all()
    assert (project.root / "reports/audit/suspects.png").stat().st_size > 10_000
    assert "label_issues" in project.dvc("metrics", "show").stdout

    # A reviewer confirms them: split drops them from every split, and what follows reruns.
    (project.root / "data/exclude.txt").write_text("# reviewed\n" + "\n".join(planted) + "\n")
    assert "data/exclude.txt" in project.dvc("status", "split").stdout
    project.dvc("repro", "split")
    after = pd.read_csv(project.root / "data/split/manifest.csv")
    assert not after["path"].isin(planted).any() and len(after) == 36
    assert all((project.root / "data/raw" / photo).exists() for photo in planted)  # raw data untouched
