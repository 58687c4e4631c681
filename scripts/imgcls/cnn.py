"""The CNN trained from scratch, built from the train_cnn section of params.yaml (mostly train_cnn.net).

VGG-style: an optional whitening stem, blocks of 3x3 convolutions (each
optionally followed by batch normalisation) with one 2x2 max pooling per
block, then global pooling or flatten, optional hidden dense layers, and a
softmax. The seeds' baseline "conv-pool-conv-pool-dense" is filters [32, 64],
one convolution per block, no batch norm, flatten, dense_units [128].

Two options make small, fast nets train in few epochs (ideas from the fast
CIFAR-10 training literature, e.g. Page's ResNet-9 and Jordan's airbench):
- stem "whiten": a frozen 2x2 convolution whose filters decorrelate the
  pixels of each 2x2 patch, computed from the training images. The first
  block then starts from inputs of equal variance in every direction, which
  plain SGD otherwise spends epochs learning. whiten_bias_trainable lets its
  offsets learn (airbench trains them for 3 epochs).
- pool_after "first": each block pools right after its first convolution, so
  its other convolutions run at a quarter of the pixels. pool_before_norm
  moves the pooling ahead of that convolution's batch norm and activation.
Three more come from airbench's ablations (Jordan, github.com/KellerJordan/cifar10-airbench):
- identity_init: each 3x3 convolution starts as the identity on its first
  input channels, so the stack starts close to passing its input through;
- batch_norm_momentum: how slowly the running statistics follow the weights;
- batch_norm_scale: false keeps the batch-norm scales fixed at 1;
- optimizer.batch_norm_bias_lr_scale (see batch_norm_bias_rates and optim.build_optimizer);
- conv_init_scale: the size of the convolutions' random start. Batch norm
  makes a convolution's output blind to the scale of its kernel, so each
  step changes the kernel's direction by about learning rate / norm**2: a
  start a third of He's variance (PyTorch's default, which airbench's
  learning rate is tuned for) takes 6x larger steps until weight decay has
  shrunk the kernels to their working size.
"""

import keras
import numpy as np

from imgcls.augment import augmentation

WHITEN_KERNEL = 2
WHITEN_SAMPLE_IMAGES = 5000  # enough for a stable 12x12 covariance; a fixed number keeps it cheap and seeded
CHUNK_IMAGES = 256  # images per step of the whitening statistics, which bounds their memory for large images


def build_cnn(num_classes: int, image_size: int, section, seed: int, train_images: np.ndarray | None = None
              ) -> keras.Model:
    """A keras.Model taking (image_size, image_size, 3) pixels in 0..255 and returning class probabilities.

    `section` is train_cnn's params: its input_size, augment and net are read.
    `train_images` (uint8, N x image_size x image_size x 3) is needed only by
    the whitening stem, whose filters come from their patch statistics.
    """
    net = section.net
    inputs = keras.Input((image_size, image_size, 3), name="pixels")
    x, resize = _resize_and_augment(inputs, image_size, section, seed)
    x = keras.layers.Rescaling(1.0 / 255, name="rescale")(x)
    size = section.input_size
    if net.stem == "whiten":
        if train_images is None:
            raise ValueError("the whitening stem needs the training images to compute its filters")
        x = _whitening_stem(x, _sample(train_images, seed), resize, net.activation, net.whiten_bias_trainable)
        size -= WHITEN_KERNEL - 1
    x = _convolution_blocks(x, size, net)
    x = _pool_features(x, net.pooling)
    x = _dense_layers(x, net, seed)
    return keras.Model(inputs, _class_probabilities(x, num_classes, net.output_scale, net.head, seed), name="cnn")


def _resize_and_augment(inputs, image_size: int, section, seed: int):
    """The images at section.input_size, randomly augmented in training, and the Resizing layer (None if unneeded)."""
    x, resize = inputs, None
    if section.input_size != image_size:
        # Resizing first makes augmentation and every convolution work on the smaller image;
        # antialiasing keeps fine texture from aliasing when shrinking by 2x or more.
        resize = keras.layers.Resizing(section.input_size, section.input_size, antialias=True, name="resize")
        x = resize(x)
    augment = augmentation(section.augment, seed)
    if any(not isinstance(layer, keras.layers.Identity) for layer in augment.layers):
        x = augment(x)
    return x, resize


