"""Stage `export`: the chosen model as a TFLite file for phones and small devices.

Writes models/<export.model>.tflite (float16 or dynamic-range quantised weights)
and models/<export.model>.labels.txt (one class per line, in output order). Its
input is the same as the Keras model's: (1, size, size, 3) float32 pixels in
0..255, preprocessing inside. The stage then runs the TFLite interpreter on the
test split and records in reports/export/metrics.json how often its top-1 class
agrees with the Keras model's, with the file sizes: quantisation must not change
the answers.

This is the one stage that uses TensorFlow directly: TFLite conversion exists only there.
"""

import contextlib
import io
import os
import warnings

import numpy as np

from imgcls import device
from imgcls.dataset import MODELS_DIR, REPORTS_DIR, atomic_path, load_split, write_json
from imgcls.errors import UserError, run_stage
from imgcls.params import load_params
from imgcls.predict import Classifier, choose_model

METRICS_FILE = REPORTS_DIR / "export" / "metrics.json"
BATCH_SIZE = 64


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


def convert(model, quantization: str) -> bytes:
    """The TFLite flatbuffer of `model`, float16 or dynamic-range quantised."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantization == "float16":
        converter.target_spec.supported_types = [tf.float16]
    # With Optimize.DEFAULT and no representative dataset, the rest is dynamic-range
    # quantisation: 8-bit weights, float activations.
    return converter.convert()


def tflite_probabilities(content: bytes, pixels: np.ndarray) -> np.ndarray:
    """Run the TFLite interpreter over (N, size, size, 3) pixels in batches; return (N, classes)."""
    import tensorflow as tf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter announces its successor package
        interpreter = tf.lite.Interpreter(model_content=content, num_threads=os.cpu_count())
    input_index = interpreter.get_input_details()[0]["index"]
    output_index = interpreter.get_output_details()[0]["index"]
    outputs = []
    batch_shape = None
    for start in range(0, len(pixels), BATCH_SIZE):
        batch = np.asarray(pixels[start:start + BATCH_SIZE], dtype=np.float32)
        if batch.shape != batch_shape:
            interpreter.resize_tensor_input(input_index, batch.shape)
            interpreter.allocate_tensors()
            batch_shape = batch.shape
        interpreter.set_tensor(input_index, batch)
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(output_index).copy())
    return np.concatenate(outputs)


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
    with contextlib.redirect_stdout(io.StringIO()):  # the converter prints a description of every traced function
        plain_resizing = without_antialiasing(classifier.model)
        content = convert(plain_resizing or classifier.model, settings.quantization)
    keras_top1 = classifier.probabilities(pixels).argmax(axis=1)
    lite_top1 = tflite_probabilities(content, pixels).argmax(axis=1)

    tflite_file = MODELS_DIR / f"{settings.model}.tflite"
    labels_file = MODELS_DIR / f"{settings.model}.labels.txt"
    with atomic_path(tflite_file) as temporary:
        temporary.write_bytes(content)
    with atomic_path(labels_file) as temporary:
        temporary.write_text("\n".join(classifier.class_names) + "\n")
    metrics = {
        "model": classifier.name,
        "quantization": settings.quantization,
        "tflite_bytes": len(content),
        # True when the Keras model's antialiased resizing became plain bilinear resizing.
        "resizing_without_antialiasing": plain_resizing is not None,
        "keras_bytes": model_file.stat().st_size,
        "test_images": int(len(pixels)),
        "top1_agreement": float(np.mean(keras_top1 == lite_top1)) if len(pixels) else None,
        "keras_test_accuracy": float(np.mean(keras_top1 == labels)) if len(pixels) else None,
        "tflite_test_accuracy": float(np.mean(lite_top1 == labels)) if len(pixels) else None,
    }
    write_json(METRICS_FILE, metrics)
    print(f"export: {model_file} → {tflite_file} ({settings.quantization}, {len(content) / 1e6:.2f} MB,"
          f" Keras {metrics['keras_bytes'] / 1e6:.2f} MB); top-1 agrees with Keras on"
          f" {metrics['top1_agreement']:.2%} of {len(pixels)} test images")


if __name__ == "__main__":
    run_stage(main)
