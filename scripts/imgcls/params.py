"""Load and validate params.yaml.

Every stage calls `load_params()` first, so a typo or an out-of-range value
stops the pipeline before any work is done, with a message that names the key.
The schema below is the single description of every knob; params.yaml carries
the comments a user reads.
"""

from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from imgcls.cnn_params import TrainCnnParams, old_cnn_key
from imgcls.errors import UserError
from imgcls.sections import AugmentParams, Section, TestTimeParams
from imgcls.tune_params import TuneParams, check_space

PARAMS_FILE = Path("params.yaml")


def number_or_auto(value, low: float, high: float, auto_means: str):
    """A param that is a number from `low` to `high` or the word auto; a clear error otherwise."""
    if value == "auto" or (isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high):
        return value
    raise ValueError(f"must be a number from {low} to {high}, or auto ({auto_means})")


class DataParams(Section):
    source: str = Field(min_length=1)
    limit_per_class: int = Field(ge=0)
    seed: int = Field(ge=0)


class ResizeParams(Section):
    # One size, or a list: one array per size, and each model reads the one that suits its input size.
    image_size: int | list[int]
    aspect: Literal["pad", "center_crop", "stretch"]
    # With aspect pad: how far the short side may be lengthened, or auto (resize picks it from the photos' shapes).
    max_stretch: float | str
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

    @field_validator("max_stretch", mode="plain")
    @classmethod
    def _factor_or_auto(cls, value):
        return number_or_auto(value, 1, 10, "the shape most photos share")

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
    val: float = Field(ge=0, lt=1)  # 0: no validation split (train_cnn keeps its last epoch; see params.yaml)
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
    unfreeze: int | str  # top N layers of the base, the name of the first layer to train, or auto
    patience: int = Field(ge=0)
    augment: AugmentParams
    cached_copies: int = Field(ge=0, le=50)  # 0: every epoch runs the whole base on freshly augmented images
    warmup_epochs: int = Field(ge=0, le=100)  # epochs at a rate rising to learning_rate (optim.warmup_callbacks)
    beta_2: float = Field(gt=0, lt=1)  # Adam's decay of its running mean of squared gradients
    clip_norm: float = Field(ge=0)  # gradients rescaled to at most this global norm; 0 leaves them

    @model_validator(mode="after")
    def _unfreeze_is_positive(self):
        if isinstance(self.unfreeze, int) and self.unfreeze < 1:
            raise ValueError(f"unfreeze must be a number of layers >= 1, a layer name or auto, got {self.unfreeze}")
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
    min_improvement: float = Field(ge=0, lt=1)  # share of the best score an early stop's progress must reach
    accuracy_progress: bool  # a higher validation accuracy than ever is progress for an early stop too
    probe_candidate: bool
    ensemble_candidate: bool
    mixed_precision: Literal["auto", "none", "float16", "bfloat16"]
    head: TransferHeadParams
    fine_tune: TransferFineTuneParams
    test_time: TestTimeParams

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
        return number_or_auto(value, 0, 1, "the threshold in the model card")


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
