"""Stage `export`: the chosen model as files that run without Keras: TFLite and ONNX.

Writes, in models/export/, one file per format of export.formats:
  <model>.tflite  TensorFlow Lite (float16, dynamic-range or full-integer INT8), for LiteRT and phones;
  <model>.onnx    ONNX (opset 18, float32 weights), for onnxruntime, TensorRT, OpenVINO;
and with export.onnx_quantization int8, <model>.int8.onnx beside the float32 file
(statically quantised, QDQ), so the serving image keeps float32 unless asked.
The model card <model>.json (class names, image geometry, and which precision
each file holds; <model>.int8.json, the same, beside the INT8 ONNX file) and
<model>.labels.txt (one class per line, in output order) go beside them. Each
file's input is the same as the Keras model's: (N, size, size, 3) float32
pixels in 0..255, preprocessing inside; its output float32 probabilities. INT8
files are calibrated on a seeded sample of training photos (imgcls/quantize.py).

The stage then runs each file on the test split with the runtime that serves
it (LiteRT, onnxruntime) and records in reports/export/metrics.json how often
its top-1 class agrees with the Keras model's, its test accuracy, how far its
probabilities are from Keras', and its size. A float file must not change the
answers: one that agrees on less than export.min_agreement of the test images
stops the stage. An INT8 file changes a few by design, so it must keep its
accuracy instead: one that loses more than export.max_accuracy_drop against
Keras stops the stage. Either way nothing is written: the files are made and
checked in a staging folder and moved into models/export only once every one
of them has passed.

A model trained in mixed precision (bfloat16 or float16 computations, as on a
recent GPU) is rebuilt in float32 with the same weights before conversion:
neither converter takes bfloat16 convolutions.

This is the one stage that uses TensorFlow directly: both converters start from a TensorFlow graph.
"""

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from imgcls import device
from imgcls.dataset import MODELS_DIR, REPORTS_DIR, load_split, write_json
from imgcls.errors import UserError, run_stage
from imgcls.params import load_params
from imgcls.predict import Classifier, choose_model
from imgcls.quantize import TFLITE_PRECISION, calibration_sample, onnx_int8, tflite_flatbuffer

METRICS_FILE = REPORTS_DIR / "export" / "metrics.json"
EXPORT_DIR = MODELS_DIR / "export"
BATCH_SIZE = 64
# The first opset whose Resize has the `antialias` attribute.
ONNX_OPSET = 18
# Dtypes and policies of mixed-precision training (keras.config.set_dtype_policy("mixed_bfloat16")).
LOWER_PRECISION = ("float16", "bfloat16", "mixed_float16", "mixed_bfloat16")


def float32_config(node):
    """A copy of a serialised Keras object with every float16 or bfloat16 dtype and policy made float32.

    The policy is saved in each layer's config (nested models, such as a
    transfer model's base, hold their own layers' configs), and an InputLayer
    or a traced tensor may name its dtype as a plain string.
    """
    if isinstance(node, list):
        return [float32_config(item) for item in node]
    if not isinstance(node, dict):
        return node
    if node.get("class_name") == "DTypePolicy" and node.get("config", {}).get("name") in LOWER_PRECISION:
        return {**node, "config": {**node["config"], "name": "float32"}}
    return {key: "float32" if key == "dtype" and value in LOWER_PRECISION else float32_config(value)
            for key, value in node.items()}


def in_float32(model):
    """`model` rebuilt to compute in float32 with the same weights, or `model` itself when it does already.

    A model trained with a mixed_bfloat16 policy keeps that policy in its saved
    layers, so its TensorFlow graph convolves in bfloat16, which TFLite has no
    kernels for. Mixed precision keeps the weights themselves in float32: the
    copy, built from the model's config with every policy made float32, takes
    them as they are. It computes what the model computes, more precisely; the
    agreement check compares the exported files with the model as trained.
    """
    import keras

    import imgcls.calibration  # noqa: F401  (registers the Temperature layer the config names)

    config = keras.saving.serialize_keras_object(model)
    float32 = float32_config(config)
    if float32 == config:
        return model
    copy = keras.saving.deserialize_keras_object(float32, safe_mode=True)
    copy.set_weights(model.get_weights())
    return copy


