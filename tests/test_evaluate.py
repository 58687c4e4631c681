"""evaluate: every trained model scored on the test split, side by side, with the evidence behind the numbers."""

import contextlib
import json

import numpy as np
import pandas as pd
import pytest

from tiny_model import train_on_project, train_tiny_model

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def prepared(prepared):
    """The data stages ran, and no model from the working tree came along in the copy."""
    for path in (prepared.root / "models").glob("*"):
        path.unlink()
    return prepared


def test_evaluate_scores_each_model_present_side_by_side(prepared):
    root = prepared.root
    train_on_project(root, "cnn")
    prepared.stage("evaluate")
    metrics = json.loads((root / "reports/evaluate/metrics.json").read_text())
    assert list(metrics) == ["cnn"]
    cnn = metrics["cnn"]
    assert set(cnn) == {"accuracy", "top3_accuracy", "macro_f1", "log_loss", "images", "ece", "ece_before_temperature",
                        "calibration_bins", "temperature", "min_confidence", "coverage", "selective_accuracy"}
    assert cnn["ece"] == cnn["ece_before_temperature"] and cnn["min_confidence"] == 0.5  # the tiny card's
    reliability = pd.read_csv(root / "reports/evaluate/calibration/cnn.csv")
    assert len(reliability) == 15 and reliability["images"].sum() == cnn["images"]
    assert 0 <= cnn["accuracy"] <= cnn["top3_accuracy"] == 1.0  # three classes: the top 3 always hold the truth
    assert cnn["log_loss"] > 0

    test_rows = pd.read_csv(root / "data/split/manifest.csv").query("split == 'test'")
    confusion = pd.read_csv(root / "reports/evaluate/confusion/cnn.csv")
    assert list(confusion.columns) == ["actual", "predicted"] and len(confusion) == len(test_rows) == cnn["images"]
    assert sorted(confusion["actual"]) == sorted(test_rows["label"])  # class names, not indices
    assert np.mean(confusion["actual"] == confusion["predicted"]) == pytest.approx(cnn["accuracy"])

    per_class = pd.read_csv(root / "reports/evaluate/per_class/cnn.csv")
    assert list(per_class.columns) == ["class", "precision", "recall", "f1", "support"]
    assert list(per_class["class"]) == ["class_0", "class_1", "class_2"]
    assert per_class["support"].sum() == len(test_rows)
    assert per_class["f1"].mean() == pytest.approx(cnn["macro_f1"])
    as_json = json.loads((root / "reports/evaluate/per_class/cnn.json").read_text())
    assert as_json["class_1"]["support"] == int(per_class.loc[1, "support"])
    for figure in ("cnn_confusion.png", "cnn_misclassified.png", "cnn_reliability.png"):
        assert (root / "reports/evaluate/figures" / figure).read_bytes()[:8] == PNG
    # Each test photo's probabilities, by path: what the audit stage reads.
    probabilities = pd.read_csv(root / "reports/evaluate/probabilities/cnn.csv")
    assert list(probabilities.columns) == ["path", "label", "class_0", "class_1", "class_2"]
    assert sorted(probabilities["path"]) == sorted(test_rows["path"])
    np.testing.assert_allclose(probabilities[["class_0", "class_1", "class_2"]].sum(axis=1), 1, atol=1e-5)

    # A second model joins the same metrics file without any change to the stage, and `dvc metrics show` lists both.
    train_on_project(root, "transfer")
    prepared.stage("evaluate")
    metrics = json.loads((root / "reports/evaluate/metrics.json").read_text())
    assert list(metrics) == ["cnn", "transfer"]
    shown = prepared.dvc("metrics", "show", "--json").stdout
    assert '"cnn"' in shown and '"transfer"' in shown and '"top3_accuracy"' in shown
    plots = prepared.dvc("plots", "show", "--json").stdout
    assert "reports/evaluate/confusion/transfer.csv" in plots and "class_2" in plots

    # A model that is gone leaves no stale report behind.
    (root / "models/transfer.keras").unlink()
    prepared.stage("evaluate")
    assert list(json.loads((root / "reports/evaluate/metrics.json").read_text())) == ["cnn"]
    assert not list((root / "reports/evaluate").rglob("transfer*"))


