"""Stage `evaluate`: score every trained model on the test split, side by side.

For each model in models/ (cnn, transfer: whichever exist) it writes
  reports/evaluate/metrics.json               {"cnn": {accuracy, top3_accuracy, macro_f1, log_loss, ...}, ...}
  reports/evaluate/confusion/<model>.csv      one row per test image (actual, predicted class names): DVC plots data
  reports/evaluate/per_class/<model>.csv|json precision, recall, F1 and support per class
  reports/evaluate/figures/<model>_confusion.png     confusion matrix with counts
  reports/evaluate/figures/<model>_misclassified.png the most confidently wrong test images
  reports/evaluate/figures/<model>_reliability.png   reliability diagram, before and after the temperature
  reports/evaluate/calibration/<model>.csv    accuracy and mean confidence per confidence bin: DVC plots data
  reports/evaluate/probabilities/<model>.csv  each test photo's path, label and calibrated probabilities (the audit reads them)

Beside the scores, metrics.json says how far each model's confidence can be
trusted: the expected calibration error (ECE over 15 bins) with and without its
temperature, coverage and accuracy on the answered photos at the `unknown`
threshold (predict_new.min_confidence; with auto, also the card's target
coverage and whether the test coverage meets it within sampling error), and, with evaluate.ood_dir, the share of
out-of-class photos flagged unknown and the AUROC of confidence between
in-class test photos and those.
"""

from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from sklearn.metrics import classification_report, confusion_matrix, f1_score, log_loss, roc_auc_score

from imgcls import device
from imgcls.dataset import REPORTS_DIR, atomic_path, load_class_names, load_manifest, load_split, write_csv, write_json
from imgcls.errors import UserError, run_stage
from imgcls.gallery import save_gallery
from imgcls.images import BadImage
from imgcls.modelio import MODEL_NAMES, PRODUCED_BY, load_model, model_path
from imgcls.params import load_params
from imgcls.predict import decode_for_model, find_images, resolve_min_confidence, trained_without_validation

matplotlib.use("Agg")  # figures go to files; no screen is needed
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the Agg backend)

REPORT_DIR = REPORTS_DIR / "evaluate"
CONFUSION_DIR = REPORT_DIR / "confusion"
CALIBRATION_DIR = REPORT_DIR / "calibration"
PROBABILITIES_DIR = REPORT_DIR / "probabilities"
PER_CLASS_DIR = REPORT_DIR / "per_class"
FIGURES_DIR = REPORT_DIR / "figures"


def score(labels: np.ndarray, probabilities: np.ndarray, class_names: list[str]) -> tuple[dict, pd.DataFrame]:
    """Headline metrics and the per-class report of one model's test predictions."""

    indices = list(range(len(class_names)))
    predicted = probabilities.argmax(axis=1)
    # Renormalise: float32 softmax rows sum to 1 only up to rounding, and log_loss checks.
    probabilities = probabilities.astype(np.float64)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    metrics = {
        "accuracy": float(np.mean(predicted == labels)),
        # Ties broken by class order, like argmax; with 3 classes or fewer it is 1 by definition.
        "top3_accuracy": float(np.mean((np.argsort(-probabilities, axis=1, kind="stable")[:, :3] == labels[:, None]).any(axis=1))),
        "macro_f1": float(f1_score(labels, predicted, labels=indices, average="macro", zero_division=0)),
        "log_loss": float(log_loss(labels, probabilities, labels=indices)),
        "images": int(len(labels)),
    }
    report = classification_report(labels, predicted, labels=indices, target_names=class_names, output_dict=True,
                                   zero_division=0)
    rows = [{"class": name, **{key: report[name][key] for key in ("precision", "recall", "f1-score", "support")}}
            for name in class_names]
    per_class = pd.DataFrame(rows).rename(columns={"f1-score": "f1"})
    per_class["support"] = per_class["support"].astype(int)
    return metrics, per_class


