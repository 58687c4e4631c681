"""What runs a model file: Keras for `.keras`, onnxruntime for `.onnx`, LiteRT for `.tflite`.

Each runtime is one small class with `outputs` (the number of classes) and
`predict(batch)`: (N, size, size, 3) float32 pixels in 0..255 in, (N, classes)
softmax probabilities out. Everything around it (decoding photos, batching,
top-k, `unknown`) is the same whatever runs the model. Only `KerasRuntime`
imports Keras: a server of an exported file needs neither TensorFlow, Keras nor
JAX, only onnxruntime or LiteRT (requirements-serve.txt).
"""

import os
from pathlib import Path

import numpy as np

from imgcls.errors import UserError
from imgcls.modelio import check_card, load_keras, require_model_file


class KerasRuntime:
    """The native Keras model, loaded in safe_mode (no arbitrary Python code from the file)."""

    def __init__(self, model_file: Path):
        self.model = load_keras(model_file)
        self.outputs = self.model.output_shape[-1]

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict_on_batch(batch))


class OnnxRuntime:
    """An ONNX file (written by `export`) run by onnxruntime on the CPU."""

    def __init__(self, model_file: Path):
        import onnxruntime  # imported here: only an .onnx file needs it (a .tflite server may lack it)

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # warnings about unused initialisers are noise here
        self.session = onnxruntime.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.outputs = self.session.get_outputs()[0].shape[-1]

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0]


class LiteRtRuntime:
    """A TFLite file (written by `export`) run by LiteRT, TensorFlow Lite's standalone interpreter."""

    def __init__(self, model_file: Path):
        from ai_edge_litert.interpreter import Interpreter  # imported here: only a .tflite file needs LiteRT

        self.interpreter = Interpreter(model_path=str(model_file), num_threads=os.cpu_count())
        self.input_index = self.interpreter.get_input_details()[0]["index"]
        self.output_index = self.interpreter.get_output_details()[0]["index"]
        self.outputs = int(self.interpreter.get_output_details()[0]["shape"][-1])
        self.batch_shape = None

    def predict(self, batch: np.ndarray) -> np.ndarray:
        if batch.shape != self.batch_shape:  # the file's input is (1, size, size, 3): resize it to the batch
            self.interpreter.resize_tensor_input(self.input_index, batch.shape)
            self.interpreter.allocate_tensors()
            self.batch_shape = batch.shape
        self.interpreter.set_tensor(self.input_index, batch)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output_index).copy()


RUNTIMES = {".keras": KerasRuntime, ".onnx": OnnxRuntime, ".tflite": LiteRtRuntime}


def open_model(model_file: Path | str, check_classes: bool = True):
    """(runtime, card) of a .keras, .onnx or .tflite file with its card beside it."""
    model_file = Path(model_file)
    if model_file.suffix not in RUNTIMES:
        raise UserError(f"{model_file}: cannot serve a {model_file.suffix or 'suffix-less'} file; give a"
                        f" {', '.join(RUNTIMES)} file with its .json card beside it.")
    card = require_model_file(model_file)
    runtime = RUNTIMES[model_file.suffix](model_file)
    check_card(model_file, card, runtime.outputs, check_classes)
    return runtime, card
