"""export: INT8 files (full-integer TFLite, static QDQ ONNX) keep float32 input and output and ship only
when they keep the Keras model's test accuracy."""

import contextlib
import json
import shutil
import warnings

import numpy as np
import pytest

from export import compare, require_accuracy
from imgcls.errors import UserError
from test_params import write_params
from tiny_model import train_on_project

INT8_BOTH = {"export.model": "cnn", "export.formats": ["tflite", "onnx"], "export.quantization": "int8",
             "export.onnx_quantization": "int8", "export.calibration_images": 16}


@pytest.fixture
def prepared(prepared):
    """The prepared project with a tiny CNN trained on its train split and no other model."""
    shutil.rmtree(prepared.root / "models", ignore_errors=True)
    train_on_project(prepared.root, "cnn")
    return prepared


def metrics_of(project) -> dict:
    return json.loads((project.root / "reports" / "export" / "metrics.json").read_text())


def exported_files(project) -> dict[str, bytes]:
    folder = project.root / "models" / "export"
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())} if folder.exists() else {}


def test_int8_files_in_both_formats_pass_the_gate_and_read_like_the_float_ones(prepared):
    from ai_edge_litert.interpreter import Interpreter
    import onnx
    import onnxruntime

    from imgcls.dataset import load_split
    from imgcls.predict import Classifier

    prepared.set_params(**INT8_BOTH)
    result = prepared.stage("export")
    for name in ("cnn.tflite (int8", "cnn.onnx (float32", "cnn.int8.onnx (int8"):
        assert f"models/export/{name}" in result.stdout, result.stdout
    exported = prepared.root / "models" / "export"
    files = exported_files(prepared)
    assert sorted(files) == ["cnn.int8.json", "cnn.int8.onnx", "cnn.json", "cnn.labels.txt", "cnn.onnx", "cnn.tflite"]
    card = json.loads(files["cnn.json"])
    assert card["files"] == {"cnn.tflite": {"precision": "int8"}, "cnn.onnx": {"precision": "float32"},
                             "cnn.int8.onnx": {"precision": "int8"}}
    assert files["cnn.int8.json"] == files["cnn.json"]

    metrics = metrics_of(prepared)
    assert metrics["calibration_images"] == 16
    for key, file_name in (("tflite", "cnn.tflite"), ("onnx_int8", "cnn.int8.onnx")):
        entry = metrics[key]
        assert entry["precision"] == "int8" and entry["bytes"] == len(files[file_name])
        assert entry["test_accuracy"] >= metrics["keras_test_accuracy"] - 0.01
    assert metrics["onnx"]["precision"] == "float32" and metrics["onnx"]["top1_agreement"] == 1.0

    # Full-integer inside, float32 at the edges: what imgcls.runtimes and the server read.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        interpreter = Interpreter(model_content=files["cnn.tflite"])
    assert interpreter.get_input_details()[0]["dtype"] == np.float32
    assert interpreter.get_output_details()[0]["dtype"] == np.float32
    assert {detail["dtype"] for detail in interpreter.get_tensor_details()} >= {np.int8, np.int32}
    session = onnxruntime.InferenceSession(str(exported / "cnn.int8.onnx"), providers=["CPUExecutionProvider"])
    assert [put.type for put in (*session.get_inputs(), *session.get_outputs())] == ["tensor(float)"] * 2
    graph = onnx.load(str(exported / "cnn.int8.onnx")).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in graph.node}
    assert onnx.TensorProto.INT8 in {tensor.data_type for tensor in graph.initializer}

    # The project's own runtimes run each file as they run a float one, and give the accuracy the stage measured.
    with contextlib.chdir(prepared.root):
        pixels, labels, _ = load_split("test", 32)
        for key, file_name in (("tflite", "cnn.tflite"), ("onnx_int8", "cnn.int8.onnx")):
            classifier = Classifier(exported / file_name)
            probabilities = classifier.probabilities(pixels)
            assert probabilities.dtype == np.float32
            np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=0.02)
            assert float(np.mean(probabilities.argmax(axis=1) == labels)) == metrics[key]["test_accuracy"]

    # The same params and data make the same files.
    prepared.stage("export")
    assert exported_files(prepared) == files