def plot_confusion(path, labels, predicted, class_names: list[str], title: str) -> None:
    """Confusion matrix PNG: rows are true classes, columns predicted, each cell shows its count."""

    matrix = confusion_matrix(labels, predicted, labels=list(range(len(class_names))))
    side = max(5.0, 0.55 * len(class_names) + 2.5)
    figure, axis = plt.subplots(figsize=(side + 1, side))
    # Colour by row share, so a small class's errors are as visible as a big one's.
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    image = axis.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04, label="share of the true class")
    if len(class_names) <= 40:
        for row in range(len(class_names)):
            for column in range(len(class_names)):
                if matrix[row, column]:
                    axis.text(column, row, str(matrix[row, column]), ha="center", va="center", fontsize=8,
                              color="white" if shares[row, column] > 0.5 else "black")
    axis.set_xticks(range(len(class_names)), class_names, rotation=60, ha="right", fontsize=8)
    axis.set_yticks(range(len(class_names)), class_names, fontsize=8)
    axis.set_xlabel("predicted class")
    axis.set_ylabel("true class")
    axis.set_title(title)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=110)
    plt.close(figure)


def plot_misclassified(path, pixels, labels, probabilities, class_names: list[str], count: int, title: str) -> int:
    """Gallery of the `count` test images the model got wrong with the highest confidence; returns how many."""

    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    confidence = probabilities[wrong, predicted[wrong]]
    worst = wrong[np.argsort(-confidence, kind="stable")][:count]
    captions = [f"true: {class_names[labels[index]]}\npredicted: {class_names[predicted[index]]}"
                f" ({probabilities[index, predicted[index]]:.0%})" for index in worst]
    save_gallery(path, pixels[worst], captions, title, "no misclassified test image")
    return len(worst)


def trust_scores(labels, probabilities, temperature: float, threshold: float,
                 target_coverage: float | None) -> tuple[dict, np.ndarray]:
    """Calibration and selective-prediction metrics of one model; also the probabilities without its temperature.

    With the card's threshold (min_confidence auto), also its target coverage
    and whether the test coverage meets it within sampling error.
    """
    # calibration and batches import Keras, so they load only after main() chose the backend.
    from imgcls.calibration import (CALIBRATION_BINS, coverage_check, expected_calibration_error, rescale,
                                    selective_scores)

    before = rescale(probabilities, 1 / temperature)  # undoes the model's Temperature layer
    metrics = {
        "ece": round(expected_calibration_error(probabilities, labels), 5),
        "ece_before_temperature": round(expected_calibration_error(before, labels), 5),
        "calibration_bins": CALIBRATION_BINS,
        "temperature": temperature,
        "min_confidence": round(threshold, 5),
        **selective_scores(probabilities, labels, threshold),
    }
    if target_coverage is not None:
        metrics |= coverage_check(metrics["coverage"], target_coverage, len(labels))
    return metrics, before


def out_of_class_scores(model, card: dict, files: list[Path], in_class_confidence, threshold: float,
                        batch_size: int) -> dict:
    """Share of out-of-class photos flagged unknown, and the AUROC of confidence: in-class test photos vs those."""

    from imgcls.batches import ImageBatches  # imports Keras: after main() chose the backend

    decoded = []
    for path in files:
        try:
            decoded.append(decode_for_model(path, card))
        except BadImage:
            pass  # counted below: an unreadable photo says nothing about the model
    if not decoded:
        raise UserError("evaluate.ood_dir holds no readable image: put photos of none of the classes there,"
                        " or set evaluate.ood_dir: \"\" to turn this off.")
    confidence = model.predict(ImageBatches(np.stack(decoded), batch_size=batch_size), verbose=0).max(axis=1)
    truth = np.concatenate([np.ones(len(in_class_confidence)), np.zeros(len(confidence))])
    return {
        "ood_images": len(decoded),
        "ood_unreadable": len(files) - len(decoded),
        "ood_unknown_share": float((confidence < threshold).mean()),
        "ood_auroc": float(roc_auc_score(truth, np.concatenate([in_class_confidence, confidence]))),
    }


