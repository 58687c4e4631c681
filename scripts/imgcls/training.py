"""What every training stage shares: seeding, batches, augmentation, optimizer, logging, keeping the best model.

Everything here uses `keras.*` only and feeds numpy arrays through a
`keras.utils.PyDataset`, so a trainer built on it runs unchanged with the
TensorFlow, JAX or PyTorch backend.

A trainer does, in order:
    run = start_run(stage, section, seed, distribution, image_size)  # seed, precision, devices, saved state
    train = run.batches(pixels, labels, num_classes, batch_size, shuffle=True, seed=..., class_weights=...)
    model = ...  # augmentation(section.augment, seed) goes inside the model
    compile_classifier(model, build_optimizer(...), label_smoothing, jit_compile)
    log, best = TrainingLog(report_dir), KeepBest(monitor)
    train_phase(model, train, val, epochs, log, best, patience, run.state, phase="train")
    best.restore(model); log.finish()
    save_trained_model(model, name, model_card(...)); run.state.finish()
A trainer with two phases (e.g. head first, then fine-tuning) calls
train_phase twice with the same log, KeepBest and state, so the history, the
plot and the best model span both phases, and a killed run resumes in either.
"""

import dataclasses
import math
import time
from pathlib import Path

import keras
import numpy as np

from imgcls import checkpoint, device
from imgcls.dataset import CLASSES_FILE, MANIFEST_FILE, atomic_path, images_file, write_csv, write_json
from imgcls.errors import UserError

MONITOR_MODES = {"val_accuracy": "max", "val_loss": "min"}


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


