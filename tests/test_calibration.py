"""Calibration: a temperature fitted on validation data, ECE, and the `unknown` threshold for a target coverage."""

import contextlib

import numpy as np
import pytest

from imgcls import calibration
from imgcls.batches import ImageBatches


def noisy_images(count: int, seed: int):
    """8 x 8 images of 3 classes told apart by a faint colour cast under heavy noise: no model can be sure."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, count)
    pixels = rng.normal(128, 40, (count, 8, 8, 3))
    pixels[np.arange(count), :, :, labels] += 4
    return np.clip(pixels, 0, 255).astype(np.uint8), labels


def over_confident_model(pixels, labels):
    """A real tiny classifier, trained, then served with its logits multiplied by 8: deliberately over-confident."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    logits = keras.layers.Dense(3)(keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs)))
    trained = keras.Model(inputs, keras.layers.Activation("softmax")(logits))
    trained.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    trained.fit(pixels.astype(np.float32), labels, epochs=30, batch_size=32, verbose=0)
    return keras.Model(inputs, keras.layers.Activation("softmax")(keras.layers.Rescaling(8.0)(logits)))


def test_temperature_scaling_lowers_ece_of_an_over_confident_model(tmp_path):
    train, validation, test = noisy_images(600, 0), noisy_images(300, 1), noisy_images(300, 2)
    model = over_confident_model(*train)
    card = {"name": "cnn", "class_names": ["a", "b", "c"], "image_size": 8, "aspect": "pad",
            "background": [255, 255, 255], "max_pixels": 1000, "val_accuracy": 0.0}
    batches = ImageBatches(validation[0], batch_size=64)
    calibrated, card = calibration.calibrate(model, card, batches, validation[1], target_coverage=0.9)
    assert card["temperature"] > 2  # softens the 8x logits
    assert card["val_ece"]["after"] < card["val_ece"]["before"] / 2
    test_before = model.predict(test[0].astype(np.float32), verbose=0)
    test_after = calibrated.predict(test[0].astype(np.float32), verbose=0)
    assert calibration.expected_calibration_error(test_after, test[1]) < calibration.expected_calibration_error(test_before, test[1])
    assert (test_after.argmax(1) == test_before.argmax(1)).all()  # the answers stay the same
    # The Temperature layer saves, loads in safe_mode (through modelio) and computes what numpy computes.
    from imgcls.modelio import load_model, save_model

    with contextlib.chdir(tmp_path):
        save_model(calibrated, "cnn", card)
        loaded, loaded_card = load_model("models/cnn.keras", check_classes=False)
    assert loaded_card["temperature"] == card["temperature"]
    np.testing.assert_allclose(loaded.predict(test[0].astype(np.float32), verbose=0),
                               calibration.rescale(test_before, card["temperature"]), atol=1e-5)
    np.testing.assert_allclose(calibration.rescale(test_after, 1 / card["temperature"]), test_before, atol=1e-5)


def test_the_auto_threshold_meets_its_coverage_on_the_validation_split():
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet([1, 1, 1, 1], size=250)
    labels = rng.integers(0, 4, 250)
    for coverage in (0.5, 0.9, 0.99, 1.0):
        threshold = calibration.confidence_threshold(probabilities, coverage)
        scores = calibration.selective_scores(probabilities, labels, threshold)
        assert scores["coverage"] >= coverage
        # The highest threshold that does: one step higher answers too few.
        higher = probabilities.max(axis=1)[probabilities.max(axis=1) > threshold].min(initial=1.01)
        assert (probabilities.max(axis=1) >= higher).mean() < coverage
    assert calibration.selective_scores(probabilities, labels, 1.5) == {"coverage": 0.0, "selective_accuracy": None}


def test_ece_is_zero_when_confidence_matches_accuracy_and_counts_each_bin():
    # Four images at confidence 0.75, three right: perfectly calibrated.
    probabilities = np.array([[0.75, 0.25]] * 4)
    labels = np.array([0, 0, 0, 1])
    assert calibration.expected_calibration_error(probabilities, labels) == pytest.approx(0.0)
    table = calibration.reliability(probabilities, labels, bins=4)
    assert list(table["images"]) == [0, 0, 4, 0] and table["accuracy"][2] == 0.75
    # Always right at confidence 0.75: 0.25 too timid.
    assert calibration.expected_calibration_error(probabilities, np.zeros(4, int)) == pytest.approx(0.25)
