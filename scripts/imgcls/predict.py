"""Classify new photos with a trained model: shared by predict_new, serve and export.

A new photo goes through `decode_image` with the geometry written in the model
card (size, aspect policy and stretch, background, pixel limit), so the model sees it
exactly as it saw its training images. A prediction whose top probability is
below `min_confidence` is reported as `unknown` rather than forced into a class:
a photo of something outside the classes must not come out as confident gear.
`min_confidence: auto` takes the threshold the trainer set on the calibration
split and wrote in the model card (imgcls/calibration.py).
"""

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgcls.dataset import CLASSES_FILE, MODELS_DIR, NO_VALIDATION
from imgcls.errors import UserError
from imgcls.images import decode_image
from imgcls.modelio import MODEL_NAMES, PRODUCED_BY, load_card
from imgcls.runtimes import RUNTIMES, open_model
from imgcls.sources import JUNK_NAMES

MODEL_CHOICES = (*MODEL_NAMES, "best")
UNKNOWN = "unknown"


def _trained_models(models_dir: Path) -> list[str]:
    return [name for name in MODEL_NAMES if (models_dir / f"{name}.keras").exists()]


def choose_model(choice: str, models_dir: Path = MODELS_DIR) -> Path:
    """Path of the model named by `choice`: "cnn", "transfer", "best" (higher val_accuracy), or the path of a
    .keras file or of an exported .onnx or .tflite file."""
    models_dir = Path(models_dir)
    if choice not in MODEL_CHOICES:
        path = Path(choice)
        if path.suffix not in RUNTIMES:
            raise UserError(
                f"model {choice!r} is neither one of {', '.join(MODEL_CHOICES)} nor a {', '.join(RUNTIMES)} file:"
                " give a model name or path."
            )
        if not path.exists():
            raise UserError(f"{path} not found: give the path of a trained model file (its .json card beside it).")
        return path
    if choice != "best":
        path = models_dir / f"{choice}.keras"
        if not path.exists():
            raise UserError(f"{path} not found: train it with `dvc repro {PRODUCED_BY[choice]}`, or choose another model.")
        return path
    trained = _trained_models(models_dir)
    if not trained:
        stages = " or ".join(f"`dvc repro {PRODUCED_BY[name]}`" for name in MODEL_NAMES)
        raise UserError(f"no trained model in {models_dir}/ to choose the best from: run {stages}.")
    scores = {}
    for name in trained:
        card = load_card(models_dir / f"{name}.keras")
        if trained_without_validation(card):
            raise UserError(f"{models_dir / name}.keras was trained without a validation split (split.val: 0), so"
                            f" 'best' cannot rank it: name the model (e.g. predict_new.model: {name})")
        if not isinstance(card.get("val_accuracy"), (int, float)):
            raise UserError(
                f"{models_dir / name}.json has no numeric val_accuracy, so 'best' cannot rank it:"
                f" retrain it (`dvc repro {PRODUCED_BY[name]}`) or choose the model by name."
            )
        scores[name] = float(card["val_accuracy"])
    # max() keeps the first of equal scores, so a tie picks the same model every time.
    return models_dir / f"{max(trained, key=lambda name: scores[name])}.keras"


def iter_images(inputs: list[Path | str], class_names: list[str]) -> Iterator[tuple[Path, str]]:
    """(file, true label or "") for every file in the given folders and files, found lazily in a stable order.

    A folder is walked depth first with each directory's names sorted: the order of
    sorted(folder.rglob("*")), without listing the whole tree first. A file inside a
    sub-folder named after a class is labelled with that class. Hidden files and
    folders and operating-system litter are skipped.
    """
    found = False
    for entry in map(Path, inputs):
        if entry.is_file():
            found = True
            yield entry, ""
        elif entry.is_dir():
            for found_file in _walk(entry, "", set(class_names), top=True):
                found = True
                yield found_file
        else:
            raise UserError(f"{entry} not found: give existing image files or folders of images.")
    if not found:
        raise UserError(f"no files in {', '.join(map(str, inputs))}: put the photos to classify there.")


def _walk(folder: Path, label: str, class_names: set[str], top: bool) -> Iterator[tuple[Path, str]]:
    try:
        with os.scandir(folder) as scan:
            entries = sorted(scan, key=lambda entry: entry.name)
    except PermissionError:  # as rglob: a sub-folder that cannot be listed is passed over
        return
    for entry in entries:
        if entry.name in JUNK_NAMES or entry.name.startswith("."):
            continue
        path = folder / entry.name
        if entry.is_dir(follow_symlinks=False):  # as rglob: a link to a folder is not followed (no loops)
            yield from _walk(path, (entry.name if entry.name in class_names else "") if top else label, class_names, False)
        elif entry.is_file():
            yield path, label


def find_images(inputs: list[Path | str], class_names: list[str]) -> list[tuple[Path, str]]:
    """iter_images as a list."""
    return list(iter_images(inputs, class_names))


def decode_for_model(source, card: dict) -> np.ndarray:
    """(size, size, 3) uint8 pixels of a path, bytes or file, decoded with the card's geometry; raises images.BadImage."""
    return decode_image(
        source,
        size=int(card["image_size"]),
        aspect=card["aspect"],
        background=tuple(card["background"]),
        max_pixels=int(card["max_pixels"]),
        max_stretch=float(card.get("max_stretch", 1.0)),  # cards from before the param padded only
    ).pixels


