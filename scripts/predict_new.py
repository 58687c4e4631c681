"""Stage `predict_new`: classify a folder of new photos and draw them with their predictions.

As a stage it reads predict_new.* in params.yaml (by default the held-out photos
in data/holdout, which no model has seen) and writes reports/predictions.csv and
reports/predictions.png. The same script is a command-line tool for folders of
any size (a camera-trap dump, last month's product photos):

    python scripts/predict_new.py --images DIR_OR_FILES... [--out predictions.csv] [--model cnn|transfer|best|PATH]
                                  [--resume] [--workers N]

A folder may hold the photos directly or in class sub-folders (then the CSV has
their true labels). A file that is not a usable image becomes a row with its
error; it never stops the run. Photos are decoded by worker processes and the
CSV grows a batch at a time, so memory stays flat however many photos there
are; a stopped run keeps its rows, and `--resume` goes on from there. Given an
exported .onnx or .tflite file (`--model models/export/best.onnx`), it runs
without TensorFlow, Keras or JAX (requirements-serve.txt); without matplotlib
it writes the CSV alone.
"""

import argparse
import contextlib
import math
import os
import signal
import sys
import textwrap
import time
from pathlib import Path

from tqdm import tqdm

from imgcls import bulk, device
from imgcls.dataset import REPORTS_DIR, atomic_path
from imgcls.errors import Terminated, UserError, run_stage
from imgcls.modelio import load_card
from imgcls.params import load_params
from imgcls.predict import MODEL_CHOICES, Classifier, choose_model

PREDICTIONS_FILE = REPORTS_DIR / "predictions.csv"


def draw_grid(shown: list[tuple[dict, object]], summary: bulk.Summary, top_k: int, path: Path,
              min_confidence: float) -> None:
    """Each shown photo as the model saw it, its predicted class and a bar of its top-k probabilities."""
    # Imported here: the serving environment has no matplotlib (can_draw), and pyplot must load after Agg.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(6, max(1, len(shown)))
    lines = max(1, math.ceil(len(shown) / columns))
    figure = plt.figure(figsize=(2.6 * columns, (2.6 + 0.28 * top_k + 0.5) * lines), layout="constrained")
    cells = figure.subfigures(lines, columns, squeeze=False)
    for cell in cells.flat:
        cell.set_facecolor("white")
    for cell, (row, pixels) in zip(cells.flat, shown):
        image_axes, bar_axes = cell.subplots(2, 1, height_ratios=[2.6, 0.28 * top_k + 0.2])
        image_axes.imshow(pixels)
        image_axes.set_xticks([])
        image_axes.set_yticks([])
        unknown = row["unknown"] == "True"
        if unknown:
            title, colour = f"unknown\n(maybe {row['best_guess']})", "darkorange"
        else:
            title = row["predicted"]
            colour = "black" if not row["true_label"] else "green" if row["predicted"] == row["true_label"] else "red"
        if row["true_label"] and row["predicted"] != row["true_label"]:
            title += f"\ntrue: {row['true_label']}"
        image_axes.set_title(title, fontsize=9, color=colour)
        names = [row[f"top{rank}_class"] for rank in range(1, top_k + 1)][::-1]
        values = [float(row[f"top{rank}_probability"]) for rank in range(1, top_k + 1)][::-1]
        bar_axes.barh(range(top_k), values, color=["tab:blue"] * (top_k - 1) + ["tab:orange" if unknown else "tab:green"])
        bar_axes.set_yticks(range(top_k), [textwrap.shorten(name, 18, placeholder="…") for name in names], fontsize=7)
        bar_axes.set_xlim(0, 1)
        bar_axes.axvline(min_confidence, color="grey", linestyle=":", linewidth=1)
        bar_axes.tick_params(axis="x", labelsize=6)
        for position, value in enumerate(values):
            bar_axes.text(min(value, 0.75) + 0.02, position, f"{value:.0%}", va="center", fontsize=6)
    for cell in list(cells.flat)[len(shown):]:
        cell.subplots().axis("off")
    errors = summary.unreadable
    heading = f"{len(shown)} of {summary.rows} images" + (f"; {errors} unreadable, listed in the CSV" if errors else "")
    figure.suptitle(f"Predictions ({heading}); dotted line: min_confidence {min_confidence:g}", fontsize=10)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    plt.close(figure)


