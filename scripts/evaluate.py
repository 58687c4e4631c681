"""Stage `evaluate`: score every trained model on the test split, side by side.

For each model in models/ (cnn, transfer: whichever exist) it writes
  reports/evaluate/metrics.json               {"cnn": {accuracy, top3_accuracy, macro_f1, log_loss, ...}, ...}
  reports/evaluate/confusion/<model>.csv      one row per test image (actual, predicted class names): DVC plots data
  reports/evaluate/per_class/<model>.csv|json precision, recall, F1 and support per class
  reports/evaluate/figures/<model>_confusion.png     confusion matrix with counts
  reports/evaluate/figures/<model>_misclassified.png the most confidently wrong test images
"""

import numpy as np
import pandas as pd

from imgcls import device
from imgcls.dataset import REPORTS_DIR, atomic_path, load_class_names, load_manifest, load_split, write_csv, write_json
from imgcls.errors import UserError, run_stage
from imgcls.modelio import MODEL_NAMES, PRODUCED_BY, model_path
from imgcls.params import load_params

REPORT_DIR = REPORTS_DIR / "evaluate"
CONFUSION_DIR = REPORT_DIR / "confusion"
PER_CLASS_DIR = REPORT_DIR / "per_class"
FIGURES_DIR = REPORT_DIR / "figures"


def score(labels: np.ndarray, probabilities: np.ndarray, class_names: list[str]) -> tuple[dict, pd.DataFrame]:
    """Headline metrics and the per-class report of one model's test predictions."""
    from sklearn.metrics import classification_report, f1_score, log_loss

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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix

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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    confidence = probabilities[wrong, predicted[wrong]]
    worst = wrong[np.argsort(-confidence, kind="stable")][:count]
    columns = max(1, min(4, len(worst)))
    rows = max(1, int(np.ceil(len(worst) / columns)))
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.5 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, index in zip(axes.flat, worst):
        axis.imshow(pixels[index])
        axis.set_title(f"true: {class_names[labels[index]]}\npredicted: {class_names[predicted[index]]}"
                       f" ({probabilities[index, predicted[index]]:.0%})", fontsize=8)
    if len(worst) == 0:
        axes[0, 0].text(0.5, 0.5, "no misclassified test image", ha="center", va="center")
    figure.suptitle(title)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (3.5 * rows)))  # leave the title its own strip
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    plt.close(figure)
    return len(worst)


def remove_stale(present: list[str]) -> None:
    """Drop the reports of models that are gone, so the report folders describe exactly the models scored."""
    for folder in (CONFUSION_DIR, PER_CLASS_DIR, FIGURES_DIR):
        if folder.is_dir():
            for path in folder.iterdir():
                if path.is_file() and path.name.split(".")[0].removesuffix("_confusion").removesuffix("_misclassified") not in present:
                    path.unlink()


def main() -> None:
    params = load_params()
    section = params.evaluate
    class_names = load_class_names()
    names = [name for name in MODEL_NAMES if model_path(name).exists()]
    if not names:
        raise UserError("no trained model in models/: run `dvc repro train_cnn` (or `dvc repro` for every stage) first.")
    manifest = load_manifest()
    if not (manifest["split"] == "test").any():
        raise UserError("the test split is empty: check the split fractions in params.yaml and run `dvc repro split`.")

    device.choose_backend()
    from imgcls.modelio import load_model
    from imgcls.training import ImageBatches

    results = {}
    for name in names:
        model, card = load_model(model_path(name))
        # Each model reads the test photos at its own size (resize.image_size may list several).
        size = model.input_shape[1]
        if size not in params.resize.sizes:
            raise UserError(
                f"models/{name}.keras takes {size}x{size} images but resize.image_size is {params.resize.image_size}:"
                f" retrain it with `dvc repro {PRODUCED_BY[name]}`."
            )
        pixels, labels, _ = load_split("test", size, manifest)
        probabilities = model.predict(ImageBatches(pixels, batch_size=section.batch_size), verbose=0)
        metrics, per_class = score(labels, probabilities, class_names)
        predicted = probabilities.argmax(axis=1)
        results[name] = metrics

        write_csv(CONFUSION_DIR / f"{name}.csv",
                  pd.DataFrame({"actual": [class_names[i] for i in labels], "predicted": [class_names[i] for i in predicted]}))
        write_csv(PER_CLASS_DIR / f"{name}.csv", per_class)
        write_json(PER_CLASS_DIR / f"{name}.json", {row["class"]: {k: v for k, v in row.items() if k != "class"}
                                                     for row in per_class.to_dict(orient="records")})
        plot_confusion(FIGURES_DIR / f"{name}_confusion.png", labels, predicted, class_names,
                       f"{name}: test accuracy {metrics['accuracy']:.1%} ({len(labels)} images)")
        plot_misclassified(FIGURES_DIR / f"{name}_misclassified.png", pixels, labels, probabilities, class_names,
                           section.gallery_size, f"{name}: most confident mistakes on the test split")
        print(f"evaluate {name}: accuracy {metrics['accuracy']:.4f}, top-3 {metrics['top3_accuracy']:.4f},"
              f" macro F1 {metrics['macro_f1']:.4f}, log loss {metrics['log_loss']:.4f}")

    remove_stale(names)
    write_json(REPORT_DIR / "metrics.json", results)


if __name__ == "__main__":
    run_stage(main)
