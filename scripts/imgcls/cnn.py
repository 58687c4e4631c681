"""The CNN trained from scratch, built from the train_cnn section of params.yaml.

VGG-style: blocks of 3x3 convolutions (each optionally followed by batch
normalisation) ending in 2x2 max pooling, then global average pooling or
flatten, optional hidden dense layers, and a softmax. The seeds' baseline
"conv-pool-conv-pool-dense" is filters [32, 64], one convolution per block,
no batch norm, flatten, dense_units [128].
"""

import keras

from imgcls.training import augmentation


def build_cnn(num_classes: int, image_size: int, section, seed: int) -> keras.Model:
    """A keras.Model taking (image_size, image_size, 3) pixels in 0..255 and returning class probabilities."""
    inputs = keras.Input((image_size, image_size, 3), name="pixels")
    x = inputs
    if section.input_size != image_size:
        # Resizing first makes augmentation and every convolution work on the smaller image;
        # antialiasing keeps fine texture from aliasing when shrinking by 2x or more.
        x = keras.layers.Resizing(section.input_size, section.input_size, antialias=True, name="resize")(x)
    augment = augmentation(section.augment, seed)
    if any(not isinstance(layer, keras.layers.Identity) for layer in augment.layers):
        x = augment(x)
    x = keras.layers.Rescaling(1.0 / 255, name="rescale")(x)
    size = section.input_size
    for block, filters in enumerate(section.filters, start=1):
        for number in range(1, section.convs_per_block + 1):
            x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=not section.batch_norm,
                                    kernel_initializer="he_normal", name=f"block{block}_conv{number}")(x)
            if section.batch_norm:
                # momentum 0.9 (not 0.99): running statistics must settle within a short training.
                x = keras.layers.BatchNormalization(momentum=0.9, name=f"block{block}_norm{number}")(x)
            x = keras.layers.Activation("relu", name=f"block{block}_relu{number}")(x)
        if size >= 2:  # a block on a 1x1 map cannot pool further
            x = keras.layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
            size //= 2
    if section.pooling == "global_average":
        x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    else:
        x = keras.layers.Flatten(name="flatten")(x)
    for number, units in enumerate(section.dense_units, start=1):
        if section.dropout > 0:
            x = keras.layers.Dropout(section.dropout, seed=seed + 10 + number, name=f"dropout{number}")(x)
        x = keras.layers.Dense(units, activation="relu", name=f"dense{number}")(x)
    if section.dropout > 0:
        x = keras.layers.Dropout(section.dropout, seed=seed + 10, name="dropout")(x)
    # float32 output keeps probabilities precise under mixed precision.
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="cnn")