def default_workers() -> int:
    """Decoding processes: half the cores, so that the model keeps the other half; at least 1, at most 4."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    return max(1, min(4, cores // 2))


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", nargs="+", help="image files and/or folders (default: predict_new.input_dir)")
    parser.add_argument("--out", help="predictions CSV (default: reports/predictions.csv, or predictions.csv with --images);"
                        " the figure goes beside it as .png")
    parser.add_argument("--model", help="cnn, transfer, best, or the path of a .keras, .onnx or .tflite file"
                        " (default: predict_new.model)")
    parser.add_argument("--top-k", type=int, help="classes listed per image (default: predict_new.top_k)")
    parser.add_argument("--min-confidence", help="below it a photo is 'unknown': a number from 0 to 1, or auto (the"
                        " threshold in the model card); default: predict_new.min_confidence")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in the CSV (of a stopped run)"
                        " and classify only the photos it does not list yet")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="processes decoding photos (default: half the cores, 1 to 4; here %(default)s)")
    return parser.parse_args(argv)


def chosen_settings(arguments: argparse.Namespace, settings) -> tuple[int, float | str]:
    """(top_k, min_confidence): the command line's, or else params.yaml's."""
    top_k = settings.top_k if arguments.top_k is None else arguments.top_k
    min_confidence = settings.min_confidence if arguments.min_confidence is None else arguments.min_confidence
    if top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {top_k}.")
    if arguments.workers < 1:
        raise UserError(f"--workers must be at least 1, got {arguments.workers}.")
    if min_confidence != "auto":
        try:
            min_confidence = float(min_confidence)
        except ValueError:
            min_confidence = -1.0
        if not 0 <= min_confidence <= 1:
            raise UserError(f"--min-confidence must be a number between 0 and 1 or auto, got {arguments.min_confidence}.")
    return top_k, min_confidence


def output_file(arguments: argparse.Namespace) -> Path:
    # Photos given on the command line are not the stage's input: keep its report out of their way.
    out = Path(arguments.out or ("predictions.csv" if arguments.images else PREDICTIONS_FILE))
    if out.suffix.lower() != ".csv":
        raise UserError(f"--out {out}: give a .csv file name; the figure is written beside it as {out.stem}.png.")
    return out


def input_paths(arguments: argparse.Namespace, settings) -> list[str]:
    if not arguments.images and not Path(settings.input_dir).exists():
        raise UserError(
            f"predict_new.input_dir = {settings.input_dir!r} does not exist: put new photos there"
            " (directly or in class sub-folders) or point the param at a folder of photos."
        )
    return arguments.images or [settings.input_dir]


def can_draw() -> bool:
    """Whether matplotlib is there for the figure (the serving environment has none): said once if not."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: writing the CSV only, no figure.", file=sys.stderr)
        return False
    return True


@contextlib.contextmanager
def keeping_rows_when_stopped(table: bulk.PredictionTable):
    """Ctrl-C or SIGTERM stops the run with every row written so far kept (rather than the stage's "no output
    was written"): say so, and how to go on."""
    try:
        yield
    except (KeyboardInterrupt, Terminated) as stop:
        if table.file is None:
            print("\nstopped before the first photo: nothing was written.", file=sys.stderr)
        else:
            print(f"\nstopped: {table.path} keeps the {table.summary.rows} photos classified so far; the same"
                  " command with --resume goes on from there.", file=sys.stderr)
        sys.exit(130 if isinstance(stop, KeyboardInterrupt) else 128 + signal.SIGTERM)


def main(argv=None) -> None:
    arguments = parse_arguments(argv)
    settings = load_params().predict_new
    top_k, min_confidence = chosen_settings(arguments, settings)
    out, inputs = output_file(arguments), input_paths(arguments, settings)
    model_file = choose_model(arguments.model or settings.model)
    if model_file.suffix == ".keras":  # an exported file needs no Keras backend at all
        device.choose_backend()
    card = load_card(model_file)
    table = bulk.PredictionTable(out, bulk.csv_columns(min(top_k, len(card["class_names"]))), resume=arguments.resume,
                                 figure_limit=settings.figure_max_images if can_draw() else 0)
    total, already = bulk.count_photos(inputs, card["class_names"], table.done)  # before the model: bad paths fail fast
    if table.resumed:
        print(f"resuming: {out} lists {table.summary.rows} photos; {total - already} of {total} left to classify")
    with keeping_rows_when_stopped(table):
        with bulk.decoding_workers(card, arguments.workers) as decoders:
            # A model given by path may come from elsewhere: only a project model must match classes.txt.
            classifier = Classifier(model_file, top_k=top_k, min_confidence=min_confidence,
                                    batch_size=settings.batch_size,
                                    check_classes=None if arguments.model in (None, *MODEL_CHOICES) else False)
            table.open()
            started = time.perf_counter()
            with tqdm(total=total, initial=already, unit="photo", desc="predict_new", mininterval=1) as progress:
                bulk.classify_all(classifier, decoders, arguments.workers, inputs, table, progress)
            rate = (total - already) / max(time.perf_counter() - started, 1e-9)
        table.close()
        wrote = f"wrote {out}"
        if table.summary.figure_limit:
            draw_grid(bulk.photos_to_show(table.summary, card), table.summary, classifier.top_k,
                      out.with_suffix(".png"), classifier.min_confidence)
            wrote += f" and {out.with_suffix('.png')}"
    print(f"predict_new with {model_file}: {table.summary.line()} ({rate:.0f} photos/s); {wrote}")


if __name__ == "__main__":
    run_stage(main)
