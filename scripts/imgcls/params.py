"""Load and validate params.yaml.

Every stage calls `load_params()` first, so a typo or an out-of-range value
stops the pipeline before any work is done, with a message that names the key.
The schema below is the single description of every knob; params.yaml carries
the comments a user reads.
"""

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from imgcls.errors import UserError

PARAMS_FILE = Path("params.yaml")


class Section(BaseModel):
    # extra="forbid" turns a misspelt key into an error instead of a silent default.
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(Section):
    source: str = Field(min_length=1)
    limit_per_class: int = Field(ge=0)
    seed: int = Field(ge=0)


class ResizeParams(Section):
    image_size: int = Field(ge=8, le=1024)
    aspect: Literal["pad", "center_crop", "stretch"]
    background: tuple[int, int, int]
    on_error: Literal["skip", "fail"]
    max_pixels: int = Field(ge=1)
    workers: int = Field(ge=0)

    @model_validator(mode="after")
    def _background_is_rgb(self):
        if not all(0 <= channel <= 255 for channel in self.background):
            raise ValueError("background must be three integers in 0..255, e.g. [255, 255, 255]")
        return self


class SplitParams(Section):
    seed: int = Field(ge=0)
    train: float = Field(gt=0, lt=1)
    val: float = Field(gt=0, lt=1)
    test: float = Field(gt=0, lt=1)
    holdout_per_class: int = Field(ge=0)

    @model_validator(mode="after")
    def _fractions_sum_to_one(self):
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(
                f"train + val + test must sum to 1, got {self.train} + {self.val} + {self.test} = {total:g}"
            )
        return self


class Params(Section):
    seed: int = Field(ge=0)
    data: DataParams
    resize: ResizeParams
    split: SplitParams


def _describe(error: dict) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "(top level)"
    message = error["msg"].removeprefix("Value error, ")
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
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        problems = "\n".join(f"  - {_describe(item)}" for item in error.errors())
        raise UserError(f"{path} has {error.error_count()} invalid value(s):\n{problems}") from None
