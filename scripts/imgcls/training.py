"""A training run: its seed, precision, devices and saved state; the loss, compiling, and one phase of fit.

Everything here uses `keras.*` only, so a trainer built on it runs unchanged
with the TensorFlow, JAX or PyTorch backend. The rest of a trainer's parts
live beside it, one idea per module: batches.py (the images in batches),
augment.py, optim.py (optimizers and schedules), callbacks.py (the best epoch
and the curves), modelio.py (saving the model).

A trainer does, in order:
    run = start_run(stage, section, seed, distribution, image_size)  # seed, precision, devices, saved state
    train = run.batches(pixels, labels, num_classes, batch_size, shuffle=True, seed=..., class_weights=...)
    model = ...  # augment.augmentation(section.augment, seed) goes inside the model
    compile_classifier(model, optim.build_optimizer(...), label_smoothing, jit_compile)
    log, best = callbacks.TrainingLog(report_dir), callbacks.KeepBest(monitor)
    train_phase(model, train, val, epochs, log, best, patience, run.state, phase="train")
    best.restore(model); log.finish()
    modelio.save_trained_model(model, name, model_card(...)); run.state.finish()
A trainer with two phases (e.g. head first, then fine-tuning) calls
train_phase twice with the same log, KeepBest and state, so the history, the
plot and the best model span both phases, and a killed run resumes in either.
"""

import dataclasses
import time
from pathlib import Path

import keras
import numpy as np

from imgcls import checkpoint, device, keras_internals, tuning
from imgcls.batches import ImageBatches
from imgcls.callbacks import KeepBest, StopOnNonFiniteLoss, TrainingLog
from imgcls.dataset import (CALIBRATION, CLASSES_FILE, MANIFEST_FILE, images_file, load_split, resized_max_stretch,
                            write_json)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and the Keras backend; on TensorFlow also make its ops deterministic.

    Same params + same data on CPU then give the same weights and metrics.
    """
    keras.utils.set_random_seed(seed)
    if keras.backend.backend() == "tensorflow":
        # Only TensorFlow needs this switch (its multi-threaded kernels may sum in any order);
        # importing it under another backend would make TensorFlow a requirement.
        import tensorflow

        tensorflow.config.experimental.enable_op_determinism()


@dataclasses.dataclass
class TrainingRun:
    """What a training stage decides before it builds its model: precision, devices, its resumable state."""

    stage: str
    precision: str
    replicas: int
    process: tuple[int, int]
    device: dict  # device.describe(): what it runs on, for the printout, train.json and the model card
    state: checkpoint.TrainingState

    def batches(self, images, labels=None, num_classes=None, batch_size=32, kind=None, **options) -> "ImageBatches":
        """ImageBatches (or the subclass `kind`) split across this run's devices (and hosts).

        An array of images that fits stays on the accelerator (device.fits_on_device).
        """
        resident = isinstance(images, np.ndarray) and device.fits_on_device(images.nbytes)
        return (kind or ImageBatches)(images, labels, num_classes, batch_size, replicas=self.replicas,
                                      process=self.process, resident=resident, **options)

    def calibration_batches(self, image_size: int) -> "ImageBatches | None":
        """The calibration split's images (calibration.calibrate sets the `unknown` threshold on them), or None."""
        pixels, _, _ = load_split(CALIBRATION, image_size)
        return self.batches(pixels, batch_size=64) if len(pixels) else None


def start_run(stage: str, section, seed: int, distribution: str, image_size: int) -> TrainingRun:
    """Seed everything, pick the precision and the devices, and find a killed run's state to resume.

    `section` is the stage's params section (its mixed_precision and batch_size
    are read here). Call it before building the model: the precision policy and
    the distribution apply to the variables the model creates.
    """
    # First: joining the other hosts (if any) must come before anything else touches the devices.
    replicas = device.distribute(distribution, {f"{stage}.batch_size": section.batch_size})
    seed_everything(seed)
    precision = device.resolve_precision(section.mixed_precision)
    set_precision(precision)
    report = device.describe(precision, replicas, section.batch_size)
    print(f"{stage}: {device.summary(report)}")
    settings = {"seed": seed, "params": section.model_dump(), "image_size": image_size, "device": report}
    data = [images_file(image_size), MANIFEST_FILE, CLASSES_FILE]
    state = checkpoint.TrainingState(stage, checkpoint.fingerprint(settings, data))
    return TrainingRun(stage, precision, replicas, device.process_slice(), report, state)


