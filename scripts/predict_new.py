"""Stage `predict_new`: classify a folder of new photos and draw them with their predictions.

As a stage it reads predict_new.* in params.yaml (by default the held-out photos
in data/holdout, which no model has seen) and writes reports/predictions.csv and
reports/predictions.png. The same script is a command-line tool:

    python scripts/predict_new.py --images DIR_OR_FILES... --out predictions.csv [--model cnn|transfer|best|PATH]

A folder may hold the photos directly or in class sub-folders (then the CSV has
their true labels). A file that is not a usable image becomes a row with its
error; it never stops the batch.
"""

import argparse
import concurrent.futures
import math
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

from imgcls import device
from imgcls.dataset import REPORTS_DIR, atomic_path, write_csv
from imgcls.errors import UserError, run_stage
from imgcls.images import BadImage
from imgcls.params import load_params
from imgcls.modelio import load_card
from imgcls.predict import MODEL_CHOICES, Classifier, choose_model, find_images

PREDICTIONS_FILE = REPORTS_DIR / "predictions.csv"
# Photos decoded ahead of the model: enough to keep it busy, few enough to bound memory.
DECODE_AHEAD_BATCHES = 4


def predict_files(classifier: Classifier, files: list[tuple[Path, str]], workers: int = 2):
    """Classify the files in batches; return (CSV rows, decoded pixels of each readable file or None)."""
    top_columns = {}
    for rank in range(1, classifier.top_k + 1):
        top_columns |= {f"top{rank}_class": "", f"top{rank}_probability": np.nan}
    rows, pixels_of = [], []

    def decode(path):
        try:
            return classifier.decode(path), ""
        except BadImage as error:
            return None, str(error)
        except OSError as error:  # unreadable file: permissions, a vanished file
            return None, f"cannot read: {error.strerror or error}"

    chunk = classifier.batch_size * DECODE_AHEAD_BATCHES
    # Pillow releases the GIL while decoding, so threads overlap decoding with inference.
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as executor:
        for start in range(0, len(files), chunk):
            part = files[start:start + chunk]
            decoded = list(executor.map(decode, [path for path, _ in part]))
            readable = [pixels for pixels, _ in decoded if pixels is not None]
            predictions = iter(classifier.classify(np.stack(readable)) if readable else [])
            for (path, label), (pixels, error) in zip(part, decoded):
                row = {"image": str(path), "true_label": label, "predicted": "", "confidence": np.nan,
                       "unknown": "", "best_guess": "", **top_columns, "error": error}
                if pixels is not None:
                    prediction = next(predictions)
                    row |= {"predicted": prediction.predicted, "confidence": prediction.confidence,
                            "unknown": prediction.unknown, "best_guess": prediction.best_guess}
                    for rank, (name, probability) in enumerate(prediction.top, start=1):
                        row |= {f"top{rank}_class": name, f"top{rank}_probability": probability}
                rows.append(row)
                pixels_of.append(pixels)
    return pd.DataFrame(rows), pixels_of


def draw_grid(frame: pd.DataFrame, pixels_of: list, path: Path, max_images: int, min_confidence: float) -> None:
    """Each readable photo as the model saw it, its predicted class and a bar of its top-k probabilities."""
    # Imported here: pyplot must load after the file-only Agg backend is chosen.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [index for index, pixels in enumerate(pixels_of) if pixels is not None][:max_images]
    top_k = sum(1 for column in frame.columns if column.endswith("_class") and column.startswith("top"))
    columns = min(6, max(1, len(shown)))
    lines = max(1, math.ceil(len(shown) / columns))
    figure = plt.figure(figsize=(2.6 * columns, (2.6 + 0.28 * top_k + 0.5) * lines), layout="constrained")
    cells = figure.subfigures(lines, columns, squeeze=False)
    for cell in cells.flat:
        cell.set_facecolor("white")
    for cell, index in zip(cells.flat, shown):
        row = frame.iloc[index]
        image_axes, bar_axes = cell.subplots(2, 1, height_ratios=[2.6, 0.28 * top_k + 0.2])
        image_axes.imshow(pixels_of[index])
        image_axes.set_xticks([])
        image_axes.set_yticks([])
        if row["unknown"]:
            title, colour = f"unknown\n(maybe {row['best_guess']})", "darkorange"
        else:
            title = row["predicted"]
            colour = "black" if not row["true_label"] else "green" if row["predicted"] == row["true_label"] else "red"
        if row["true_label"] and row["predicted"] != row["true_label"]:
            title += f"\ntrue: {row['true_label']}"
        image_axes.set_title(title, fontsize=9, color=colour)
        names = [row[f"top{rank}_class"] for rank in range(1, top_k + 1)][::-1]
        values = [row[f"top{rank}_probability"] for rank in range(1, top_k + 1)][::-1]
        bar_axes.barh(range(top_k), values, color=["tab:blue"] * (top_k - 1) + ["tab:orange" if row["unknown"] else "tab:green"])
        bar_axes.set_yticks(range(top_k), [textwrap.shorten(name, 18, placeholder="…") for name in names], fontsize=7)
        bar_axes.set_xlim(0, 1)
        bar_axes.axvline(min_confidence, color="grey", linestyle=":", linewidth=1)
        bar_axes.tick_params(axis="x", labelsize=6)
        for position, value in enumerate(values):
            bar_axes.text(min(value, 0.75) + 0.02, position, f"{value:.0%}", va="center", fontsize=6)
    for cell in list(cells.flat)[len(shown):]:
        cell.subplots().axis("off")
    errors = int((frame["error"] != "").sum())
    heading = f"{len(shown)} of {len(frame)} images" + (f"; {errors} unreadable, listed in the CSV" if errors else "")
    figure.suptitle(f"Predictions ({heading}); dotted line: min_confidence {min_confidence:g}", fontsize=10)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    plt.close(figure)


