"""Pretrained ImageNet bases for transfer learning: construction, weights, preprocessing, frozen features.

Each base is described once in BASES: its `keras.applications` constructor,
the input preprocessing it was trained with, its default and minimum input
size, and where its ImageNet weights (without the classification top) live.

The base is always built with `weights=None` and its weights are loaded
afterwards by `load_base_weights`, so that a missing file, no network or a
file of another architecture each end in one message that says what to do,
instead of a download traceback.

Preprocessing is expressed with standard Keras layers (Rescaling, Dense,
Normalization), never a Lambda: the saved model must load with safe_mode and
run on any backend, so the model file alone turns 0..255 pixels into
predictions.

build_networks puts the base, the new head and the saved classifier
together; the sub-models below (split_base, pooled_top, top_classifier) are
what the two training phases run (transfer_training.py).
"""

import dataclasses
import importlib
import os
import warnings
from pathlib import Path

import keras
import numpy as np

from imgcls.augment import augmentation
from imgcls.errors import UserError

KERAS_WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"
EFFICIENTNET_WEIGHTS_URL = "https://storage.googleapis.com/keras-applications/"
# ImageNet statistics of the "caffe" (BGR, mean subtracted) and "torch" (RGB, standardised) conventions.
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
TORCH_MEAN = (0.485, 0.456, 0.406)
TORCH_STD = (0.229, 0.224, 0.225)
# MobileNetV2 was trained at these input sizes; each has its own weights file.
MOBILENET_V2_SIZES = (96, 128, 160, 192, 224)


@dataclasses.dataclass(frozen=True)
class Base:
    constructor: str  # attribute of keras.applications
    module: str  # keras.applications.<module>.preprocess_input is the base's own preprocessing
    preprocess: str  # "tf": [-1, 1]; "caffe": BGR minus mean; "torch": RGB standardised; "none": inside the base
    default_size: int
    min_size: int
    top_layer: str  # where its last stage begins: the first layer fine_tune.unfreeze: auto trains
    weights_file: str  # ImageNet no-top weights; "{size}" is filled in for MobileNetV2
    weights_url: str  # folder URL the file is downloaded from
    weights_hash: str | None = None

    def imagenet_weights(self, input_size: int) -> tuple[str, str]:
        """(file name, URL) of this base's ImageNet weights for an input size."""
        if self.constructor == "MobileNetV2":
            # Keras falls back to the 224 px weights for other sizes; do the same.
            size = input_size if input_size in MOBILENET_V2_SIZES else 224
            file_name = self.weights_file.format(size=size)
        else:
            file_name = self.weights_file
        return file_name, self.weights_url + file_name


BASES = {
    "MobileNetV2": Base(
        "MobileNetV2", "mobilenet_v2", "tf", 224, 32, "block_12_expand",
        "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{size}_no_top.h5",
        KERAS_WEIGHTS_URL + "mobilenet_v2/"),
    "EfficientNetB0": Base(
        "EfficientNetB0", "efficientnet", "none", 224, 32, "block6a_expand_conv",
        "efficientnetb0_notop.h5", EFFICIENTNET_WEIGHTS_URL, "50bc09e76180e00e4465e1a485ddc09d"),
    "ResNet50": Base(
        "ResNet50", "resnet", "caffe", 224, 32, "conv5_block1_1_conv",
        "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5", KERAS_WEIGHTS_URL + "resnet/",
        "4d473c1dd8becc155b73f8504c6f6626"),
    "Xception": Base(
        "Xception", "xception", "tf", 299, 71, "block13_sepconv1_act",
        "xception_weights_tf_dim_ordering_tf_kernels_notop.h5", KERAS_WEIGHTS_URL + "xception/",
        "b0042744bf5b25fce3cb969f33bebb97"),
    "InceptionV3": Base(
        "InceptionV3", "inception_v3", "tf", 299, 75, "mixed8",
        "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5", KERAS_WEIGHTS_URL + "inception_v3/",
        "bcbd6486424b2319ff4ef7d526e38f63"),
    "DenseNet121": Base(
        "DenseNet121", "densenet", "torch", 224, 32, "conv5_block1_0_bn",
        "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5", KERAS_WEIGHTS_URL + "densenet/",
        "30ee3e1110167f948a6b9946edeeb738"),
}


