"""The TFLite conversion settings of each export.quantization, and INT8 models calibrated on real photos.

An 8-bit integer model stores each tensor as integers and a scale. The
weights' scales come from the weights; the activations' come from the ranges
the activations take on real inputs, measured by running the float model on a
calibration sample: export.calibration_images photos of the train split, drawn
with the global seed, so the same params and data make the same file.
Dynamic-range quantisation skips that measurement, which is why it keeps its
activations in float: "int8" without calibration data is not INT8 arithmetic.

Both INT8 files keep a float32 input and output: the pixels are quantised and
the probabilities dequantised inside the file, so whatever runs the float
files (imgcls.runtimes, the server) runs them unchanged.
"""

import contextlib
import io
import tempfile
import warnings
from pathlib import Path

import numpy as np

from imgcls.dataset import images_file, load_images, load_manifest, require
from imgcls.errors import UserError

# What each export.quantization stores in the TFLite file, as the card and metrics name it.
TFLITE_PRECISION = {"float16": "float16", "dynamic": "int8 weights, float activations", "int8": "int8"}
# Photos per onnxruntime calibration run: its memory depends on this, the measured ranges do not.
CALIBRATION_BATCH = 16


def calibration_sample(size: int, count: int, seed: int) -> np.ndarray:
    """`count` photos of the train split at `size` px (all of them when it has fewer), drawn with `seed`.

    Only the chosen rows are read from the memory-mapped array, in index
    order, as (N, size, size, 3) float32 pixels in 0..255 like the model's input.
    """
    manifest = load_manifest()
    ids = manifest.loc[manifest["split"] == "train", "id"].to_numpy()
    if not len(ids):
        raise UserError("export: the train split is empty, so there are no photos to calibrate an int8 model on:"
                        " check the split fractions and run `dvc repro split`, or choose a float quantisation.")
    images = load_images(size)
    if ids.max() >= len(images):
        raise UserError(f"{require(images_file(size), 'resize')} does not match the split: rerun `dvc repro split`.")
    chosen = np.sort(np.random.default_rng(seed).choice(ids, size=min(count, len(ids)), replace=False))
    return np.asarray(images[chosen], dtype=np.float32)


def tflite_flatbuffer(model, quantization: str, sample: np.ndarray | None) -> bytes:
    """The TFLite flatbuffer of `model`: float16 weights, dynamic-range int8 weights, or full-integer int8
    calibrated on `sample`."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantization == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif quantization == "int8":
        # Every operation in int8: conversion fails rather than leave a float kernel in the graph.
        converter.representative_dataset = lambda: ([image[None]] for image in sample)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.float32
        converter.inference_output_type = tf.float32
    # With Optimize.DEFAULT and no representative dataset, the rest is dynamic-range
    # quantisation: 8-bit weights, float activations.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        # The converter warns that the float input has no statistics: it gets them from the sample.
        warnings.simplefilter("ignore", UserWarning)
        return converter.convert()


def onnx_int8(float_file: Path, int8_file: Path, sample: np.ndarray) -> None:
    """Write `int8_file`: the ONNX file `float_file` statically quantised to INT8, calibrated on `sample`.

    QDQ format (QuantizeLinear/DequantizeLinear pairs around each quantised
    operation, which onnxruntime fuses into integer kernels and other runtimes
    read too), unsigned 8-bit activations and signed 8-bit weights (what
    x86's integer dot products take), one scale per output channel of each
    convolution and dense kernel: with one scale per tensor, a MobileNetV2's
    depthwise kernels, whose channels differ by orders of magnitude, lost a
    quarter of the gear test accuracy.
    """
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    input_name = onnx.load(str(float_file)).graph.input[0].name

    class Sample(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(range(0, len(sample), CALIBRATION_BATCH))

        def get_next(self):
            start = next(self.batches, None)
            return None if start is None else {input_name: sample[start:start + CALIBRATION_BATCH]}

    with tempfile.TemporaryDirectory(prefix="imgcls-quantize-") as folder:
        # onnxruntime's advice before quantising: its graph optimisations and ONNX shape inference. Its
        # symbolic shape inference is for the dynamic shapes of transformers (and needs sympy).
        prepared = Path(folder) / "prepared.onnx"
        quant_pre_process(str(float_file), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(int8_file), Sample(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
