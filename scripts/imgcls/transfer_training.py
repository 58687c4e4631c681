"""Training a transfer model: its images, what is computed once from them, its two phases, and the choice
between the trained model, the linear probe and their average.

Phase 1 fits the head on the frozen base, whose pooled features of the
un-augmented photos are computed once (imgcls/features.py): by default it is
the linear probe (head.solver lbfgs, imgcls/probe.py), fitted in seconds, and
fine-tuning starts from it (LP-FT); head.solver adam trains the head by
gradient descent instead (train_head), each epoch costing milliseconds.
Phase 2 (fine_tune, optional) unfreezes the top of the base and fine-tunes
it together with the head at a lower learning rate, with augmentation, until
validation stops improving (patience; schedule plateau cuts the rate on the
way). The layers below the unfrozen ones are still frozen, so by default
their output is computed once for each image and a few augmented copies of it
(fine_tune.cached_copies; cache_below_fine_tuning), and each epoch runs only
the top of the base.
Both phases share one TrainingLog and KeepBest: the epoch with the best
validation score over both is kept. choose_model then saves the linear probe
instead when it does better on validation (probe_candidate), or the average of
the two (ensemble_candidate; pick_candidate says when), each scored as it is
saved: averaging over the test-time views of each photo (test_time).
"""

import dataclasses
import time

import keras
import numpy as np

from imgcls import calibration, transfer
from imgcls.augment import test_time_model
from imgcls.batches import ImageBatches, class_weights
from imgcls.callbacks import KeepBest, TrainingLog
from imgcls.features import augmented_copy, compute_features
from imgcls.features import pooled_features as pooled_features_of
from imgcls.optim import OptimizerSettings, build_optimizer, warmup_callbacks
from imgcls.params import TrainTransferParams, TransferFineTuneParams
from imgcls.probe import Probe, fit_probe, score
from imgcls.training import TrainingRun, compile_classifier, train_phase
from imgcls.transfer import Networks


class CachedBatches(ImageBatches):
    """Batches of precomputed activations, each image drawn at random from one of its versions.

    `versions` is a list (one entry per version of the images: plain, then
    augmented copies) of lists of arrays (one per model input). Each epoch
    draws a new order and, per image, a version, from (seed, epoch), so a rerun
    sees the same batches.
    """

    def __init__(self, versions, labels, num_classes: int, batch_size: int, **options):
        self.versions = versions
        super().__init__(versions[0][0], labels, num_classes, batch_size, **options)

    def _order(self) -> np.ndarray:
        self.version = np.random.default_rng([self.seed, self.epoch, 1]).integers(0, len(self.versions),
                                                                                 size=len(self.labels))
        return super()._order()

    def inputs(self, picked: np.ndarray):
        inputs = []
        for position in range(len(self.versions[0])):
            batch = self.versions[0][position][picked].copy()
            for number in range(1, len(self.versions)):
                chosen = self.version[picked] == number
                batch[chosen] = self.versions[number][position][picked[chosen]]
            inputs.append(batch)
        return tuple(inputs) if len(inputs) > 1 else inputs[0]


@dataclasses.dataclass(frozen=True)
class Data:
    """The training and validation images of a run, and the class weights of its training images."""

    run: TrainingRun
    section: TrainTransferParams
    seed: int
    num_classes: int
    train_pixels: np.ndarray
    train_labels: np.ndarray
    val_pixels: np.ndarray
    val_labels: np.ndarray
    class_weights: dict[int, float] | None

    @classmethod
    def prepare(cls, run: TrainingRun, section: TrainTransferParams, seed: int, num_classes: int, train_set,
                val_set) -> "Data":
        """Data of the (pixels, labels) pairs of the training and validation splits."""
        (train_pixels, train_labels), (val_pixels, val_labels) = train_set, val_set
        weights = class_weights(train_labels, num_classes, section.class_weight)
        return cls(run, section, seed, num_classes, train_pixels, train_labels, val_pixels, val_labels, weights)

    def batches(self, train_inputs, val_inputs, seed: int, kind=None) -> tuple[ImageBatches, ImageBatches]:
        """(training batches, validation batches) of the given inputs (pixels, features or cached activations)."""
        run, section = self.run, self.section
        train = run.batches(train_inputs, self.train_labels, self.num_classes, section.batch_size, kind=kind,
                            shuffle=True, seed=seed, class_weights=self.class_weights)
        return train, run.batches(val_inputs, self.val_labels, self.num_classes, 64, kind=kind)


