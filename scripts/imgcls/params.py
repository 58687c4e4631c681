"""Load and validate params.yaml.

Every stage calls `load_params()` first, so a typo or an out-of-range value
stops the pipeline before any work is done, with a message that names the key.
The schema below is the single description of every knob; params.yaml carries
the comments a user reads.
"""

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from imgcls.errors import UserError
from imgcls.tune_params import TuneParams, check_space

PARAMS_FILE = Path("params.yaml")


class Section(BaseModel):
    # extra="forbid" turns a misspelt key into an error instead of a silent default.
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(Section):
    source: str = Field(min_length=1)
    limit_per_class: int = Field(ge=0)
    seed: int = Field(ge=0)


class ResizeParams(Section):
    # One size, or a list: one array per size, and each model reads the one that suits its input size.
    image_size: int | list[int]
    aspect: Literal["pad", "center_crop", "stretch"]
    background: tuple[int, int, int]
    on_error: Literal["skip", "fail"]
    max_pixels: int = Field(ge=1)
    workers: int = Field(ge=0)
    conflicting_labels: Literal["fail", "drop", "keep"]
    near_duplicate_distance: int = Field(ge=0, le=32)  # bits of the 64-bit perceptual hash; 0 turns it off

    @field_validator("image_size", mode="plain")
    @classmethod
    def _sides_in_pixels(cls, value):
        sides = value if isinstance(value, list) else [value]
        if not sides or not all(isinstance(side, int) and not isinstance(side, bool) and 8 <= side <= 1024
                                for side in sides):
            raise ValueError("must be a side in pixels from 8 to 1024, or a list of them (e.g. 160 or [160, 224])")
        return value

    @model_validator(mode="after")
    def _background_is_rgb(self):
        if not all(0 <= channel <= 255 for channel in self.background):
            raise ValueError("background must be three integers in 0..255, e.g. [255, 255, 255]")
        return self

    @property
    def sizes(self) -> list[int]:
        """Every size resize writes, smallest first."""
        return sorted({self.image_size} if isinstance(self.image_size, int) else set(self.image_size))

    def array_size(self, input_size: int) -> int:
        """The size of the arrays a model with this input size reads: the smallest that is at least as large
        (it then only shrinks them, or uses them as they are), else the largest (which it enlarges)."""
        return next((size for size in self.sizes if size >= input_size), self.sizes[-1])


class SplitParams(Section):
    seed: int = Field(ge=0)
    train: float = Field(gt=0, lt=1)
    val: float = Field(gt=0, lt=1)
    test: float = Field(gt=0, lt=1)
    # Share of each class's validation photos held back as the `calibration` split, which
    # only sets the `unknown` threshold; 0 sets it on the validation photos instead.
    calibration: float = Field(ge=0, lt=1)
    holdout_per_class: int = Field(ge=0)

    @model_validator(mode="after")
    def _fractions_sum_to_one(self):
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(
                f"train + val + test must sum to 1, got {self.train} + {self.val} + {self.test} = {total:g}"
            )
        return self


class AugmentParams(Section):
    """Random changes to training images, as Keras preprocessing layers inside the model.

    They are active only while training, so evaluation and prediction see the
    image as it is. 0 (or "none") turns a change off.
    """

    flip: Literal["none", "horizontal", "vertical", "horizontal_and_vertical"]
    rotation: float = Field(ge=0, le=0.5)  # fraction of a full turn, e.g. 0.05 = up to ±18°
    zoom: float = Field(ge=0, lt=1)  # fraction of the side, in or out
    translation: float = Field(ge=0, lt=1)  # fraction of the side, horizontally and vertically
    contrast: float = Field(ge=0, le=1)  # contrast factor range 1 ± contrast
    interpolation: Literal["bilinear", "nearest"]  # how rotated, zoomed and moved pixels are resampled

    @property
    def off(self) -> bool:
        """Whether every change is off: the images are seen as they are."""
        return self.flip == "none" and not (self.rotation or self.zoom or self.translation or self.contrast)


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

    @model_validator(mode="after")
    def _needs_an_average(self):
        if self.ramp and not self.momentum:
            raise ValueError(f"ramp ({self.ramp:g}) needs a momentum above 0 (the average it ramps)")
        if self.every and not self.momentum:
            raise ValueError(f"every ({self.every}) needs a momentum above 0 (the average it resets to)")
        return self


