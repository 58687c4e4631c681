"""Training a transfer model: its images, what is computed once from them, and its two phases.

Phase 1 (train_head) trains only the new head on the frozen base. Without
phase-1 augmentation the base's pooled features never change, so they are
computed once per image and the head trains on them: each epoch then costs
milliseconds instead of a full pass of the base over every image.
Phase 2 (fine_tune, optional) unfreezes the top of the base and fine-tunes
it together with the head at a lower learning rate, with augmentation and
early stopping. The layers below the unfrozen ones are still frozen, so by
default their output is computed once for each image and a few augmented
copies of it (fine_tune.cached_copies; cache_below_fine_tuning), and each
epoch runs only the top of the base.
Both phases share one TrainingLog and KeepBest: the epoch with the best
validation score over both is kept.
"""

import dataclasses
import time

import keras
import numpy as np

from imgcls import transfer
from imgcls.augment import augmentation
from imgcls.batches import ImageBatches, class_weights
from imgcls.callbacks import KeepBest, TrainingLog
from imgcls.optim import OptimizerSettings, build_optimizer
from imgcls.params import TrainTransferParams
from imgcls.training import TrainingRun, compile_classifier, train_phase
from imgcls.transfer import Networks


def compute_features(extractor, inputs, batch_size: int = 64, transform=None, replicas: int = 1):
    """Run `extractor` over every image, one batch at a time (the float copy of all images never exists).

    `inputs` is one array or a list of arrays (a model with several inputs);
    the result is likewise one float32 array or a list, per model output.
    `transform(batch)` is applied to each uint8 batch first (e.g. augmented_copy).
    Split across `replicas` devices, a last batch that does not divide by their
    number is padded with copies of its first images, whose results are dropped.
    """
    arrays = inputs if isinstance(inputs, (list, tuple)) else [inputs]
    batch_size = -(-batch_size // replicas) * replicas
    outputs = None
    for start in range(0, len(arrays[0]), batch_size):
        batch = [np.asarray(array[start:start + batch_size]) for array in arrays]
        if transform is not None:
            batch = [transform(part) for part in batch]
        real = len(batch[0])
        if real % replicas:
            batch = [np.concatenate([part, np.resize(part, (-real % replicas, *part.shape[1:]))]) for part in batch]
        batch = [part.astype("float32") for part in batch]
        result = extractor.predict_on_batch(batch if len(batch) > 1 else batch[0])
        result = [np.asarray(part, dtype="float32")[:real]
                  for part in (result if isinstance(result, (list, tuple)) else [result])]
        outputs = [[] for _ in result] if outputs is None else outputs
        for collected, part in zip(outputs, result):
            collected.append(part)
    if outputs is None:
        raise ValueError("compute_features needs at least one image")
    joined = [np.concatenate(parts) for parts in outputs]
    return joined if len(joined) > 1 or isinstance(extractor.output, (list, tuple)) else joined[0]


def augmented_copy(augment, seed: int):
    """A transform for compute_features: one random draw of an augmentation section per image (training mode)."""
    layers = augmentation(augment, seed)
    return lambda batch: np.asarray(layers(batch.astype("float32"), training=True))


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
    extractor = transfer.feature_extractor(data.section.base, net.base, net.image_size, net.input_size)
    return (compute_features(extractor, data.train_pixels, replicas=replicas),
            compute_features(extractor, data.val_pixels, replicas=replicas))


def compile_phase(model, section: TrainTransferParams, phase, steps_per_epoch: int) -> None:
    settings = OptimizerSettings("adam", phase.learning_rate, section.schedule)
    optimizer = build_optimizer(settings, phase.epochs, steps_per_epoch)
    compile_classifier(model, optimizer, section.label_smoothing)


def train_phases(net: Networks, data: Data, log: TrainingLog, best: KeepBest) -> dict:
    """Both phases (a resumed run skips a finished phase 1); returns their timings, for train.json."""
    section = data.section
    print(f"train_transfer: {section.base} at {net.input_size} px ({section.weights} weights),"
          f" {len(data.train_labels)} training and {len(data.val_labels)} validation images,"
          f" {data.num_classes} classes")
    cache, timings = None, {}
    if net.fine_tune and section.fine_tune.cached_copies:
        cache, timings = cache_below_fine_tuning(net, data)
    if not data.run.state.skips("head"):
        timings |= train_head(net, data, cache, log, best)
    if net.fine_tune:
        timings |= fine_tune(net, data, cache, log, best)
    return timings


def train_head(net: Networks, data: Data, cache: Activations | None, log: TrainingLog, best: KeepBest) -> dict:
    """Phase 1: the head alone on the frozen base. Without augmentation the base's features never change,
    so they are computed once and each epoch costs milliseconds instead of a pass of the base."""
    section = data.section
    timings = {}
    if transfer.augmentation_is_off(section.head.augment):
        clock = time.perf_counter()
        train_features, val_features = pooled_features(net, data, cache)
        timings["feature_seconds"] = round(time.perf_counter() - clock, 2)
        print(f"train_transfer: features of {len(train_features) + len(val_features)} images computed once"
              f" in {timings['feature_seconds']:.1f} s")
        # A model around the head, so that the head nested in the saved classifier is never compiled
        # (a compiled layer would carry its loss and optimizer into models/transfer.keras).
        features = keras.Input(net.head.input_shape[1:], name="features")
        model = keras.Model(features, net.head(features), name="head_on_features")
        train, val = data.batches(train_features, val_features, data.seed)
    else:
        model = transfer.with_augmentation(net.classifier, section.head.augment, data.seed, net.image_size)
        train, val = data.batches(data.train_pixels, data.val_pixels, data.seed)
    compile_phase(model, section, section.head, len(train))
    seconds = train_phase(model, train, val, section.head.epochs, log, best, state=data.run.state, phase="head")
    best.restore(model)  # the head (and so the classifier) now holds phase 1's best weights
    return timings | {"head_seconds": round(seconds, 2)}


def fine_tune(net: Networks, data: Data, cache: Activations | None, log: TrainingLog, best: KeepBest) -> dict:
    """Phase 2: the top of the base unfrozen, with the head, at a lower learning rate (BatchNorm stays frozen)."""
    section = data.section
    trainable = transfer.unfreeze_top(net.base, section.fine_tune.unfreeze)
    if cache is not None:
        model = transfer.top_classifier(cache.top, net.head)
        train, val = data.batches(cache.train_versions, cache.val_versions, data.seed + 100, kind=CachedBatches)
    else:
        model = transfer.with_augmentation(net.classifier, section.fine_tune.augment, data.seed + 100, net.image_size)
        train, val = data.batches(data.train_pixels, data.val_pixels, data.seed)
    # The best weights so far (phase 1's) expressed as this model's weights, so that
    # restoring after phase 2 falls back to them when fine-tuning never did better.
    best.weights = [weight.copy() for weight in model.get_weights()]
    compile_phase(model, section, section.fine_tune, len(train))
    print(f"train_transfer: fine-tuning {trainable} layers of {section.base} ({len(net.base.layers)} in all)"
          + (", on cached activations" if cache is not None else ", on images"))
    seconds = train_phase(model, train, val, section.fine_tune.epochs, log, best, section.fine_tune.patience,
                          data.run.state, phase="fine-tune")
    best.restore(model)
    return {"fine_tune_seconds": round(seconds, 2)}