def without_antialiasing(model):
    """`model` with plain bilinear Resizing layers, or None when it has no antialiased one.

    TFLite has no antialiased resize op (not even through the TensorFlow-ops
    fallback), so an antialiased Resizing layer (the CNN's, or a transfer base's
    smaller input) is exported as plain bilinear resizing. It has no weights;
    everything else is copied as is, and the agreement check measures the effect.
    """
    import keras

    def resizing(layer) -> bool:
        return isinstance(layer, keras.layers.Resizing) and layer.get_config().get("antialias", False)

    def every_layer(container):
        for layer in container.layers:
            yield layer
            if hasattr(layer, "layers"):  # a nested model, e.g. the augmentation Sequential
                yield from every_layer(layer)

    if not any(resizing(layer) for layer in every_layer(model)):
        return None

    def clone(layer):
        if not resizing(layer):
            return layer.__class__.from_config(layer.get_config())
        return keras.layers.Resizing.from_config({**layer.get_config(), "antialias": False})

    copy = keras.models.clone_model(model, clone_function=clone, recursive=True)
    copy.set_weights(model.get_weights())
    return copy


def tflite_file(model, quantization: str, sample: np.ndarray | None = None) -> tuple[bytes, bool]:
    """The TFLite flatbuffer of `model` (INT8 calibrated on `sample`), and whether its antialiased resizing
    became plain bilinear."""
    with contextlib.redirect_stdout(io.StringIO()):  # the converter prints a description of every traced function
        plain_resizing = without_antialiasing(model)
        return tflite_flatbuffer(plain_resizing or model, quantization, sample), plain_resizing is not None


def antialiased_resize(graph) -> bool:
    """Turn each ScaleAndTranslate node of an ONNX graph into an antialiased ONNX Resize; True if any was.

    An antialiased Keras Resizing layer is TensorFlow's ScaleAndTranslate op (a
    triangle filter widened by the shrink factor, half-pixel centres), which
    tf2onnx leaves untranslated. Since opset 18 ONNX's linear Resize with
    `antialias=1` is that same filter, so the node becomes one Resize of the
    height and width axes to the layer's fixed output size.
    """
    from onnx import helper, numpy_helper

    constants = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    replaced = False
    for index, node in enumerate(graph.node):
        if node.op_type != "ScaleAndTranslate":
            continue
        attributes = {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}
        translation = constants.get(node.input[3])
        if (attributes.get("kernel_type") != b"triangle" or not attributes.get("antialias")
                or node.input[1] not in constants or translation is None or np.any(translation)):
            raise UserError(f"export: {node.name} is a resize ONNX cannot express ({attributes}):"
                            " set export.formats to [tflite] for this model.")
        sizes = f"{node.output[0]}/sizes"
        graph.initializer.append(numpy_helper.from_array(constants[node.input[1]].astype(np.int64), sizes))
        graph.node[index].CopyFrom(helper.make_node(
            "Resize", [node.input[0], "", "", sizes], list(node.output), name=node.name, mode="linear",
            antialias=1, axes=[1, 2], coordinate_transformation_mode="half_pixel"))
        replaced = True
    drop_unused(graph)
    return replaced


def drop_unused(graph) -> None:
    """Remove the nodes and initialisers no output depends on (what computed ScaleAndTranslate's scale)."""
    while True:
        used = {name for node in graph.node for name in node.input} | {output.name for output in graph.output}
        unused = [node for node in graph.node if not any(name in used for name in node.output)]
        if not unused:
            break
        for node in unused:
            graph.node.remove(node)
    for tensor in [tensor for tensor in graph.initializer if tensor.name not in used]:
        graph.initializer.remove(tensor)


def onnx_file(model, quantization: str, sample: np.ndarray | None = None) -> tuple[bytes, bool]:
    """The ONNX file of `model` (float32 whatever `quantization`, opset 18, any batch size), and whether its
    resizing lost its antialiasing (never: see antialiased_resize). Its INT8 copy is made from it (onnx_int8).

    tf2onnx converts the model's inference graph: a tf.function calling the model
    with training=False. Keras' own `model.export(format="onnx")` (Keras 3.15.1)
    traced BatchNormalization with the batch's statistics instead of its moving
    averages, which changes every answer.
    """
    import onnx
    import tensorflow as tf
    import tf2onnx

    signature = [tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name="pixels")]
    function = tf.function(lambda pixels: model(pixels, training=False), input_signature=signature)
    logging.getLogger("tf2onnx").setLevel(logging.CRITICAL)  # it reports ScaleAndTranslate, replaced below
    with contextlib.redirect_stdout(io.StringIO()):
        proto, _ = tf2onnx.convert.from_function(function, signature, opset=ONNX_OPSET)
    antialiased_resize(proto.graph)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as error:
        raise UserError(f"export: the ONNX conversion of this model is not valid ONNX ({error}):"
                        " set export.formats to [tflite] for this model.") from None
    return proto.SerializeToString(), False


EXPORTERS = {"tflite": tflite_file, "onnx": onnx_file}


