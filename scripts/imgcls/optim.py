"""Optimizers and learning-rate schedules: warm-up and decay, per-variable rates, a moving average of the weights."""

import dataclasses

import keras

from imgcls import keras_internals

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
    """The learning rate as a float ("constant", "plateau") or a Keras schedule over all training steps.

    "plateau" starts constant; a ReduceLROnPlateau callback cuts it (training.phase_callbacks).

    "cosine": optional linear warm-up from peak x start, then cosine decay to peak x end;
    "one_cycle": see OneCycle.
    """
    total_steps = max(1, epochs * steps_per_epoch)
    warmup_steps = min(int(round(warmup_epochs * steps_per_epoch)), total_steps - 1)
    if schedule in ("constant", "plateau"):
        return learning_rate
    if schedule == "cosine":
        if warmup_steps > 0:
            return keras.optimizers.schedules.CosineDecay(learning_rate * start, total_steps - warmup_steps, alpha=end,
                                                          warmup_target=learning_rate, warmup_steps=warmup_steps)
        return keras.optimizers.schedules.CosineDecay(learning_rate, total_steps, alpha=end)
    if schedule == "one_cycle":
        return OneCycle(learning_rate, warmup_steps, total_steps, start, end)
    raise ValueError(f"schedule must be constant, plateau, cosine or one_cycle, got {schedule!r}")


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
        self.scale_by_index = {keras_internals.variable_index(self, variable): self.rate_scales[variable.path]
                               for variable in variables if variable.path in self.rate_scales}

    def update_step(self, gradient, variable, learning_rate):
        scale = self.scale_by_index.get(keras_internals.variable_index(self, variable), 1.0)
        super().update_step(gradient, variable, learning_rate if scale == 1.0 else learning_rate * scale)

    def get_config(self):
        return {**super().get_config(), "rate_scales": self.rate_scales}


class RampedAverage(keras_internals.MovingAverageUpdate):
    """Optimizer mixin: the moving average of the weights (use_ema) starts loose and tightens.

    At step t of T its momentum is ema_momentum x (t / T) ** ema_ramp, where
    Keras keeps it constant. Early on the weights move fast and their past is
    of little use, so the average (and the lookahead resets to it, when
    ema_overwrite_frequency is set) follows them closely instead of holding
    them back; by the end it averages as ema_momentum says. This replaces
    the one method of Keras' optimizer that updates the average (see
    keras_internals.MovingAverageUpdate).
    """

    def __init__(self, *arguments, ema_ramp: float, ema_total_steps: int, **keywords):
        super().__init__(*arguments, **keywords)
        self.ema_ramp = float(ema_ramp)
        self.ema_total_steps = int(ema_total_steps)

    def update_weight_averages(self, trainable_variables, averages):
        ops = keras.ops
        progress = ops.minimum(ops.cast(self.iterations, "float32") / max(self.ema_total_steps, 1), 1.0)
        momentum = self.ema_momentum * ops.power(progress, self.ema_ramp)
        for variable, average in zip(trainable_variables, averages):
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


def warmup_callbacks(learning_rate: float, schedule: str, warmup_epochs: int) -> tuple:
    """The callbacks of a warm-up over the first `warmup_epochs` of a constant or plateau rate: epoch k
    (from 1) runs at k / (warmup_epochs + 1) of `learning_rate`, the epoch after at all of it.

    Per epoch, so that no step waits on a per-batch hook, and by setting the
    rate as ReduceLROnPlateau does, so that the plateau cuts that follow still
    apply. The cosine and one-cycle schedules warm up per step instead
    (OptimizerSettings.warmup_epochs).
    """
    if warmup_epochs <= 0 or schedule not in ("constant", "plateau"):
        return ()

    def rate(epoch: int, current: float) -> float:
        if epoch < warmup_epochs:
            return learning_rate * (epoch + 1) / (warmup_epochs + 1)
        return learning_rate if epoch == warmup_epochs else current  # a later cut (plateau) stays

    return (keras.callbacks.LearningRateScheduler(rate),)


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """What build_optimizer reads, with the defaults of a plain optimizer; train_cnn's optimizer section
    (cnn_params.OptimizerParams) has the same fields and is passed as it is."""

    name: str = "adam"  # adam, or sgd (Nesterov momentum 0.9)
    learning_rate: float = 0.001  # the peak
    schedule: str = "constant"  # see learning_rate_schedule
    warmup_epochs: float = 0.0
    schedule_start: float = WARMUP_START  # fractions of the peak
    schedule_end: float = 0.0
    weight_decay: float = 0.0
    weight_decay_biases: bool = False