@dataclasses.dataclass(frozen=True)
class Activations:
    """The output of the frozen layers below the fine-tuned ones, computed once: phase 2 then runs only `top`."""

    top: keras.Model  # the base from the first fine-tuned layer up; its inputs are the cached activations
    train_versions: list  # per version of the training images (plain, then augmented copies): an array per input
    val_versions: list  # the plain validation images' activations, likewise


def cache_below_fine_tuning(net: Networks, data: Data) -> tuple[Activations, dict]:
    """The layers below the fine-tuned ones stay frozen: their output for each image, and for a few
    augmented copies of it, is computed once; phase 2 then runs only the top of the base."""
    clock = time.perf_counter()
    section, replicas = data.section, data.run.replicas
    bottom, top = transfer.split_base(net.base, net.first_trainable)
    below = transfer.bottom_extractor(section.base, bottom, net.image_size, net.input_size)
    train_versions = [transfer.as_list(compute_features(below, data.train_pixels, replicas=replicas))]
    if not transfer.augmentation_is_off(section.fine_tune.augment):
        for copy in range(section.fine_tune.cached_copies):
            augment = augmented_copy(section.fine_tune.augment, data.seed + 100 + copy)
            train_versions.append(transfer.as_list(
                compute_features(below, data.train_pixels, transform=augment, replicas=replicas)))
    val_versions = [transfer.as_list(compute_features(below, data.val_pixels, replicas=replicas))]
    seconds = round(time.perf_counter() - clock, 2)
    print(f"train_transfer: activations below layer {net.base.layers[net.first_trainable].name} of"
          f" {len(data.train_pixels)} training images ({len(train_versions) - 1} augmented copies each)"
          f" and {len(data.val_pixels)} validation images computed once in {seconds:.1f} s")
    return Activations(top, train_versions, val_versions), {"cache_seconds": seconds}


def pooled_features(net: Networks, data: Data, cache: Activations | None) -> tuple:
    """The frozen base's pooled features of every image (phase 1 without augmentation trains on these)."""
    replicas = data.run.replicas
    if cache is not None:  # from the cached activations: only the top of the base runs
        extractor = transfer.pooled_top(cache.top)
        return (compute_features(extractor, cache.train_versions[0], replicas=replicas),
                compute_features(extractor, cache.val_versions[0], replicas=replicas))
    return tuple(pooled_features_of(data.section.base, net.base, net.image_size, net.input_size, data.train_pixels,
                                    data.val_pixels, replicas=replicas))


def timed(function, *arguments):
    """(function(*arguments), its seconds rounded to 0.01)."""
    clock = time.perf_counter()
    result = function(*arguments)
    return result, round(time.perf_counter() - clock, 2)


def stop_rule(section: TrainTransferParams) -> dict:
    """What counts as progress for each phase's early stop (train_phase's keywords)."""
    return {"min_improvement": section.min_improvement, "accuracy_progress": section.accuracy_progress}


def compile_phase(model, section: TrainTransferParams, phase, steps_per_epoch: int, warmup_epochs: int = 0) -> tuple:
    """Compile `model` for `phase` (section.head or section.fine_tune); returns the phase's warm-up callbacks."""
    settings = OptimizerSettings("adam", phase.learning_rate, section.schedule, warmup_epochs=warmup_epochs)
    # Adam's memory of squared gradients and the clip are fine-tuning's params; a head trained by Adam
    # (head.solver adam) keeps Keras' defaults.
    fine_tuning = isinstance(phase, TransferFineTuneParams)
    adam = {"beta_2": phase.beta_2, "clip_norm": phase.clip_norm} if fine_tuning else {}
    optimizer = build_optimizer(settings, phase.epochs, steps_per_epoch, **adam)
    compile_classifier(model, optimizer, section.label_smoothing)
    return warmup_callbacks(phase.learning_rate, section.schedule, warmup_epochs)


