"""train_cnn: the shared training helpers, the stage end to end, seeding, JAX without TensorFlow, bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from conftest import REPO, TINY_CNN, stage_env

# A net that trains in seconds on the 32 px generated images.
TINY = TINY_CNN


def read_json(path):
    return json.loads(path.read_text())


# Loads models/cnn.keras the way later stages do (safe_mode) in a fresh process and describes it.
INSPECT_SAVED_CNN = """
import json, sys, numpy as np
sys.path.insert(0, "scripts")
from imgcls.modelio import load_model
from imgcls.dataset import load_split
model, card = load_model("models/cnn.keras")
pixels, labels, _ = load_split("val", card["image_size"])
probabilities = model.predict(pixels.astype("float32"), verbose=0)
# With test-time augmentation the trained network is nested in a model that also feeds it mirrored and shifted copies.
network = next((layer for layer in model.layers if layer.name == "cnn"), model)
whiten = next((layer for layer in network.layers if layer.name == "whiten"), None)
print(json.dumps({"outer_layers": [layer.name for layer in model.layers],
                  "layers": [layer.name for layer in network.layers],
                  "accuracy": float(np.mean(probabilities.argmax(1) == labels)),
                  "probability_sum": float(probabilities.sum(1).mean()),
                  "whiten_trainable": whiten and whiten.trainable, "whiten_filters": whiten and whiten.filters,
                  "output_bias": any(layer.name in ("logits", "probabilities") and layer.use_bias
                                     for layer in network.layers)}))