def plot_reliability(path, labels, before, after, metrics: dict, title: str) -> None:
    """Reliability diagram: accuracy against mean confidence per bin, without and with the temperature."""

    from imgcls.calibration import reliability  # imports Keras: after main() chose the backend

    figure, axis = plt.subplots(figsize=(5.5, 5))
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfectly calibrated")
    for probabilities, name, ece in ((before, "without temperature", metrics["ece_before_temperature"]),
                                     (after, f"temperature {metrics['temperature']:g}", metrics["ece"])):
        table = reliability(probabilities, labels)
        table = table[table["images"] > 0]
        axis.plot(table["confidence"], table["accuracy"], marker="o", label=f"{name}: ECE {ece:.3f}")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1.02)
    axis.set_xlabel(f"mean confidence in the bin ({metrics['calibration_bins']} bins)")
    axis.set_ylabel("accuracy in the bin")
    axis.set_title(title, fontsize=10)
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    plt.close(figure)


def remove_stale(present: list[str]) -> None:
    """Drop the reports of models that are gone, so the report folders describe exactly the models scored."""
    for folder in (CONFUSION_DIR, PER_CLASS_DIR, FIGURES_DIR, CALIBRATION_DIR, PROBABILITIES_DIR):
        if folder.is_dir():
            for path in folder.iterdir():
                model = path.name.split(".")[0]
                for suffix in ("_confusion", "_misclassified", "_reliability"):
                    model = model.removesuffix(suffix)
                if path.is_file() and model not in present:
                    path.unlink()


def models_to_score() -> list[str]:
    """The names of the trained models in models/, in MODEL_NAMES order; stops when there is none."""
    names = [name for name in MODEL_NAMES if model_path(name).exists()]
    if not names:
        raise UserError("no trained model in models/: run `dvc repro train_cnn` (or `dvc repro` for every stage) first.")
    return names


def load_test_manifest() -> pd.DataFrame:
    """The split manifest; stops when its test split is empty."""
    manifest = load_manifest()
    if not (manifest["split"] == "test").any():
        raise UserError("the test split is empty: check the split fractions in params.yaml and run `dvc repro split`.")
    return manifest


def find_out_of_class_photos(ood_dir: str) -> list[Path]:
    """The photos in evaluate.ood_dir, or none when it is "" (turned off)."""

    if not ood_dir:
        return []
    if not Path(ood_dir).is_dir():
        raise UserError(f"evaluate.ood_dir = {ood_dir!r} is not a folder: point it at a folder of photos"
                        " that belong to none of the classes, or set it to \"\" to turn this off.")
    return [path for path, _ in find_images([ood_dir], [])]


