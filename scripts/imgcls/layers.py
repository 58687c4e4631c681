"""The project's own Keras layers: a saved model may hold them, so loading it needs them registered.

modelio.load_keras imports this module before loading any model. Each layer
is plain Keras ops (no Lambda), so a model holding it still loads in
safe_mode and converts to TFLite and ONNX.
"""

import keras

# Probabilities are clipped here before the log, in the layer and in numpy alike (calibration.py).
SMALLEST_PROBABILITY = 1e-12


@keras.saving.register_keras_serializable(package="imgcls")
class Temperature(keras.layers.Layer):
    """Softmax probabilities rescaled by a fitted temperature: softmax(log(p) / temperature) (see calibration.py)."""

    def __init__(self, temperature: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.temperature = float(temperature)

    def call(self, probabilities):
        logits = keras.ops.log(keras.ops.maximum(probabilities, SMALLEST_PROBABILITY))
        return keras.ops.softmax(logits / self.temperature, axis=-1)

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}
