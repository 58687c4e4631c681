"""params.yaml's `tune` section: the search of scripts/tune.py, and the check of its space against the params.

Each key of tune.space must be a param of the pipeline (outside tune) that
accepts every value at the edges of its dimension, so that a misspelt key or
an impossible range fails when the search starts, by name, instead of making
every trial fail.
"""

from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# As params.Section: a misspelt key is an error, not a silent default.
STRICT = ConfigDict(extra="forbid", frozen=True)


class SearchDimension(BaseModel):
    """One entry of tune.space: the values a trial may give one params.yaml key."""

    model_config = STRICT

    type: Literal["float", "int", "categorical"]
    low: float | None = None  # float and int: the range, both ends included
    high: float | None = None
    log: bool = False  # float and int: draw on a log scale (learning rates, weight decays)
    step: float | None = None  # float and int: only multiples of it above low (int: 1 if not given)
    # categorical: the values, each a number, string or boolean (Optuna stores no lists)
    choices: list[bool | int | float | str] | None = None

    @model_validator(mode="after")
    def _fits_its_type(self):
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical dimension needs choices: a list of at least one value")
            if any(value is not None for value in (self.low, self.high, self.step)) or self.log:
                raise ValueError("a categorical dimension takes only choices (no low, high, step or log)")
            return self
        if self.choices is not None:
            raise ValueError(f"choices belong to type categorical, not {self.type}")
        if self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"a {self.type} dimension needs low < high, got low {self.low} and high {self.high}")
        if self.type == "int" and not all(float(value).is_integer() for value in (self.low, self.high)):
            raise ValueError(f"an int dimension needs whole low and high, got {self.low} and {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"log needs low > 0, got {self.low}")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined (Optuna draws a log scale without steps)")
        if self.step is not None and not 0 < self.step <= self.high - self.low:
            raise ValueError(f"step must be above 0 and at most high - low, got {self.step}")
        return self

    def values(self) -> list:
        """The values at the edges of the dimension, each of which must be a valid param."""
        if self.type == "categorical":
            return list(self.choices)
        cast = int if self.type == "int" else float
        return [cast(self.low), cast(self.high)]


class TuneParams(BaseModel):
    """The hyperparameter search of scripts/tune.py. No stage reads it, so editing it reruns nothing."""

    model_config = STRICT

    stage: Literal["train_cnn", "train_transfer"]
    metric: Literal["val_accuracy", "val_loss"]  # from the stage's train.json and its epochs: never a test metric
    direction: Literal["maximize", "minimize"]
    n_trials: int = Field(ge=1, le=100_000)  # complete and pruned trials of the study, over every worker
    timeout: int = Field(ge=0)  # seconds after which a worker starts no new trial; 0: none
    sampler: Literal["tpe", "random"]
    pruner: Literal["median", "successive_halving", "none"]
    startup_trials: int = Field(ge=0)  # trials finished before the pruner prunes anything (median)
    warmup_epochs: int = Field(ge=0)  # epochs of each trial before it can be pruned
    study_name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")  # also the prefix of experiment names
    storage: str = Field(min_length=1)  # sqlite:///path or postgresql://...; TUNE_STORAGE overrides it
    seed: int = Field(ge=0)  # of the sampler
    space: dict[str, SearchDimension] = Field(min_length=1)

    @model_validator(mode="after")
    def _direction_suits_metric(self):
        natural = "maximize" if self.metric == "val_accuracy" else "minimize"
        if self.direction != natural:
            raise ValueError(f"direction {self.direction} would search for the worst {self.metric}: use {natural}")
        return self

    @field_validator("storage")
    @classmethod
    def _known_storage(cls, url):
        if not url.startswith(("sqlite:///", "postgresql://", "postgresql+", "mysql://", "mysql+")):
            raise ValueError(f"{url!r} is not a database URL: use sqlite:///path/study.db (one machine) or"
                             " postgresql://user:password@host/database (several)")
        return url


def check_space(space: dict[str, SearchDimension], pipeline: dict, schema: type[BaseModel],
                describe: Callable) -> None:
    """Raise ValueError naming each key of `space` that does not fit the pipeline's params (`pipeline`, as
    plain data): a key that is not a param, a float range on a whole-number param, or an edge value that
    `schema` (the pipeline's) refuses, with `describe`'s words for why."""
    problems = []
    for key, dimension in space.items():
        if key == "tune" or key.startswith("tune."):
            problems.append(f"tune.space.{key}: the search cannot tune its own settings")
            continue
        *parents, name = key.split(".")
        current = pipeline
        for parent in parents:
            current = current.get(parent) if isinstance(current, dict) else None
        if not isinstance(current, dict) or name not in current or isinstance(current[name], dict):
            problems.append(f"tune.space.{key}: no such param in params.yaml (a dotted key of a value,"
                            " e.g. train_transfer.fine_tune.learning_rate)")
            continue
        if dimension.type == "float" and isinstance(current[name], int) and not isinstance(current[name], bool):
            problems.append(f"tune.space.{key}: {key} is a whole number: use type int")
            continue
        for value in dimension.values():
            try:
                schema.model_validate(with_value(pipeline, key, value))
            except ValidationError as error:
                reasons = "; ".join(describe(item) for item in error.errors())
                problems.append(f"tune.space.{key}: the value {value!r} is not a valid {key} ({reasons})")
    if problems:
        raise ValueError("\n  - ".join(problems))


def with_value(raw: dict, dotted_key: str, value) -> dict:
    """A deep copy of the plain-data params `raw` with one dotted key set to `value`."""
    import copy

    changed = copy.deepcopy(raw)
    *parents, name = dotted_key.split(".")
    target = changed
    for parent in parents:
        target = target[parent]
    target[name] = value
    return changed
