"""Training the CNN: its batches, its model and optimizer, the test-time views of the saved model, its metrics.

scripts/train_cnn.py runs these in order around training.train_phase; the
network itself is built in cnn.py, from the train_cnn section of params.yaml.
"""

import dataclasses
from pathlib import Path

import keras
import numpy as np

from imgcls import batches, flops, optim, training
from imgcls.augment import test_time_model
from imgcls.callbacks import KeepBest
from imgcls.cnn import batch_norm_bias_rates, build_cnn
from imgcls.errors import UserError


@dataclasses.dataclass
class Data:
    """The training and validation images, in the batches the CNN trains and validates on."""

    num_classes: int
    train_pixels: np.ndarray  # the whitening stem computes its filters from them
    train_labels: np.ndarray
    val_labels: np.ndarray
    train: batches.ImageBatches
    val: batches.ImageBatches | None  # None: no validation split (split.val: 0)

    @classmethod
    def prepare(cls, run: training.TrainingRun, section, seed: int, num_classes: int, train_set, val_set) -> "Data":
        """Batches of (pixels, labels) train_set and val_set, with section's batch size, class weights and flips."""
        (train_pixels, train_labels), (val_pixels, val_labels) = train_set, val_set
        weights = batches.class_weights(train_labels, num_classes, section.class_weight)
        kind = batches.AlternatingFlips if section.augment.alternate_flips else None
        train = run.batches(train_pixels, train_labels, num_classes, section.batch_size, shuffle=True, seed=seed,
                            class_weights=weights, kind=kind)
        val = (run.batches(val_pixels, val_labels, num_classes, batch_size=max(section.batch_size, 64))
               if len(val_labels) else None)
        return cls(num_classes, train_pixels, train_labels, val_labels, train, val)


def build_and_compile(section, data: Data, image_size: int, seed: int) -> keras.Model:
    """The CNN of section.net, compiled with the optimizer of section.optimizer and section.ema."""
    model = build_cnn(data.num_classes, image_size, section, seed, train_images=data.train_pixels)
    rate_scales = batch_norm_bias_rates(model, section.optimizer.batch_norm_bias_lr_scale)
    optimizer = optim.build_optimizer(section.optimizer, section.epochs, len(data.train), rate_scales, section.ema)
    training.compile_classifier(model, optimizer, section.label_smoothing, section.jit_compile)
    print(f"train_cnn: {model.count_params():,} parameters, {len(data.train_labels)} training and"
          f" {len(data.val_labels)} validation images, {data.num_classes} classes")
    return model


def keep_best(section, data: Data) -> KeepBest:
    """What keeps the epoch to save: the best on validation, or without a validation split the last one."""
    if data.val is None and section.patience:
        raise UserError(f"train_cnn.patience ({section.patience}) stops training when validation stops improving,"
                        " but there is no validation split (split.val: 0): set train_cnn.patience to 0, or"
                        " split.val above 0")
    return KeepBest(section.monitor, keep_last=data.val is None)


def lookahead(section, data: Data) -> tuple:
    """The callbacks of section.ema's lookahead over every weight, batch-norm statistics included, if on."""
    ema = section.ema
    if not ema.batch_norm_statistics:
        return ()  # no average, or Keras' own (the optimizer's use_ema, see optim.build_optimizer)
    return (optim.Lookahead(ema.momentum, ema.every, ema.ramp, total_steps=section.epochs * len(data.train)),)


def with_test_time_views(model: keras.Model, test_time, data: Data, best: KeepBest) -> tuple[keras.Model, float]:
    """The model to save and its validation accuracy: the trained one, or (with test_time.flip or .shift) one
    that averages its predictions for the mirror image and/or shifted copies of each photo."""
    if not test_time.on:
        return model, best.best_logs.get("val_accuracy")
    # Training is unchanged; the saved model also looks at each photo's mirror image and/or shifted copies.
    averaged = test_time_model(model, test_time)
    if data.val is None:
        return averaged, None
    val_accuracy = float((batches.predict(averaged, data.val).argmax(axis=1) == data.val_labels).mean())
    print(f"train_cnn: validation accuracy {best.best_logs['val_accuracy']:.4f}, {val_accuracy:.4f} averaged"
          " over the test-time versions of each image")
    return averaged, val_accuracy


def write_metrics(path: Path, trained: keras.Model, saved: keras.Model, data: Data, best: KeepBest,
                  seconds: float, run: training.TrainingRun) -> dict:
    """train.json: the best epoch's scores, time, throughput, size and FLOPs (of training and of the saved model)."""
    return training.write_training_metrics(path, best, seconds, images_seen=best.epochs_seen * len(data.train_labels),
                                           parameters=int(trained.count_params()), trained_on=run.device,
                                           **flops.cnn_flops(trained, saved, len(data.train_labels),
                                                             len(data.val_labels), best.epochs_seen))