def test_no_model_says_to_train_one(prepared):
    result = prepared.stage("evaluate", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no trained model in models/: run `dvc repro train_cnn`" in result.stderr


def test_missing_split_says_which_stage_to_run(project):
    result = project.stage("evaluate", check=False)
    assert result.returncode == 2 and "dvc repro split" in result.stderr and "Traceback" not in result.stderr


def test_a_model_trained_on_other_classes_is_refused(prepared):
    from imgcls.dataset import load_split

    with contextlib.chdir(prepared.root):
        pixels, labels, _ = load_split("train", 32)
    train_tiny_model(prepared.root, pixels, labels, ["boots", "helmets", "tents"], epochs=1)
    result = prepared.stage("evaluate", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "was trained on classes ['boots', 'helmets', 'tents']" in result.stderr
    assert "dvc repro train_cnn" in result.stderr


def test_a_model_for_another_image_size_is_refused(prepared):
    from imgcls.dataset import load_class_names, load_split

    with contextlib.chdir(prepared.root):
        pixels, labels, _ = load_split("train", 32)
        class_names = load_class_names()
    train_tiny_model(prepared.root, pixels[:, :16, :16], labels, class_names, epochs=1)
    result = prepared.stage("evaluate", check=False)
    assert result.returncode == 2
    assert "models/cnn.keras takes 16x16 images but resize.image_size is 32" in result.stderr
    assert "dvc repro train_cnn" in result.stderr


def test_out_of_class_photos_are_scored_with_auroc(prepared, tmp_path):
    from PIL import Image

    root = prepared.root
    train_on_project(root, "cnn")
    # Photos of none of the classes: grey noise without any coloured square, and one unreadable file.
    ood = tmp_path / "not_gear"
    ood.mkdir()
    rng = np.random.default_rng(5)
    for number in range(8):
        Image.fromarray(rng.integers(0, 80, (40, 40, 3), dtype=np.uint8)).save(ood / f"{number}.jpg")
    (ood / "broken.jpg").write_bytes(b"not a photo")
    prepared.set_params(**{"evaluate.ood_dir": str(ood)})
    result = prepared.stage("evaluate")
    cnn = json.loads((root / "reports/evaluate/metrics.json").read_text())["cnn"]
    assert cnn["ood_images"] == 8 and cnn["ood_unreadable"] == 1
    assert 0 <= cnn["ood_unknown_share"] <= 1 and cnn["ood_auroc"] > 0.5
    assert "out-of-class photos unknown, AUROC" in result.stdout
    prepared.set_params(**{"evaluate.ood_dir": str(tmp_path / "missing")})
    result = prepared.stage("evaluate", check=False)
    assert result.returncode == 2 and "evaluate.ood_dir" in result.stderr and "is not a folder" in result.stderr


def test_the_card_s_target_coverage_is_checked_against_the_test_coverage(prepared):
    root = prepared.root
    card = train_on_project(root, "cnn")
    (root / "models/cnn.json").write_text(json.dumps({**card, "target_coverage": 0.9}))
    result = prepared.stage("evaluate")
    cnn = json.loads((root / "reports/evaluate/metrics.json").read_text())["cnn"]
    # t - 1.96 * sqrt(t (1 - t) / n) on the n test photos.
    bound = 0.9 - 1.96 * (0.9 * 0.1 / cnn["images"]) ** 0.5
    assert cnn["target_coverage"] == 0.9 and cnn["coverage_lower_bound"] == pytest.approx(bound, abs=1e-5)
    assert cnn["coverage_meets_target"] == (cnn["coverage"] >= cnn["coverage_lower_bound"])
    assert "(target 90.00%, met within sampling error: " in result.stdout
    # A fixed min_confidence makes no coverage promise: nothing to check.
    prepared.set_params(**{"predict_new.min_confidence": 0.5})
    prepared.stage("evaluate")
    assert "target_coverage" not in json.loads((root / "reports/evaluate/metrics.json").read_text())["cnn"]
