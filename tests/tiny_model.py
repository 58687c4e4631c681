"""A real, tiny trained model for the tests of predict_new, serve and export.

It follows the model contract of imgcls.modelio (pixels 0..255 in, rescaling
inside, softmax out, card beside it) without waiting for the training stages:
a few epochs of real Keras training on the generated, easily learnt images.
"""

import contextlib
from pathlib import Path

import numpy as np

from imgcls.images import decode_image
from imgcls.modelio import save_model

CARD_GEOMETRY = {"aspect": "pad", "background": [255, 255, 255], "max_pixels": 89_478_485}


def train_tiny_model(root: Path, pixels: np.ndarray, labels: np.ndarray, class_names: list[str], name: str = "cnn",
                     val_accuracy: float | None = None, epochs: int = 60, seed: int = 0) -> dict:
    """Train on (N, S, S, 3) uint8 pixels and save root/models/<name>.keras + .json; return the card."""
    import keras

    keras.utils.set_random_seed(seed)
    size = pixels.shape[1]
    model = keras.Sequential([
        keras.Input((size, size, 3)),
        keras.layers.Rescaling(1 / 255),
        keras.layers.Conv2D(8, 3, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(len(class_names), activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(pixels.astype(np.float32), labels, epochs=epochs, batch_size=16, verbose=0)
    accuracy = history.history["accuracy"][-1] if val_accuracy is None else val_accuracy
    # No temperature fitted (1 changes nothing); a fixed `unknown` threshold for min_confidence: auto.
    card = {"name": name, "class_names": list(class_names), "image_size": int(size), **CARD_GEOMETRY,
            "val_accuracy": float(accuracy), "temperature": 1.0, "confidence_threshold": 0.5}
    with contextlib.chdir(root):
        save_model(model, name, card)
    return card


def train_on_project(root: Path, name: str = "cnn", val_accuracy: float | None = None) -> dict:
    """Train on the train split of a project whose data stages ran (the `prepared` fixture)."""
    from imgcls.dataset import load_class_names, load_split

    with contextlib.chdir(root):
        pixels, labels, _ = load_split("train", 32)
        class_names = load_class_names()
    return train_tiny_model(root, pixels, labels, class_names, name=name, val_accuracy=val_accuracy)


def train_on_folder(root: Path, dataset: Path, size: int = 32, name: str = "cnn") -> dict:
    """Train on a folder of <class>/<image> files, decoded exactly as resize would."""
    class_names = sorted(folder.name for folder in dataset.iterdir() if folder.is_dir())
    pixels, labels = [], []
    for index, class_name in enumerate(class_names):
        for path in sorted((dataset / class_name).iterdir()):
            pixels.append(decode_image(path, size).pixels)
            labels.append(index)
    return train_tiny_model(root, np.stack(pixels), np.array(labels), class_names, name=name)


def copy_model(root: Path, source: str, name: str, val_accuracy: float) -> None:
    """Save models/<source> again as models/<name> with another val_accuracy: a second model without training."""
    import json
    import shutil

    models = root / "models"
    shutil.copy(models / f"{source}.keras", models / f"{name}.keras")
    card = json.loads((models / f"{source}.json").read_text())
    (models / f"{name}.json").write_text(json.dumps({**card, "name": name, "val_accuracy": val_accuracy}))
