"""export: each exported file (TFLite, ONNX) answers like the Keras model it came from."""

import contextlib
import json
import shutil
import warnings

import numpy as np
import pytest

from conftest import TINY_CNN, TINY_TRANSFER
from tiny_model import copy_model, train_on_project


@pytest.fixture
def prepared(prepared):
    """The prepared project without any model copied from the working tree: each test trains its own."""
    shutil.rmtree(prepared.root / "models", ignore_errors=True)
    return prepared


def metrics_of(project) -> dict:
    return json.loads((project.root / "reports" / "export" / "metrics.json").read_text())


def test_each_format_top1_agrees_with_keras_on_the_test_split(prepared):
    import keras
    import onnxruntime
    import tensorflow as tf

    from imgcls.dataset import load_split

    card = train_on_project(prepared.root, "cnn")
    prepared.set_params(**{"export.model": "cnn", "export.formats": ["tflite", "onnx"],
                           "export.quantization": "float16"})
    result = prepared.stage("export")
    assert "models/export/cnn.tflite" in result.stdout and "models/export/cnn.onnx" in result.stdout

    exported = prepared.root / "models" / "export"
    assert (exported / "cnn.labels.txt").read_text().splitlines() == card["class_names"]
    assert json.loads((exported / "cnn.json").read_text()) == card
    with contextlib.chdir(prepared.root):
        pixels, labels, _ = load_split("test", 32)
    keras_probabilities = keras.saving.load_model(prepared.root / "models" / "cnn.keras").predict(
        pixels.astype(np.float32), verbose=0)
    keras_top1 = keras_probabilities.argmax(axis=1)
    # Each file run one photo at a time, as on a device, by TensorFlow's own interpreter and by onnxruntime.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        interpreter = tf.lite.Interpreter(model_content=(exported / "cnn.tflite").read_bytes())
    session = onnxruntime.InferenceSession(str(exported / "cnn.onnx"), providers=["CPUExecutionProvider"])
    lite_top1, onnx_probabilities = [], []
    for image in pixels:
        interpreter.allocate_tensors()
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], image[None].astype(np.float32))
        interpreter.invoke()
        lite_top1.append(interpreter.get_tensor(interpreter.get_output_details()[0]["index"])[0].argmax())
        onnx_probabilities.append(session.run(None, {"pixels": image[None].astype(np.float32)})[0][0])
    assert len(pixels) >= 6
    assert np.array_equal(np.array(lite_top1), keras_top1)
    assert np.abs(np.array(onnx_probabilities) - keras_probabilities).max() < 1e-4

    metrics = metrics_of(prepared)
    assert metrics["model"] == "cnn" and metrics["test_images"] == len(pixels)
    assert metrics["keras_test_accuracy"] == pytest.approx(float(np.mean(keras_top1 == labels)))
    for format_name in ("tflite", "onnx"):
        entry = metrics[format_name]
        assert entry["top1_agreement"] == 1.0 and entry["test_accuracy"] == metrics["keras_test_accuracy"]
        assert entry["bytes"] == (exported / f"cnn.{format_name}").stat().st_size
        assert entry["resizing_without_antialiasing"] is False
    assert metrics["tflite"]["quantization"] == "float16" and metrics["tflite"]["bytes"] < metrics["keras_bytes"]
    assert metrics["onnx"]["max_probability_difference"] < 1e-4


def test_best_model_dynamic_quantisation_one_format_and_missing_model(prepared):
    prepared.set_params(**{"export.model": "transfer", "export.quantization": "dynamic"})
    result = prepared.stage("export", check=False)
    assert result.returncode == 2 and "models/transfer.keras not found: train it with `dvc repro train_transfer`" in result.stderr

    train_on_project(prepared.root, "cnn", val_accuracy=0.6)
    copy_model(prepared.root, "cnn", "transfer", val_accuracy=0.7)
    prepared.set_params(**{"export.model": "best", "export.formats": ["tflite"]})
    prepared.stage("export")
    metrics = metrics_of(prepared)
    assert metrics["model"] == "transfer" and metrics["tflite"]["quantization"] == "dynamic" and "onnx" not in metrics
    assert metrics["tflite"]["top1_agreement"] >= 0.8
    exported = prepared.root / "models" / "export"
    assert (exported / "best.tflite").stat().st_size == metrics["tflite"]["bytes"]
    assert (exported / "best.labels.txt").exists() and not (exported / "best.onnx").exists()


def test_unknown_or_repeated_formats_are_refused_by_name(prepared):
    for formats, message in ((["onnx", "onnx"], "lists a format twice"), (["tflite", "coreml"], "export.formats.1"),
                             ([], "export.formats")):
        prepared.set_params(**{"export.formats": formats})
        result = prepared.stage("export", check=False)
        assert result.returncode == 2 and message in result.stderr, (formats, result.stderr)


def test_a_trained_cnn_with_antialiased_resizing_is_exact_in_onnx_only(prepared):
    # TFLite has no antialiased resize: export swaps in plain bilinear resizing and measures the effect.
    # ONNX (opset 18) has one: the same filter, so the answers stay Keras' own up to float rounding.
    prepared.set_params(**{**TINY_CNN, "train_cnn.epochs": 2, "export.model": "cnn"})
    prepared.stage("train_cnn")
    prepared.stage("export")
    metrics = metrics_of(prepared)
    assert metrics["tflite"]["resizing_without_antialiasing"] is True
    assert 0 <= metrics["tflite"]["top1_agreement"] <= 1
    assert metrics["onnx"]["resizing_without_antialiasing"] is False
    assert metrics["onnx"]["top1_agreement"] == 1.0 and metrics["onnx"]["max_probability_difference"] < 1e-3


def test_a_trained_transfer_model_exports_to_both_formats(prepared):
    prepared.set_params(**{**TINY_TRANSFER, "export.model": "transfer"})
    prepared.stage("train_transfer")
    prepared.stage("export")
    metrics = metrics_of(prepared)
    assert metrics["model"] == "transfer"
    assert metrics["onnx"]["top1_agreement"] == 1.0 and metrics["onnx"]["max_probability_difference"] < 1e-4
    assert metrics["tflite"]["top1_agreement"] >= 0.8
