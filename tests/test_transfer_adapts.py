"""train_transfer adapts to the data: phases stop when validation stops improving, a phase stopped by its
cap while still improving says so, and the linear probe (imgcls/probe.py) is a candidate that ships,
exports and serves when it beats the trained model.

Real training on tiny generated images with a randomly initialised base (weights: none).
"""

import json
import sys

import numpy as np
import pandas as pd
import pytest
import requests
from sklearn.linear_model import LogisticRegression

from conftest import REPO, TINY_TRANSFER, TRAINING_STACK, WITHOUT_TENSORFLOW, make_photo, stage_env
from imgcls.probe import C_VALUES, fit_probe
from serving import free_port, running_server

# Phase 1 by gradient descent, alone: what the early stop and the cap apply to.
HEAD_ONLY = {**TINY_TRANSFER, "train_transfer.head.solver": "adam", "train_transfer.fine_tune.epochs": 0,
             "train_transfer.probe_candidate": False}


def test_the_probe_is_one_softmax_layer_on_the_raw_features_and_matches_scikit_learn():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 20)) * 3
    labels = np.repeat(np.arange(3), 40)
    features = (centres[labels] + rng.normal(size=(120, 20))).astype("float32") * 7 + 2  # not standardised
    train, val = np.arange(120) % 4 != 0, np.arange(120) % 4 == 0
    probe = fit_probe(features[train], labels[train], features[val], labels[val], num_classes=3)
    assert probe.c in C_VALUES and probe.val_accuracy >= 0.9
    # The scaling (one spread for all features) is folded into the weights: the same probabilities as
    # scikit-learn's own model.
    mean, scale = features[train].mean(axis=0), np.sqrt(features[train].var(axis=0).mean())
    reference = LogisticRegression(C=probe.c, max_iter=1000).fit((features[train] - mean) / scale, labels[train])
    expected = reference.predict_proba((features[val] - mean) / scale)
    np.testing.assert_allclose(probe.probabilities(features[val]), expected, atol=1e-4)


def test_a_feature_that_barely_varies_gets_no_huge_weight_for_fine_tuning_to_start_from():
    # Many pooled features of a ReLU network are almost constant. Dividing each feature by its own spread
    # would give such a feature its coefficient over 1e-4 as a weight: the same fit on these photos, but
    # huge gradients for LP-FT and wild logits on an augmented photo.
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(3), 40)
    features = rng.normal(size=(120, 10)) + np.eye(3, 10)[labels] * 3
    features[:, 9] = 0.5 + rng.normal(size=120) * 1e-4  # a near-dead feature
    probe = fit_probe(features[::2], labels[::2], features[1::2], labels[1::2], num_classes=3)
    assert probe.val_accuracy > 0.9
    assert np.abs(probe.kernel[9]).max() < 1.0 and np.abs(probe.kernel).max() < 10


def test_two_classes_and_a_class_without_training_images():
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], 30)
    features = (rng.normal(size=(60, 8)) + labels[:, None] * 2).astype("float32")
    probe = fit_probe(features, labels, features, labels, num_classes=2)
    assert probe.kernel.shape == (8, 2) and probe.val_accuracy > 0.8
    with pytest.raises(ValueError, match=r"classes \[2\] have none"):
        fit_probe(features, labels, features, labels, num_classes=3)


def test_the_average_is_saved_when_it_beats_both_or_they_tie_and_so_does_it():
    from imgcls.transfer_training import pick_candidate

    # (validation accuracy, log loss) of each candidate.
    assert pick_candidate({"fine_tune": (0.9, 0.3), "probe": (0.9, 0.2), "ensemble": (0.9, 0.4)}) == "ensemble"
    assert pick_candidate({"fine_tune": (0.8, 0.3), "probe": (0.85, 0.2), "ensemble": (0.9, 0.5)}) == "ensemble"
    # Tied with the better model only: the average would pull it towards the worse one.
    assert pick_candidate({"fine_tune": (0.8, 0.1), "probe": (0.9, 0.2), "ensemble": (0.9, 0.1)}) == "probe"
    assert pick_candidate({"fine_tune": (0.9, 0.3), "probe": (0.9, 0.2), "ensemble": (0.8, 0.1)}) == "probe"
    assert pick_candidate({"fine_tune": (0.9, 0.3), "probe": (0.9, 0.3)}) == "fine_tune"
    assert pick_candidate({"head": (0.7, 0.3), "probe": (0.6, 0.1)}) == "head"