"""


def inspect_saved_cnn(root) -> dict:
    result = subprocess.run([sys.executable, "-c", INSPECT_SAVED_CNN], cwd=root, env=stage_env(),
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.splitlines()[-1])


# --- batches, optim, augment -----------------------------------------------------------------------------------

def test_image_batches_cover_every_image_once_per_epoch_in_a_seeded_order():
    from imgcls.batches import ImageBatches

    images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1).repeat(3, axis=3)
    labels = np.arange(10) % 3
    batches = ImageBatches(images, labels, num_classes=3, batch_size=4, shuffle=True, seed=7)
    assert len(batches) == 3

    def one_epoch(dataset):
        pixels, targets = zip(*(dataset[index] for index in range(len(dataset))))
        return np.concatenate(pixels)[:, 0, 0, 0], np.concatenate(targets)

    first, targets = one_epoch(batches)
    assert sorted(first) == list(range(10)) and first.dtype == np.uint8  # a quarter of float32's bytes
    assert np.array_equal(targets, first.astype(int) % 3)  # class indices travel with their images
    assert [len(batches[index][0]) for index in range(3)] == [4, 4, 2]
    batches.on_epoch_end()
    second, _ = one_epoch(batches)
    assert sorted(second) == list(range(10)) and not np.array_equal(first, second)
    again = ImageBatches(images, labels, num_classes=3, batch_size=4, shuffle=True, seed=7)
    assert np.array_equal(one_epoch(again)[0], first)


def test_image_batches_reach_the_model_in_order_through_two_worker_threads():
    import keras

    from imgcls.batches import ImageBatches

    # Each image holds its own index; a model that only flattens shows the order Keras delivered them in.
    images = np.arange(60, dtype=np.uint8).reshape(60, 1, 1, 1).repeat(3, axis=3)
    batches = ImageBatches(images, batch_size=3)
    assert batches.workers == 2 and not batches.use_multiprocessing
    model = keras.Sequential([keras.Input((1, 1, 3)), keras.layers.Flatten()])
    for _ in range(2):  # a second pass reuses the enqueuer
        assert model.predict(batches, verbose=0)[:, 0].tolist() == list(range(60))


def test_image_batches_for_prediction_and_with_class_weights():
    from imgcls.batches import ImageBatches, class_weights

    images = np.zeros((5, 2, 2, 3), dtype=np.uint8)
    assert [len(item) for item in (ImageBatches(images, batch_size=2)[2])] == [1]  # (pixels,) only
    labels = np.array([0, 0, 0, 1, 2])
    weights = class_weights(labels, 3, "balanced")
    assert weights[0] == pytest.approx(5 / 9) and weights[1] == pytest.approx(5 / 3)
    assert np.mean([weights[label] for label in labels]) == pytest.approx(1.0)
    assert class_weights(labels, 3, "none") is None
    _, _, sample_weights = ImageBatches(images, labels, num_classes=3, batch_size=5, class_weights=weights)[0]
    assert sample_weights.tolist() == pytest.approx([5 / 9] * 3 + [5 / 3] * 2)
    with pytest.raises(ValueError, match="num_classes is required"):
        ImageBatches(images, labels)
    with pytest.raises(ValueError, match="5 images but 2 labels"):
        ImageBatches(images, labels[:2], num_classes=3)


def test_one_cycle_and_cosine_schedules_warm_up_then_decay_to_zero():
    import keras

    from imgcls.optim import OneCycle, OptimizerSettings, build_optimizer, learning_rate_schedule

    schedule = OneCycle(peak=0.1, warmup_steps=10, total_steps=100)
    rate = lambda step: float(keras.ops.convert_to_numpy(schedule(step)))  # noqa: E731
    assert rate(0) == pytest.approx(0.004)
    assert rate(10) == pytest.approx(0.1)
    assert rate(55) == pytest.approx(0.05)
    assert rate(100) == pytest.approx(0.0, abs=1e-9)
    cosine = learning_rate_schedule(0.1, "cosine", epochs=10, steps_per_epoch=10, warmup_epochs=1)
    assert float(keras.ops.convert_to_numpy(cosine(10))) == pytest.approx(0.1)
    assert float(keras.ops.convert_to_numpy(cosine(100))) == pytest.approx(0.0, abs=1e-6)
    constant = build_optimizer(OptimizerSettings("adam", 0.02, "constant", weight_decay=0.01), epochs=3,
                               steps_per_epoch=4)
    assert float(keras.ops.convert_to_numpy(constant.learning_rate)) == pytest.approx(0.02)
    assert constant.weight_decay == pytest.approx(0.01)


def test_schedules_start_and_end_where_asked():
    import keras

    from imgcls.optim import OneCycle, learning_rate_schedule

    # airbench's triangle: 0.2 of the peak at the start, the peak at 23%, 0.07 of it at the end.
    schedule = OneCycle(peak=2.0, warmup_steps=23, total_steps=100, start=0.2, end=0.07)
    rate = lambda step: float(keras.ops.convert_to_numpy(schedule(step)))  # noqa: E731
    assert [rate(0), rate(23), rate(100)] == pytest.approx([0.4, 2.0, 0.14])
    assert rate(23 + 77 / 2) == pytest.approx((2.0 + 0.14) / 2)
    assert OneCycle(**schedule.get_config()).get_config() == schedule.get_config()
    cosine = learning_rate_schedule(1.0, "cosine", epochs=10, steps_per_epoch=10, warmup_epochs=1, start=0.2, end=0.1)
    assert [float(keras.ops.convert_to_numpy(cosine(step))) for step in (0, 10, 100)] == pytest.approx([0.2, 1.0, 0.1])


@pytest.mark.parametrize("decay_biases", [False, True])
def test_weight_decay_spares_biases_and_offsets_unless_asked(decay_biases):
    import keras

    from imgcls.optim import OptimizerSettings, build_optimizer

    kernel, bias = keras.Variable(np.ones(3), name="kernel"), keras.Variable(np.ones(3), name="bias")
    offset, scale = keras.Variable(np.ones(3), name="beta"), keras.Variable(np.ones(3), name="gamma")
    settings = OptimizerSettings("sgd", 0.5, "constant", weight_decay=0.1, weight_decay_biases=decay_biases)
    optimizer = build_optimizer(settings, epochs=1, steps_per_epoch=1)
    optimizer.apply([keras.ops.zeros(3)] * 4, [kernel, bias, offset, scale])
    after = [float(keras.ops.convert_to_numpy(variable)[0]) for variable in (kernel, bias, offset, scale)]
    shrunk = 1 - 0.5 * 0.1
    assert after == pytest.approx([shrunk, shrunk, shrunk, 1.0] if decay_biases else [shrunk, 1.0, 1.0, 1.0])


def test_a_trainable_whitening_stem_learns_its_offsets_and_keeps_its_filters():
    import keras

    from imgcls.cnn import build_cnn
    from imgcls.cnn_params import TrainCnnParams

    params = yaml.safe_load((REPO / "params.yaml").read_text())["train_cnn"]
    params["input_size"] = 16
    params["net"].update(stem="whiten", whiten_bias_trainable=True, filters=[8], dense_units=[])
    images = np.random.default_rng(0).integers(0, 256, (64, 16, 16, 3), dtype=np.uint8)
    model = build_cnn(3, 16, TrainCnnParams.model_validate(params), seed=0, train_images=images)
    stem = model.get_layer("whiten")
    assert stem.trainable and [variable.path for variable in model.trainable_variables if "whiten" in variable.path] \
        == [stem.bias.path]
    kernel, bias = (keras.ops.convert_to_numpy(variable).copy() for variable in (stem.kernel, stem.bias))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    model.fit(images.astype("float32"), np.arange(64) % 3, epochs=1, batch_size=16, verbose=0)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(stem.kernel), kernel)
    assert np.abs(keras.ops.convert_to_numpy(stem.bias) - bias).max() > 1e-4
    with pytest.raises(ValueError, match="needs stem: whiten"):
        TrainCnnParams.model_validate({**params, "net": {**params["net"], "stem": "none"}})


def test_alternating_flips_mirror_each_image_on_every_other_epoch():
    from imgcls.batches import AlternatingFlips

    # Each image's columns count 0..3, so a mirrored image starts with 3.
    images = np.tile(np.arange(4, dtype=np.uint8).reshape(1, 1, 4, 1), (40, 4, 1, 3))
    labels = np.zeros(40, dtype=int)

    def mirrored_by_image(batches):
        order = batches.order
        pixels = np.concatenate([batches[index][0] for index in range(len(batches))])
        flags = np.empty(len(order), dtype=bool)
        flags[order] = pixels[:, 0, 0, 0] == 3
        return flags

    batches = AlternatingFlips(images, labels, num_classes=1, batch_size=16, shuffle=True, seed=5)
    epochs = []
    for _ in range(3):
        epochs.append(mirrored_by_image(batches))
        batches.on_epoch_end()
    assert 10 < epochs[0].sum() < 30  # about half start mirrored
    assert np.array_equal(epochs[1], ~epochs[0]) and np.array_equal(epochs[2], epochs[0])
    again = AlternatingFlips(images, labels, num_classes=1, batch_size=16, shuffle=True, seed=5)
    assert np.array_equal(mirrored_by_image(again), epochs[0])  # seeded


def test_identity_init_passes_the_first_channels_through():
    from imgcls.cnn import identity_kernel

    rng = np.random.default_rng(0)
    kernel = identity_kernel(rng.normal(size=(3, 3, 4, 6)))
    image = rng.normal(size=(5, 5, 4))
    centre = np.einsum("abio,abi->o", kernel, image[1:4, 1:4])  # the convolution's output at pixel (2, 2)
    np.testing.assert_allclose(centre[:4], image[2, 2])
    assert np.abs(kernel[..., 4:]).sum() > 0  # filters beyond the inputs keep their random start
    assert identity_kernel(np.zeros((3, 3, 6, 4)))[1, 1].tolist() == np.eye(6, 4).tolist()


def test_conv_init_scale_sets_the_variance_of_the_convolutions_random_start():
    import keras

    from imgcls.cnn import build_cnn
    from imgcls.cnn_params import TrainCnnParams

    params = yaml.safe_load((REPO / "params.yaml").read_text())["train_cnn"]
    params["input_size"] = 32
    params["net"].update(filters=[64, 128], batch_norm=True)
    variances = {}
    for scale in (2.0, 0.333):
        section = {**params, "net": {**params["net"], "conv_init_scale": scale}}
        model = build_cnn(10, 32, TrainCnnParams.model_validate(section), seed=0)
        kernel = keras.ops.convert_to_numpy(model.get_layer("block2_conv1").kernel)
        fan_in = np.prod(kernel.shape[:3])
        variances[scale] = kernel.var() * fan_in
        # Scale 2 is He initialisation, saved under its own name.
        expected = "HeNormal" if scale == 2 else "VarianceScaling"
        assert model.get_layer("block2_conv1").get_config()["kernel_initializer"]["class_name"] == expected
    assert variances[2.0] == pytest.approx(2.0, rel=0.05) and variances[0.333] == pytest.approx(0.333, rel=0.05)


def test_pool_before_norm_pools_each_block_before_its_batch_norm():
    from imgcls.cnn import build_cnn
    from imgcls.cnn_params import TrainCnnParams

    params = yaml.safe_load((REPO / "params.yaml").read_text())["train_cnn"]
    params["input_size"] = 32
    params["net"].update(filters=[8, 16], convs_per_block=2, pool_after="first", batch_norm=True)
    for before, expected in ((False, ["conv1", "norm1", "relu1", "pool", "conv2", "norm2", "relu2"]),
                             (True, ["conv1", "pool", "norm1", "relu1", "conv2", "norm2", "relu2"])):
        section = {**params, "net": {**params["net"], "pool_before_norm": before}}
        model = build_cnn(10, 32, TrainCnnParams.model_validate(section), seed=0)
        names = [layer.name.removeprefix("block1_") for layer in model.layers if layer.name.startswith("block1_")]
        assert names == expected
        # Either way each block halves the map once: 32 -> 16 -> 8.
        assert model.get_layer("block2_conv2").output.shape[1:3] == (8, 8)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_scaled_rates_multiply_the_learning_rate_of_the_named_variables(name):
    import keras

    from imgcls.optim import OptimizerSettings, build_optimizer

    plain, fast = keras.Variable(np.zeros(3), name="kernel"), keras.Variable(np.zeros(3), name="beta")
    settings = OptimizerSettings(name, 0.1, "constant")
    optimizer = build_optimizer(settings, epochs=1, steps_per_epoch=1, rate_scales={fast.path: 64.0})
    for _ in range(3):
        optimizer.apply([keras.ops.ones(3), keras.ops.ones(3)], [plain, fast])
    moved_plain, moved_fast = (keras.ops.convert_to_numpy(variable) for variable in (plain, fast))
    np.testing.assert_allclose(moved_fast, 64 * moved_plain, rtol=1e-5)
    assert moved_plain[0] < 0
    unscaled = build_optimizer(settings, epochs=1, steps_per_epoch=1)
    assert type(unscaled) in (keras.optimizers.SGD, keras.optimizers.Adam)  # the defaults build the plain ones


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_a_ramped_average_follows_the_weights_early_and_averages_late(name):
    import keras

    from imgcls.keras_internals import weight_averages
    from imgcls.optim import OptimizerSettings, build_optimizer
    from imgcls.cnn_params import EmaParams

    def averages(ramp: float) -> list[float]:
        """The moving average after each of 10 steps of a constant gradient."""
        weight = keras.Variable(np.zeros(1), name="kernel")
        optimizer = build_optimizer(OptimizerSettings(name, 0.1, "constant"), epochs=1, steps_per_epoch=10,
                                    ema=EmaParams(momentum=0.9, every=0, ramp=ramp,
                                                               batch_norm_statistics=False))
        path = []
        for _ in range(10):
            optimizer.apply([keras.ops.ones(1)], [weight])
            path.append((float(keras.ops.convert_to_numpy(weight)[0]),
                         float(keras.ops.convert_to_numpy(weight_averages(optimizer)[0])[0])))
        return path

    constant, ramped = averages(0.0), averages(2.0)
    # At step t of 10 the ramped momentum is 0.9 * (t / 10) ** 2: 0 at the first step, so the average is the weight...
    assert ramped[0][1] == pytest.approx(ramped[0][0])
    assert ramped[1][1] == pytest.approx(0.009 * ramped[0][0] + 0.991 * ramped[1][0], rel=1e-5)
    # ... while Keras' constant momentum lags far behind from the second step on.
    lag = [abs(weight - average) for weight, average in constant]
    ramped_lag = [abs(weight - average) for weight, average in ramped]
    assert all(ours < theirs for ours, theirs in zip(ramped_lag[1:], lag[1:]))
    last_weight, last_average = ramped[-1]
    previous_average = ramped[-2][1]
    assert last_average == pytest.approx(0.9 * 0.81 * previous_average + (1 - 0.9 * 0.81) * last_weight, rel=1e-5)


def test_the_lookahead_averages_the_batch_norm_statistics_with_the_weights():
    import keras

    from imgcls.optim import Lookahead

    inputs = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    labels = np.arange(8) % 2

    def trained(callbacks: list) -> list[np.ndarray]:
        """A small network with batch norm, from the same start each time, after one step on one batch."""
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, use_bias=False),
                                  keras.layers.BatchNormalization(momentum=0.5),
                                  keras.layers.Dense(2, activation="softmax")])
        model.compile(keras.optimizers.SGD(0.5), "sparse_categorical_crossentropy")
        start = model.get_weights()
        model.fit(inputs, labels, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
        return start, model.get_weights()

    start, fast = trained([])
    _, averaged = trained([Lookahead(momentum=0.9, every=1, ramp=0.0, total_steps=1)])
    names = ["kernel", "gamma", "beta", "moving_mean", "moving_variance", "kernel", "bias"]
    assert len(start) == len(names)
    for name, before, after_one_step, result in zip(names, start, fast, averaged):
        assert not np.allclose(before, after_one_step), name  # the step moved every weight, statistics included
        # ... and the lookahead reset each of them 1 - 0.9 of the way from its start.
        np.testing.assert_allclose(result, 0.9 * before + 0.1 * after_one_step, rtol=1e-5, atol=1e-6, err_msg=name)


def test_augmentation_resamples_whole_pixels_with_nearest():
    from imgcls.sections import AugmentParams
    from imgcls.augment import augmentation

    shifts = AugmentParams(flip="none", rotation=0, zoom=0, translation=0.25, contrast=0, interpolation="nearest")
    image = np.arange(16 * 16 * 3, dtype="float32").reshape(1, 16, 16, 3)
    moved = np.asarray(augmentation(shifts, seed=0)(np.repeat(image, 8, axis=0), training=True))
    # Every output pixel is one of the input's pixels: no blending of neighbours.
    assert np.isin(moved, image).all() and not np.allclose(moved, image)


def test_augmentation_leaves_out_changes_set_to_zero():
    from imgcls.sections import AugmentParams
    from imgcls.augment import augmentation

    off = AugmentParams(flip="none", rotation=0, zoom=0, translation=0, contrast=0, interpolation="bilinear")
    assert [type(layer).__name__ for layer in augmentation(off, seed=0).layers] == ["Identity"]
    every = AugmentParams(flip="horizontal", rotation=0.1, zoom=0.1, translation=0.1, contrast=0.2,
                          interpolation="bilinear")
    names = [type(layer).__name__ for layer in augmentation(every, seed=0).layers]
    assert names == ["RandomFlip", "RandomRotation", "RandomZoom", "RandomTranslation", "RandomContrast"]


def test_the_seeds_baseline_is_expressible_in_params():
    from imgcls.cnn import build_cnn
    from imgcls.cnn_params import TrainCnnParams

    params = yaml.safe_load((REPO / "params.yaml").read_text())["train_cnn"]
    params.update(input_size=64, label_smoothing=0.0, class_weight="none")
    params["net"].update(stem="none", filters=[32, 64], convs_per_block=1, pool_after="last", batch_norm=False,
                         activation="relu", pooling="flatten", output_scale=1.0, dense_units=[128], dropout=0.0)
    params["optimizer"].update(name="adam", learning_rate=0.001, schedule="constant", weight_decay=0.0)
    params["augment"].update(flip="none", rotation=0, zoom=0, translation=0, contrast=0, interpolation="bilinear")
    model = build_cnn(12, 160, TrainCnnParams.model_validate(params), seed=0)
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == ["InputLayer", "Resizing", "Rescaling", "Conv2D", "Activation", "MaxPooling2D",
                     "Conv2D", "Activation", "MaxPooling2D", "Flatten", "Dense", "Dense"]
    assert model.output_shape == (None, 12)


# --- the stage -------------------------------------------------------------------------------------------------

def test_train_cnn_keeps_the_best_epoch_writes_curves_and_is_reproducible(prepared):
    # The plain model: with test-time views the card holds their accuracy (see test_the_fast_cnn_options_...).
    prepared.set_params(**{**TINY, "train_cnn.epochs": 4, "train_cnn.test_time.flip": False})
    dvc_yaml = (prepared.root / "dvc.yaml").read_bytes()
    prepared.stage("train_cnn")
    root = prepared.root
    metrics = read_json(root / "reports/cnn/train.json")
    card = read_json(root / "models/cnn.json")
    assert card["name"] == "cnn" and card["class_names"] == ["class_0", "class_1", "class_2"]
    assert card["image_size"] == 32 and card["val_accuracy"] == metrics["val_accuracy"]
    assert metrics["epochs_run"] == 4 and 1 <= metrics["best_epoch"] <= 4
    # FLOPs: 3 forward passes per training image per epoch; evaluation runs the saved model over the test split.
    splits = [line.split(",")[-1] for line in (root / "data/split/manifest.csv").read_text().splitlines()[1:]]
    assert metrics["forward_flops_per_image"] > 0
    assert metrics["training_flops"] == 3 * metrics["forward_flops_per_image"] * splits.count("train") * 4
    assert metrics["validation_flops"] == metrics["forward_flops_per_image"] * splits.count("val") * 4
    assert metrics["evaluation_flops"] == metrics["forward_flops_per_image"] * splits.count("test")
    history = (root / "reports/cnn/history.csv").read_text().splitlines()
    assert history[0].startswith("epoch,phase,loss,accuracy,val_loss,val_accuracy") and len(history) == 5
    best_row = history[metrics["best_epoch"]].split(",")
    assert float(best_row[5]) == pytest.approx(metrics["val_accuracy"])
    assert max(float(row.split(",")[5]) for row in history[1:]) == pytest.approx(metrics["val_accuracy"])
    assert (root / "reports/cnn/training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for split in ("train", "val"):
        for metric in ("loss", "accuracy"):
            rows = (root / f"reports/cnn/live/plots/metrics/{split}/{metric}.tsv").read_text().splitlines()
            assert len(rows) == 5
    assert (root / "dvc.yaml").read_bytes() == dvc_yaml  # DVCLive must not edit dvc.yaml
    assert not list((root / "models").glob(".*tmp*"))  # atomic writes leave no temporary file

    # The saved model follows the contract: loads safely, pixels 0..255 in, probabilities out.
    saved = inspect_saved_cnn(root)
    assert saved["accuracy"] == pytest.approx(card["val_accuracy"], abs=1e-6)
    assert saved["probability_sum"] == pytest.approx(1.0, abs=1e-4)

    # Same params and data on CPU: the same numbers again.
    first = [line.split(",")[:6] for line in history]
    prepared.stage("train_cnn")
    second = [line.split(",")[:6] for line in (root / "reports/cnn/history.csv").read_text().splitlines()]
    assert second == first


def test_the_whitening_stem_decorrelates_image_patches():
    from imgcls.cnn import whitening_filters

    rng = np.random.default_rng(0)
    # Blocky images: neighbouring pixels and the three channels are strongly correlated.
    blocks = np.repeat(np.repeat(rng.random((50, 8, 8, 1)), 4, axis=1), 4, axis=2)
    images = blocks * np.array([1.0, 0.8, 0.6]) + 0.2 * rng.random((50, 32, 32, 3))
    kernel, bias = whitening_filters(images)
    assert kernel.shape == (2, 2, 3, 24) and bias.shape == (24,)

    patches = np.stack([images[:, row:31 + row, column:31 + column, :] for row in (0, 1) for column in (0, 1)],
                       axis=3).reshape(-1, 12)
    outputs = patches @ kernel.reshape(12, 24) + bias
    np.testing.assert_allclose(outputs[:, 12:], -outputs[:, :12], atol=1e-4)  # both signs of every direction
    whitened = outputs[:, :12]
    covariance = np.cov(whitened, rowvar=False)
    assert np.abs(whitened.mean(axis=0)).max() < 1e-3
    assert np.abs(covariance - np.diag(np.diag(covariance))).max() < 1e-3  # decorrelated
    # Unit variance in every direction, a little less where the patch variance is near epsilon.
    assert 0.8 < np.diag(covariance).min() and np.diag(covariance).max() < 1.0 + 1e-3
    assert np.corrcoef(patches, rowvar=False).min() > 0.5  # while the raw pixels were correlated

    # epsilon is relative to the pixel variance: the same images at a tenth of the contrast whiten the same.
    faint_kernel, faint_bias = whitening_filters(0.1 * images)
    np.testing.assert_allclose(0.1 * faint_kernel, kernel, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(faint_bias, bias, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("flip, shift", [(True, False), (False, True), (True, True)])
def test_test_time_augmentation_averages_the_mirror_and_shifted_images(flip, shift):
    import keras

    from imgcls.augment import with_test_time_augmentation

    inputs = keras.Input((8, 8, 3))
    outputs = keras.layers.Dense(4, activation="softmax")(keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs)))
    model = keras.Model(inputs, outputs, name="cnn")
    pixels = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3)).astype("float32")
    views = [pixels] + ([pixels[:, :, ::-1]] if flip else [])
    if shift:  # moved one pixel up-left and down-right, the edge rows and columns repeated
        padded = [np.pad(view, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge") for view in views]
        views += [view[:, 2:, 2:] for view in padded] + [view[:, :-2, :-2] for view in padded]
    expected = np.mean([model.predict(view, verbose=0) for view in views], axis=0)
    augmented = with_test_time_augmentation(model, flip, shift)
    np.testing.assert_allclose(augmented.predict(pixels, verbose=0), expected, atol=1e-6)
    assert with_test_time_augmentation(model, flip=False, shift=False) is model


def test_the_fast_cnn_options_train_and_load_safely(prepared):
    prepared.set_params(**{**TINY, "train_cnn.epochs": 2, "train_cnn.net.stem": "whiten",
                           "train_cnn.net.convs_per_block": 2, "train_cnn.net.pool_after": "first",
                           "train_cnn.net.activation": "gelu", "train_cnn.net.pooling": "global_max",
                           "train_cnn.net.output_scale": 0.125, "train_cnn.test_time.flip": True,
                           "train_cnn.test_time.shift": True})
    prepared.stage("train_cnn")
    result = inspect_saved_cnn(prepared.root)
    assert result["whiten_trainable"] is False and result["whiten_filters"] == 24
    layers = result["layers"]
    # Each block pools right after its first convolution; the scaled logits feed the softmax.
    assert layers.index("block1_pool") == layers.index("block1_gelu1") + 1 < layers.index("block1_conv2")
    assert "pool" in layers and layers[-3:] == ["logits", "logit_scale", "probabilities"]
    # The saved model averages the network's predictions for each image, its mirror image and their shifted copies.
    outer = result["outer_layers"]
    # ... and rescales their mean by the temperature fitted on the validation split.
    assert outer[0] == "pixels" and outer[-3:] == ["cnn", "mean_probabilities", "temperature"]
    assert {"mirror", "view0_up_left_columns", "view1_down_right_columns"} <= set(outer)
    card = read_json(prepared.root / "models/cnn.json")
    assert card["test_time_flip"] is True and card["test_time_shift"] is True
    metrics = read_json(prepared.root / "reports/cnn/train.json")  # six views: six times the network's FLOPs, and more
    assert metrics["evaluation_flops_per_image"] > 6 * metrics["forward_flops_per_image"]
    assert result["accuracy"] == pytest.approx(card["val_accuracy"], abs=1e-6)
    assert card["temperature"] > 0 and card["val_log_loss"]["after"] <= card["val_log_loss"]["before"]
    # Set on the calibration split: 3 photos (one a class) can honour a target of at most 3/4, not 0.99.
    assert (card["threshold_split"], card["threshold_photos"], card["target_coverage"]) == ("calibration", 3, 0.75)
    assert 0 < card["confidence_threshold"] <= 1


# Every option from airbench's ablations at once: identity init over PyTorch's smaller random start, fast
# batch-norm statistics with fixed scales, 64x learning rate on the batch-norm offsets,
# a ramped moving average of the weights and batch-norm statistics reset into them every 4 steps, a head
# without bias, alternating flips, whole-pixel shifts,
# pooling before batch norm, a whitening stem whose offsets learn, airbench's triangle of learning rates and
# weight decay of every trained weight.
AIRBENCH_OPTIONS = {"train_cnn.net.identity_init": True, "train_cnn.net.conv_init_scale": 0.333,
                    "train_cnn.net.batch_norm_momentum": 0.4, "train_cnn.net.batch_norm_scale": False,
                    "train_cnn.net.convs_per_block": 2, "train_cnn.net.pool_after": "first",
                    "train_cnn.net.pool_before_norm": True, "train_cnn.net.stem": "whiten",
                    "train_cnn.net.whiten_bias_trainable": True,
                    "train_cnn.optimizer.name": "sgd", "train_cnn.optimizer.batch_norm_bias_lr_scale": 64.0,
                    "train_cnn.optimizer.schedule_start": 0.2, "train_cnn.optimizer.schedule_end": 0.07,
                    "train_cnn.optimizer.weight_decay_biases": True,
                    "train_cnn.ema.momentum": 0.8, "train_cnn.ema.every": 4, "train_cnn.ema.ramp": 0.6,
                    "train_cnn.ema.batch_norm_statistics": True, "train_cnn.net.head": "airbench",
                    "train_cnn.augment.alternate_flips": True, "train_cnn.augment.flip": "none",
                    "train_cnn.augment.translation": 0.1, "train_cnn.augment.interpolation": "nearest"}


def test_the_airbench_options_train_reproducibly_and_save_the_averaged_weights(prepared):
    prepared.set_params(**{**TINY, **AIRBENCH_OPTIONS, "train_cnn.epochs": 3})
    prepared.stage("train_cnn")
    root = prepared.root
    card = read_json(root / "models/cnn.json")
    saved = inspect_saved_cnn(root)
    # The saved model loads in safe_mode and scores what was validated: the averaged weights of the best epoch.
    assert saved["accuracy"] == pytest.approx(card["val_accuracy"], abs=1e-6)
    assert saved["output_bias"] is False  # airbench's head
    history = [line.split(",")[:6] for line in (root / "reports/cnn/history.csv").read_text().splitlines()]
    prepared.stage("train_cnn")
    again = [line.split(",")[:6] for line in (root / "reports/cnn/history.csv").read_text().splitlines()]
    assert again == history


def test_the_airbench_options_run_on_jax_without_tensorflow(prepared):
    prepared.set_params(**{**TINY, **AIRBENCH_OPTIONS, "train_cnn.epochs": 2})
    result = prepared.stage_on_jax_without_tensorflow("train_cnn")
    assert "backend jax" in result.stdout and "tensorflow modules: []" in result.stdout
    card = read_json(prepared.root / "models/cnn.json")
    assert card["backend"] == "jax" and 0 <= card["val_accuracy"] <= 1


def test_train_cnn_runs_on_jax_without_tensorflow(prepared):
    prepared.set_params(**{**TINY, "train_cnn.epochs": 1, "train_cnn.optimizer.warmup_epochs": 0})
    result = prepared.stage_on_jax_without_tensorflow("train_cnn")
    assert "backend jax" in result.stdout and "tensorflow modules: []" in result.stdout
    card = read_json(prepared.root / "models/cnn.json")
    assert card["backend"] == "jax" and 0 <= card["val_accuracy"] <= 1


def test_dvc_exp_run_sets_params_and_records_metrics(project):
    project.set_params(**TINY)
    project.run("git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qam", "tiny")
    project.dvc("exp", "run", "-S", "train_cnn.epochs=2", "-S", "train_cnn.optimizer.learning_rate=0.005", "train_cnn")
    shown = json.loads(project.dvc("exp", "show", "--json").stdout)
    text = json.dumps(shown)
    assert '"epochs": 2' in text and '"learning_rate": 0.005' in text
    assert "reports/cnn/train.json" in text and '"epochs_run": 2' in text
    # The experiment ran in the workspace: its model and curves are there, and dvc.yaml is untouched by DVCLive.
    assert (project.root / "models/cnn.keras").exists()
    assert project.run("git", "status", "--porcelain", "dvc.yaml").stdout == ""


# --- bad input -------------------------------------------------------------------------------------------------

def test_without_a_validation_split_train_cnn_keeps_its_last_epoch_and_transfer_stops(prepared):
    # split.val 0: train on every non-test photo (as for CIFAR-10's 50,000), with nothing to validate on.
    prepared.set_params(**{**TINY, "split.train": 0.8, "split.val": 0.0, "split.test": 0.2, "train_cnn.epochs": 3})
    prepared.stage("split")
    summary = read_json(prepared.root / "reports/split/summary.json")
    assert summary["splits"]["val"] == {"images": 0, "how": "none (split.val: 0)"}
    assert summary["splits"]["calibration"] == {"images": 0, "how": "none (split.val: 0)"}
    assert summary["splits"]["test"]["images"] > 0
    result = prepared.stage("train_cnn")
    assert "no validation split (split.val: 0)" in result.stdout and "kept epoch 3/3" in result.stdout
    card = read_json(prepared.root / "models/cnn.json")
    assert card["best_epoch"] == 3 and card["val_accuracy"] is None
    assert card["validation"] == "none (split.val: 0): last epoch kept"
    assert card["temperature"] is None and card["confidence_threshold"] is None
    history = (prepared.root / "reports/cnn/history.csv").read_text().splitlines()
    assert len(history) == 4
    # evaluate scores it on the test split, answering every photo (there is no `unknown` threshold).
    result = prepared.stage("evaluate")
    assert "trained without a validation split" in result.stdout
    metrics = read_json(prepared.root / "reports/evaluate/metrics.json")["cnn"]
    assert metrics["coverage"] == 1.0 and metrics["temperature"] == 1.0
    # predict_new can neither rank it ("best") nor set `unknown` without validation: it says so.
    result = prepared.stage("predict_new", check=False)
    assert result.returncode == 2 and "'best' cannot rank it" in result.stderr
    prepared.set_params(**{"predict_new.model": "cnn"})
    result = prepared.stage("predict_new", check=False)
    assert result.returncode == 2 and "no `unknown` threshold" in result.stderr
    assert "set predict_new.min_confidence to a number" in result.stderr
    # Early stopping has nothing to watch; train_transfer picks its model on validation photos: both say so.
    prepared.set_params(**{"train_cnn.patience": 2})
    result = prepared.stage("train_cnn", check=False)
    assert result.returncode == 2 and "set train_cnn.patience to 0" in result.stderr
    result = prepared.stage("train_transfer", check=False)
    assert result.returncode == 2 and "the val split is empty" in result.stderr and "split.val above 0" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_split_says_which_stage_to_run(project):
    project.set_params(**TINY)
    result = project.stage("train_cnn", check=False)
    assert result.returncode == 2
    assert "data/split/classes.txt not found" in result.stderr and "dvc repro split" in result.stderr
    assert "Traceback" not in result.stderr


def test_out_of_range_params_name_the_key(prepared):
    prepared.set_params(**{"train_cnn.optimizer.learning_rate": -1, "train_cnn.augment.rotation": 3,
                           "train_cnn.net.filters": [32, 0]})
    result = prepared.stage("train_cnn", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "train_cnn.optimizer.learning_rate = -1" in result.stderr
    assert "train_cnn.augment.rotation = 3" in result.stderr
    assert "train_cnn.net.filters.1 = 0: Input should be greater than or equal to 1" in result.stderr
    prepared.set_params(**{"train_cnn.optimizer.learning_rate": 0.01, "train_cnn.augment.rotation": 0,
                           "train_cnn.net.filters": [8], "train_cnn.epochs": 2, "train_cnn.optimizer.warmup_epochs": 2})
    result = prepared.stage("train_cnn", check=False)
    assert result.returncode == 2 and "optimizer.warmup_epochs (2) must be less than epochs (2)" in result.stderr


def test_conflicting_airbench_options_say_what_to_change():
    from pydantic import ValidationError

    from imgcls.cnn_params import TrainCnnParams

    params = yaml.safe_load((REPO / "params.yaml").read_text())["train_cnn"]
    def changed(section: str, **changes) -> dict:
        return {**params, section: {**params[section], **changes}}

    with pytest.raises(ValidationError, match="set flip to none .or vertical., not horizontal"):
        TrainCnnParams.model_validate(changed("augment", alternate_flips=True))
    with pytest.raises(ValidationError, match=r"every \(5\) needs a momentum above 0"):
        TrainCnnParams.model_validate(changed("ema", every=5))
    with pytest.raises(ValidationError, match=r"ramp \(3\) needs a momentum above 0"):
        TrainCnnParams.model_validate(changed("ema", ramp=3))
    with pytest.raises(ValidationError, match="interpolation"):
        TrainCnnParams.model_validate(changed("augment", interpolation="cubic"))
    with pytest.raises(ValidationError, match="batch_norm_bias_lr_scale"):
        TrainCnnParams.model_validate(changed("optimizer", batch_norm_bias_lr_scale=0))


def test_resized_images_that_do_not_match_params_ask_for_resize(prepared):
    prepared.set_params(**TINY, **{"resize.image_size": 48})
    result = prepared.stage("train_cnn", check=False)
    assert result.returncode == 2
    assert "data/resized has no 48 px images" in result.stderr and "dvc repro resize" in result.stderr


def test_a_training_that_never_has_finite_losses_says_to_lower_the_learning_rate():
    import keras

    from imgcls.errors import UserError
    from imgcls.callbacks import KeepBest

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    best = KeepBest("val_accuracy")
    best.set_model(model)
    best.on_epoch_end(0, {"loss": float("nan"), "val_loss": float("nan"), "val_accuracy": 0.5})
    with pytest.raises(UserError, match="lower the learning rate"):
        best.restore(model)
    best.on_epoch_end(1, {"loss": 1.0, "val_loss": 1.2, "val_accuracy": 0.4})
    best.on_epoch_end(2, {"loss": 0.9, "val_loss": 1.3, "val_accuracy": 0.3})
    assert best.best_epoch == 2 and best.best_value == 0.4 and best.epochs_seen == 3
    best.on_epoch_end(3, {"loss": 0.8, "val_loss": 1.1, "val_accuracy": 0.4})  # a tie with a lower loss wins
    best.on_epoch_end(4, {"loss": 0.7, "val_loss": 1.15, "val_accuracy": 0.4})
    assert best.best_epoch == 4 and best.best_logs["val_loss"] == 1.1


@pytest.mark.parametrize("preset, filters", [("cifar10", "[56,224,224]"), ("cifar10-airbench", "[64,256,256]")])
def test_the_cifar10_presets_print_valid_params_overrides(preset, filters):
    from imgcls.params import Params

    result = subprocess.run([sys.executable, "scripts/preset.py", preset], cwd=REPO, capture_output=True,
                            text=True, check=True)
    arguments = result.stdout.split()
    assert arguments[:2] == ["-S", "data.source=cifar10"] and f"train_cnn.net.filters={filters}" in arguments
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for setting in arguments[1::2]:
        key, _, value = setting.partition("=")
        *sections, last = key.split(".")
        target = params
        for section in sections:
            target = target[section]
        assert last in target, f"the preset sets {key}, which params.yaml does not have"
        target[last] = yaml.safe_load(value)
    # Each section the preset touches must still validate (the others are not the preset's business).
    touched = {setting.split(".")[0] for setting in arguments[1::2]}
    loaded = {name: Params.model_fields[name].annotation.model_validate(params[name]) for name in touched}
    assert loaded["resize"].image_size == loaded["train_cnn"].input_size == 32
    assert loaded["train_cnn"].mixed_precision == "bfloat16"
    missing = subprocess.run([sys.executable, "scripts/preset.py", "imagenet"], cwd=REPO, capture_output=True, text=True)
    assert missing.returncode != 0 and "presets/imagenet.yaml not found: presets are cifar10" in missing.stderr


def test_the_recipe_benchmark_takes_a_candidate_as_key_value_pairs(tmp_path):
    from bench_cnn import BASELINE, CANDIDATE, _update_params
    from benchmark import parse_overrides, with_overrides

    recipe = parse_overrides(["net.filters=[16,32,64,128]", "test_time.flip=true", "augment.zoom=0.2",
                              "augment.flip=none", "input_size=64"])
    assert recipe == {"net.filters": [16, 32, 64, 128], "test_time.flip": True, "augment.zoom": 0.2,
                      "augment.flip": "none", "input_size": 64}
    # Applied to params.yaml, a dotted key changes that nested param alone.
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    _update_params(tmp_path, "train_cnn", recipe)
    section = yaml.safe_load((tmp_path / "params.yaml").read_text())["train_cnn"]
    default = yaml.safe_load((REPO / "params.yaml").read_text())["train_cnn"]
    assert section["net"] == {**default["net"], "filters": [16, 32, 64, 128]} and section["input_size"] == 64
    assert section["test_time"] == {**default["test_time"], "flip": True}
    assert section["augment"] == {**default["augment"], "zoom": 0.2, "flip": "none"}
    # The benchmark's own recipes are in the nested layout too.
    for recipe in (BASELINE, CANDIDATE):
        with_overrides(default, recipe)
    # A malformed pair stops the benchmark before it copies the project or trains anything.
    result = subprocess.run([sys.executable, "tests/benchmark.py", "--only", "cnn_splits", "--candidate", "filters"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0 and "--candidate 'filters': expected KEY=VALUE" in result.stderr
    # So does a misspelt key, nested or not, and a key of the old flat layout, with params.yaml's message.
    for pair, message in (("augment.zoon=0.2", "no param 'augment.zoon'"), ("net.filter=[8]", "no param 'net.filter'"),
                          ("filters=[8]", "train_cnn.filters moved to train_cnn.net.filters"),
                          ("test_time_flip=true", "train_cnn.test_time_flip moved to train_cnn.test_time.flip"),
                          ("batch_norm_epsilon=1e-12", "train_cnn.batch_norm_epsilon was dropped")):
        result = subprocess.run([sys.executable, "tests/benchmark.py", "--only", "cifar", "--candidate", pair],
                                cwd=REPO, capture_output=True, text=True)
        assert result.returncode != 0 and message in result.stderr, (pair, result.stderr)