def precisions(settings) -> dict[str, str]:
    """The file name of each file export writes, with the precision it holds: float32, float16, int8, or
    "int8 weights, float activations" (dynamic-range TFLite)."""
    files = {f"{settings.model}.{format_name}": TFLITE_PRECISION[settings.quantization]
             if format_name == "tflite" else "float32" for format_name in settings.formats}
    if settings.onnx_quantization == "int8":
        files[f"{settings.model}.int8.onnx"] = "int8"
    return files


def export_file(model, path: Path, quantization: str, sample: np.ndarray | None, precision: str) -> dict:
    """Write `model` in the format its suffix names; return the file's entry of the metrics."""
    content, plain_resizing = EXPORTERS[path.suffix[1:]](model, quantization, sample)
    path.write_bytes(content)
    return {
        "bytes": len(content),
        **({"quantization": quantization} if path.suffix == ".tflite" else {}),
        "precision": precision,
        # True when the Keras model's antialiased resizing became plain bilinear resizing.
        "resizing_without_antialiasing": plain_resizing,
    }


def export_onnx_int8(float_file: Path, sample: np.ndarray) -> tuple[Path, dict]:
    """Write <model>.int8.onnx beside the float32 <model>.onnx; return its path and its entry of the metrics."""
    path = float_file.with_suffix(".int8.onnx")
    onnx_int8(float_file, path, sample)
    return path, {"bytes": path.stat().st_size, "precision": "int8", "resizing_without_antialiasing": False}


def write_card(classifier: Classifier, name: str, folder, files: dict[str, str]) -> None:
    """The model card and the labels file beside the exported files, for whatever runs them.

    The card lists every exported file with the precision it holds (its
    `trained_on.precision` is the training's). Each runtime finds a file's
    card under the file's own name (best.int8.onnx: best.int8.json), so the
    INT8 ONNX file gets a copy of it.
    """
    listed = {file_name: {"precision": precision} for file_name, precision in files.items()}
    card = json.dumps({**classifier.card, "files": listed}, indent=2) + "\n"
    for file_name in files:
        (folder / file_name).with_suffix(".json").write_text(card)
    (folder / f"{name}.labels.txt").write_text("\n".join(classifier.class_names) + "\n")


