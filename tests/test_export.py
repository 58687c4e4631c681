"""export: each exported file (TFLite, ONNX) answers like the Keras model it came from."""

import contextlib
import json
import shutil
import warnings

import numpy as np
import pytest

from conftest import TINY_CNN, TINY_TRANSFER
from export import compare, in_float32, require_agreement
from imgcls.errors import UserError
from tiny_model import CARD_GEOMETRY, copy_model, train_on_project


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
    assert json.loads((exported / "cnn.json").read_text()) == {
        **card, "files": {"cnn.tflite": {"precision": "float16"}, "cnn.onnx": {"precision": "float32"}}}
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


def test_the_gate_passes_at_min_agreement_and_stops_below_it_naming_the_figure_file_and_param():
    keras_probabilities = np.eye(3)[np.arange(200) % 3]
    labels = np.arange(200) % 3
    exported = keras_probabilities.copy()
    exported[:3] = np.roll(exported[:3], 1, axis=1)  # 3 answers of 200 changed: 98.5% agreement
    figures = compare(exported, keras_probabilities, labels)
    assert figures["top1_agreement"] == 0.985 and figures["test_accuracy"] == 0.985

    require_agreement("models/export/cnn.onnx", figures, 0.985, 200)
    with pytest.raises(UserError) as error:
        require_agreement("models/export/cnn.onnx", figures, 0.99, 200)
    message = str(error.value)
    for part in ("models/export/cnn.onnx", "98.50% of the 200 test images", "export.min_agreement (0.99)",
                 "nothing was written", "Try another export.quantization"):
        assert part in message, (part, message)
    with pytest.raises(UserError, match="resizes without antialiasing.*export.formats: \\[onnx\\] keeps it"):
        require_agreement("models/export/cnn.tflite", {**figures, "resizing_without_antialiasing": True}, 0.99, 200)
    # An empty test split has no figure to check.
    require_agreement("models/export/cnn.onnx", compare(exported[:0], keras_probabilities[:0], labels[:0]), 0.99, 0)


def save_near_tie_model(root, class_names: list[str]) -> None:
    """models/cnn.keras: a model whose top class wins by less than float16 can tell apart.

    Class 1's weights are class 0's times (1 + 2**-12), so Keras (float32) always
    answers class 1, and TFLite's float16 weights, in which the two are equal,
    make every answer a tie that goes to class 0.
    """
    import keras

    from imgcls.modelio import save_model

    model = keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Rescaling(1 / 255),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(len(class_names), activation="softmax"),
    ])
    kernel = np.zeros((3, len(class_names)), np.float32)
    kernel[:, 0], kernel[:, 1] = 1.0, 1.0 + 2.0 ** -12
    model.layers[-1].set_weights([kernel, np.zeros(len(class_names), np.float32)])
    card = {"name": "cnn", "class_names": class_names, "image_size": 32, **CARD_GEOMETRY,
            "val_accuracy": 0.5, "temperature": 1.0, "confidence_threshold": 0.5}
    with contextlib.chdir(root):
        save_model(model, "cnn", card)


