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
    held_back = noisy_images(120, 3)
    calibrated, card = calibration.calibrate(model, card, batches, validation[1],
                                             ImageBatches(held_back[0], batch_size=64), target_coverage=0.9)
    assert (card["threshold_split"], card["threshold_photos"], card["target_coverage"]) == ("calibration", 120, 0.9)
    # The threshold is the conformal one on the held-back photos' calibrated confidence.
    assert card["confidence_threshold"] == calibration.conformal_threshold(
        calibrated.predict(held_back[0].astype(np.float32), verbose=0), 0.9)[0]
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


def test_the_conformal_threshold_takes_the_rank_n_plus_one_times_t():
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet([1, 1, 1, 1], size=250)
    labels = rng.integers(0, 4, 250)
    descending = np.sort(probabilities.max(axis=1))[::-1]
    for coverage, rank in ((0.5, 126), (0.9, 226), (0.99, 249)):  # ceil(251 * t)
        threshold, honoured = calibration.conformal_threshold(probabilities, coverage)
        assert threshold == descending[rank - 1] and honoured == coverage
        assert calibration.selective_scores(probabilities, labels, threshold)["coverage"] >= coverage
    assert calibration.selective_scores(probabilities, labels, 1.5) == {"coverage": 0.0, "selective_accuracy": None}


def test_the_conformal_threshold_keeps_its_coverage_on_new_draws_where_the_empirical_quantile_does_not():
    # 4,000 calibration sets of 100 photos, each threshold judged on 1,000 new photos of the same kind.
    rng = np.random.default_rng(1)
    conformal, empirical = [], []
    for _ in range(4000):
        calibration_confidence = rng.beta(8, 1, size=(100, 1))
        new_confidence = rng.beta(8, 1, size=1000)
        threshold, _ = calibration.conformal_threshold(calibration_confidence, 0.95)
        conformal.append((new_confidence >= threshold).mean())
        quantile = np.sort(calibration_confidence[:, 0])[::-1][94]  # answers exactly 95 of the 100
        empirical.append((new_confidence >= quantile).mean())
    # Rank ceil(101 * 0.95) = 96 from the top, the 5th lowest: in expectation 1 - 5/101 = 0.9505 of new
    # photos answered (the mean's standard error here is about 0.0004). The 95th from the top, the 6th
    # lowest, answers 1 - 6/101 = 0.9406: short of the target.
    assert abs(np.mean(conformal) - (1 - 5 / 101)) < 0.0015
    assert abs(np.mean(empirical) - (1 - 6 / 101)) < 0.0015


def test_too_few_calibration_photos_lower_the_target_with_a_warning(capsys):
    confidence = np.array([[0.9], [0.8], [0.99], [0.7], [0.95]])
    threshold, honoured = calibration.conformal_threshold(confidence, 0.99)
    assert (threshold, honoured) == (0.7, 0.8333)  # the lowest of 5, for n / (n + 1)
    out = capsys.readouterr().out
    assert "5 calibration photos can honour a target_coverage of at most 0.8333" in out
    assert "needs at least 99 photos" in out and "split.calibration" in out
    # 19 photos are enough for 0.95 (rank ceil(20 * 0.95) = 19); a target of 1 is never honoured.
    assert calibration.conformal_threshold(confidence, 0.95)[1] == 0.8333
    assert "needs at least 19 photos" in capsys.readouterr().out
    assert calibration.conformal_threshold(confidence, 1.0) == (0.7, 0.8333)
    assert "needs infinitely many photos" in capsys.readouterr().out


def test_the_coverage_check_allows_the_sampling_error_of_the_test_split():
    check = calibration.coverage_check(0.979, 0.99, 284)
    assert check == {"target_coverage": 0.99, "coverage_lower_bound": 0.97843,
                     "coverage_meets_target": True}
    assert not calibration.coverage_check(0.965, 0.99, 284)["coverage_meets_target"]


def test_ece_is_zero_when_confidence_matches_accuracy_and_counts_each_bin():
    # Four images at confidence 0.75, three right: perfectly calibrated.
    probabilities = np.array([[0.75, 0.25]] * 4)
    labels = np.array([0, 0, 0, 1])
    assert calibration.expected_calibration_error(probabilities, labels) == pytest.approx(0.0)
    table = calibration.reliability(probabilities, labels, bins=4)
    assert list(table["images"]) == [0, 0, 4, 0] and table["accuracy"][2] == 0.75
    # Always right at confidence 0.75: 0.25 too timid.
    assert calibration.expected_calibration_error(probabilities, np.zeros(4, int)) == pytest.approx(0.25)
