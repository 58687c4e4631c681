"""export: the TFLite file answers like the Keras model it came from."""

import contextlib
import json
import shutil
import warnings

import numpy as np
import pytest

from conftest import TINY_CNN
from tiny_model import copy_model, train_on_project


@pytest.fixture
def prepared(prepared):
    """The prepared project without any model copied from the working tree: each test trains its own."""
    shutil.rmtree(prepared.root / "models", ignore_errors=True)
    return prepared


def test_tflite_top1_agrees_with_keras_on_the_test_split(prepared):
    import keras
    import tensorflow as tf

    from imgcls.dataset import load_split

    card = train_on_project(prepared.root, "cnn")
    prepared.set_params(**{"export.model": "cnn", "export.quantization": "float16"})
    result = prepared.stage("export")
    assert "models/cnn.tflite" in result.stdout

    models = prepared.root / "models"
    assert (models / "cnn.labels.txt").read_text().splitlines() == card["class_names"]
    content = (models / "cnn.tflite").read_bytes()
    with contextlib.chdir(prepared.root):
        pixels, labels, _ = load_split("test", 32)
    keras_top1 = keras.saving.load_model(models / "cnn.keras").predict(pixels.astype(np.float32), verbose=0).argmax(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        interpreter = tf.lite.Interpreter(model_content=content)
    lite_top1 = []
    for image in pixels:  # one at a time, as on a device: the file's own input shape (1, size, size, 3)
        interpreter.allocate_tensors()
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], image[None].astype(np.float32))
        interpreter.invoke()
        lite_top1.append(interpreter.get_tensor(interpreter.get_output_details()[0]["index"])[0].argmax())
    assert len(pixels) >= 6
    assert np.array_equal(np.array(lite_top1), keras_top1)

    metrics = json.loads((prepared.root / "reports" / "export" / "metrics.json").read_text())
    assert metrics["model"] == "cnn" and metrics["quantization"] == "float16"
    assert metrics["top1_agreement"] == 1.0 and metrics["test_images"] == len(pixels)
    assert metrics["tflite_bytes"] == len(content) < metrics["keras_bytes"]
    assert metrics["tflite_test_accuracy"] == pytest.approx(float(np.mean(keras_top1 == labels)))


def test_best_model_dynamic_quantisation_and_missing_model(prepared):
    prepared.set_params(**{"export.model": "transfer", "export.quantization": "dynamic"})
    result = prepared.stage("export", check=False)
    assert result.returncode == 2 and "models/transfer.keras not found: train it with `dvc repro train_transfer`" in result.stderr

    train_on_project(prepared.root, "cnn", val_accuracy=0.6)
    copy_model(prepared.root, "cnn", "transfer", val_accuracy=0.7)
    prepared.set_params(**{"export.model": "best"})
    prepared.stage("export")
    metrics = json.loads((prepared.root / "reports" / "export" / "metrics.json").read_text())
    assert metrics["model"] == "transfer" and metrics["quantization"] == "dynamic"
    assert metrics["top1_agreement"] >= 0.8
    assert (prepared.root / "models" / "best.tflite").stat().st_size == metrics["tflite_bytes"]
    assert (prepared.root / "models" / "best.labels.txt").exists()


def test_a_trained_cnn_with_antialiased_resizing_exports_with_plain_resizing(prepared):
    # TFLite has no antialiased resize: export swaps in plain bilinear resizing and measures the effect.
    prepared.set_params(**{**TINY_CNN, "train_cnn.epochs": 2, "export.model": "cnn"})
    prepared.stage("train_cnn")
    prepared.stage("export")
    metrics = json.loads((prepared.root / "reports" / "export" / "metrics.json").read_text())
    assert metrics["resizing_without_antialiasing"] is True
    assert 0 <= metrics["top1_agreement"] <= 1 and (prepared.root / "models" / "cnn.tflite").stat().st_size > 0