def test_a_file_below_min_agreement_stops_the_stage_and_nothing_is_written(prepared):
    from imgcls.dataset import load_class_names

    with contextlib.chdir(prepared.root):
        class_names = load_class_names()
    save_near_tie_model(prepared.root, class_names)
    prepared.set_params(**{"export.model": "cnn", "export.formats": ["onnx"], "export.quantization": "float16"})
    prepared.stage("export")  # ONNX keeps float32 weights: the same answers
    exported = prepared.root / "models" / "export"
    before = {path.name: path.read_bytes() for path in exported.iterdir()}
    metrics_before = metrics_of(prepared)
    assert sorted(before) == ["cnn.json", "cnn.labels.txt", "cnn.onnx"]
    assert metrics_before["onnx"]["top1_agreement"] == 1.0

    prepared.set_params(**{"export.formats": ["onnx", "tflite"]})
    result = prepared.stage("export", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert ("models/export/cnn.tflite would agree with the Keras model's top-1 class on 0.00% of the"
            f" {metrics_before['test_images']} test images, below export.min_agreement (0.99)") in result.stderr
    # The files of the last export that passed stay as they were; the failed one is nowhere.
    assert {path.name: path.read_bytes() for path in exported.iterdir()} == before
    assert metrics_of(prepared) == metrics_before
    assert [path.name for path in (prepared.root / "models").iterdir() if path.name.startswith(".export")] == []


def mixed_precision_model(class_names: list[str]):
    """A model built under mixed_bfloat16 like the trainers' on a recent GPU: a nested augmentation
    Sequential, a nested functional base, a float32 softmax and the Temperature layer."""
    import keras

    from imgcls.calibration import with_temperature

    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        keras.utils.set_random_seed(0)
        pixels = keras.Input((32, 32, 3), name="pixels")
        augmentation = keras.Sequential([keras.layers.RandomFlip("horizontal"), keras.layers.RandomZoom(0.1)],
                                        name="augmentation")
        base_input = keras.Input((16, 16, 3))
        features = keras.layers.Conv2D(8, 3, activation="relu6")(keras.layers.Rescaling(1 / 127.5, -1)(base_input))
        base = keras.Model(base_input, keras.layers.DepthwiseConv2D(3)(features), name="base")
        x = keras.layers.Resizing(16, 16)(augmentation(pixels))
        x = keras.layers.GlobalAveragePooling2D()(base(x))
        outputs = keras.layers.Dense(len(class_names), activation="softmax", dtype="float32")(x)
        return with_temperature(keras.Model(pixels, outputs, name="cnn"), 0.5)
    finally:
        keras.config.set_dtype_policy("float32")


def every_layer(model):
    for layer in model.layers:
        yield layer
        yield from every_layer(layer) if hasattr(layer, "layers") else ()


def test_a_mixed_precision_model_is_rebuilt_in_float32_with_its_weights_and_answers():
    model = mixed_precision_model(["a", "b", "c"])
    assert {layer.dtype_policy.name for layer in every_layer(model)} == {"mixed_bfloat16", "float32"}
    copy = in_float32(model)
    assert copy is not model
    assert {layer.dtype_policy.name for layer in every_layer(copy)} == {"float32"}
    assert [layer.name for layer in every_layer(copy)] == [layer.name for layer in every_layer(model)]
    assert all(np.array_equal(first, second) for first, second in zip(copy.get_weights(), model.get_weights()))
    pixels = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype(np.float32)
    probabilities = copy.predict(pixels, verbose=0)
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities, model.predict(pixels, verbose=0), atol=0.02)
    # A float32 model is exported as it is.
    assert in_float32(copy) is copy


def test_a_model_trained_in_bfloat16_exports_to_both_formats(prepared):
    import keras

    from imgcls.dataset import load_class_names, load_split
    from imgcls.modelio import save_model

    with contextlib.chdir(prepared.root):
        class_names = load_class_names()
        pixels, labels, _ = load_split("train", 32)
    model = mixed_precision_model(class_names)
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss="sparse_categorical_crossentropy")
    model.fit(pixels.astype(np.float32), labels, epochs=30, batch_size=16, verbose=0)
    card = {"name": "cnn", "class_names": class_names, "image_size": 32, **CARD_GEOMETRY,
            "val_accuracy": 0.5, "temperature": 0.5, "confidence_threshold": 0.5}
    with contextlib.chdir(prepared.root):
        save_model(model, "cnn", card)
    prepared.set_params(**{"export.model": "cnn", "export.formats": ["tflite", "onnx"]})
    prepared.stage("export")
    metrics = metrics_of(prepared)
    assert metrics["rebuilt_in_float32"] is True
    exported = prepared.root / "models" / "export"
    for format_name in ("tflite", "onnx"):
        assert (exported / f"cnn.{format_name}").stat().st_size == metrics[format_name]["bytes"]
        assert metrics[format_name]["top1_agreement"] >= 0.99