class ImageBatches(keras.utils.PyDataset):
    """Batches of images (N, S, S, 3) as the uint8 pixels they are stored in, with class indices as labels.

    uint8 is a quarter of float32's bytes on the way to a GPU; the model casts
    them itself, and the loss one-hot encodes the indices inside the compiled
    step (see compile_classifier). With `shuffle`, each epoch visits the images
    in a new order drawn from (seed, epoch number), so a rerun (or a resumed run,
    after `set_epoch`) sees the same batches. Without labels the batches hold images
    only (for `model.predict`). With `class_weights` ({class index: weight}) each
    batch also carries per-image loss weights.

    Data-parallel training (`replicas` > 1) needs every batch to divide by the
    number of devices. A shuffled (training) batch that does not leaves out its
    last few images (others each epoch), so BatchNormalization never sees
    padding; a validation or prediction batch is padded with copies of its
    first images, marked as padding for the loss and accuracy (label -1,
    weight 0), and `predict` drops their predictions. With several hosts,
    each process yields only its own slice of each batch (`process`: index, count).

    With `resident`, the images are copied to the accelerator once, and each
    batch is gathered there: only its indices (and labels) leave the host.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray | None = None, num_classes: int | None = None,
                 batch_size: int = 32, shuffle: bool = False, seed: int = 0, class_weights: dict | None = None,
                 replicas: int = 1, process: tuple[int, int] = (0, 1), resident: bool = False):
        # Two threads, no processes: batches are cheap slices of arrays in memory.
        # With more than one worker Keras fetches batches with its ordered enqueuer
        # (same order, so the same metrics) and switches off tf.data's autotuned
        # prefetching, which on a 2-core CPU otherwise competes with training for
        # the cores (gear CNN epochs: 7.5 s instead of 10 s). Processes would also
        # break JAX on a GPU (keras-team/keras#20619).
        super().__init__(workers=2, use_multiprocessing=False)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if len(images) == 0:
            raise ValueError("ImageBatches needs at least one image")
        if labels is not None:
            if num_classes is None:
                raise ValueError("num_classes is required with labels (the loss one-hot encodes them)")
            if len(labels) != len(images):
                raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if replicas % process[1]:
            raise ValueError(f"{replicas} replicas cannot be split evenly over {process[1]} processes")
        self.resident = resident
        self.images = keras.ops.convert_to_tensor(images) if resident else images
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int32)
        self.num_classes = num_classes
        # With several replicas only the last batch may need padding.
        self.batch_size = math.ceil(batch_size / replicas) * replicas
        self.shuffle = shuffle
        self.seed = seed
        self.replicas = replicas
        self.process_index, self.process_count = process
        self.epoch = 0
        self.weights = None
        if class_weights is not None and self.labels is not None:
            lookup = np.array([class_weights.get(index, 1.0) for index in range(num_classes)], dtype=np.float32)
            self.weights = lookup[self.labels]
        self.order = self._order()

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.images))
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.images))

    def __len__(self) -> int:
        if self.shuffle and len(self.images) % self.batch_size < self.replicas:
            return max(1, len(self.images) // self.batch_size)  # a last batch too small to split is left out
        return math.ceil(len(self.images) / self.batch_size)

    def inputs(self, picked: np.ndarray):
        """The model inputs of the images at positions `picked` (a subclass may serve other inputs)."""
        if self.resident:
            return keras.ops.take(self.images, picked, axis=0)
        return np.asarray(self.images[picked])

    def __getitem__(self, index: int):
        picked = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        if self.shuffle:
            picked = picked[:len(picked) - len(picked) % self.replicas]
        real = len(picked)
        padding = -real % self.replicas
        if padding:
            picked = np.concatenate([picked, np.resize(picked, padding)])
        weights = None
        # Split across devices every batch carries weights (JAX fixes the batch's structure at the first one).
        if self.labels is not None and (self.weights is not None or self.replicas > 1):
            weights = self.weights[picked] if self.weights is not None else np.ones(len(picked), dtype=np.float32)
            weights[real:] = 0.0  # padding: counted by no loss and no metric
        labels = None if self.labels is None else self.labels[picked]
        if labels is not None and padding:
            labels[real:] = -1  # padding: the loss leaves it out (IndexCrossentropy)
        if self.process_count > 1:
            share = len(picked) // self.process_count
            mine = slice(self.process_index * share, (self.process_index + 1) * share)
            picked, weights = picked[mine], None if weights is None else weights[mine]
            labels = None if labels is None else labels[mine]
        inputs = self.inputs(picked)
        if labels is None:
            return (inputs,)
        if weights is None:
            return inputs, labels
        return inputs, labels, weights

    def on_epoch_end(self) -> None:
        self.set_epoch(self.epoch + 1)

    def set_epoch(self, epoch: int) -> None:
        """Continue from epoch `epoch` (0-based): its order, and for CachedBatches its versions."""
        self.epoch = epoch
        self.order = self._order()


def predict(model: keras.Model, batches: ImageBatches) -> np.ndarray:
    """model.predict over `batches`, without the predictions of any padding (see ImageBatches)."""
    if batches.process_count > 1:
        return _predict_on_this_host(model, batches)
    return model.predict(batches, verbose=0)[:len(batches.images)]


def _predict_on_this_host(model: keras.Model, batches: ImageBatches) -> np.ndarray:
    # Keras cannot bring back outputs spread over several hosts' devices, so each host predicts every
    # image with its own copy of the (replicated) model, on its own device.
    distribution = keras.distribution.distribution()
    keras.distribution.set_distribution(None)
    try:
        local = uncompiled_copy(model)
        return local.predict(ImageBatches(batches.images, batch_size=batches.batch_size), verbose=0)
    finally:
        keras.distribution.set_distribution(distribution)


class AlternatingFlips(ImageBatches):
    """ImageBatches whose images are mirrored left-right on every other epoch, instead of at random.

    Which half of the images starts mirrored is drawn once from the seed; from
    then on each image flips at every epoch, so any two epochs in a row show
    every image both ways round (random flips show a quarter of them the same
    way twice). The batches are the same for the same seed.
    """

    def __init__(self, *arguments, **keywords):
        super().__init__(*arguments, **keywords)
        self.mirrored_first = np.random.default_rng([self.seed, 0, 1]).random(len(self.images)) < 0.5

    def inputs(self, picked: np.ndarray):
        pixels = super().inputs(picked)
        mirrored = self.mirrored_first[picked] ^ (self.epoch % 2 == 1)
        if self.resident:
            return keras.ops.where(mirrored[:, None, None, None], keras.ops.flip(pixels, axis=2), pixels)
        pixels[mirrored] = pixels[mirrored, :, ::-1]
        return pixels


def augmentation(section, seed: int) -> keras.Sequential:
    """A keras.Sequential of random preprocessing layers from an AugmentParams section.

    Put it inside the model (after any Resizing, before Rescaling): the layers act
    only in training, run on every backend, and expect pixels in 0..255. Layers
    whose strength is 0 are left out; with every change off it holds a single
    Identity layer (Keras cannot call an empty Sequential).
    """
    layers = []
    # "nearest" moves, turns and zooms by whole pixels (as cropping a padded image does): no blur
    # that the test images never have, which matters most for small images.
    resampling = {"interpolation": section.interpolation, "fill_mode": "reflect"}
    if section.flip != "none":
        layers.append(keras.layers.RandomFlip(section.flip, seed=seed))
    if section.rotation > 0:
        layers.append(keras.layers.RandomRotation(section.rotation, seed=seed + 1, **resampling))
    if section.zoom > 0:
        layers.append(keras.layers.RandomZoom(section.zoom, seed=seed + 2, **resampling))
    if section.translation > 0:
        layers.append(keras.layers.RandomTranslation(section.translation, section.translation, seed=seed + 3,
                                                     **resampling))
    if section.contrast > 0:
        layers.append(keras.layers.RandomContrast(section.contrast, value_range=(0, 255), seed=seed + 4))
    return device.compile_on_jax(keras.Sequential(layers or [keras.layers.Identity()], name="augmentation"))


def class_weights(labels: np.ndarray, num_classes: int, mode: str) -> dict[int, float] | None:
    """{class index: weight} for mode "balanced" (weight ∝ 1 / class count, mean 1 per image), None for "none"."""
    if mode == "none":
        return None
    if mode != "balanced":
        raise ValueError(f"class weighting must be 'none' or 'balanced', got {mode!r}")
    counts = np.bincount(labels, minlength=num_classes)
    missing = [index for index, count in enumerate(counts) if count == 0]
    if missing:
        raise UserError(f"classes {missing} have no training image: every class needs images in the train split.")
    # n / (k * count): a class with the average count gets 1, the mean weight over all images is 1.
    return {index: float(len(labels) / (num_classes * count)) for index, count in enumerate(counts)}


# Where a warm-up starts, as a fraction of the peak learning rate, unless a trainer says otherwise.
WARMUP_START = 1 / 25


class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """Linear ramp from peak x start to the peak over `warmup_steps`, then linear decay to peak x end at `total_steps`.

    A short ramp keeps early steps of a freshly initialised network stable; the
    long linear decay is what lets a few epochs converge. By default the ramp
    starts at 1/25 of the peak and the decay ends at 0; airbench starts at 0.2
    and ends at 0.07.
    """

    def __init__(self, peak: float, warmup_steps: int, total_steps: int, start: float = WARMUP_START,
                 end: float = 0.0):
        self.peak = float(peak)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.start = float(start)
        self.end = float(end)

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        start, end = self.peak * self.start, self.peak * self.end
        warmup = max(self.warmup_steps, 1)
        rising = start + (self.peak - start) * step / warmup
        falling = end + (self.peak - end) * (self.total_steps - step) / max(self.total_steps - self.warmup_steps, 1)
        rate = keras.ops.where(step < self.warmup_steps, rising, falling)
        return keras.ops.maximum(rate, end)

    def get_config(self):
        return {"peak": self.peak, "warmup_steps": self.warmup_steps, "total_steps": self.total_steps,
                "start": self.start, "end": self.end}


def learning_rate_schedule(learning_rate: float, schedule: str, epochs: int, steps_per_epoch: int,
                           warmup_epochs: float = 0.0, start: float = WARMUP_START, end: float = 0.0):
    """The learning rate as a float ("constant") or a Keras schedule over all training steps.

    "cosine": optional linear warm-up from peak x start, then cosine decay to peak x end;
    "one_cycle": see OneCycle.
    """
    total_steps = max(1, epochs * steps_per_epoch)
    warmup_steps = min(int(round(warmup_epochs * steps_per_epoch)), total_steps - 1)
    if schedule == "constant":
        return learning_rate
    if schedule == "cosine":
        if warmup_steps > 0:
            return keras.optimizers.schedules.CosineDecay(learning_rate * start, total_steps - warmup_steps, alpha=end,
                                                          warmup_target=learning_rate, warmup_steps=warmup_steps)
        return keras.optimizers.schedules.CosineDecay(learning_rate, total_steps, alpha=end)
    if schedule == "one_cycle":
        return OneCycle(learning_rate, warmup_steps, total_steps, start, end)
    raise ValueError(f"schedule must be constant, cosine or one_cycle, got {schedule!r}")


class ScaledRates:
    """Optimizer mixin: some variables (by path) learn at a multiple of the learning rate.

    Each step hands those variables' update a learning rate times their
    factor, on every backend (TensorFlow and JAX both update one variable at a
    time through update_step). Weight decay is unaffected.
    """

    def __init__(self, *arguments, rate_scales: dict[str, float], **keywords):
        super().__init__(*arguments, **keywords)
        self.rate_scales = dict(rate_scales)

    def build(self, variables):
        super().build(variables)
        self.scale_by_index = {self._get_variable_index(variable): self.rate_scales[variable.path]
                               for variable in variables if variable.path in self.rate_scales}

    def update_step(self, gradient, variable, learning_rate):
        scale = self.scale_by_index.get(self._get_variable_index(variable), 1.0)
        super().update_step(gradient, variable, learning_rate if scale == 1.0 else learning_rate * scale)

    def get_config(self):
        return {**super().get_config(), "rate_scales": self.rate_scales}


class RampedAverage:
    """Optimizer mixin: the moving average of the weights (use_ema) starts loose and tightens.

    At step t of T its momentum is ema_momentum x (t / T) ** ema_ramp, where
    Keras keeps it constant. Early on the weights move fast and their past is
    of little use, so the average (and the lookahead resets to it, when
    ema_overwrite_frequency is set) follows them closely instead of holding
    them back; by the end it averages as ema_momentum says. This overrides
    the one method of Keras' optimizer that updates the average.
    """

    def __init__(self, *arguments, ema_ramp: float, ema_total_steps: int, **keywords):
        super().__init__(*arguments, **keywords)
        self.ema_ramp = float(ema_ramp)
        self.ema_total_steps = int(ema_total_steps)

    def _update_model_variables_moving_average(self, trainable_variables):
        if not self.use_ema:
            return
        ops = keras.ops
        progress = ops.minimum(ops.cast(self.iterations, "float32") / max(self.ema_total_steps, 1), 1.0)
        momentum = self.ema_momentum * ops.power(progress, self.ema_ramp)
        for variable, average in zip(trainable_variables, self._model_variables_moving_average):
            if average is not None:
                weight = ops.cast(momentum, variable.dtype)
                average.assign(weight * average + (1 - weight) * variable)

    def get_config(self):
        return {**super().get_config(), "ema_ramp": self.ema_ramp, "ema_total_steps": self.ema_total_steps}


class ScaledRatesAdam(ScaledRates, keras.optimizers.Adam):
    pass


class ScaledRatesSGD(ScaledRates, keras.optimizers.SGD):
    pass


class RampedAdam(RampedAverage, ScaledRates, keras.optimizers.Adam):
    pass


class RampedSGD(RampedAverage, ScaledRates, keras.optimizers.SGD):
    pass


def build_optimizer(name: str, learning_rate: float, schedule: str, epochs: int, steps_per_epoch: int,
                    warmup_epochs: float = 0.0, weight_decay: float = 0.0, rate_scales: dict[str, float] | None = None,
                    ema_momentum: float = 0.0, ema_every: int = 0, ema_ramp: float = 0.0,
                    schedule_start: float = WARMUP_START, schedule_end: float = 0.0, decay_biases: bool = False
                    ) -> keras.optimizers.Optimizer:
    """An optimizer ("adam" or "sgd" with Nesterov momentum 0.9) with a learning-rate schedule.

    See learning_rate_schedule for the schedules (schedule_start and schedule_end
    are fractions of the peak). weight_decay is decoupled (AdamW-style: each
    step shrinks kernels by rate x weight_decay) and spares batch-norm scales,
    and also biases and batch-norm offsets unless decay_biases. rate_scales ({variable path:
    factor}) makes those variables learn faster or slower (ScaledRates).
    ema_momentum > 0 keeps Keras' moving average of the weights (use_ema),
    which train_phase validates and keeps; ema_every > 0 also resets the
    weights to it every that many steps; ema_ramp > 0 grows its momentum
    from 0 over training (RampedAverage).
    """
    rate = learning_rate_schedule(learning_rate, schedule, epochs, steps_per_epoch, warmup_epochs,
                                  schedule_start, schedule_end)
    decay = weight_decay or None
    options = {"learning_rate": rate, "weight_decay": decay}
    if ema_momentum:
        options.update(use_ema=True, ema_momentum=ema_momentum, ema_overwrite_frequency=ema_every or None)
    if name not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be adam or sgd, got {name!r}")
    if name == "sgd":
        options.update(momentum=0.9, nesterov=True)
    # The plain Keras classes unless an option needs one of the mixins above.
    classes = {"adam": (keras.optimizers.Adam, ScaledRatesAdam, RampedAdam),
               "sgd": (keras.optimizers.SGD, ScaledRatesSGD, RampedSGD)}[name]
    if ema_momentum and ema_ramp:
        optimizer = classes[2](rate_scales=rate_scales or {}, ema_ramp=ema_ramp,
                               ema_total_steps=epochs * steps_per_epoch, **options)
    elif rate_scales:
        optimizer = classes[1](rate_scales=rate_scales, **options)
    else:
        optimizer = classes[0](**options)
    if decay:
        optimizer.exclude_from_weight_decay(var_names=["gamma"] if decay_biases else ["bias", "gamma", "beta"])
    return optimizer


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


class KeepBest(keras.callbacks.Callback):
    """Remember the weights of the epoch with the best validation score (across several fits)."""

    def __init__(self, monitor: str = "val_accuracy"):
        super().__init__()
        if monitor not in MONITOR_MODES:
            raise ValueError(f"monitor must be one of {sorted(MONITOR_MODES)}, got {monitor!r}")
        self.monitor = monitor
        self.mode = MONITOR_MODES[monitor]
        self.best_value = None
        self.best_epoch = None  # 1-based, counted across all fits
        self.best_logs = {}
        self.weights = None
        self.epochs_seen = 0

    def improved(self, value: float, logs: dict | None = None) -> bool:
        """Whether `value` beats the best so far (higher accuracy, lower loss).

        Accuracy on a few hundred images ties often; a tie goes to the epoch with
        the lower validation loss (usually a later one, at a lower learning rate).
        """
        if self.best_value is None:
            return True
        if value == self.best_value and self.monitor != "val_loss" and logs and "val_loss" in logs:
            return logs["val_loss"] < self.best_logs.get("val_loss", float("inf"))
        return value > self.best_value if self.mode == "max" else value < self.best_value

    def on_epoch_end(self, epoch, logs=None):
        self.epochs_seen += 1
        logs = logs or {}
        value = logs.get(self.monitor)
        if value is None:
            raise ValueError(f"{self.monitor} is not in the epoch logs: pass validation data to fit")
        # An epoch whose losses are not finite has broken weights, whatever its accuracy says.
        finite = all(math.isfinite(logs.get(key, 0.0)) for key in ("loss", "val_loss"))
        if finite and self.improved(value, logs):
            self.best_value = float(value)
            self.best_epoch = self.epochs_seen
            self.best_logs = {key: float(number) for key, number in logs.items()}
            self.weights = [np.array(weight) for weight in self.model.get_weights()]

    def state(self) -> dict:
        """What a checkpoint needs besides the weights (see checkpoint.TrainingState)."""
        return {"best_value": self.best_value, "best_epoch": self.best_epoch, "best_logs": self.best_logs,
                "epochs_seen": self.epochs_seen}

    def restore_state(self, state: dict, weights: list[np.ndarray]) -> None:
        self.best_value, self.best_epoch = state["best_value"], state["best_epoch"]
        self.best_logs, self.epochs_seen = state["best_logs"], state["epochs_seen"]
        self.weights = weights or None

    def restore(self, model: keras.Model) -> None:
        """Load the best weights into `model`; fail clearly if no epoch had a finite score."""
        if self.weights is None:
            raise UserError(f"training never produced a finite {self.monitor} (the loss diverged):"
                            " lower the learning rate in params.yaml and rerun.")
        model.set_weights(self.weights)


class TrainingLog(keras.callbacks.Callback):
    """Per-epoch train/validation loss and accuracy → DVCLive plots data, history.csv and a PNG.

    Files in `report_dir`: live/plots/metrics/{train,val}/{loss,accuracy}.tsv
    (declared as plots in dvc.yaml; DVCLive is told not to edit dvc.yaml),
    history.csv, and training.png "training vs validation loss" (and accuracy),
    with a dashed line where each phase after the first begins.
    """

    def __init__(self, report_dir: Path | str, title: str = "model"):
        super().__init__()
        from dvclive import Live

        self.report_dir = Path(report_dir)
        self.title = title
        self.rows: list[dict] = []
        self.phases: list[tuple[int, str]] = []  # (first epoch of the phase, 1-based; phase name)
        self.live = Live(dir=str(self.report_dir / "live"), dvcyaml=None, save_dvc_exp=False)
        self._started = None

    def start_phase(self, name: str) -> None:
        """Mark that the next epochs belong to phase `name` (shown in history.csv and on the plot)."""
        self.phases.append((len(self.rows) + 1, name))

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        row = {
            "epoch": len(self.rows) + 1,
            "phase": self.phases[-1][1] if self.phases else "",
            "loss": logs.get("loss"),
            "accuracy": logs.get("accuracy"),
            "val_loss": logs.get("val_loss"),
            "val_accuracy": logs.get("val_accuracy"),
            "learning_rate": _current_learning_rate(self.model),
            "seconds": time.perf_counter() - self._started if self._started else None,
        }
        self.rows.append(row)
        self._log_live(row)

    def _log_live(self, row: dict) -> None:
        self.live.step = row["epoch"]  # DVCLive's x axis is then the epoch number, across phases
        for split, prefix in (("train", ""), ("val", "val_")):
            for metric in ("loss", "accuracy"):
                if row[prefix + metric] is not None:
                    self.live.log_metric(f"{split}/{metric}", float(row[prefix + metric]))
        self.live.next_step()

    def state(self) -> dict:
        return {"rows": self.rows, "phases": self.phases}

    def restore(self, state: dict) -> None:
        """Continue the curves of a resumed run: its epochs so far, written again to DVCLive's files."""
        self.rows = [dict(row) for row in state["rows"]]
        self.phases = [tuple(phase) for phase in state["phases"]]
        for row in self.rows:
            self._log_live(row)

    def finish(self) -> None:
        """Write history.csv and training.png, and close DVCLive."""
        import pandas as pd

        self.live.end()
        write_csv(self.report_dir / "history.csv", pd.DataFrame(self.rows))
        self.plot(self.report_dir / "training.png")

    def plot(self, path: Path) -> None:
        """Write the loss and accuracy curves side by side as a PNG, phase boundaries dashed."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = [row["epoch"] for row in self.rows]
        figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for axis, metric, label in ((axes[0], "loss", "loss"), (axes[1], "accuracy", "accuracy")):
            axis.plot(epochs, [row[metric] for row in self.rows], marker=".", label=f"training {label}")
            axis.plot(epochs, [row[f"val_{metric}"] for row in self.rows], marker=".", label=f"validation {label}")
            for first_epoch, name in self.phases[1:]:
                axis.axvline(first_epoch - 0.5, color="grey", linestyle="--", linewidth=1)
                axis.text(first_epoch - 0.4, 0.98, name, transform=axis.get_xaxis_transform(), va="top",
                          fontsize=8, color="grey")
            axis.set_xlabel("epoch")
            axis.set_ylabel(label)
            axis.grid(alpha=0.3)
            axis.legend()
        axes[0].set_title(f"{self.title}: training vs validation loss")
        axes[1].set_title(f"{self.title}: training vs validation accuracy")
        figure.tight_layout()
        with atomic_path(path) as temporary:
            figure.savefig(temporary, format="png", dpi=110)
        plt.close(figure)


def _current_learning_rate(model) -> float | None:
    try:
        optimizer = model.optimizer
        rate = optimizer.learning_rate  # a schedule evaluated at the current step, or a variable
        return float(keras.ops.convert_to_numpy(rate))
    except Exception:  # a learning rate is informative only; never fail training over it
        return None


def train_phase(model: keras.Model, train: ImageBatches, val: ImageBatches, epochs: int, log: TrainingLog,
                best: KeepBest, patience: int = 0, state=None, phase: str = "train", verbose: int = 2) -> float:
    """model.fit for one phase with the shared callbacks; returns the training seconds.

    patience > 0 stops the phase after that many epochs without a better
    `best.monitor`. With a checkpoint.TrainingState, the phase resumes where a
    killed run of the same stage stopped, and saves its state after every
    epoch. Call `best.restore(model)` after the last phase.
    """
    log.start_phase(phase)
    # TerminateOnNaN: once the loss is NaN no later epoch can recover, so stop at once.
    callbacks = [best, log, keras.callbacks.TerminateOnNaN()]
    early_stopping = swap = None
    if getattr(model.optimizer, "use_ema", False):  # validate and keep the averaged weights (swapped in first)
        swap = keras.callbacks.SwapEMAWeights(swap_on_epoch=True)
        callbacks.insert(0, swap)
    if patience > 0:
        early_stopping = keras.callbacks.EarlyStopping(monitor=best.monitor, mode=best.mode, patience=patience)
        callbacks.append(early_stopping)
    first_epoch = 0
    if state is not None:
        first_epoch = state.resume(phase, model, train, log, best)
        if swap is not None and first_epoch:
            # The state was saved at an epoch's end, with the averaged weights swapped into the model:
            # the callback must swap them back before the next epoch, as it would have.
            swap._ema_weights_in_model = True
        if state.stopped_early:
            first_epoch = epochs  # it had stopped before its last epoch: nothing is left to run
        callbacks.append(state.callback(phase, log, best, early_stopping))
    earlier = sum(row["seconds"] or 0.0 for row in log.rows if row["phase"] == phase)
    started = time.perf_counter()
    # shuffle=False: ImageBatches shuffles itself, from the seed.
    model.fit(train, validation_data=val, epochs=epochs, initial_epoch=first_epoch, callbacks=callbacks,
              shuffle=False, verbose=verbose)
    return earlier + time.perf_counter() - started


def model_card(name: str, class_names: list[str], resize_section, image_size: int, val_accuracy: float,
               **extra) -> dict:
    """The model card modelio expects: names, the image geometry new photos need, validation accuracy, extras."""
    return {
        "name": name,
        "class_names": list(class_names),
        "image_size": image_size,
        "aspect": resize_section.aspect,
        "background": list(resize_section.background),
        "max_pixels": resize_section.max_pixels,
        "val_accuracy": float(val_accuracy),
        "backend": keras.backend.backend(),
        **extra,
    }


def uncompiled_copy(model: keras.Model) -> keras.Model:
    """The same architecture and weights, with no optimizer, loss or learning-rate schedule attached."""
    # from_config (unlike clone_model) carries no compile settings over.
    clone = device.compile_on_jax(model.__class__.from_config(model.get_config()))
    clone.set_weights(model.get_weights())
    return clone


def save_trained_model(model: keras.Model, name: str, card: dict) -> None:
    """Save models/<name>.keras (+ card) atomically, without optimizer state.

    The weights are copied into a fresh, uncompiled copy: the saved file then
    holds no optimizer (smaller, and it loads without the training code's
    custom learning-rate schedule), only what prediction needs.
    """
    from imgcls.modelio import save_model

    save_model(uncompiled_copy(model), name, card)


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
    return metrics
