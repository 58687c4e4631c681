"""predict_new: the stage and the command-line tool, with a real tiny trained model."""

import contextlib
import json
import shutil

import pandas as pd
import pytest
from PIL import Image

from conftest import make_dataset
from tiny_model import copy_model, train_on_project


@pytest.fixture
def prepared(prepared):
    """The prepared project without any model copied from the working tree: each test trains its own."""
    shutil.rmtree(prepared.root / "models", ignore_errors=True)
    return prepared


def placeholder_model(root, name: str, val_accuracy: float = 0.5) -> None:
    """A model file and card for the checks that happen before any model is loaded."""
    (root / "models").mkdir(exist_ok=True)
    (root / "models" / f"{name}.keras").write_bytes(b"never loaded")
    card = {"name": name, "class_names": ["class_0", "class_1", "class_2"], "val_accuracy": val_accuracy}
    (root / "models" / f"{name}.json").write_text(json.dumps(card))


def new_photos(root):
    """Unseen generated photos in class folders, plus files that are not usable images."""
    make_dataset(root, classes=3, per_class=3, size=48, seed=7)
    (root / "class_0" / "truncated.png").write_bytes((root / "class_0" / "000.png").read_bytes()[:200])
    (root / "notes.txt").write_text("not a photo")
    (root / "empty.jpg").write_bytes(b"")
    (root / ".DS_Store").write_bytes(b"\0")  # operating-system litter: ignored, not an error
    return root


def test_cli_classifies_folders_and_files_and_lists_errors(prepared, tmp_path):
    train_on_project(prepared.root)
    photos = new_photos(tmp_path / "new")
    single = tmp_path / "single.jpg"
    Image.open(photos / "class_2" / "000.png").convert("RGB").save(single)  # a single file, another format

    result = prepared.stage("predict_new", "--images", str(photos), str(single), "--out", "out/predictions.csv",
                            "--model", "cnn", "--top-k", "2")
    assert "out/predictions.csv" in result.stdout
    frame = pd.read_csv(prepared.root / "out" / "predictions.csv", keep_default_na=False)
    for column in ("image", "true_label", "predicted", "confidence", "unknown", "best_guess",
                   "top1_class", "top1_probability", "top2_class", "top2_probability", "error"):
        assert column in frame.columns
    assert "top3_class" not in frame.columns
    assert len(frame) == 9 + 3 + 1  # 9 photos, 3 unusable files, the single file; .DS_Store skipped

    errors = frame[frame["error"] != ""]
    errors = errors.set_index(errors["image"].str.rsplit("/", n=1).str[-1])
    assert set(errors.index) == {"truncated.png", "notes.txt", "empty.jpg"}
    assert errors.loc["truncated.png", "error"].startswith("truncated")
    assert errors.loc["notes.txt", "error"].startswith("not an image")
    assert errors.loc["empty.jpg", "error"].startswith("empty file")
    assert (errors["predicted"] == "").all()

    good = frame[frame["error"] == ""]
    labelled = good[good["true_label"] != ""]
    assert len(labelled) == 9
    assert good.loc[~good["image"].str.contains("class_"), "true_label"].tolist() == [""]
    assert (labelled["best_guess"] == labelled["true_label"]).mean() >= 0.8
    probabilities = good[["top1_probability", "top2_probability"]].astype(float)
    assert (probabilities["top1_probability"] >= probabilities["top2_probability"]).all()
    assert (good["confidence"].astype(float) == probabilities["top1_probability"]).all()

    with Image.open(prepared.root / "out" / "predictions.png") as figure:
        assert figure.width > 400 and figure.height > 200


def test_stage_uses_params_best_model_and_flags_unknown(prepared, tmp_path):
    train_on_project(prepared.root, "cnn", val_accuracy=0.5)
    copy_model(prepared.root, "cnn", "transfer", val_accuracy=0.9)
    photos = make_dataset(tmp_path / "holdout", classes=3, per_class=2, size=32, seed=9)
    # At min_confidence 1 every photo the model is not absolutely sure of is unknown.
    prepared.set_params(**{"predict_new.input_dir": str(photos), "predict_new.min_confidence": 1.0})

    result = prepared.stage("predict_new")
    assert "models/transfer.keras" in result.stdout  # best = the higher val_accuracy
    frame = pd.read_csv(prepared.root / "reports" / "predictions.csv", keep_default_na=False)
    assert (prepared.root / "reports" / "predictions.png").stat().st_size > 10_000
    assert len(frame) == 6 and (frame["error"] == "").all()
    assert {"top1_class", "top3_class"} <= set(frame.columns)  # top_k from params
    unknown = frame["unknown"].astype(str) == "True"
    assert unknown.sum() >= 1
    assert (unknown == (frame["confidence"].astype(float) < 1.0)).all()
    assert (frame.loc[unknown, "predicted"] == "unknown").all()
    assert frame.loc[unknown, "best_guess"].isin(["class_0", "class_1", "class_2"]).all()
    assert (frame.loc[~unknown, "predicted"] == frame.loc[~unknown, "best_guess"]).all()