def trained_without_validation(card: dict) -> bool:
    """Whether the model was trained without a validation split (split.val 0): it then has no validation
    accuracy, temperature or `unknown` threshold (calibration.calibrate says so in the card)."""
    return str(card.get("validation", "")).startswith(NO_VALIDATION)


def resolve_min_confidence(setting: float | str, card: dict, model_file: Path | str) -> float:
    """The `unknown` threshold: a number as given, or for "auto" the one the model card records."""
    if setting != "auto":
        return float(setting)
    threshold = card.get("confidence_threshold")
    if trained_without_validation(card):
        raise UserError(f"{model_file} was trained without a validation split (split.val: 0), so it has no"
                        " `unknown` threshold for min_confidence 'auto': set predict_new.min_confidence to a number"
                        " from 0 to 1, or set split.val above 0 and retrain it")
    if not isinstance(threshold, (int, float)):
        stage = PRODUCED_BY.get(Path(model_file).stem)
        retrain = f"retrain it (`dvc repro {stage}`)" if stage else "retrain it with this project's trainers"
        raise UserError(f"{model_file}'s card has no confidence_threshold, so min_confidence 'auto' cannot be used:"
                        f" {retrain}, or set predict_new.min_confidence to a number from 0 to 1.")
    return float(threshold)


@dataclass(frozen=True)
class Prediction:
    predicted: str  # the class, or "unknown" when confidence < min_confidence
    best_guess: str  # the most probable class, even when unknown
    confidence: float  # its probability
    unknown: bool
    top: list[tuple[str, float]]  # the top-k classes with their probabilities, most probable first

    def as_json(self) -> dict:
        return {
            "predicted": self.predicted,
            "best_guess": self.best_guess,
            "confidence": self.confidence,
            "unknown": self.unknown,
            "top_k": [{"class": name, "probability": probability} for name, probability in self.top],
        }


class Classifier:
    """A loaded model with its card: decodes photos the card's way and classifies them in batches.

    The model file is a .keras model or an exported .onnx or .tflite file; `runtime` runs it (imgcls.runtimes).
    """

    def __init__(self, model_file: Path | str, top_k: int = 3, min_confidence: float | str = 0.5, batch_size: int = 32,
                 check_classes: bool | None = None):
        self.model_file = Path(model_file)
        # Inside the project, a model trained on other classes than data/split/classes.txt is stale;
        # outside it (a copied model), the card alone says what the outputs mean.
        if check_classes is None:
            check_classes = CLASSES_FILE.exists()
        self.runtime, self.card = open_model(self.model_file, check_classes=check_classes)
        self.name = self.card.get("name", self.model_file.stem)
        self.class_names = list(self.card["class_names"])
        self.image_size = int(self.card["image_size"])
        self.top_k = min(top_k, len(self.class_names))
        self.min_confidence = resolve_min_confidence(min_confidence, self.card, self.model_file)
        self.batch_size = batch_size
        # One inference at a time: the server calls in from several threads, and on a
        # CPU the backend already uses every core for one batch.
        self._lock = threading.Lock()
        # The first call builds the backend's predict function; do it now, not on the first request.
        self.probabilities(np.zeros((1, self.image_size, self.image_size, 3), dtype=np.uint8))

    def decode(self, source) -> np.ndarray:
        """(size, size, 3) uint8 pixels of a path, bytes or file; raises images.BadImage."""
        return decode_for_model(source, self.card)

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """Softmax outputs (N, classes) for (N, size, size, 3) pixels, in fixed-size batches."""
        pixels = np.asarray(pixels, dtype=np.float32)
        outputs = []
        with self._lock:
            for start in range(0, len(pixels), self.batch_size):
                batch = pixels[start:start + self.batch_size]
                count = len(batch)
                # A short batch is padded to the next power of two (at most batch_size): the backend
                # compiles its predict function once per input shape, so few shapes mean few compilations.
                padded = min(self.batch_size, 1 << (count - 1).bit_length())
                if padded > count:
                    batch = np.concatenate([batch, np.zeros((padded - count, *batch.shape[1:]), np.float32)])
                outputs.append(np.asarray(self.runtime.predict(batch))[:count])
        if not outputs:
            return np.zeros((0, len(self.class_names)), dtype=np.float32)
        return np.concatenate(outputs)

    def explain(self, probabilities: np.ndarray) -> list[Prediction]:
        """Turn softmax rows into top-k predictions with the unknown flag."""
        predictions = []
        for row in np.asarray(probabilities, dtype=np.float64):
            order = np.argsort(-row, kind="stable")[: self.top_k]
            top = [(self.class_names[index], float(row[index])) for index in order]
            best_guess, confidence = top[0]
            unknown = confidence < self.min_confidence
            predictions.append(Prediction(UNKNOWN if unknown else best_guess, best_guess, confidence, unknown, top))
        return predictions

    def classify(self, pixels: np.ndarray) -> list[Prediction]:
        return self.explain(self.probabilities(pixels))