def test_a_phase_stops_when_validation_stops_improving_and_cuts_its_rate_first(prepared):
    prepared.set_params(**{**HEAD_ONLY, "train_transfer.head.epochs": 200, "train_transfer.head.patience": 4,
                           "train_transfer.head.learning_rate": 0.05, "train_transfer.monitor": "val_loss",
                           "train_transfer.min_improvement": 0.0, "train_transfer.accuracy_progress": False})
    result = prepared.stage("train_transfer")
    history = pd.read_csv(prepared.root / "reports/transfer/history.csv")
    training = json.loads((prepared.root / "reports/transfer/train.json").read_text())
    assert len(history) < 200 and "ran all" not in result.stdout  # no warning of a phase stopped by its cap
    # It stopped `patience` epochs after the last improvement of at least 0.001 (smaller ones do not
    # count), and the rate was cut to 0.3x half-way through them.
    best, improved_at = float("inf"), None
    for epoch, loss in enumerate(history["val_loss"], start=1):
        if loss < best - 0.001:
            best, improved_at = loss, epoch
    assert len(history) == improved_at + 4 and training["best_epoch"] >= improved_at
    rates = history["learning_rate"].to_numpy()
    assert rates[0] == pytest.approx(0.05) and rates[-1] == pytest.approx(0.05 * 0.3, rel=1e-4)


def test_the_early_stop_counts_a_fall_of_a_share_of_the_loss_or_a_new_best_accuracy_and_a_checkpoint_keeps_its_count(
        tmp_path):
    import keras

    from imgcls import keras_internals
    from imgcls.callbacks import KeepBest, TrainingLog
    from imgcls.training import phase_callbacks

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    # A fall of 0.1, then a loss that creeps down by 0.0011 an epoch (more than 0.001; 1% of 0.9 only after
    # 9 epochs), while validation gets one more photo right at epoch 5 and no more after it.
    losses = [1.0, 0.9] + [0.9 - 0.0011 * step for step in range(1, 11)]
    accuracies = [0.5, 0.8, 0.8, 0.8, 0.82] + [0.82] * 7

    def stopping_callback(share: float, accuracy_progress: bool):
        _, _, counting = phase_callbacks(model, TrainingLog(tmp_path), KeepBest("val_loss"), patience=4,
                                         plateau=True, min_improvement=share, accuracy_progress=accuracy_progress)
        stopping = counting["early_stopping"]
        stopping.set_model(model)
        stopping.on_train_begin()
        return stopping

    def stopped_at(share: float, accuracy_progress: bool = False, first_epoch: int = 0, stopping=None):
        stopping = stopping or stopping_callback(share, accuracy_progress)
        model.stop_training = False
        for epoch in range(first_epoch, len(losses)):
            stopping.on_epoch_end(epoch, {"val_loss": losses[epoch], "val_accuracy": accuracies[epoch]})
            if model.stop_training:
                return epoch + 1, keras_internals.counts(stopping)
        return None, keras_internals.counts(stopping)

    # At 1% the creeping epochs are no progress: it stops 4 epochs after epoch 2, and its count (what a
    # checkpoint of a killed run saves) says so. Counting any fall of 0.001, it would go on.
    assert stopped_at(0.01) == (6, {"wait": 4, "best": pytest.approx(0.9), "best_epoch": 1, "best_accuracy": -1.0})
    assert stopped_at(0.0)[0] is None
    # Counting a new best accuracy too, epoch 5 is progress: it stops 4 epochs after it instead.
    assert stopped_at(0.01, accuracy_progress=True) == (
        9, {"wait": 4, "best": pytest.approx(0.9), "best_epoch": 1, "best_accuracy": 0.82})
    # A run killed after epoch 6 resumes with the count it saved, and stops where it would have.
    killed = stopping_callback(0.01, accuracy_progress=True)
    for epoch in range(6):
        killed.on_epoch_end(epoch, {"val_loss": losses[epoch], "val_accuracy": accuracies[epoch]})
    resumed = stopping_callback(0.01, accuracy_progress=True)  # fit resets the count...
    keras_internals.restore_counts(resumed, keras_internals.counts(killed))  # ... and the checkpoint puts it back
    assert stopped_at(0.01, first_epoch=6, stopping=resumed)[0] == 9


