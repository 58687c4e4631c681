"""Augmentation as Keras layers inside the model: random changes active only in training, on every backend,
and the fixed views of each photo that a saved model averages its predictions over (test-time augmentation)."""

import keras
import numpy as np

from imgcls import device, modelio


def augmentation(section, seed: int) -> keras.Sequential:
    """A keras.Sequential of random preprocessing layers from an AugmentParams section.

    Put it inside the model (after any Resizing, before Rescaling): the layers act
    only in training, run on every backend, and expect pixels in 0..255. Layers
    whose strength is 0 are left out; with every change off it holds a single
    Identity layer (Keras cannot call an empty Sequential).
    """
    layers = []
    # "nearest" moves, turns and zooms by whole pixels (as cropping a padded image does): no blur
    # that the test images never have, which matters most for small images.
    resampling = {"interpolation": section.interpolation, "fill_mode": "reflect"}
    if section.flip != "none":
        layers.append(keras.layers.RandomFlip(section.flip, seed=seed))
    if section.rotation > 0:
        layers.append(keras.layers.RandomRotation(section.rotation, seed=seed + 1, **resampling))
    if section.zoom > 0:
        layers.append(keras.layers.RandomZoom(section.zoom, seed=seed + 2, **resampling))
    if section.translation > 0:
        layers.append(keras.layers.RandomTranslation(section.translation, section.translation, seed=seed + 3,
                                                     **resampling))
    if section.contrast > 0:
        layers.append(keras.layers.RandomContrast(section.contrast, value_range=(0, 255), seed=seed + 4))
    return device.compile_on_jax(keras.Sequential(layers or [keras.layers.Identity()], name="augmentation"))


def with_test_time_augmentation(model: keras.Model, flip: bool, shift: bool) -> keras.Model:
    """`model` whose prediction is the mean of its predictions for several versions of each image.

    flip adds the left-right mirror image. shift adds, for every version so
    far, two copies moved by one pixel: up and left, and down and right (the
    edge rows and columns repeated). Both together average six predictions.
    Each move is a fixed linear map of the rows or the columns, written as a
    frozen Dense layer over that axis (Permute brings the axis last and back):
    plain Keras layers, so the saved model still loads in safe_mode, runs on
    every backend and exports to TFLite.
    """
    height, width, channels = model.input_shape[1:]
    inputs = keras.Input((height, width, channels), name="pixels")
    views = [inputs]
    if flip:
        views.append(_map_axis(inputs, np.eye(width)[::-1], axis=2, name="mirror"))
    if shift:
        for number, view in enumerate(list(views)):
            for step, direction in ((-1, "up_left"), (1, "down_right")):
                moved = _map_axis(view, _shift_matrix(height, step), axis=1, name=f"view{number}_{direction}_rows")
                views.append(_map_axis(moved, _shift_matrix(width, step), axis=2,
                                       name=f"view{number}_{direction}_columns"))
    if len(views) == 1:
        return model
    outputs = keras.layers.Average(dtype="float32", name="mean_probabilities")([model(view) for view in views])
    return keras.Model(inputs, outputs, name=f"{model.name}_test_time_augmented")


def test_time_model(model: keras.Model, test_time) -> keras.Model:
    """The model to save for a test_time section (TestTimeParams): `model` itself without views; with them,
    with_test_time_augmentation around an uncompiled copy (a compiled model nested in the saved one would drag
    its optimizer along)."""
    if not test_time.on:
        return model
    return with_test_time_augmentation(modelio.uncompiled_copy(model), test_time.flip, test_time.shift)


def _shift_matrix(length: int, step: int) -> np.ndarray:
    """Matrix M with (x @ M)[j] = x[j - step], the first or last entry repeated where j - step falls outside."""
    matrix = np.zeros((length, length), dtype="float32")
    matrix[np.clip(np.arange(length) - step, 0, length - 1), np.arange(length)] = 1
    return matrix


def _map_axis(x, matrix: np.ndarray, axis: int, name: str):
    """Apply a fixed (length x length) matrix along the rows (axis 1) or columns (axis 2) of images x."""
    # A permutation that swaps `axis` with the channels, and undoes itself.
    order = (3, 2, 1) if axis == 1 else (1, 3, 2)
    layer = keras.layers.Dense(matrix.shape[1], use_bias=False, trainable=False, dtype="float32", name=name)
    x = layer(keras.layers.Permute(order, dtype="float32", name=f"{name}_last")(x))
    layer.set_weights([matrix.astype("float32")])
    return keras.layers.Permute(order, dtype="float32", name=f"{name}_back")(x)