def get_base(name: str) -> Base:
    if name not in BASES:
        raise UserError(
            f"train_transfer.base = {name!r} is not a known base network: choose one of {', '.join(BASES)}"
            " (names as in keras.applications, case-sensitive)."
        )
    return BASES[name]


def resolve_input_size(name: str, input_size: int) -> int:
    """The base's input side in pixels: `input_size`, or the base's default when it is 0."""
    base = get_base(name)
    size = input_size or base.default_size
    if size < base.min_size:
        raise UserError(
            f"train_transfer.input_size = {size} is too small for {name}: it needs at least {base.min_size} px"
            f" (its default is {base.default_size}). Raise train_transfer.input_size, or set it to 0 for the default."
        )
    return size


def preprocess_input(name: str, pixels):
    """The base's own `keras.applications` preprocessing, for checking the layers below against it."""
    module = importlib.import_module(f"keras.applications.{get_base(name).module}")
    return module.preprocess_input(np.array(pixels, dtype="float32", copy=True))


def preprocessing_layers(name: str) -> list:
    """Standard Keras layers equal to the base's preprocess_input on 0..255 RGB pixels."""
    mode = get_base(name).preprocess
    if mode == "tf":
        return [keras.layers.Rescaling(scale=1 / 127.5, offset=-1.0, name="preprocess_tf")]
    if mode == "torch":
        return [
            keras.layers.Rescaling(scale=1 / 255.0, name="preprocess_torch_scale"),
            keras.layers.Normalization(mean=list(TORCH_MEAN), variance=[std**2 for std in TORCH_STD],
                                       name="preprocess_torch_normalize"),
        ]
    if mode == "caffe":
        # RGB -> BGR and mean subtraction in one fixed affine map on the channel axis:
        # output channel j = input channel (2 - j) - mean[j].
        swap = np.zeros((3, 3), dtype="float32")
        for channel in range(3):
            swap[2 - channel, channel] = 1.0
        layer = keras.layers.Dense(3, trainable=False, name="preprocess_caffe")
        layer.build((None, 3))
        layer.set_weights([swap, -np.asarray(CAFFE_BGR_MEAN, dtype="float32")])
        return [layer]
    return []  # the base normalises its input itself


def keras_cache_dir() -> Path:
    """The Keras cache: $KERAS_HOME, else ~/.keras; /tmp/.keras when that is not writable (as get_file does)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    if not os.access(home, os.W_OK):
        home = "/tmp/.keras"
    return Path(home)


def weights_cache_path(file_name: str) -> Path:
    """Where a downloaded weights file is kept."""
    return keras_cache_dir() / "models" / file_name


def imagenet_weights_file(name: str, input_size: int) -> Path:
    """Path of the base's ImageNet weights, downloaded into the Keras cache when missing."""
    base = get_base(name)
    file_name, url = base.imagenet_weights(input_size)
    cached = weights_cache_path(file_name)
    try:
        # cache_dir is passed explicitly so the message below names the folder really searched.
        return Path(keras.utils.get_file(file_name, url, cache_subdir="models", file_hash=base.weights_hash,
                                         cache_dir=str(keras_cache_dir())))
    except Exception as error:  # no network, HTTP error, hash mismatch: all end the same way for a user
        raise UserError(
            f"ImageNet weights of {name} are not available: {file_name} is not in the Keras cache ({cached})"
            f" and downloading it from {url} failed ({type(error).__name__}: {error}). Download that file"
            f" and put it at {cached} (or point KERAS_HOME at a cache holding models/{file_name}),"
            " or set train_transfer.weights to the path of a local weights file."
        ) from None


