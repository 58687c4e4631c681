"""How much arithmetic a model costs: forward FLOPs per image, counted from the built Keras model.

The count is analytic, layer by layer, and one multiply-add counts as 2 FLOPs:
- convolutions (Conv1D/2D/3D, grouped): 2 x output positions x output channels
  x kernel size x input channels per group;
- depthwise convolutions: 2 x output positions x channels x depth multiplier x kernel size;
- separable convolutions: their depthwise part plus a 1x1 convolution;
- Dense layers: 2 x inputs x units, times every position a Dense over a
  non-flat tensor is applied at.
Left out, because each costs a few FLOPs per value where a 3x3 convolution over
tens of channels costs hundreds: biases, batch normalisation, activations,
pooling, resizing, rescaling, element-wise sums and averages, augmentation.
Nested models and Sequentials are walked, and a layer or model called several
times (e.g. a network averaged over test-time views) counts once per call.

Training is counted as 3 forward passes per training image (forward, and a
backward pass of about twice the forward cost), the convention of the
compute-per-result literature; a pass over frozen layers that nothing below
trains needs no backward pass and counts once.
"""

from typing import NamedTuple

import keras

from imgcls.dataset import load_manifest
from imgcls.keras_internals import calls_in_graph
from imgcls.transfer import augmentation_is_off

TRAINING_PASSES = 3  # forward + backward (gradients of the activations and of the weights)


def layer_flops(model) -> list[tuple[object, int]]:
    """[(layer, forward FLOPs per image over all its calls in `model`)] for each of `model`'s own layers."""
    counts = []
    for layer, calls in calls_in_graph(model):
        if isinstance(layer, keras.Model):
            total = forward_flops(layer) * len(calls)
        else:
            total = sum(_call_flops(layer, call) for call in calls)
        counts.append((layer, total))
    return counts


def forward_flops(model) -> int:
    """Forward FLOPs for one image through `model` (see the module docstring for what counts)."""
    return sum(count for _, count in layer_flops(model))


def _positions(shape) -> int:
    """Product of the dimensions between the batch and the last axis (1 for a flat tensor)."""
    product = 1
    for size in shape[1:-1]:
        product *= size
    return product


def _call_flops(layer, call) -> int:
    inputs, outputs = call
    if not inputs or not outputs:
        return 0
    input_shape, output_shape = inputs[0].shape, outputs[0].shape
    if isinstance(layer, keras.layers.Dense):
        return 2 * input_shape[-1] * layer.units * _positions(output_shape)
    if not isinstance(layer, (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D,
                              keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D,
                              keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)):
        return 0
    channels_last = getattr(layer, "data_format", "channels_last") == "channels_last"
    in_channels = input_shape[-1] if channels_last else input_shape[1]
    spatial = output_shape[1:-1] if channels_last else output_shape[2:]
    positions = 1
    for size in spatial:
        positions *= size
    kernel = 1
    for size in layer.kernel_size:
        kernel *= size
    if isinstance(layer, (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)):
        return 2 * positions * in_channels * layer.depth_multiplier * kernel
    if isinstance(layer, (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)):
        depthwise = in_channels * layer.depth_multiplier
        return 2 * positions * (depthwise * kernel + depthwise * layer.filters)
    return 2 * positions * layer.filters * kernel * in_channels // layer.groups


def _test_images() -> int:
    manifest = load_manifest()
    return int((manifest["split"] == "test").sum())


def cnn_flops(network, saved_model, train_images: int, val_images: int, epochs: int) -> dict:
    """train.json's FLOP figures for train_cnn.

    `network` is the trained network (each training step runs it once per
    image); `saved_model` is what is saved and evaluated, test-time views
    included. Training: 3 x forward x training images x epochs run. Validation:
    a forward pass over the validation images after each epoch.
    """
    forward = forward_flops(network)
    evaluation = forward_flops(saved_model)
    return {
        "forward_flops_per_image": forward,
        "training_flops": TRAINING_PASSES * forward * train_images * epochs,
        "validation_flops": forward * val_images * epochs,
        "evaluation_flops_per_image": evaluation,
        "evaluation_flops": evaluation * _test_images(),
    }


class PassFlops(NamedTuple):
    """Forward FLOPs per image of each part of the transfer model, split where fine-tuning starts."""

    bottom: int  # the base's layers below fine_tune.unfreeze: frozen in both phases
    top: int  # the base's layers from there up: trained in phase 2
    head: int
    whole: int  # the classifier: base and head