def train_phases(net: Networks, data: Data, log: TrainingLog, best: KeepBest) -> tuple[dict, Probe | None]:
    """Both phases (a resumed run skips a finished phase 1); returns their timings, for train.json, and
    the linear probe when one was fitted (head.solver lbfgs, or probe_candidate)."""
    section = data.section
    print(f"train_transfer: {section.base} at {net.input_size} px ({section.weights} weights),"
          f" {len(data.train_labels)} training and {len(data.val_labels)} validation images,"
          f" {data.num_classes} classes")
    cache, timings = None, {}
    if net.fine_tune and section.fine_tune.cached_copies:
        cache, timings = cache_below_fine_tuning(net, data)
    features = probe = None
    if section.head.augment.off or section.probe_candidate:
        features, timings["feature_seconds"] = timed(pooled_features, net, data, cache)
        print(f"train_transfer: features of {len(features[0]) + len(features[1])} images computed once"
              f" in {timings['feature_seconds']:.1f} s")
    if section.head.solver == "lbfgs" or section.probe_candidate:
        probe, timings["probe_seconds"] = timed(fit_probe, features[0], data.train_labels, features[1],
                                                data.val_labels, data.num_classes, section.class_weight)
        print(f"train_transfer: linear probe (C = {probe.c:g}, chosen on validation): val accuracy"
              f" {probe.val_accuracy:.4f}, val log loss {probe.val_log_loss:.4f}; {timings['probe_seconds']:.1f} s")
    if section.head.solver == "lbfgs":  # phase 1 is the probe: fine-tuning starts from it (LP-FT)
        probe.set_into(net.head.get_layer("probabilities"))
    elif not data.run.state.skips("head"):
        timings |= train_head(net, data, features, log, best)
    if net.fine_tune:
        timings |= fine_tune(net, data, cache, log, best)
    return timings, probe


def train_head(net: Networks, data: Data, features: tuple | None, log: TrainingLog, best: KeepBest) -> dict:
    """Phase 1 by gradient descent: the head alone on the frozen base. Without augmentation the base's
    features never change, so it trains on `features` (computed once): each epoch costs milliseconds."""
    section = data.section
    if section.head.augment.off:
        # A model around the head, so that the head nested in the saved classifier is never compiled
        # (a compiled layer would carry its loss and optimizer into models/transfer.keras).
        inputs = keras.Input(net.head.input_shape[1:], name="features")
        model = keras.Model(inputs, net.head(inputs), name="head_on_features")
        train, val = data.batches(*features, data.seed)
    else:
        model = transfer.with_augmentation(net.classifier, section.head.augment, data.seed, net.image_size)
        train, val = data.batches(data.train_pixels, data.val_pixels, data.seed)
    compile_phase(model, section, section.head, len(train))
    seconds = train_phase(model, train, val, section.head.epochs, log, best, section.head.patience,
                          data.run.state, phase="head", plateau=section.schedule == "plateau",
                          epochs_param="train_transfer.head.epochs", **stop_rule(section))
    best.restore(model)  # the head (and so the classifier) now holds phase 1's best weights
    return {"head_seconds": round(seconds, 2)}


def fine_tune(net: Networks, data: Data, cache: Activations | None, log: TrainingLog, best: KeepBest) -> dict:
    """Phase 2: the top of the base unfrozen, with the head, at a lower learning rate (BatchNorm stays frozen)."""
    section = data.section
    trainable = transfer.unfreeze_top(net.base, net.first_trainable)
    if cache is not None:
        model = transfer.top_classifier(cache.top, net.head)
        train, val = data.batches(cache.train_versions, cache.val_versions, data.seed + 100, kind=CachedBatches)
    else:
        model = transfer.with_augmentation(net.classifier, section.fine_tune.augment, data.seed + 100, net.image_size)
        train, val = data.batches(data.train_pixels, data.val_pixels, data.seed)
    # The best weights so far (phase 1's) expressed as this model's weights, so that
    # restoring after phase 2 falls back to them when fine-tuning never did better.
    best.weights = [weight.copy() for weight in model.get_weights()]
    warmup = compile_phase(model, section, section.fine_tune, len(train), section.fine_tune.warmup_epochs)
    print(f"train_transfer: fine-tuning {trainable} layers of {section.base} ({len(net.base.layers)} in all)"
          + (", on cached activations" if cache is not None else ", on images"))
    seconds = train_phase(model, train, val, section.fine_tune.epochs, log, best, section.fine_tune.patience,
                          data.run.state, phase="fine-tune", plateau=section.schedule == "plateau",
                          epochs_param="train_transfer.fine_tune.epochs", extra_callbacks=warmup,
                          **stop_rule(section))
    best.restore(model)
    return {"fine_tune_seconds": round(seconds, 2)}


@dataclasses.dataclass(frozen=True)
class Choice:
    """The model the stage ships, which candidate it is, and every candidate's validation figures."""

    classifier: keras.Model
    winner: str  # "fine_tune", "head" (phase 2 off), "probe" or "ensemble" (the fine-tuned model and the probe)
    val_accuracy: float
    candidates: dict  # candidate name -> {"val_accuracy", "val_log_loss"}


CANDIDATE_LABELS = {"fine_tune": "fine-tuned model", "head": "trained head", "probe": "linear probe",
                    "ensemble": "average of the fine-tuned model and the linear probe"}