def check_weights_setting(name: str, weights: str) -> None:
    """Fail early (before Keras loads) when train_transfer.weights names a file that does not exist."""
    if weights not in ("imagenet", "none") and not Path(weights).is_file():
        raise UserError(
            f"train_transfer.weights = {weights!r}: no such file. Use 'imagenet', 'none', or the path of a"
            f" weights file (.h5 or .weights.h5) of {name} without its top."
        )


def build_base(name: str, input_size: int, weights: str):
    """The base network without its top, input (input_size, input_size, 3) preprocessed pixels.

    weights: "imagenet" (through the Keras cache), a path to a weights file of
    this architecture, or "none" (random initialisation, for tests).
    """
    base_spec = get_base(name)
    size = resolve_input_size(name, input_size)
    constructor = getattr(keras.applications, base_spec.constructor)
    base = constructor(include_top=False, weights=None, input_shape=(size, size, 3))
    if weights == "none":
        return base
    if weights == "imagenet":
        path = imagenet_weights_file(name, size)
        origin = f"ImageNet weights file {path}"
    else:
        check_weights_setting(name, weights)
        path = Path(weights)
        origin = f"weights file {path}"
    try:
        with warnings.catch_warnings():
            # Keras only warns when a .weights.h5 file lacks some layers and leaves them
            # randomly initialised: for a base network that is an error.
            warnings.simplefilter("error")
            base.load_weights(path)
    except Exception as error:  # Keras raises ValueError/KeyError/OSError depending on how the file differs
        raise UserError(
            f"{origin} does not fit {name} at {size} px ({type(error).__name__}: {error}). The file must hold the"
            f" weights of {name} without its classification top (include_top=False); check"
            " train_transfer.base and train_transfer.weights."
        ) from None
    return base


def feature_extractor(name: str, base, image_size: int, input_size: int):
    """Model from resized 0..255 pixels to the base's pooled features (what a frozen base gives the head)."""
    inputs = keras.Input((image_size, image_size, 3), name="pixels")
    features = base(input_pipeline(name, image_size, input_size)(inputs), training=False)
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(features)
    return keras.Model(inputs, pooled, name=f"{name}_features")


def input_pipeline(name: str, image_size: int, input_size: int):
    """Sequential: resize to the base's input size (when it differs), then the base's preprocessing."""
    size = resolve_input_size(name, input_size)
    layers = []
    if size != image_size:
        # Antialiasing only matters when shrinking; it blurs nothing when enlarging.
        layers.append(keras.layers.Resizing(size, size, antialias=size < image_size, name="resize_to_base"))
    layers.extend(preprocessing_layers(name))
    layers = layers or [keras.layers.Identity(name="no_preprocessing")]
    return keras.Sequential(layers, name="base_input")


def split_base(base, first: int, top_name: str = ""):
    """(bottom, top) sub-models of the base, cut before layer `first`; they share the base's layers.

    bottom maps the base input to every tensor that crosses the cut (a residual
    connection can add one), top maps those tensors to the base output, so
    top(bottom(x)) == base(x). With the bottom frozen, its output can be computed once per
    image (and each of a few augmented copies) and fine-tuning runs only the top.
    """
    produced_below = {}
    for layer in base.layers[:first]:
        for tensor in keras.tree.flatten(layer.output):
            produced_below[id(tensor)] = tensor
    crossing = []
    for layer in base.layers[first:]:
        for tensor in keras.tree.flatten(layer.input):
            if id(tensor) in produced_below and all(tensor is not seen for seen in crossing):
                crossing.append(tensor)
    bottom = keras.Model(base.input, crossing, name=f"{base.name}_bottom")
    top = keras.Model(crossing, base.output, name=top_name or f"{base.name}_top")
    return bottom, top


def as_list(arrays) -> list:
    return list(arrays) if isinstance(arrays, (list, tuple)) else [arrays]