def build_optimizer(settings, epochs: int, steps_per_epoch: int, rate_scales: dict[str, float] | None = None,
                    ema=None, beta_2: float = 0.999, clip_norm: float = 0.0) -> keras.optimizers.Optimizer:
    """An optimizer ("adam" or "sgd" with Nesterov momentum 0.9) with a learning-rate schedule.

    `settings` is an OptimizerSettings or train_cnn's optimizer section. See
    learning_rate_schedule for the schedules (schedule_start and schedule_end
    are fractions of the peak). weight_decay is decoupled (AdamW-style: each
    step shrinks kernels by rate x weight_decay) and spares batch-norm scales,
    and also biases and batch-norm offsets unless weight_decay_biases.
    rate_scales ({variable path: factor}) makes those variables learn faster
    or slower (ScaledRates). `ema` (train_cnn's ema section) with a momentum
    above 0 keeps Keras' moving average of the weights (use_ema), which
    train_phase validates and keeps; ema.every > 0 also resets the weights to
    it every that many steps; ema.ramp > 0 grows its momentum from 0 over
    training (RampedAverage). beta_2 is Adam's decay of its running mean of
    squared gradients (ignored by SGD); clip_norm > 0 rescales each step's
    gradients to at most that global norm (Keras' global_clipnorm).
    """
    if settings.name not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be adam or sgd, got {settings.name!r}")
    rate = learning_rate_schedule(settings.learning_rate, settings.schedule, epochs, steps_per_epoch,
                                  settings.warmup_epochs, settings.schedule_start, settings.schedule_end)
    decay = settings.weight_decay or None
    options = {"learning_rate": rate, "weight_decay": decay, "global_clipnorm": clip_norm or None}
    # With ema.batch_norm_statistics the average is a callback's (Lookahead), not the optimizer's.
    averaged = ema is not None and ema.momentum > 0 and not ema.batch_norm_statistics
    if averaged:
        options.update(use_ema=True, ema_momentum=ema.momentum, ema_overwrite_frequency=ema.every or None)
    if settings.name == "sgd":
        options.update(momentum=0.9, nesterov=True)
    else:
        options.update(beta_2=beta_2)
    # The plain Keras classes unless an option needs one of the mixins above.
    classes = {"adam": (keras.optimizers.Adam, ScaledRatesAdam, RampedAdam),
               "sgd": (keras.optimizers.SGD, ScaledRatesSGD, RampedSGD)}[settings.name]
    if averaged and ema.ramp:
        optimizer = classes[2](rate_scales=rate_scales or {}, ema_ramp=ema.ramp,
                               ema_total_steps=epochs * steps_per_epoch, **options)
    elif rate_scales:
        optimizer = classes[1](rate_scales=rate_scales, **options)
    else:
        optimizer = classes[0](**options)
    if decay:
        optimizer.exclude_from_weight_decay(
            var_names=["gamma"] if settings.weight_decay_biases else ["bias", "gamma", "beta"])
    return optimizer


class Lookahead(keras.callbacks.Callback):
    """A lookahead whose average covers every weight of the model, batch-norm statistics included (as airbench's).

    Keras' average (use_ema) covers the trainable weights only: after each
    reset to it, the batch-norm layers' running mean and variance still
    describe the fast weights, not the averaged ones they now normalise.
    Here, every `every` steps and at the end of each epoch (so validation and
    the kept epoch see the average), the average of each weight moves
    1 - decay of the way to the weight, and the weight is reset to the average,
    with decay = momentum ** every x (step / total_steps) ** ramp. A callback
    through public Keras APIs only: on JAX, reading `self.model` mid-epoch
    brings the model's state back from the compiled step first.
    """

    def __init__(self, momentum: float, every: int, ramp: float, total_steps: int):
        super().__init__()
        if every < 1:
            raise ValueError(f"the lookahead needs every >= 1 step between resets, got {every}")
        self.momentum, self.every, self.ramp, self.total_steps = float(momentum), int(every), float(ramp), total_steps
        self.averages = None

    def averaged_weights(self) -> list:
        # On JAX, reading self.model mid-epoch first brings the model's state back from the compiled step.
        return [weight for weight in self.model.weights if "float" in str(weight.dtype)]

    def on_train_begin(self, logs=None):
        # The weights are the average at every epoch's end, so a resumed run starts the average from them.
        self.averages = [keras.ops.copy(weight.value) for weight in self.averaged_weights()]  # a copy, not a view

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = epoch * self.params["steps"]

    def on_train_batch_end(self, batch, logs=None):
        if (batch + 1) % self.every == 0 or batch + 1 == self.params["steps"]:
            self.reset_to_average(step=self.epoch_start + batch + 1)

    def reset_to_average(self, step: int):
        progress = min(step / max(self.total_steps, 1), 1.0)
        decay = self.momentum ** self.every * progress ** self.ramp
        for index, weight in enumerate(self.averaged_weights()):
            average = decay * self.averages[index] + (1 - decay) * keras.ops.convert_to_tensor(weight)
            self.averages[index] = average
            # A copy: on JAX the next step donates (frees) the buffers the model's variables hold.
            weight.assign(keras.ops.copy(average))