def _convolution_blocks(x, size: int, net):
    """The blocks of net.filters: net.convs_per_block convolutions each, and one 2x2 max pooling.

    `size` is the side of the feature maps coming in: a block on a 1x1 map cannot pool further.
    """
    for block, filters in enumerate(net.filters, start=1):
        for number in range(1, net.convs_per_block + 1):
            pools_here = number == (1 if net.pool_after == "first" else net.convs_per_block)
            pool = None
            if pools_here and size >= 2:
                pool = keras.layers.MaxPooling2D(2, name=f"block{block}_pool")
                size //= 2
            x = _convolution(x, filters, net, f"block{block}_", number, pool)
    return x


def _pool_features(x, pooling: str):
    """The feature maps as one vector per image: their global average or maximum, or flattened."""
    if pooling == "global_average":
        return keras.layers.GlobalAveragePooling2D(name="pool")(x)
    if pooling == "global_max":
        return keras.layers.GlobalMaxPooling2D(name="pool")(x)
    return keras.layers.Flatten(name="flatten")(x)


def _dense_layers(x, net, seed: int):
    """The hidden dense layers of net.dense_units, each after dropout, then dropout before the output."""
    for number, units in enumerate(net.dense_units, start=1):
        if net.dropout > 0:
            x = keras.layers.Dropout(net.dropout, seed=seed + 10 + number, name=f"dropout{number}")(x)
        x = keras.layers.Dense(units, activation=net.activation, name=f"dense{number}")(x)
    if net.dropout > 0:
        x = keras.layers.Dropout(net.dropout, seed=seed + 10, name="dropout")(x)
    return x


def _class_probabilities(x, num_classes: int, output_scale: float, head: str = "dense", seed: int = 0):
    """The softmax output layer; its logits scaled by `output_scale` when that is below 1.

    head "airbench" drops the bias and starts the kernel as PyTorch's Linear
    does: uniform within 1 / sqrt(inputs), Keras' VarianceScaling of 1/3.
    """
    options = {}
    if head == "airbench":
        options = {"use_bias": False, "kernel_initializer": keras.initializers.VarianceScaling(
            1 / 3, mode="fan_in", distribution="uniform", seed=seed + 20)}
    # float32 output keeps probabilities precise under mixed precision.
    if output_scale == 1:
        return keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities",
                                  **options)(x)
    # Scaled-down logits slow the last layer relative to the batch-normalised ones below it,
    # so the whole net can train at a high learning rate without the softmax saturating early.
    x = keras.layers.Dense(num_classes, dtype="float32", name="logits", **options)(x)
    x = keras.layers.Rescaling(output_scale, dtype="float32", name="logit_scale")(x)
    return keras.layers.Activation("softmax", dtype="float32", name="probabilities")(x)


def _convolution(x, filters: int, net, prefix: str, number: int, pool=None):
    """3x3 convolution, optional batch normalisation, activation; then `pool` (a pooling layer), if given.

    With net.pool_before_norm the pooling comes right after the convolution instead.
    """
    # Scale 2 is exactly he_normal; the name keeps the default model's config as it was.
    initializer = ("he_normal" if net.conv_init_scale == 2
                   else keras.initializers.VarianceScaling(net.conv_init_scale, "fan_in", "truncated_normal"))
    convolution = keras.layers.Conv2D(filters, 3, padding="same", use_bias=not net.batch_norm,
                                      kernel_initializer=initializer, name=f"{prefix}conv{number}")
    x = convolution(x)
    if net.identity_init:
        # The weights are set, not the initializer: the saved config keeps the plain initializer.
        convolution.kernel.assign(identity_kernel(keras.ops.convert_to_numpy(convolution.kernel)))
    pool_first = pool is not None and net.pool_before_norm
    if pool_first:
        x = pool(x)
    if net.batch_norm:
        # momentum 0.9 (the default; not Keras' 0.99): running statistics must settle within a short training.
        # scale False fixes each channel's scale at 1 (airbench does): the next layer's weights can take it on.
        # Keras' epsilon (0.001): airbench's 1e-12 changed nothing on CIFAR-10 (docs/cifar10.md#on-one-h200).
        x = keras.layers.BatchNormalization(momentum=net.batch_norm_momentum, scale=net.batch_norm_scale,
                                            name=f"{prefix}norm{number}")(x)
    x = keras.layers.Activation(net.activation, name=f"{prefix}{net.activation}{number}")(x)
    return pool(x) if pool is not None and not pool_first else x