def bottom_extractor(name: str, bottom, image_size: int, input_size: int):
    """Model from resized 0..255 pixels to the frozen bottom's activations (the inputs of the top)."""
    inputs = keras.Input((image_size, image_size, 3), name="pixels")
    return keras.Model(inputs, bottom(input_pipeline(name, image_size, input_size)(inputs), training=False),
                       name=f"{name}_below_fine_tuning")


def pooled_top(top):
    """Model from the bottom's activations to the pooled features: phase-1 features from the cache."""
    inputs = [keras.Input(tensor.shape[1:]) for tensor in as_list(top.input)]
    features = top(inputs if len(inputs) > 1 else inputs[0], training=False)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(features))


def top_classifier(top, head):
    """What phase 2 trains on cached activations: the top of the base (inference-mode BatchNorm), pooling, head."""
    inputs = [keras.Input(tensor.shape[1:]) for tensor in as_list(top.input)]
    features = top(inputs if len(inputs) > 1 else inputs[0], training=False)
    return keras.Model(inputs, head(keras.layers.GlobalAveragePooling2D()(features)), name="top_and_head")


def build_head(feature_size: int, num_classes: int, dense_units: list[int], dropout: float, name: str = "head"):
    """The new head: dropout and optional hidden dense layers on the pooled features, then softmax."""
    layers = [keras.Input((feature_size,), name="features")]
    for number, units in enumerate(dense_units, start=1):
        if dropout > 0:
            layers.append(keras.layers.Dropout(dropout, name=f"head_dropout_{number}"))
        layers.append(keras.layers.Dense(units, activation="relu", name=f"head_dense_{number}"))
    if dropout > 0:
        layers.append(keras.layers.Dropout(dropout, name="head_dropout"))
    layers.append(keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities"))
    return keras.Sequential(layers, name=name)


def build_classifier(name: str, base, head, image_size: int, input_size: int):
    """The saved model: resized 0..255 pixels → resize + the base's preprocessing → base → pooling → head.

    The base is called with training=False, so its BatchNormalization layers
    use their ImageNet statistics even while fine-tuning (a small batch of
    augmented photos would otherwise overwrite them and wreck the features).
    """
    inputs = keras.Input((image_size, image_size, 3), name="pixels")
    features = base(input_pipeline(name, image_size, input_size)(inputs), training=False)
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(features)
    return keras.Model(inputs, head(pooled), name=f"transfer_{name}")


@dataclasses.dataclass(frozen=True)
class Networks:
    """The frozen base, the new head and the saved classifier (pixels → base → head), which share layers."""

    base: keras.Model
    head: keras.Model
    classifier: keras.Model
    fine_tune: bool  # whether phase 2 runs
    first_trainable: int  # the first base layer phase 2 trains (len(base.layers) without phase 2)
    image_size: int  # the side of the stored images the classifier takes
    input_size: int  # the side of the images the base takes
    pretrained_weights: list  # the base's weights before phase 2 changed any: what the probe was fitted on


def build_networks(section, num_classes: int, image_size: int, input_size: int) -> Networks:
    """The networks of a train_transfer params section, the base frozen (phase 1 trains the head alone)."""
    base = build_base(section.base, input_size, section.weights)
    base.trainable = False
    head = build_head(base.output_shape[-1], num_classes, section.dense_units, section.dropout)
    classifier = build_classifier(section.base, base, head, image_size, input_size)
    fine_tune = section.fine_tune.epochs > 0
    first = first_trainable_layer(base, section) if fine_tune else len(base.layers)
    return Networks(base, head, classifier, fine_tune, first, image_size, input_size, base.get_weights())


def pretrained_base(section, net: Networks):
    """A frozen copy of the base as it was before phase 2: the one the probe's features came from (with
    weights: none too, whose every build draws new random weights)."""
    base = build_base(section.base, net.input_size, "none")
    base.set_weights(net.pretrained_weights)
    base.trainable = False
    return base


def build_probe_head(probe, feature_size: int, name: str = "head"):
    """The linear probe as a head: one Dense softmax layer holding its weights (no dropout)."""
    head = build_head(feature_size, probe.kernel.shape[1], [], 0.0, name=name)
    probe.set_into(head.get_layer("probabilities"))
    return head


def build_probe_classifier(section, probe, net: Networks):
    """The linear probe as a saved classifier: the frozen pretrained base and the probe's head, so
    calibration, export and serving treat it like any model."""
    base = pretrained_base(section, net)
    head = build_probe_head(probe, base.output_shape[-1])
    return build_classifier(section.base, base, head, net.image_size, net.input_size)


def build_ensemble_classifier(section, probe, net: Networks):
    """The fine-tuned classifier and the linear probe in one model that averages their probabilities.

    The layers below the fine-tuned ones are frozen in both, so they run once;
    above them run the fine-tuned top with its head, and the pretrained top (a
    second copy of the base as it was before phase 2) with the probe's Dense
    layer. It needs a frozen bottom to share (net.first_trainable > 0).
    """
    pretrained = pretrained_base(section, net)
    probe_head = build_probe_head(probe, pretrained.output_shape[-1], name="probe_head")
    bottom, fine_tuned_top = split_base(net.base, net.first_trainable, "fine_tuned_top")
    _, pretrained_top = split_base(pretrained, net.first_trainable, "pretrained_top")
    inputs = keras.Input((net.image_size, net.image_size, 3), name="pixels")
    crossing = bottom(input_pipeline(section.base, net.image_size, net.input_size)(inputs), training=False)
    fine_tuned = net.head(keras.layers.GlobalAveragePooling2D(name="pool")(fine_tuned_top(crossing, training=False)))
    pretrained_features = pretrained_top(crossing, training=False)
    probed = probe_head(keras.layers.GlobalAveragePooling2D(name="probe_pool")(pretrained_features))
    outputs = keras.layers.Average(dtype="float32", name="ensemble")([fine_tuned, probed])
    return keras.Model(inputs, outputs, name=f"transfer_{section.base}_ensemble")


def augmentation_is_off(augment) -> bool:
    return augment.off


def with_augmentation(classifier, augment, seed: int, image_size: int):
    """The classifier behind random augmentation layers (active only in training); shares its weights."""
    if augmentation_is_off(augment):
        return classifier
    inputs = keras.Input((image_size, image_size, 3), name="pixels")
    return keras.Model(inputs, classifier(augmentation(augment, seed)(inputs)), name="augmented_" + classifier.name)


def first_trainable_layer(base, section) -> int:
    """Index of the first base layer phase 2 trains, from a train_transfer section's fine_tune.unfreeze: the
    last N layers, from the layer so named, or auto: from the first layer of the base's last stage
    (Base.top_layer), so that changing the base needs no other param."""
    unfreeze = section.fine_tune.unfreeze
    if unfreeze == "auto":
        unfreeze = get_base(section.base).top_layer
    names = [layer.name for layer in base.layers]
    if isinstance(unfreeze, str):
        if unfreeze not in names:
            raise UserError(
                f"train_transfer.fine_tune.unfreeze = {unfreeze!r}: {base.name} has no layer of that name."
                f" Its last layers are: {', '.join(names[-12:])}. Give a layer name of this base, a number of"
                " top layers, or auto (the base's last stage)."
            )
        return names.index(unfreeze)
    if unfreeze > len(names):
        raise UserError(
            f"train_transfer.fine_tune.unfreeze = {unfreeze}, but {base.name} has only {len(names)} layers:"
            f" use a number up to {len(names)}."
        )
    return len(names) - unfreeze


def unfreeze_top(base, first: int) -> int:
    """Make the base trainable from layer `first` (first_trainable_layer) up; returns how many layers that is.

    BatchNormalization layers stay frozen: their scale and offset were learnt
    together with their ImageNet statistics, which stay in use (inference mode).
    """
    base.trainable = True
    for index, layer in enumerate(base.layers):
        layer.trainable = index >= first and not isinstance(layer, keras.layers.BatchNormalization)
    return len(base.layers) - first