@contextlib.contextmanager
def staging_folder():
    """A new empty folder beside models/export, removed on the way out whatever happens.

    Outside models/export, so a folder left by a killed run is never taken into
    the next export; its name matches the .gitignore pattern of temporary files.
    """
    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    folder = tempfile.mkdtemp(prefix=".export.", suffix=".tmp", dir=MODELS_DIR)
    try:
        yield Path(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def publish(folder) -> None:
    """Move every file of the staging folder into models/export, each in one rename."""
    EXPORT_DIR.mkdir(parents=True, exist_ok=True)
    for path in sorted(folder.iterdir()):
        os.replace(path, EXPORT_DIR / path.name)


def compare(probabilities: np.ndarray, keras_probabilities: np.ndarray, labels: np.ndarray) -> dict:
    """How an exported file's answers on the test split compare with Keras' (None for each on no images)."""
    if not len(probabilities):
        return {"top1_agreement": None, "test_accuracy": None, "max_probability_difference": None}
    top1 = probabilities.argmax(axis=1)
    return {
        "top1_agreement": float(np.mean(top1 == keras_probabilities.argmax(axis=1))),
        "test_accuracy": float(np.mean(top1 == labels)),
        "max_probability_difference": float(np.abs(probabilities - keras_probabilities).max()),
    }


def check_export(path, pixels: np.ndarray, keras_probabilities: np.ndarray, labels: np.ndarray) -> dict:
    """Run an exported file on the test split with its own runtime; compare with Keras."""
    probabilities = Classifier(path, batch_size=BATCH_SIZE, check_classes=False).probabilities(pixels)
    return compare(probabilities, keras_probabilities, labels)


def require_agreement(published: Path, figures: dict, minimum: float, images: int) -> None:
    """Stop the stage when a file's top-1 agreement with Keras on the test split is below export.min_agreement.

    `figures` is compare()'s, with resizing_without_antialiasing; an empty test
    split gives no figure, and nothing to refuse.
    """
    agreement = figures["top1_agreement"]
    if agreement is None or agreement >= minimum:
        return
    if figures.get("resizing_without_antialiasing"):
        hint = ("This file resizes without antialiasing (TFLite has no antialiased resize):"
                " export.formats: [onnx] keeps it")
    else:
        hint = "Try another export.quantization or export.formats"
    raise UserError(f"export: {published} would agree with the Keras model's top-1 class on {agreement:.2%} of the"
                    f" {images} test images, below export.min_agreement ({minimum:g}), so nothing was written to"
                    f" {EXPORT_DIR}. {hint}; or lower export.min_agreement if that difference is acceptable.")


def require_accuracy(published: Path, figures: dict, keras_accuracy: float | None, maximum_drop: float,
                     images: int) -> None:
    """Stop the stage when an INT8 file's test accuracy is more than export.max_accuracy_drop below Keras'.

    `figures` is compare()'s; an empty test split gives no figure, and nothing to refuse.
    """
    accuracy = figures["test_accuracy"]
    # Rounded, so that a drop of exactly the maximum (1 image of 100 at 0.01) passes despite float error.
    if accuracy is None or round(keras_accuracy - accuracy, 9) <= maximum_drop:
        return
    setting = "export.quantization" if Path(published).suffix == ".tflite" else "export.onnx_quantization"
    resizing = (" It also resizes without antialiasing (TFLite has no antialiased resize): export.formats: [onnx]"
                " keeps it." if figures.get("resizing_without_antialiasing") else "")
    raise UserError(f"export: {published} (int8) would classify {accuracy:.2%} of the {images} test images"
                    f" correctly, against {keras_accuracy:.2%} for the Keras model: a drop of"
                    f" {keras_accuracy - accuracy:.4f}, above export.max_accuracy_drop ({maximum_drop:g}), so nothing"
                    f" was written to {EXPORT_DIR}.{resizing} Calibrate it on more training photos"
                    f" (export.calibration_images) or keep this format in float ({setting}); or raise"
                    " export.max_accuracy_drop if that loss is acceptable.")


def check_file(path: Path, entry: dict, test: tuple, keras_accuracy: float | None, settings) -> None:
    """Run an exported file on the test split, add the figures to its `entry`, and stop the stage unless it
    passes its gate: agreement with Keras for a float file, accuracy for an INT8 one."""
    pixels, keras_probabilities, labels = test
    entry.update(check_export(path, pixels, keras_probabilities, labels))
    published = EXPORT_DIR / path.name
    if entry["precision"] == "int8":
        require_accuracy(published, entry, keras_accuracy, settings.max_accuracy_drop, len(pixels))
    else:
        require_agreement(published, entry, settings.min_agreement, len(pixels))
    accuracy = "" if entry["test_accuracy"] is None else f", test accuracy {entry['test_accuracy']:.2%}"
    print(f"export: {published} ({entry['precision']}, {entry['bytes'] / 1e6:.2f} MB); top-1 agrees with Keras"
          f" on {entry['top1_agreement'] or 0:.2%} of {len(pixels)} test images{accuracy}")


def main() -> None:
    params = load_params()
    settings = params.export
    device.choose_backend(required="tensorflow")  # TFLite conversion needs TensorFlow, whatever trained the model
    model_file = choose_model(settings.model)
    classifier = Classifier(model_file, batch_size=BATCH_SIZE)
    if classifier.image_size not in params.resize.sizes:
        raise UserError(
            f"{model_file} takes {classifier.image_size} px images but resize.image_size is"
            f" {params.resize.image_size}: retrain it (`dvc repro`) after changing resize.image_size."
        )
    pixels, labels, _ = load_split("test", classifier.image_size)
    keras_probabilities = classifier.probabilities(pixels)
    model = in_float32(classifier.runtime.model)
    metrics = {
        "model": classifier.name,
        "keras_bytes": model_file.stat().st_size,
        "test_images": int(len(pixels)),
        "keras_test_accuracy": float(np.mean(keras_probabilities.argmax(axis=1) == labels)) if len(pixels) else None,
        # True when the model computed in bfloat16 or float16 and was converted from its float32 copy.
        "rebuilt_in_float32": model is not classifier.runtime.model,
    }
    files = precisions(settings)
    sample = None
    if "int8" in files.values():
        sample = calibration_sample(classifier.image_size, settings.calibration_images, params.seed)
        metrics["calibration_images"] = len(sample)
    test = (pixels, keras_probabilities, labels)
    print(f"export: {model_file} ({metrics['keras_bytes'] / 1e6:.2f} MB, test accuracy"
          f" {metrics['keras_test_accuracy'] or 0:.2%}) → {EXPORT_DIR}/")
    with staging_folder() as staging:
        write_card(classifier, settings.model, staging, files)
        for format_name in settings.formats:
            path = staging / f"{settings.model}.{format_name}"
            metrics[format_name] = export_file(model, path, settings.quantization, sample, files[path.name])
            check_file(path, metrics[format_name], test, metrics["keras_test_accuracy"], settings)
        if settings.onnx_quantization == "int8":
            path, metrics["onnx_int8"] = export_onnx_int8(staging / f"{settings.model}.onnx", sample)
            check_file(path, metrics["onnx_int8"], test, metrics["keras_test_accuracy"], settings)
        publish(staging)
    write_json(METRICS_FILE, metrics)


if __name__ == "__main__":
    run_stage(main)