def transfer_flops(section, net, log, train_images: int, val_images: int, saved) -> dict:
    """train.json's FLOP figures for train_transfer: what each phase actually ran, and what the saved model
    (`saved`, test-time views included) costs per photo evaluated.

    `net` is build_networks' Networks. The base is split where fine-tuning
    starts (net.first_trainable, from `section.fine_tune.unfreeze`): the bottom
    (frozen in both phases) and the top (trained in phase 2). With phase 2 on
    cached activations, the bottom first runs over every cached version of the
    images (_cache_flops); then each phase costs what
    _head_phase_flops and _fine_tune_phase_flops say. The epochs of each phase
    are read from `log` (its phases and rows), so early stopping is accounted for.
    A phase 1 fitted as the linear probe has no epochs: its cost is the features,
    and its L-BFGS fits, a few GFLOP on the pooled features, are left out.
    """
    fine_tune = net.fine_tune
    flops = _pass_flops(net)
    evaluation = forward_flops(saved)
    head_epochs, fine_tune_epochs = _phase_epochs(log)
    cache_phase2 = fine_tune and section.fine_tune.cached_copies > 0
    cache, cache_validation = (_cache_flops(flops, section.fine_tune, train_images, val_images) if cache_phase2
                               else (0, 0))
    head_training, head_validation = _head_phase_flops(flops, augmentation_is_off(section.head.augment), cache_phase2,
                                                       train_images, val_images, head_epochs)
    fine_tune_training, fine_tune_validation = (
        _fine_tune_phase_flops(flops, cache_phase2, train_images, val_images, fine_tune_epochs) if fine_tune
        else (0, 0))
    return {
        "forward_flops_per_image": flops.whole,
        "training_flops": cache + head_training + fine_tune_training,
        "training_flops_cache": cache,
        "training_flops_head": head_training,
        "training_flops_fine_tune": fine_tune_training,
        "validation_flops": cache_validation + head_validation + fine_tune_validation,
        "evaluation_flops_per_image": evaluation,
        "evaluation_flops": evaluation * _test_images(),
    }


def _pass_flops(net) -> PassFlops:
    """The forward cost of each part; without fine-tuning the whole base is the bottom (net.first_trainable is
    then len(base.layers))."""
    per_layer = [count for _, count in layer_flops(net.base)]
    first = net.first_trainable
    return PassFlops(bottom=sum(per_layer[:first]), top=sum(per_layer[first:]), head=forward_flops(net.head),
                     whole=forward_flops(net.classifier))


def _phase_epochs(log) -> tuple[int, int]:
    """(head epochs, fine-tuning epochs) that `log` ran: 0 for a phase that did not run (phase 1 fitted
    as the linear probe has no epochs)."""
    starts = [start for start, _ in log.phases] + [len(log.rows) + 1]
    epochs = {name: later - start for (start, name), later in zip(log.phases, starts[1:])}
    return epochs.get("head", 0), epochs.get("fine-tune", 0)


def _cache_flops(flops: PassFlops, fine_tune, train_images: int, val_images: int) -> tuple[int, int]:
    """(training, validation) FLOPs of caching phase 2's inputs: the bottom over every cached version
    of the training images (the plain one, and each augmented copy), and once over the validation images."""
    versions = 1 + (fine_tune.cached_copies if not augmentation_is_off(fine_tune.augment) else 0)
    return flops.bottom * train_images * versions, flops.bottom * val_images


def _head_phase_flops(flops: PassFlops, plain_images: bool, cache_phase2: bool, train_images: int, val_images: int,
                      epochs: int) -> tuple[int, int]:
    """(training, validation) FLOPs of phase 1, which trains the head.

    On cached features (`plain_images`: no head augmentation), the base runs
    once forward over every training and validation image (only the top, when
    phase 2's cache already ran the bottom), then each epoch trains the head:
    3 x head per training image, and runs it forward over the validation
    images. On augmented images, every epoch runs the frozen base forward and
    the head 3 times per training image, and the whole classifier forward over
    the validation images.
    """
    if plain_images:
        features = flops.top if cache_phase2 else flops.bottom + flops.top
        training = features * train_images + TRAINING_PASSES * flops.head * train_images * epochs
        return training, features * val_images + flops.head * val_images * epochs
    training = (flops.bottom + flops.top + TRAINING_PASSES * flops.head) * train_images * epochs
    return training, flops.whole * val_images * epochs


def _fine_tune_phase_flops(flops: PassFlops, cache_phase2: bool, train_images: int, val_images: int,
                           epochs: int) -> tuple[int, int]:
    """(training, validation) FLOPs of phase 2, which trains the top and the head.

    Each epoch trains the top and the head: 3 x (top + head) per training
    image, after running the bottom forward over the images unless its
    activations were cached. Validation runs forward what the epoch trains
    (the whole classifier without the cache).
    """
    trained = TRAINING_PASSES * (flops.top + flops.head)
    training = (trained if cache_phase2 else flops.bottom + trained) * train_images * epochs
    return training, (flops.top + flops.head if cache_phase2 else flops.whole) * val_images * epochs


def format_flops(flops: float) -> str:
    """'0.153 PFLOP', '12.4 TFLOP', '236 MFLOP': three significant figures in the largest unit below the count."""
    for unit, size in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if flops >= size:
            return f"{flops / size:.3g} {unit}"
    return f"{flops:.0f} FLOP"