def test_a_broken_calibration_set_fails_the_gate_naming_the_figure_and_nothing_is_written(prepared):
    # Every training photo made black, the model and the test split untouched: calibrated on those, the
    # activation ranges miss everything a real photo reaches.
    images_file = prepared.root / "data" / "resized" / "images_32.npy"
    manifest = (prepared.root / "data" / "split" / "manifest.csv").read_text().splitlines()
    train_ids = [int(line.split(",")[0]) for line in manifest[1:] if line.rsplit(",", 1)[1] == "train"]
    images = np.load(images_file)
    images[train_ids] = 0
    np.save(images_file, images)
    prepared.set_params(**INT8_BOTH)
    for changes, published in (({"export.formats": ["tflite"], "export.quantization": "int8",
                                 "export.onnx_quantization": "none"}, "models/export/cnn.tflite"),
                               ({"export.formats": ["onnx"], "export.quantization": "float16",
                                 "export.onnx_quantization": "int8"}, "models/export/cnn.int8.onnx")):
        prepared.set_params(**changes)
        result = prepared.stage("export", check=False)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        message = " ".join(result.stderr.split())
        for part in (f"export: {published} (int8) would classify", "correctly, against 100.00% for the Keras model",
                     "above export.max_accuracy_drop (0.01), so nothing was written to models/export",
                     "export.calibration_images"):
            assert part in message, (part, message)
        assert exported_files(prepared) == {}
        assert not (prepared.root / "reports" / "export" / "metrics.json").exists()
        assert [path.name for path in (prepared.root / "models").iterdir() if path.name.startswith(".export")] == []


def test_the_accuracy_gate_passes_at_max_accuracy_drop_and_stops_above_it():
    keras_probabilities = np.eye(3)[np.arange(100) % 3]
    labels = np.arange(100) % 3
    int8 = keras_probabilities.copy()
    int8[:1] = np.roll(int8[:1], 1, axis=1)  # 1 answer of 100 wrong: a drop of exactly 0.01
    figures = compare(int8, keras_probabilities, labels)
    require_accuracy("models/export/cnn.int8.onnx", figures, 1.0, 0.01, 100)
    int8[:2] = np.roll(keras_probabilities[:2], 1, axis=1)
    with pytest.raises(UserError) as error:
        require_accuracy("models/export/cnn.int8.onnx", compare(int8, keras_probabilities, labels), 1.0, 0.01, 100)
    message = str(error.value)
    for part in ("models/export/cnn.int8.onnx (int8) would classify 98.00% of the 100 test images correctly",
                 "a drop of 0.0200, above export.max_accuracy_drop (0.01)", "(export.onnx_quantization)"):
        assert part in message, (part, message)
    with pytest.raises(UserError, match=r"\(export.quantization\).*raise export.max_accuracy_drop"):
        require_accuracy("models/export/cnn.tflite", compare(int8, keras_probabilities, labels), 1.0, 0.01, 100)
    # Better than Keras, or no test images: nothing to refuse.
    require_accuracy("models/export/cnn.tflite", figures, 0.9, 0.0, 100)
    require_accuracy("models/export/cnn.tflite", compare(int8[:0], keras_probabilities[:0], labels[:0]), None, 0.01, 0)


@pytest.mark.parametrize("changes, message", [
    ({"export.quantization": "int4"}, "export.quantization = 'int4': Input should be 'float16', 'dynamic' or 'int8'"),
    ({"export.onnx_quantization": "float16"}, "export.onnx_quantization = 'float16': Input should be 'none' or 'int8'"),
    ({"export.onnx_quantization": "int8", "export.formats": ["tflite"]},
     "export: onnx_quantization int8 quantises the ONNX file, but formats ['tflite'] has no onnx"),
    ({"export.calibration_images": 0}, "export.calibration_images = 0: Input should be greater than or equal to 1"),
    ({"export.max_accuracy_drop": -0.1}, "export.max_accuracy_drop = -0.1: Input should be greater than or equal to 0"),
    ({"export.max_accuracy_drop": None}, "export.max_accuracy_drop: missing"),
])
def test_a_bad_int8_setting_is_named(tmp_path, changes, message):
    from imgcls.params import load_params

    with pytest.raises(UserError) as error:
        load_params(write_params(tmp_path, **changes))
    assert message in str(error.value)


def test_the_default_export_stays_float():
    from conftest import REPO
    from imgcls.params import load_params

    settings = load_params(REPO / "params.yaml").export
    assert (settings.quantization, settings.onnx_quantization, settings.max_accuracy_drop) == ("float16", "none", 0.01)