class CnnTestTimeParams(Section):
    """train_cnn.test_time: the saved model averages its predictions over these versions of each photo."""

    flip: bool
    shift: bool


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
    test_time: CnnTestTimeParams

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


class TransferHeadParams(Section):
    """Phase 1: the new head trained on the frozen base."""

    solver: Literal["lbfgs", "adam"]  # lbfgs: the linear probe (imgcls/probe.py); adam: epochs of gradient descent
    epochs: int = Field(ge=1, le=10000)
    learning_rate: float = Field(gt=0, le=10)
    patience: int = Field(ge=0)
    augment: AugmentParams  # all off: the base's features are computed once and the head trains on them


class TransferFineTuneParams(Section):
    """Phase 2: the top of the base unfrozen at a lower learning rate; epochs 0 skips it."""

    epochs: int = Field(ge=0, le=10000)
    learning_rate: float = Field(gt=0, le=10)
    unfreeze: int | str  # top N layers of the base, or the name of the first layer to train
    patience: int = Field(ge=0)
    augment: AugmentParams
    cached_copies: int = Field(ge=0, le=50)  # 0: every epoch runs the whole base on freshly augmented images

    @model_validator(mode="after")
    def _unfreeze_is_positive(self):
        if isinstance(self.unfreeze, int) and self.unfreeze < 1:
            raise ValueError(f"unfreeze must be a number of layers >= 1 or a layer name, got {self.unfreeze}")
        return self


class TrainTransferParams(Section):
    base: str = Field(min_length=1)  # checked against the known bases when the stage starts
    weights: str = Field(min_length=1)
    input_size: int = Field(ge=0, le=1024)
    dense_units: list[int]
    dropout: float = Field(ge=0, lt=1)
    label_smoothing: float = Field(ge=0, lt=1)
    batch_size: int = Field(ge=1, le=4096)
    schedule: Literal["plateau", "constant", "cosine", "one_cycle"]
    class_weight: Literal["none", "balanced"]
    monitor: Literal["val_accuracy", "val_loss"]
    probe_candidate: bool
    mixed_precision: Literal["auto", "none", "float16", "bfloat16"]
    head: TransferHeadParams
    fine_tune: TransferFineTuneParams

    @model_validator(mode="after")
    def _positive_units(self):
        if any(value < 1 for value in self.dense_units):
            raise ValueError(f"dense_units must be positive layer widths or [] for none, got {self.dense_units}")
        return self

    @model_validator(mode="after")
    def _lbfgs_head_is_linear(self):
        if self.head.solver == "lbfgs" and (self.dense_units or not self.head.augment.off):
            raise ValueError("head.solver lbfgs fits a linear head (the linear probe) on the features of the"
                             " un-augmented photos: set dense_units: [] and turn head.augment off, or set"
                             " head.solver: adam")
        return self


class EvaluateParams(Section):
    batch_size: int = Field(ge=1, le=4096)
    gallery_size: int = Field(ge=1, le=100)
    ood_dir: str  # photos of none of the classes; "" turns the out-of-class evaluation off


class PredictNewParams(Section):
    model: Literal["cnn", "transfer", "best"]
    input_dir: str = Field(min_length=1)
    top_k: int = Field(ge=1, le=100)
    # A number, or auto: the threshold in the model card, set on the calibration split for target_coverage.
    min_confidence: float | str
    target_coverage: float = Field(gt=0, le=1)
    batch_size: int = Field(ge=1, le=4096)
    figure_max_images: int = Field(ge=1, le=500)

    @field_validator("min_confidence", mode="plain")
    @classmethod
    def _number_or_auto(cls, value):
        if value == "auto" or (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1):
            return value
        raise ValueError("must be a number from 0 to 1, or auto (the threshold in the model card)")


