"""imgcls.flops: forward FLOPs counted from a built model, checked against counts worked out by hand."""

import pytest


def tiny_network():
    """8x8x3 -> 3x3 conv (4 filters) -> 3x3 depthwise conv -> 2x2 max pooling -> flatten -> dense 5."""
    import keras

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)  # 8*8 positions * 4 filters * (3*3*3) * 2 = 13,824
    x = keras.layers.BatchNormalization()(x)  # left out
    x = keras.layers.DepthwiseConv2D(3, padding="same")(x)  # 8*8 * 4 channels * 3*3 * 2 = 4,608
    x = keras.layers.MaxPooling2D(2)(keras.layers.Activation("relu")(x))  # left out
    outputs = keras.layers.Dense(5)(keras.layers.Flatten()(x))  # (4*4*4) inputs * 5 units * 2 = 640
    return keras.Model(inputs, outputs, name="tiny")


TINY_NETWORK_FLOPS = 13_824 + 4_608 + 640


def test_a_tiny_network_costs_the_hand_computed_flops():
    from imgcls.flops import forward_flops, layer_flops

    network = tiny_network()
    assert forward_flops(network) == TINY_NETWORK_FLOPS
    assert [count for _, count in layer_flops(network) if count] == [13_824, 4_608, 640]


def test_nested_models_sequentials_and_repeated_calls_are_counted_once_per_call():
    import keras

    from imgcls.flops import forward_flops

    network = tiny_network()
    head = keras.Sequential([keras.Input((5,)), keras.layers.Dense(2)], name="head")  # 5 * 2 * 2 = 20
    inputs = keras.Input((8, 8, 3))
    mirrored = keras.layers.RandomFlip("horizontal")(inputs)
    averaged = keras.layers.Average()([network(inputs), network(mirrored)])  # the network runs twice
    outer = keras.Model(inputs, head(averaged))
    assert forward_flops(outer) == 2 * TINY_NETWORK_FLOPS + 20

    # A Dense layer over a sequence is applied at every position: 4 positions * 6 inputs * 3 units * 2.
    sequence = keras.Input((4, 6))
    assert forward_flops(keras.Model(sequence, keras.layers.Dense(3)(sequence))) == 144
    # A layer shared with another model counts only in the models that call it.
    other = keras.Model(inputs, network.layers[1](inputs))
    assert forward_flops(other) == 13_824 and forward_flops(network) == TINY_NETWORK_FLOPS


def test_separable_and_grouped_convolutions():
    import keras

    from imgcls.flops import forward_flops

    inputs = keras.Input((6, 6, 4))
    separable = keras.layers.SeparableConv2D(8, 3, padding="valid")(inputs)  # 4*4 * (4*9 + 4*8) * 2 = 2,176
    assert forward_flops(keras.Model(inputs, separable)) == 2_176
    grouped = keras.layers.Conv2D(8, 1, groups=2)(inputs)  # 6*6 * 8 * (1 * 4/2) * 2 = 1,152
    assert forward_flops(keras.Model(inputs, grouped)) == 1_152


@pytest.mark.parametrize("filters, expected_megaflops", [([64, 256, 256], 236.3)])
def test_the_cifar10_net_costs_what_airbench94_reports(filters, expected_megaflops):
    """64-256-256 with a whitening stem: about 0.36 PFLOP for 9.9 epochs of 50,000 images, as airbench94 states."""
    import numpy as np
    import yaml

    from bench_cifar import merged
    from conftest import REPO
    from imgcls.cnn import build_cnn
    from imgcls.flops import TRAINING_PASSES, forward_flops
    from imgcls.cnn_params import TrainCnnParams

    params = merged(yaml.safe_load((REPO / "params.yaml").read_text())["train_cnn"],
                    yaml.safe_load((REPO / "presets/cifar10.yaml").read_text())["train_cnn"])
    params["net"]["filters"] = filters
    images = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    forward = forward_flops(build_cnn(10, 32, TrainCnnParams.model_validate(params), seed=0, train_images=images))
    assert forward / 1e6 == pytest.approx(expected_megaflops, abs=0.1)
    assert TRAINING_PASSES * forward * 50_000 * 9.9 / 1e15 == pytest.approx(0.35, abs=0.01)
