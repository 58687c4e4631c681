"""Saving and loading trained models together with what is needed to use them.

A model is two files under models/:
  <name>.keras  the native Keras model. Its input is (size, size, 3) RGB pixels
                as floats in 0..255, exactly the arrays `resize` writes; every
                preprocessing step (rescaling, the base network's own
                normalisation, resizing to its input size) is inside the model.
                Its output is softmax probabilities over the classes, calibrated
                by a fitted temperature (imgcls/calibration.py).
  <name>.json   the model card: class names in output order, the image
                geometry new photos must be brought to, validation accuracy,
                the temperature and the `unknown` confidence threshold.
Both are written atomically, so an interrupted stage never leaves a model
that a later stage would load.

Keras is imported only inside the functions that load a .keras file: serving
an exported model (runtimes.py) reads the cards through this module without
Keras installed.
"""

import json
import os
from pathlib import Path

from imgcls.dataset import MODELS_DIR, atomic_path, load_class_names
from imgcls.device import compile_on_jax
from imgcls.errors import UserError

MODEL_NAMES = ("cnn", "transfer")
PRODUCED_BY = {"cnn": "train_cnn", "transfer": "train_transfer"}


def model_path(name: str) -> Path:
    return MODELS_DIR / f"{name}.keras"


def card_path(name: str) -> Path:
    return MODELS_DIR / f"{name}.json"


def save_model(model, name: str, card: dict) -> None:
    """Write models/<name>.keras and models/<name>.json, each atomically."""
    with atomic_path(model_path(name)) as temporary:
        os.remove(temporary)  # Keras refuses to overwrite the empty placeholder
        model.save(temporary)
    with atomic_path(card_path(name)) as temporary:
        temporary.write_text(json.dumps(card, indent=2) + "\n")


def uncompiled_copy(model):
    """The same architecture and weights, with no optimizer, loss or learning-rate schedule attached."""
    # from_config (unlike clone_model) carries no compile settings over.
    clone = compile_on_jax(model.__class__.from_config(model.get_config()))
    clone.set_weights(model.get_weights())
    return clone


def save_trained_model(model, name: str, card: dict) -> None:
    """Save models/<name>.keras (+ card) atomically, without optimizer state.

    The weights are copied into a fresh, uncompiled copy: the saved file then
    holds no optimizer (smaller, and it loads without the training code's
    custom learning-rate schedule), only what prediction needs.
    """
    save_model(uncompiled_copy(model), name, card)


def load_card(model_file: Path | str) -> dict:
    model_file = Path(model_file)
    card_file = model_file.with_suffix(".json")
    if not card_file.exists():
        raise UserError(f"{card_file} not found: a model needs its card beside it; retrain it with its stage.")
    return json.loads(card_file.read_text())


def require_model_file(model_file: Path) -> dict:
    """The card of `model_file`, after checking that the file exists."""
    if not model_file.exists():
        stage = PRODUCED_BY.get(model_file.stem)
        hint = f"run `dvc repro {stage}`" if stage else "check the path"
        raise UserError(f"{model_file} not found: {hint}.")
    return load_card(model_file)


def check_card(model_file: Path, card: dict, outputs: int, check_classes: bool) -> None:
    """Refuse a model whose classes differ from data/split/classes.txt, or whose outputs differ from its card."""
    name = card.get("name", model_file.stem)
    if check_classes:
        expected = load_class_names()
        if card["class_names"] != expected:
            raise UserError(
                f"{model_file} was trained on classes {card['class_names']}, but data/split/classes.txt lists"
                f" {expected}: retrain it (`dvc repro {PRODUCED_BY.get(name, 'train_cnn')}`)."
            )
    if outputs != len(card["class_names"]):
        raise UserError(f"{model_file} has {outputs} outputs but its card lists {len(card['class_names'])} classes: retrain it.")


def load_keras(model_file: Path | str):
    """keras.saving.load_model in safe_mode, with the project's own layers registered first."""
    # Imported here, not at the top: the serving path must run without Keras (see the module docstring).
    import keras

    import imgcls.layers  # noqa: F401  (registers the Temperature layer the trainers add)

    # safe_mode refuses models that would run arbitrary Python code (Lambda layers) on load.
    return compile_on_jax(keras.saving.load_model(model_file, safe_mode=True))


def load_model(model_file: Path | str, check_classes: bool = True):
    """Load a saved model and its card; refuse a model whose classes differ from data/split/classes.txt."""
    model_file = Path(model_file)
    card = require_model_file(model_file)
    model = load_keras(model_file)
    check_card(model_file, card, model.output_shape[-1], check_classes)
    return model, card
