"""Random augmentation as Keras layers inside the model: active only in training, on every backend."""

import keras

from imgcls import device


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
