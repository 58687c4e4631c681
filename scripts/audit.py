"""Stage `audit`: rank the photos whose given label looks wrong, for a person to review.

Every photo in train, val, calibration and test gets class probabilities from
a model that never trained on it (imgcls/label_audit.py): a cross-validated
logistic regression on the frozen base's pooled features of train_transfer
(on the pixels with train_transfer.weights: none), and for test photos the mean
of the trained models' probabilities that `evaluate` wrote. cleanlab flags the
photos whose given label those probabilities doubt. It writes
  reports/audit/label_issues.csv   rank, photo (path under data/raw), split, given and suggested label, score
  reports/audit/suspects.png       the top audit.gallery_size suspects, given and suggested labels
  reports/audit/metrics.json       photos audited, label issues flagged, the classifier's folds, C and accuracy
It never drops a photo: list the ones you confirm are wrong in data/exclude.txt,
and `dvc repro` takes them out of every split.
"""

import numpy as np
import pandas as pd

from imgcls import device
from imgcls.dataset import (CALIBRATION, REPORTS_DIR, load_class_names, load_images, load_manifest, require,
                            write_csv, write_json)
from imgcls.errors import UserError, run_stage
from imgcls.params import load_params

REPORT_DIR = REPORTS_DIR / "audit"
PROBABILITIES_DIR = REPORTS_DIR / "evaluate" / "probabilities"
CROSS_VALIDATED_SPLITS = ("train", "val", CALIBRATION)


def read_photos(image_size: int) -> tuple[pd.DataFrame, np.ndarray]:
    """The manifest rows of every photo in a split (holdout photos have no label to audit), and all images as
    resize's memory map: only the photos whose pixels are needed are read from it."""
    manifest = load_manifest()
    rows = manifest[manifest["split"].isin((*CROSS_VALIDATED_SPLITS, "test"))].reset_index(drop=True)
    return rows, load_images(image_size)


def photo_features(params, pixels: np.ndarray, image_size: int, input_size: int) -> tuple[np.ndarray, str]:
    """(features, what they are): the frozen base's pooled features, or pooled pixels without pretrained weights."""
    from imgcls.label_audit import pixel_features

    section = params.train_transfer
    if section.weights == "none":
        return pixel_features(pixels), "pixels"
    from imgcls import transfer  # imports Keras: after main() chose the backend
    from imgcls.features import pooled_features

    base = transfer.build_base(section.base, input_size, section.weights)
    return pooled_features(section.base, base, image_size, input_size, pixels)[0], f"{section.base} features"


def test_probabilities(rows: pd.DataFrame, class_names: list[str]) -> tuple[np.ndarray, list[str]]:
    """The test photos' probabilities, the mean over the models evaluate scored, and those models' names."""
    files = sorted(require(PROBABILITIES_DIR, "evaluate").glob("*.csv"))
    tables = [pd.read_csv(path, keep_default_na=False, dtype={"path": str, "label": str}).set_index("path")
              for path in files]
    paths = rows["path"].to_numpy()
    if not tables or any(not table.index.isin(paths).all() or len(table) != len(paths) for table in tables):
        raise UserError(f"{PROBABILITIES_DIR} does not hold every test photo's probabilities for each model:"
                        " run `dvc repro evaluate`.")
    mean = np.mean([table.loc[paths, class_names].to_numpy(dtype=np.float64) for table in tables], axis=0)
    return mean / mean.sum(axis=1, keepdims=True), [path.stem for path in files]


def write_reports(rows: pd.DataFrame, issues: pd.DataFrame, images: np.ndarray, class_names: list[str],
                  source: np.ndarray, gallery_size: int) -> pd.DataFrame:
    """label_issues.csv (ranked) and the gallery of the top suspects; returns the table."""
    from imgcls.gallery import save_gallery

    flagged = rows.loc[issues["row"]]
    table = pd.DataFrame({
        "rank": np.arange(1, len(issues) + 1),
        "photo": flagged["path"].to_numpy(),
        "split": flagged["split"].to_numpy(),
        "given_label": flagged["label"].to_numpy(),
        "suggested_label": [class_names[index] for index in issues["suggested"]],
        "score": issues["score"].round(5).to_numpy(),
        "suggested_probability": issues["suggested_probability"].round(5).to_numpy(),
        "scored_by": source[issues["row"]],
    })
    write_csv(REPORT_DIR / "label_issues.csv", table)
    top = table.head(gallery_size)
    captions = [f"#{row.rank} {row.photo}\ngiven: {row.given_label}\nsuggested: {row.suggested_label}"
                f" ({row.suggested_probability:.0%})" for row in top.itertuples()]
    save_gallery(REPORT_DIR / "suspects.png", images[flagged["id"].to_numpy()[:gallery_size]], captions,
                 f"label audit: the {len(top)} most doubtful of {len(table)} flagged photos",
                 "no photo flagged")
    return table


def main() -> None:
    params = load_params()
    section = params.audit
    class_names = load_class_names()
    device.choose_backend()  # before anything imports Keras
    from imgcls import transfer
    from imgcls.label_audit import out_of_fold_probabilities, rank_label_issues

    input_size = transfer.resolve_input_size(params.train_transfer.base, params.train_transfer.input_size)
    image_size = params.resize.array_size(input_size)
    rows, images = read_photos(image_size)
    labels = rows["label_index"].to_numpy(dtype=np.int64)
    cross_validated = rows["split"].isin(CROSS_VALIDATED_SPLITS).to_numpy()

    pixels = np.asarray(images[rows["id"].to_numpy()[cross_validated]])  # test photos need no pixels
    features, described = photo_features(params, pixels, image_size, input_size)
    probabilities = np.zeros((len(rows), len(class_names)))
    probabilities[cross_validated], classifier = out_of_fold_probabilities(
        features, labels[cross_validated], len(class_names), section.folds, params.seed)
    probabilities[~cross_validated], models = test_probabilities(rows[~cross_validated], class_names)
    source = np.where(cross_validated, f"cross-validated logistic regression on {described}",
                      f"mean of trained models ({', '.join(models)})")

    issues = rank_label_issues(labels, probabilities, section.filter_by)
    table = write_reports(rows, issues, images, class_names, source, section.gallery_size)
    write_json(REPORT_DIR / "metrics.json", {
        "photos": len(rows), "label_issues": len(table), "label_issue_share": round(len(table) / len(rows), 5),
        "label_issues_by_split": {split: int((table["split"] == split).sum())
                                  for split in (*CROSS_VALIDATED_SPLITS, "test")},
        "classifier": {"features": described, **classifier}, "test_scored_by": models,
    })
    print(f"audit: {len(table)} of {len(rows)} photos flagged as possible label errors ({classifier['folds']}-fold"
          f" logistic regression on {described}, C {classifier['C']:g}, out-of-fold accuracy"
          f" {classifier['out_of_fold_accuracy']:.2%}; test photos by {', '.join(models)}); review"
          f" {REPORT_DIR / 'label_issues.csv'} and {REPORT_DIR / 'suspects.png'}, and list the wrong ones in"
          " data/exclude.txt")


if __name__ == "__main__":
    run_stage(main)