class IndexCrossentropy(keras.losses.Loss):
    """Cross-entropy with label smoothing for class indices: the one-hot targets label smoothing needs
    are made inside the compiled step, on the device, so a batch carries one integer per image.

    Index -1 marks padding (see ImageBatches): it adds nothing, and a batch's
    mean is taken over its real images only, as it would be on one device.
    """

    def __init__(self, num_classes: int, label_smoothing: float = 0.0, name: str = "crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_classes = int(num_classes)
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        ops = keras.ops
        indices = ops.cast(ops.reshape(y_true, (-1,)), "int32")
        one_hot = ops.one_hot(ops.maximum(indices, 0), self.num_classes, dtype=y_pred.dtype)
        losses = keras.losses.categorical_crossentropy(one_hot, y_pred, label_smoothing=self.label_smoothing)
        real = ops.cast(indices >= 0, losses.dtype)
        # Keras divides the batch's sum by its size; scale so that it is divided by the real images' count
        # (the factor is exactly 1 for a batch without padding).
        return losses * real * (ops.cast(ops.size(real), losses.dtype) / ops.maximum(ops.sum(real), 1.0))

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "label_smoothing": self.label_smoothing}


class IndexAccuracy(keras.metrics.SparseCategoricalAccuracy):
    """Accuracy over class indices that leaves padding (index -1, see ImageBatches) out.

    (A metric given to compile() ignores sample weights, which is right for
    class weights but would count the padding.)
    """

    def update_state(self, y_true, y_pred, sample_weight=None):
        real = keras.ops.cast(keras.ops.reshape(y_true, (-1,)) >= 0, "float32")
        return super().update_state(y_true, y_pred, sample_weight=real)


def compile_classifier(model: keras.Model, optimizer, label_smoothing: float = 0.0, jit_compile: bool = False) -> None:
    """Compile for class-index targets: cross-entropy with label smoothing, metric "accuracy".

    JAX always compiles its steps (running them eagerly is very slow; see
    device.compile_on_jax for the layers Keras would otherwise refuse), so
    jit_compile only matters with TensorFlow.
    """
    if keras.backend.backend() == "jax":
        jit_compile = True
    model.compile(
        optimizer=optimizer,
        loss=IndexCrossentropy(model.output_shape[-1], label_smoothing),
        metrics=[IndexAccuracy(name="accuracy")],
        jit_compile=jit_compile,
    )


def set_precision(mixed_precision: str) -> None:
    """Compute in float16 or bfloat16 with float32 weights, or plainly in float32 ("none").

    Call it before building the model (`auto` is resolved by device.resolve_precision
    first). The softmax output layer should say dtype="float32" so probabilities stay precise.
    """
    if mixed_precision not in ("none", "float16", "bfloat16"):
        raise ValueError(f"mixed_precision must be none, float16 or bfloat16, got {mixed_precision!r}")
    keras.config.set_dtype_policy("float32" if mixed_precision == "none" else f"mixed_{mixed_precision}")


# schedule "plateau": the rate is cut to this fraction when validation has not improved for half the patience.
PLATEAU_FACTOR = 0.3
# What counts as an improvement for early stopping and the plateau cut: a validation loss (or accuracy)
# that creeps by less than this (0.1% of a label-smoothed loss near 0.5) would keep a phase going for
# nothing. Below one photo's worth of accuracy on any validation split under 1,000 photos.
MIN_IMPROVEMENT = 0.001