def read_test_split(name: str, model, params, manifest: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """The test photos' pixels, labels and manifest rows at the size `model` takes; stops if resize wrote no
    array of that size."""
    # Each model reads the test photos at its own size (resize.image_size may list several).
    size = model.input_shape[1]
    if size not in params.resize.sizes:
        raise UserError(
            f"models/{name}.keras takes {size}x{size} images but resize.image_size is {params.resize.image_size}:"
            f" retrain it with `dvc repro {PRODUCED_BY[name]}`."
        )
    return load_split("test", size, manifest)


def min_confidence_to_score(setting, card: dict, name: str) -> float:
    """predict_new's `unknown` threshold for this model; 0 (every photo answered) for a model trained without
    a validation split, which has none to give for 'auto'."""
    if setting == "auto" and trained_without_validation(card):
        print(f"evaluate {name}: trained without a validation split (split.val: 0): no `unknown` threshold,"
              " every test photo is answered")
        return 0.0
    return resolve_min_confidence(setting, card, model_path(name))


def evaluate_model(name: str, params, manifest: pd.DataFrame, class_names: list[str],
                   out_of_class: list[Path]) -> dict:
    """Score models/<name>.keras on the test split, write its reports and print its scores; return its metrics."""
    from imgcls.batches import ImageBatches  # imports Keras: after main() chose the backend

    section = params.evaluate
    model, card = load_model(model_path(name))
    pixels, labels, rows = read_test_split(name, model, params, manifest)
    probabilities = model.predict(ImageBatches(pixels, batch_size=section.batch_size), verbose=0)
    metrics, per_class = score(labels, probabilities, class_names)
    threshold = min_confidence_to_score(params.predict_new.min_confidence, card, name)
    target = card.get("target_coverage") if params.predict_new.min_confidence == "auto" else None
    trust, before = trust_scores(labels, probabilities, float(card.get("temperature") or 1.0), threshold, target)
    metrics |= trust
    if out_of_class:
        metrics |= out_of_class_scores(model, card, out_of_class, probabilities.max(axis=1), threshold,
                                       section.batch_size)
    write_reports(name, pixels, labels, probabilities, before, metrics, per_class, class_names, section.gallery_size)
    write_probabilities(name, rows, probabilities, class_names)
    print_scores(name, metrics, threshold, out_of_class=bool(out_of_class))
    return metrics


def write_reports(name: str, pixels, labels, probabilities, before, metrics: dict, per_class: pd.DataFrame,
                  class_names: list[str], gallery_size: int) -> None:
    """One model's confusion, per-class and calibration tables, and its three figures."""
    from imgcls.calibration import reliability  # imports Keras: after main() chose the backend

    predicted = probabilities.argmax(axis=1)
    write_csv(CONFUSION_DIR / f"{name}.csv",
              pd.DataFrame({"actual": [class_names[i] for i in labels], "predicted": [class_names[i] for i in predicted]}))
    write_csv(PER_CLASS_DIR / f"{name}.csv", per_class)
    write_json(PER_CLASS_DIR / f"{name}.json", {row["class"]: {k: v for k, v in row.items() if k != "class"}
                                                 for row in per_class.to_dict(orient="records")})
    plot_confusion(FIGURES_DIR / f"{name}_confusion.png", labels, predicted, class_names,
                   f"{name}: test accuracy {metrics['accuracy']:.1%} ({len(labels)} images)")
    plot_misclassified(FIGURES_DIR / f"{name}_misclassified.png", pixels, labels, probabilities, class_names,
                       gallery_size, f"{name}: most confident mistakes on the test split")
    write_csv(CALIBRATION_DIR / f"{name}.csv", reliability(probabilities, labels))
    plot_reliability(FIGURES_DIR / f"{name}_reliability.png", labels, before, probabilities, metrics,
                     f"{name}: reliability on the test split ({len(labels)} images)")


def write_probabilities(name: str, rows: pd.DataFrame, probabilities, class_names: list[str]) -> None:
    """Each test photo's path, label and probability per class: the audit stage's view of the test split."""
    table = pd.DataFrame(np.round(probabilities, 6), columns=class_names)
    table.insert(0, "label", rows["label"].to_numpy())
    table.insert(0, "path", rows["path"].to_numpy())
    write_csv(PROBABILITIES_DIR / f"{name}.csv", table)


def print_scores(name: str, metrics: dict, threshold: float, out_of_class: bool) -> None:
    """Two lines for one model: its headline scores, then how far its confidence can be trusted."""
    print(f"evaluate {name}: accuracy {metrics['accuracy']:.4f}, top-3 {metrics['top3_accuracy']:.4f},"
          f" macro F1 {metrics['macro_f1']:.4f}, log loss {metrics['log_loss']:.4f}")
    selective = metrics["selective_accuracy"]
    print(f"evaluate {name}: ECE {metrics['ece_before_temperature']:.4f} without temperature,"
          f" {metrics['ece']:.4f} with {metrics['temperature']:g}; at min_confidence {threshold:.4f}"
          f" it answers {metrics['coverage']:.1%} of the test photos, "
          + (f"{selective:.2%} of them right" if selective is not None else "none")
          + (f" (target {metrics['target_coverage']:.2%}, met within sampling error:"
             f" {'yes' if metrics['coverage_meets_target'] else 'no'}, bound {metrics['coverage_lower_bound']:.2%})"
             if "target_coverage" in metrics else "")
          + (f"; flags {metrics['ood_unknown_share']:.1%} of {metrics['ood_images']} out-of-class photos"
             f" unknown, AUROC {metrics['ood_auroc']:.4f}" if out_of_class else ""))


def main() -> None:
    params = load_params()
    class_names = load_class_names()
    names = models_to_score()
    manifest = load_test_manifest()
    device.choose_backend()  # before anything imports Keras
    out_of_class = find_out_of_class_photos(params.evaluate.ood_dir)
    results = {name: evaluate_model(name, params, manifest, class_names, out_of_class) for name in names}
    remove_stale(names)
    write_json(REPORT_DIR / "metrics.json", results)


if __name__ == "__main__":
    run_stage(main)