def test_fine_tuning_warms_its_rate_up_over_its_first_epochs(prepared):
    prepared.set_params(**{**TINY_TRANSFER, "train_transfer.fine_tune.epochs": 4,
                           "train_transfer.schedule": "constant", "train_transfer.fine_tune.learning_rate": 0.0003,
                           "train_transfer.fine_tune.warmup_epochs": 2})
    prepared.stage("train_transfer")
    history = pd.read_csv(prepared.root / "reports/transfer/history.csv")
    rates = history.loc[history["phase"] == "fine-tune", "learning_rate"].to_numpy()
    assert rates == pytest.approx([0.0001, 0.0002, 0.0003, 0.0003], rel=1e-4)


def test_a_gradient_spike_moves_the_weights_about_a_usual_step_with_a_short_memory_of_squared_gradients_or_a_clip():
    # After many small gradients Adam's running mean of squared gradients is small, so with beta_2 0.999
    # (a memory of ~1000 steps) one gradient 100 times larger moves the weights several usual steps; a
    # memory of ~100 steps (0.99), or the gradient clipped first, keeps it near one.
    import keras

    from imgcls.optim import OptimizerSettings, build_optimizer
    from imgcls.params import load_params
    from imgcls.transfer_training import compile_phase

    def spike_over_usual_step(**options) -> float:
        weight = keras.Variable(np.zeros(1, "float32"))
        optimizer = build_optimizer(OptimizerSettings("adam", 0.001, "constant"), 1, 1, **options)
        for _ in range(500):
            before = float(keras.ops.convert_to_numpy(weight)[0])
            optimizer.apply([keras.ops.ones(1)], [weight])
        usual = float(keras.ops.convert_to_numpy(weight)[0]) - before
        optimizer.apply([keras.ops.ones(1) * 100], [weight])
        return (float(keras.ops.convert_to_numpy(weight)[0]) - before - usual) / usual

    assert spike_over_usual_step(beta_2=0.999) > 1.8
    assert spike_over_usual_step(beta_2=0.99) < 1.2
    assert spike_over_usual_step(beta_2=0.999, clip_norm=1.0) == pytest.approx(1.0, abs=0.05)
    # The stage's fine-tuning phase is compiled with its section's settings.
    section = load_params(REPO / "params.yaml").train_transfer
    fine_tune = section.fine_tune.model_copy(update={"beta_2": 0.98, "clip_norm": 5.0})
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    compile_phase(model, section, fine_tune, steps_per_epoch=10)
    assert model.optimizer.beta_2 == 0.98 and model.optimizer.global_clipnorm == 5.0


def test_a_phase_that_reaches_its_cap_still_improving_warns_and_names_the_param(prepared):
    # A small rate: the validation loss still falls at every one of the 3 epochs.
    prepared.set_params(**{**HEAD_ONLY, "train_transfer.head.epochs": 3, "train_transfer.head.patience": 5,
                           "train_transfer.head.learning_rate": 0.0003, "train_transfer.monitor": "val_loss"})
    result = prepared.stage("train_transfer")
    assert "warning: head ran all 3 epochs (train_transfer.head.epochs)" in result.stdout
    assert "raise train_transfer.head.epochs" in result.stdout


def test_the_linear_probe_alone_is_a_model_when_phase_two_is_off(prepared):
    prepared.set_params(**{**TINY_TRANSFER, "train_transfer.fine_tune.epochs": 0})
    result = prepared.stage("train_transfer")
    assert "linear probe (C = " in result.stdout
    card = json.loads((prepared.root / "models/transfer.json").read_text())
    assert card["winner"] == "probe" and card["best_epoch"] is None
    assert (prepared.root / "reports/transfer/training.png").stat().st_size > 0