def choose_model(net: Networks, data: Data, best: KeepBest, probe: Probe | None) -> Choice:
    """The trained classifier, the linear probe or the average of the two: whichever does best on validation.

    Candidates are compared on validation accuracy (pick_candidate), each scored
    as it would be saved: with the test-time views of each photo (section.test_time),
    when on. A probe that wins ships as the frozen base with one Dense softmax
    layer holding its weights; the average (ensemble_candidate, with phase 2 on)
    as one model in which the frozen layers below the fine-tuned ones run once.
    Its validation probabilities are the mean of the other two's, views or not.
    """
    section = data.section
    if best.best_epoch is None:  # no epoch ran at all: phase 1 was the probe and phase 2 is off
        saved_probe, probabilities = probe_as_saved(lambda: net.classifier, data, probe)
        scores = score(probabilities, data.val_labels)
        return Choice(saved_probe(), "probe", scores[0], {"probe": figures(scores, probe)})
    trained_name = "fine_tune" if net.fine_tune else "head"
    classifier, trained = as_saved(net.classifier, data)
    builders, probabilities = {trained_name: lambda: classifier}, {trained_name: trained}
    if probe is not None and section.probe_candidate:
        builders["probe"], probabilities["probe"] = probe_as_saved(
            lambda: transfer.build_probe_classifier(section, probe, net), data, probe)
        if net.fine_tune and section.ensemble_candidate and net.first_trainable > 0:
            probabilities["ensemble"] = (trained + probabilities["probe"]) / 2
            builders["ensemble"] = lambda: test_time_model(transfer.build_ensemble_classifier(section, probe, net),
                                                           section.test_time)
    scores = {name: score(values, data.val_labels) for name, values in probabilities.items()}
    winner = pick_candidate(scores)
    if len(scores) > 1:
        listing = ", ".join(f"{CANDIDATE_LABELS[name]} {accuracy:.4f} ({loss:.4f})"
                            for name, (accuracy, loss) in scores.items())
        print(f"train_transfer: validation accuracy (log loss) of each candidate: {listing}; the model saved is the"
              f" {CANDIDATE_LABELS[winner]}")
    candidates = {name: figures(scores[name], probe if name == "probe" else None) for name in scores}
    return Choice(builders[winner](), winner, scores[winner][0], candidates)


def pick_candidate(scores: dict[str, tuple[float, float]]) -> str:
    """The name of the candidate to save, from each one's (validation accuracy, log loss).

    The average of the trained model and the probe ("ensemble") is saved when
    it scores a higher accuracy than both, or when the two tie and it ties with
    them: validation cannot tell the two apart then, and averaging hedges
    between them (its log loss is at most the mean of theirs). An average with
    a model that validation already finds worse is not saved on a tie: it would
    pull the better one towards it. Otherwise the higher accuracy wins, then
    the lower log loss (which favours the probe: the trained model's includes
    its label smoothing), then the trained model.
    """
    members = {name: figures for name, figures in scores.items() if name != "ensemble"}
    highest = max(accuracy for accuracy, _ in members.values())
    if "ensemble" in scores:
        ensemble, tied = scores["ensemble"][0], len({accuracy for accuracy, _ in members.values()}) == 1
        if ensemble > highest or (tied and ensemble == highest):
            return "ensemble"
    return min((name for name, (accuracy, _) in members.items() if accuracy == highest),
               key=lambda name: members[name][1])


def as_saved(classifier: keras.Model, data: Data) -> tuple[keras.Model, np.ndarray]:
    """The classifier as it is saved (averaging over the test-time views of each photo, when section.test_time
    asks for any) and its probabilities on validation."""
    classifier = test_time_model(classifier, data.section.test_time)
    return classifier, calibration.predict(classifier, data.run.batches(data.val_pixels, batch_size=64))


def probe_as_saved(build, data: Data, probe: Probe) -> tuple:
    """(a function returning the probe classifier as saved, its validation probabilities). Without test-time
    views they are the probe's own, from the features, and `build` runs only if it is saved."""
    if not data.section.test_time.on:
        return build, probe.val_probabilities
    classifier, probabilities = as_saved(build(), data)
    return (lambda: classifier), probabilities


def figures(scores: tuple, probe: Probe | None = None) -> dict:
    """A candidate's validation figures for the card (and the probe's regularisation C)."""
    return {"val_accuracy": scores[0], "val_log_loss": scores[1], **({"c": probe.c} if probe is not None else {})}