def summary(frame: pd.DataFrame) -> str:
    readable = frame[frame["error"] == ""]
    labelled = readable[readable["true_label"] != ""]
    parts = [f"{len(readable)} classified", f"{int((readable['unknown'] == True).sum())} unknown"]  # noqa: E712
    if len(frame) > len(readable):
        parts.append(f"{len(frame) - len(readable)} unreadable")
    if len(labelled):
        correct = int((labelled["predicted"] == labelled["true_label"]).sum())
        parts.append(f"{correct}/{len(labelled)} labelled images right")
    return ", ".join(parts)


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", nargs="+", help="image files and/or folders (default: predict_new.input_dir)")
    parser.add_argument("--out", help="predictions CSV (default: reports/predictions.csv, or predictions.csv with --images);"
                        " the figure goes beside it as .png")
    parser.add_argument("--model", help="cnn, transfer, best or a .keras path (default: predict_new.model)")
    parser.add_argument("--top-k", type=int, help="classes listed per image (default: predict_new.top_k)")
    parser.add_argument("--min-confidence", help="below it a photo is 'unknown': a number from 0 to 1, or auto (the"
                        " threshold in the model card); default: predict_new.min_confidence")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    arguments = parse_arguments(argv)
    settings = load_params().predict_new
    device.choose_backend()
    top_k = settings.top_k if arguments.top_k is None else arguments.top_k
    min_confidence = settings.min_confidence if arguments.min_confidence is None else arguments.min_confidence
    if top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {top_k}.")
    if min_confidence != "auto":
        try:
            min_confidence = float(min_confidence)
        except ValueError:
            min_confidence = -1.0
        if not 0 <= min_confidence <= 1:
            raise UserError(f"--min-confidence must be a number between 0 and 1 or auto, got {arguments.min_confidence}.")
    # Photos given on the command line are not the stage's input: keep its report out of their way.
    out = Path(arguments.out or ("predictions.csv" if arguments.images else PREDICTIONS_FILE))
    if out.suffix.lower() != ".csv":
        raise UserError(f"--out {out}: give a .csv file name; the figure is written beside it as {out.stem}.png.")

    inputs = arguments.images or [settings.input_dir]
    if not arguments.images and not Path(settings.input_dir).exists():
        raise UserError(
            f"predict_new.input_dir = {settings.input_dir!r} does not exist: put new photos there"
            " (directly or in class sub-folders) or point the param at a folder of photos."
        )
    model_file = choose_model(arguments.model or settings.model)
    card = load_card(model_file)
    files = find_images(inputs, card["class_names"])  # before loading the model: bad paths fail fast
    # A model given by path may come from elsewhere: only a project model must match classes.txt.
    classifier = Classifier(model_file, top_k=top_k, min_confidence=min_confidence, batch_size=settings.batch_size,
                            check_classes=None if arguments.model in (None, *MODEL_CHOICES) else False)
    frame, pixels_of = predict_files(classifier, files)
    write_csv(out, frame)
    figure = out.with_suffix(".png")
    draw_grid(frame, pixels_of, figure, settings.figure_max_images, classifier.min_confidence)
    print(f"predict_new with {model_file}: {summary(frame)}; wrote {out} and {figure}")


if __name__ == "__main__":
    run_stage(main)
