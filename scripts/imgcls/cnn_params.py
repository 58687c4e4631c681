"""The schema of params.yaml's train_cnn section (see imgcls/cnn.py, imgcls/optim.py), and the places of its
old flat keys; params.py loads and validates it with the rest."""

from typing import Annotated, Literal

from pydantic import Field, model_validator

from imgcls.sections import AugmentParams, Section, TestTimeParams


class CnnNetParams(Section):
    """train_cnn.net: the network's layers (see imgcls/cnn.py)."""

    stem: Literal["none", "whiten"]
    whiten_bias_trainable: bool
    filters: list[Annotated[int, Field(ge=1)]] = Field(min_length=1)
    convs_per_block: int = Field(ge=1, le=8)
    pool_after: Literal["first", "last"]
    pool_before_norm: bool
    batch_norm: bool
    batch_norm_momentum: float = Field(ge=0, lt=1)
    batch_norm_scale: bool
    identity_init: bool
    conv_init_scale: float = Field(gt=0, le=10)
    activation: Literal["relu", "gelu"]
    pooling: Literal["global_average", "global_max", "flatten"]
    dense_units: list[Annotated[int, Field(ge=1)]]
    dropout: float = Field(ge=0, lt=1)
    output_scale: float = Field(gt=0, le=1)
    head: Literal["dense", "airbench"]  # the output layer's bias and random start

    @model_validator(mode="after")
    def _whiten_bias_needs_the_stem(self):
        if self.whiten_bias_trainable and self.stem != "whiten":
            raise ValueError(f"whiten_bias_trainable trains the whitening stem's offsets: it needs stem: whiten,"
                             f" not {self.stem}")
        return self


class CnnAugmentParams(AugmentParams):
    """train_cnn.augment: the shared augmentation, and flips that alternate by epoch (a CNN batch option)."""

    alternate_flips: bool

    @model_validator(mode="after")
    def _one_kind_of_flip(self):
        if self.alternate_flips and self.flip in ("horizontal", "horizontal_and_vertical"):
            raise ValueError("alternate_flips mirrors each image on every other epoch itself: set flip to"
                             f" none (or vertical), not {self.flip}")
        return self


class OptimizerParams(Section):
    """train_cnn.optimizer: the optimizer, its learning-rate schedule and weight decay (see imgcls/optim.py)."""

    name: Literal["adam", "sgd"]
    learning_rate: float = Field(gt=0, le=10)
    schedule: Literal["constant", "cosine", "one_cycle"]
    warmup_epochs: float = Field(ge=0)
    schedule_start: float = Field(gt=0, le=1)
    schedule_end: float = Field(ge=0, le=1)
    weight_decay: float = Field(ge=0, lt=1)
    weight_decay_biases: bool
    batch_norm_bias_lr_scale: float = Field(gt=0, le=1000)


class EmaParams(Section):
    """train_cnn.ema: a moving average of the weights; momentum 0 turns it off."""

    momentum: float = Field(ge=0, lt=1)
    every: int = Field(ge=0)
    ramp: float = Field(ge=0, le=10)
    # The lookahead also averages the batch-norm statistics (optim.Lookahead, a callback) instead of Keras' average.
    batch_norm_statistics: bool

    @model_validator(mode="after")
    def _needs_an_average(self):
        if self.ramp and not self.momentum:
            raise ValueError(f"ramp ({self.ramp:g}) needs a momentum above 0 (the average it ramps)")
        if self.every and not self.momentum:
            raise ValueError(f"every ({self.every}) needs a momentum above 0 (the average it resets to)")
        if self.batch_norm_statistics and not self.every:
            raise ValueError("batch_norm_statistics averages them in the lookahead: it needs every above 0 (the"
                             " steps between resets, e.g. 5)")
        return self


class TrainCnnParams(Section):
    # What every trainer has (training.start_run and train_phase read them) at the top, then one section per part.
    input_size: int = Field(ge=8, le=1024)
    batch_size: int = Field(ge=1, le=4096)
    epochs: int = Field(ge=1, le=10000)
    patience: int = Field(ge=0)
    monitor: Literal["val_accuracy", "val_loss"]
    class_weight: Literal["none", "balanced"]
    label_smoothing: float = Field(ge=0, lt=1)
    mixed_precision: Literal["auto", "none", "float16", "bfloat16"]
    jit_compile: bool
    net: CnnNetParams
    augment: CnnAugmentParams
    optimizer: OptimizerParams
    ema: EmaParams
    test_time: TestTimeParams

    @model_validator(mode="after")
    def _warmup_within_training(self):
        warmup = self.optimizer.warmup_epochs
        if warmup >= self.epochs and self.optimizer.schedule != "constant":
            raise ValueError(f"optimizer.warmup_epochs ({warmup:g}) must be less than epochs ({self.epochs})")
        return self


# train_cnn's settings were one flat list before they were grouped into sections: each old key and its place
# now, within train_cnn. A params.yaml (edited by hand or by `dvc exp run -S`) or a benchmark candidate that
# still uses one stops with it.
CNN_KEYS_MOVED = {
    **{key: f"net.{key}" for key in CnnNetParams.model_fields},
    "alternate_flips": "augment.alternate_flips",
    "optimizer": "optimizer.name",
    **{key: f"optimizer.{key}" for key in OptimizerParams.model_fields if key != "name"},
    "ema_momentum": "ema.momentum",
    "ema_every": "ema.every",
    "ema_ramp": "ema.ramp",
    "test_time_flip": "test_time.flip",
    "test_time_shift": "test_time.shift",
}
# Old keys that have no new place, and why.
CNN_KEYS_DROPPED = {
    "batch_norm_epsilon": "batch norm always adds Keras' 0.001 to each variance, since airbench's 1e-12 changed"
                          " nothing on CIFAR-10 (docs/cifar10.md#on-one-h200)",
}


def old_cnn_key(key: str, value=None) -> str | None:
    """What to do about `key` (within train_cnn, set to `value`) if it is one of the flat layout's, else None.

    The old `optimizer` held the optimizer's name; a dict there is the new section.
    """
    if key in CNN_KEYS_DROPPED:
        return f"train_cnn.{key} was dropped: {CNN_KEYS_DROPPED[key]}. Delete it."
    if key in CNN_KEYS_MOVED and not isinstance(value, dict):
        return (f"train_cnn.{key} moved to train_cnn.{CNN_KEYS_MOVED[key]}: train_cnn's settings are grouped in"
                " sections (net, augment, optimizer, ema, test_time; see params.yaml)")
    return None
