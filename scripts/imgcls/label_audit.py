"""The label audit: photos whose given label a model that never trained on them doubts.

Confident learning (Northcutt, Jiang and Chuang, "Confident Learning:
Estimating Uncertainty in Dataset Labels", JAIR 2021) needs, for every photo,
class probabilities from a model that did not see that photo's label. For the
train, val and calibration photos they come from a cross-validated logistic
regression on frozen features: each fold's photos are scored by a classifier
fitted on the other folds, so no photo scores itself. Test photos, which no
trainer saw, are scored by the trained models. cleanlab then estimates how
often each class is filed as another and flags the photos that account for it;
they are ranked by their label quality score (the probability of the given
label), lowest first. Nothing is dropped here: a person reviews the list.
"""

import numpy as np
import pandas as pd
from cleanlab.filter import find_label_issues
from cleanlab.rank import get_label_quality_scores
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from imgcls.errors import UserError

# Regularisation strengths tried on standardised features; the one with the lowest out-of-fold log loss is kept.
C_VALUES = (0.001, 0.01, 0.1, 1.0)
PIXEL_SIDE = 16  # pixel features: photos average-pooled to at most this many pixels a side


def pixel_features(pixels: np.ndarray) -> np.ndarray:
    """Photos as flat float vectors, average-pooled to at most PIXEL_SIDE a side (the audit without a base)."""
    count, side = pixels.shape[0], pixels.shape[1]
    factor = side // PIXEL_SIDE if side % PIXEL_SIDE == 0 and side > PIXEL_SIDE else 1
    pooled = np.asarray(pixels, dtype=np.float32).reshape(count, side // factor, factor, side // factor, factor, -1)
    return pooled.mean(axis=(2, 4)).reshape(count, -1)


def out_of_fold_probabilities(features: np.ndarray, labels: np.ndarray, num_classes: int, folds: int,
                              seed: int) -> tuple[np.ndarray, dict]:
    """(probabilities, summary): each photo's class probabilities from a logistic regression fitted without it.

    The folds are stratified; a class with fewer photos than `folds` lowers
    their number (at least 2). The summary gives the folds, the C kept and the
    out-of-fold accuracy.
    """
    counts = np.bincount(labels, minlength=num_classes)
    folds = int(min(folds, counts.min()))
    if folds < 2:
        short = [str(index) for index in np.flatnonzero(counts < 2)]
        raise UserError(f"the label audit needs at least 2 train/val photos of every class; classes {', '.join(short)}"
                        " (by index in data/split/classes.txt) have fewer: add photos to them.")
    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    best = None
    for c_value in C_VALUES:
        classifier = make_pipeline(StandardScaler(), LogisticRegression(C=c_value, max_iter=1000))
        probabilities = cross_val_predict(classifier, features, labels, cv=splitter, method="predict_proba")
        loss = log_loss(labels, probabilities, labels=list(range(num_classes)))
        if best is None or loss < best[0]:
            best = (loss, c_value, probabilities)
    loss, c_value, probabilities = best
    accuracy = float((probabilities.argmax(axis=1) == labels).mean())
    return probabilities, {"folds": folds, "C": c_value, "out_of_fold_accuracy": round(accuracy, 5),
                           "out_of_fold_log_loss": round(float(loss), 5)}


def rank_label_issues(labels: np.ndarray, probabilities: np.ndarray, filter_by: str) -> pd.DataFrame:
    """The flagged photos, lowest label quality first: their row index, suggested class and scores."""
    # One process: forking beside a loaded TensorFlow is fragile, and the data is small.
    flagged = find_label_issues(labels, probabilities, filter_by=filter_by, n_jobs=1)
    quality = get_label_quality_scores(labels, probabilities, method="self_confidence")
    rows = np.flatnonzero(flagged)
    table = pd.DataFrame({"row": rows, "score": quality[rows], "suggested": probabilities[rows].argmax(axis=1),
                          "suggested_probability": probabilities[rows].max(axis=1)})
    return table.sort_values(["score", "row"], kind="stable").reset_index(drop=True)