class AuditParams(Section):
    folds: int = Field(ge=2, le=20)  # of the cross-validated classifier that scores each train and val photo
    # cleanlab's find_label_issues filter_by: which photos count as label issues.
    filter_by: Literal["prune_by_class", "prune_by_noise_rate", "both", "confident_learning"]
    gallery_size: int = Field(ge=1, le=100)  # top suspects drawn in reports/audit/suspects.png


class ServeParams(Section):
    host: str = Field(min_length=1)
    max_upload_bytes: int = Field(ge=1024)


class ExportParams(Section):
    model: Literal["cnn", "transfer", "best"]
    formats: list[Literal["tflite", "onnx"]] = Field(min_length=1)
    quantization: Literal["float16", "dynamic", "int8"]  # of the TFLite file
    onnx_quantization: Literal["none", "int8"]  # int8 adds <model>.int8.onnx beside the float32 file
    calibration_images: int = Field(ge=1, le=100_000)  # train photos an INT8 file is calibrated on
    min_agreement: float = Field(gt=0, le=1)  # least top-1 agreement of each float file with Keras on the test split
    max_accuracy_drop: float = Field(ge=0, le=1)  # most test accuracy an INT8 file may lose against Keras

    @field_validator("formats")
    @classmethod
    def _each_format_once(cls, formats):
        if len(set(formats)) != len(formats):
            raise ValueError(f"formats lists a format twice: {formats}")
        return formats

    @model_validator(mode="after")
    def _onnx_quantization_needs_onnx(self):
        if self.onnx_quantization != "none" and "onnx" not in self.formats:
            raise ValueError(f"onnx_quantization {self.onnx_quantization} quantises the ONNX file, but formats"
                             f" {self.formats} has no onnx: add onnx to formats, or set onnx_quantization to none")
        return self


class PipelineParams(Section):
    """Every section a stage reads."""
    seed: int = Field(ge=0)
    distribution: Literal["auto", "none"]
    data: DataParams
    resize: ResizeParams
    split: SplitParams
    train_cnn: TrainCnnParams
    train_transfer: TrainTransferParams
    evaluate: EvaluateParams
    predict_new: PredictNewParams
    audit: AuditParams
    serve: ServeParams
    export: ExportParams


class Params(PipelineParams):
    """params.yaml: the pipeline's sections and the search over them (tune)."""
    tune: TuneParams

    @model_validator(mode="after")
    def _search_space_names_params(self):
        check_space(self.tune.space, self.model_dump(mode="json", exclude={"tune"}), PipelineParams, _describe)
        return self


def _old_cnn_keys(raw) -> list[str]:
    """A message for each key of train_cnn's old flat layout in a loaded params file."""
    section = raw.get("train_cnn") if isinstance(raw, dict) else None
    items = section.items() if isinstance(section, dict) else ()
    return [message for key, value in items if (message := old_cnn_key(key, value))]


def _describe(error: dict) -> str:
    key = ".".join(str(part) for part in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if not key:  # a check across sections, whose message names its keys
        return message
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key (check its spelling; see the comments in params.yaml)"
    if error["type"] == "missing":
        return f"{key}: missing (every key in params.yaml is required)"
    if error["type"] == "literal_error":
        return f"{key} = {error['input']!r}: {message}"
    if "input" in error and not isinstance(error["input"], dict):
        return f"{key} = {error['input']!r}: {message}"
    return f"{key}: {message}"


def load_params(path: Path | str = PARAMS_FILE) -> Params:
    """Read params.yaml and validate every key; raise UserError naming each bad key."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} not found: run the stages from the repository root, where params.yaml lives.")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UserError(f"{path} is not valid YAML: {error}") from None
    old_keys = _old_cnn_keys(raw)
    if old_keys:
        problems = "\n".join(f"  - {message}" for message in old_keys)
        raise UserError(f"{path} has {len(old_keys)} train_cnn key(s) of the old flat layout:\n{problems}")
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        problems = "\n".join(f"  - {_describe(item)}" for item in error.errors())
        raise UserError(f"{path} has {error.error_count()} invalid value(s):\n{problems}") from None