def phase_callbacks(model: keras.Model, log: TrainingLog, best: KeepBest, patience: int = 0,
                    plateau: bool = False, min_improvement: float = 0.0, accuracy_progress: bool = False) -> tuple:
    """The callbacks every phase trains with: (list, its SwapEMAWeights or None, its counting callbacks).

    The counting callbacks (a dict: "early_stopping" when patience > 0, and
    "plateau" when the rate is cut on plateaus) carry counts between epochs that
    a checkpoint saves. None of the callbacks has a per-batch hook that fit must
    wait for (the non-finite loss check runs on Keras' callback thread), so steps
    are dispatched without waiting on the host; tests/test_train_cnn.py checks that.
    """
    # Inside a hyperparameter search, a callback that reports each epoch to the trial (tuning.py).
    callbacks = [best, log, StopOnNonFiniteLoss(), *tuning.pruning_callbacks()]
    swap, counting = None, {}
    if getattr(model.optimizer, "use_ema", False):  # validate and keep the averaged weights (swapped in first)
        swap = keras.callbacks.SwapEMAWeights(swap_on_epoch=True)
        callbacks.insert(0, swap)
    if plateau:
        # Half-way through the patience the rate is cut; at its end the phase stops. Without patience,
        # the rate is cut after every 2 epochs without improvement, and the phase runs all its epochs.
        counting["plateau"] = keras.callbacks.ReduceLROnPlateau(
            monitor=best.monitor, mode=best.mode, factor=PLATEAU_FACTOR, patience=max(1, patience // 2) if patience
            else 2, min_delta=MIN_IMPROVEMENT, verbose=0)
    if patience > 0:
        # Progress for the stop (not the plateau cut): with min_improvement > 0, a better score by that share
        # of the best; with accuracy_progress, also a validation accuracy higher than ever.
        stopping = dict(monitor=best.monitor, mode=best.mode, patience=patience, min_delta=MIN_IMPROVEMENT)
        counting["early_stopping"] = (
            keras_internals.RelativeEarlyStopping(min_improvement, accuracy_progress, **stopping)
            if min_improvement or accuracy_progress else keras.callbacks.EarlyStopping(**stopping))
    return callbacks + list(counting.values()), swap, counting


def train_phase(model: keras.Model, train: ImageBatches, val: ImageBatches, epochs: int, log: TrainingLog,
                best: KeepBest, patience: int = 0, state=None, phase: str = "train", verbose: int = 2,
                plateau: bool = False, epochs_param: str | None = None, extra_callbacks: tuple = (),
                min_improvement: float = 0.0, accuracy_progress: bool = False) -> float:
    """model.fit for one phase with the shared callbacks; returns the training seconds.

    patience > 0 stops the phase after that many epochs without a better
    `best.monitor` (better by `min_improvement` of the best, when above 0; with
    `accuracy_progress`, a higher validation accuracy than ever also counts);
    `plateau` cuts the learning rate (a constant one) on the way
    (phase_callbacks). A phase with patience that runs all its `epochs`
    while still improving warns, naming `epochs_param`, the cap to raise.
    With a checkpoint.TrainingState, the phase resumes where a killed run of
    the same stage stopped, and saves its state after every epoch. Call
    `best.restore(model)` after the last phase. `extra_callbacks` run first (e.g. a lookahead, which
    must have reset the weights before an epoch's validation and KeepBest).
    """
    log.start_phase(phase)
    callbacks, swap, counting = phase_callbacks(model, log, best, patience, plateau, min_improvement,
                                                accuracy_progress)
    callbacks = [*extra_callbacks, *callbacks]
    first_epoch = 0
    if state is not None:
        first_epoch = state.resume(phase, model, train, log, best)
        if swap is not None and first_epoch:
            # The state was saved at an epoch's end, with the averaged weights swapped into the model:
            # the callback must swap them back before the next epoch, as it would have.
            keras_internals.set_averaged_weights_in_model(swap)
        if state.stopped_early:
            first_epoch = epochs  # it had stopped before its last epoch: nothing is left to run
        callbacks.append(state.callback(phase, log, best, counting))
    earlier = sum(row["seconds"] or 0.0 for row in log.rows if row["phase"] == phase)
    started = time.perf_counter()
    # shuffle=False: ImageBatches shuffles itself, from the seed.
    model.fit(train, validation_data=val, epochs=epochs, initial_epoch=first_epoch, callbacks=callbacks,
              shuffle=False, verbose=verbose)
    if patience > 0 and epochs_param:
        warn_if_capped(log, best, phase, epochs, patience, epochs_param)
    return earlier + time.perf_counter() - started


def warn_if_capped(log: TrainingLog, best: KeepBest, phase: str, epochs: int, patience: int, epochs_param: str) -> bool:
    """Warn when `phase` ran all its epochs and its best epoch came within the last `patience`:
    validation was still improving when the cap stopped it. Returns whether it warned."""
    ran = [number for number, row in enumerate(log.rows, start=1) if row["phase"] == phase]
    if len(ran) < epochs or best.best_epoch is None or best.best_epoch <= ran[-1] - patience:
        return False
    print(f"warning: {phase} ran all {epochs} epochs ({epochs_param}) and validation was still improving"
          f" (best at epoch {best.best_epoch - ran[0] + 1} of them): raise {epochs_param} to train longer")
    return True


def model_card(name: str, class_names: list[str], resize_section, image_size: int, val_accuracy: float | None,
               **extra) -> dict:
    """The model card modelio expects: names, the image geometry new photos need, validation accuracy, extras."""
    return {
        "name": name,
        "class_names": list(class_names),
        "image_size": image_size,
        "aspect": resize_section.aspect,
        "max_stretch": resized_max_stretch(),
        "background": list(resize_section.background),
        "max_pixels": resize_section.max_pixels,
        "val_accuracy": None if val_accuracy is None else float(val_accuracy),  # None: no validation split
        "backend": keras.backend.backend(),
        **extra,
    }


def write_training_metrics(path: Path | str, best: KeepBest, seconds: float, images_seen: int, **extra) -> dict:
    """Write the stage's metrics JSON: best validation scores, the epoch they came from, time and throughput."""
    metrics = {
        "val_accuracy": best.best_logs.get("val_accuracy"),
        "val_loss": best.best_logs.get("val_loss"),
        "best_epoch": best.best_epoch,
        "epochs_run": best.epochs_seen,
        "train_seconds": round(seconds, 2),
        "images_per_second": round(images_seen / seconds, 1) if seconds > 0 else None,
        **extra,
    }
    write_json(path, metrics)
    tuning.record_metrics(metrics)
    return metrics