def identity_kernel(kernel: np.ndarray) -> np.ndarray:
    """`kernel` (k, k, inputs, outputs) whose first min(inputs, outputs) filters copy their own input channel.

    Filter i becomes 1 at the centre of input channel i and 0 elsewhere (a
    "dirac" start); the other filters keep their random values.
    """
    kernel = np.array(kernel, copy=True)
    height, width, inputs, outputs = kernel.shape
    channels = np.arange(min(inputs, outputs))
    kernel[..., channels] = 0
    kernel[height // 2, width // 2, channels, channels] = 1
    return kernel


def batch_norm_bias_rates(model: keras.Model, scale: float) -> dict[str, float] | None:
    """{variable path: learning-rate factor} for the batch-normalisation offsets, or None when the factor is 1."""
    if scale == 1:
        return None
    return {layer.beta.path: scale for layer in model.layers
            if isinstance(layer, keras.layers.BatchNormalization) and layer.center}


def _whitening_stem(x, sample: np.ndarray, resize, activation: str, bias_trainable: bool = False):
    """The whitening convolution, its filters computed from `sample` (uint8 images) as the model sees them.

    Its filters stay fixed; with `bias_trainable` its offsets (which start by
    centring the patches) learn like any other bias.
    """
    if resize is not None:
        sample = np.concatenate([keras.ops.convert_to_numpy(resize(chunk.astype("float32")))
                                 for chunk in np.array_split(sample, -(-len(sample) // CHUNK_IMAGES))])
    kernel, bias = whitening_filters(sample / 255.0)
    stem = keras.layers.Conv2D(kernel.shape[-1], WHITEN_KERNEL, padding="valid", trainable=bias_trainable,
                               name="whiten")
    x = stem(x)
    stem.set_weights([kernel, bias])
    # A variable's own flag, which Keras honours in training (a saved model keeps only the layer's).
    stem.kernel.trainable = False
    return keras.layers.Activation(activation, name="whiten_activation")(x)


def _sample(images: np.ndarray, seed: int) -> np.ndarray:
    """At most WHITEN_SAMPLE_IMAGES of `images`, picked with `seed`, in their order."""
    if len(images) <= WHITEN_SAMPLE_IMAGES:
        return np.asarray(images)
    picked = np.sort(np.random.default_rng(seed).choice(len(images), WHITEN_SAMPLE_IMAGES, replace=False))
    return np.asarray(images[picked])


def whitening_filters(images: np.ndarray, epsilon: float = 5e-4) -> tuple[np.ndarray, np.ndarray]:
    """Kernel (k, k, 3, 2*3*k*k) and bias of a convolution that whitens k x k patches of `images` (0..1).

    Each filter projects a centred patch onto one eigenvector of the patch
    covariance, divided by the square root of its eigenvalue, so every output
    has unit variance and no two correlate. The negated filters follow, so a
    ReLU or GELU after the stem keeps both signs of each direction.

    `epsilon` is relative to the mean pixel variance, as airbench's is to its
    standardised pixels: it keeps the faintest directions (in the JPEG copy of
    CIFAR-10, fine colour detail with 1/86,000 of the brightest's variance)
    from being amplified without bound, while barely damping the rest. An
    absolute epsilon on 0..1 pixels, 16x airbench's in those units, damped
    half of that copy's 12 directions to below 0.65 of unit variance.
    """
    k = WHITEN_KERNEL
    height, width = images.shape[1:3]
    count, total, products = 0, np.zeros(k * k * 3), np.zeros((k * k * 3, k * k * 3))
    for start in range(0, len(images), CHUNK_IMAGES):
        chunk = np.asarray(images[start:start + CHUNK_IMAGES], dtype=np.float64)
        patches = np.stack([chunk[:, row:height - k + 1 + row, column:width - k + 1 + column, :]
                            for row in range(k) for column in range(k)], axis=3)  # N, H', W', k*k, 3
        patches = patches.reshape(-1, k * k * 3)  # (row, column, channel) order, as a Conv2D kernel
        count, total, products = count + len(patches), total + patches.sum(axis=0), products + patches.T @ patches
    mean = total / count
    covariance = (products - count * np.outer(mean, mean)) / (count - 1)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    floor = epsilon * np.trace(covariance) / len(covariance)  # epsilon times the mean pixel variance
    projections = eigenvectors / np.sqrt(eigenvalues + floor)  # columns: whitened directions
    kernel = np.concatenate([projections, -projections], axis=1)
    bias = -mean @ kernel
    return kernel.reshape(k, k, 3, -1).astype(np.float32), bias.astype(np.float32)