def test_a_probe_that_beats_the_fine_tuned_model_ships_exports_and_serves(prepared):
    # A rate far too high wrecks fine-tuning (loss finite, answers near chance): the probe must win against it
    # (their average, a candidate of its own, is left out here). The probe is scored, saved, exported and
    # served with the test-time mirror images (test_time.flip).
    prepared.set_params(**{**TINY_TRANSFER, "train_transfer.fine_tune.learning_rate": 3.0,
                           "train_transfer.fine_tune.patience": 0, "export.model": "transfer",
                           "train_transfer.test_time.flip": True, "train_transfer.ensemble_candidate": False})
    result = prepared.stage("train_transfer")
    card = json.loads((prepared.root / "models/transfer.json").read_text())
    assert card["winner"] == "probe", result.stdout
    probe, fine_tuned = card["candidates"]["probe"], card["candidates"]["fine_tune"]
    assert (probe["val_accuracy"], -probe["val_log_loss"]) > (fine_tuned["val_accuracy"], -fine_tuned["val_log_loss"])
    assert "the model saved is the linear probe" in result.stdout
    assert "temperature" in card  # calibrated like any other model
    training = json.loads((prepared.root / "reports/transfer/train.json").read_text())
    assert training["winner"] == "probe" and training["training_flops_fine_tune"] > 0  # phase 2 still counted
    saved_exported_and_served(prepared, card, probe["val_accuracy"])


def test_the_average_of_the_fine_tuned_model_and_the_probe_ships_exports_and_serves(prepared):
    # At a rate too small to move anything, the fine-tuned model is still the probe: the two tie on
    # validation, and a tie goes to their average, scored, saved and exported with the mirror images.
    prepared.set_params(**{**TINY_TRANSFER, "train_transfer.fine_tune.learning_rate": 1e-9,
                           "train_transfer.schedule": "constant", "export.model": "transfer",
                           "train_transfer.test_time.flip": True})
    result = prepared.stage("train_transfer")
    card = json.loads((prepared.root / "models/transfer.json").read_text())
    assert card["winner"] == "ensemble", result.stdout
    accuracies = {name: figures["val_accuracy"] for name, figures in card["candidates"].items()}
    assert set(accuracies) == {"fine_tune", "probe", "ensemble"} and len(set(accuracies.values())) == 1
    assert "the model saved is the average of the fine-tuned model and the linear probe" in result.stdout
    # The frozen layers below the fine-tuned ones run once: one prediction of the average costs more than
    # the fine-tuned model's and less than two; the mirror images double it.
    training = json.loads((prepared.root / "reports/transfer/train.json").read_text())
    assert 2 < training["evaluation_flops_per_image"] / training["forward_flops_per_image"] < 4
    saved_exported_and_served(prepared, card, accuracies["ensemble"])


def saved_exported_and_served(prepared, card: dict, val_accuracy: float) -> None:
    """The saved model scores the winner's validation accuracy, exports to ONNX and serves a photo."""
    check = ("import sys; sys.path.insert(0, 'scripts')\n"
             "from imgcls.modelio import load_model\nfrom imgcls.dataset import load_split\n"
             "model, card = load_model('models/transfer.keras')\n"
             "pixels, labels, _ = load_split('val', card['image_size'])\n"
             "print((model.predict(pixels.astype('float32'), verbose=0).argmax(1) == labels).mean())\n")
    saved_accuracy = float(prepared.run(sys.executable, "-c", check).stdout.split()[-1])
    assert saved_accuracy == pytest.approx(val_accuracy)

    prepared.stage("export")
    metrics = json.loads((prepared.root / "reports/export/metrics.json").read_text())
    assert metrics["model"] == "transfer" and metrics["onnx"]["top1_agreement"] == 1.0

    port = free_port()
    photo = prepared.root / "photo.png"
    make_photo(3).save(photo)
    with running_server(["-c", WITHOUT_TENSORFLOW, str(REPO / "scripts/serve.py")], port, cwd=prepared.root,
                        env={**stage_env(), "PORT": str(port), "MODEL": "models/export/transfer.onnx",
                             "BLOCKED_MODULES": TRAINING_STACK}) as server:
        answer = requests.post(f"{server.url}/predict", files={"file": ("photo.png", photo.read_bytes())}, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["best_guess"] in card["class_names"]