def test_min_confidence_auto_takes_the_threshold_from_the_model_card(prepared, tmp_path):
    import json

    train_on_project(prepared.root, "cnn")
    photos = make_dataset(tmp_path / "holdout", classes=3, per_class=2, size=32, seed=9)
    card_file = prepared.root / "models/cnn.json"
    card = json.loads(card_file.read_text())
    card_file.write_text(json.dumps({**card, "confidence_threshold": 1.0}))
    prepared.set_params(**{"predict_new.input_dir": str(photos), "predict_new.min_confidence": "auto",
                           "predict_new.model": "cnn"})
    prepared.stage("predict_new")
    frame = pd.read_csv(prepared.root / "reports" / "predictions.csv", keep_default_na=False)
    assert ((frame["unknown"].astype(str) == "True") == (frame["confidence"].astype(float) < 1.0)).all()
    # A model whose card has no threshold (trained before it was recorded) gets a clear message.
    card_file.write_text(json.dumps({key: value for key, value in card.items() if key != "confidence_threshold"}))
    result = prepared.stage("predict_new", check=False)
    assert result.returncode == 2 and "has no confidence_threshold" in result.stderr
    assert "dvc repro train_cnn" in result.stderr and "predict_new.min_confidence to a number" in result.stderr


def test_choose_model(prepared, tmp_path):
    from imgcls.errors import UserError
    from imgcls.predict import choose_model

    with contextlib.chdir(prepared.root):
        with pytest.raises(UserError, match=r"no trained model in models/ .*dvc repro train_cnn"):
            choose_model("best")
        with pytest.raises(UserError, match=r"models/transfer.keras not found: train it with `dvc repro train_transfer`"):
            choose_model("transfer")
        with pytest.raises(UserError, match="neither one of cnn, transfer, best nor a .keras, .onnx, .tflite file"):
            choose_model("bigger")
    placeholder_model(prepared.root, "cnn", val_accuracy=0.8)
    placeholder_model(prepared.root, "transfer", val_accuracy=0.8)
    with contextlib.chdir(prepared.root):
        assert str(choose_model("best")) == "models/cnn.keras"  # a tie picks the first name, every time
        assert str(choose_model("transfer")) == "models/transfer.keras"
        (prepared.root / "models" / "transfer.json").write_text('{"name": "transfer"}')
        with pytest.raises(UserError, match="transfer.json has no numeric val_accuracy"):
            choose_model("best")


def test_bad_input_gets_one_clear_message(prepared, tmp_path):
    placeholder_model(prepared.root, "cnn")  # every check below fails before the model is loaded
    (tmp_path / "empty").mkdir()
    cases = [
        (["--images", str(tmp_path / "nowhere")], "nowhere not found: give existing image files or folders"),
        (["--images", str(tmp_path / "empty")], "no files in"),
        (["--images", str(prepared.root / "data" / "raw"), "--out", "out.txt"], "give a .csv file name"),
        (["--images", str(prepared.root / "data" / "raw"), "--model", "models/none.keras"], "models/none.keras not found"),
        (["--images", str(prepared.root / "data" / "raw"), "--top-k", "0"], "--top-k must be at least 1"),
    ]
    for arguments, message in cases:
        result = prepared.stage("predict_new", *arguments, check=False)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr
        assert "Traceback" not in result.stderr

    result = prepared.stage("predict_new", check=False)  # the default data/holdout may not exist here
    if not (prepared.root / "data" / "holdout").exists():
        assert result.returncode == 2 and "predict_new.input_dir = 'data/holdout' does not exist" in result.stderr

    prepared.set_params(**{"predict_new.min_confidence": 1.5, "predict_new.model": "biggest"})
    result = prepared.stage("predict_new", check=False)
    assert result.returncode == 2
    assert "predict_new.min_confidence = 1.5" in result.stderr and "predict_new.model = 'biggest'" in result.stderr

    (prepared.root / "models" / "cnn.json").unlink()
    prepared.set_params(**{"predict_new.min_confidence": 0.5, "predict_new.model": "cnn"})
    result = prepared.stage("predict_new", "--images", str(prepared.root / "data" / "raw"), check=False)
    assert result.returncode == 2 and "models/cnn.json not found: a model needs its card beside it" in result.stderr
