"""Probabilities that mean what they say, and the confidence below which a photo is `unknown`.

Label smoothing, class weights and a best epoch picked on accuracy all leave a
network's softmax over- or under-confident. Temperature scaling (Guo et al.,
"On Calibration of Modern Neural Networks", 2017) fixes that with one number:
the probabilities become softmax(log(p) / T), with the T that minimises the
log loss on the validation split. T > 1 softens over-confident outputs, T < 1
sharpens timid ones; the most probable class never changes, so accuracy does
not either. Each trainer fits T and saves it inside the model as a small
`Temperature` layer (imgcls/layers.py: plain Keras ops, so the model still
loads in safe_mode and converts to TFLite), and records it in the model card.

The card also records the confidence threshold below which a photo is
reported as `unknown` (predict_new.min_confidence: auto). It is a
split-conformal threshold (Vovk et al. 2005; Angelopoulos and Bates, "A Gentle
Introduction to Conformal Prediction", 2021) on the calibration split: photos
no trainer used to pick an epoch, a C or the temperature, so their calibrated
confidence is exchangeable with a new photo's. Of n such confidences sorted
from the highest, the threshold is the one at rank ceil((n + 1) * t); a new
photo then falls at or above it with probability at least t, whatever the
model. The empirical quantile on the validation photos, used before, was
optimistic: the epoch and the temperature were chosen to fit those photos.

Calibration is measured by the expected calibration error (ECE) over
CALIBRATION_BINS equal-width confidence bins: the images' share in each bin
times the gap between the bin's accuracy and its mean confidence, summed.
"""

import math

import keras
import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar

from imgcls.batches import predict
from imgcls.dataset import NO_VALIDATION
from imgcls.layers import SMALLEST_PROBABILITY, Temperature

CALIBRATION_BINS = 15


def rescale(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(p) / temperature) in numpy; rescale(p, 1 / T) undoes rescale(p, T)."""
    logits = np.log(np.clip(np.asarray(probabilities, dtype=np.float64), SMALLEST_PROBABILITY, None)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    exponentials = np.exp(logits)
    return exponentials / exponentials.sum(axis=1, keepdims=True)


def log_loss(probabilities: np.ndarray, labels: np.ndarray) -> float:
    picked = np.asarray(probabilities, dtype=np.float64)[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(picked, SMALLEST_PROBABILITY, None)).mean())


def fit_temperature(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The temperature (0.05 to 20) that minimises the log loss of the rescaled probabilities."""
    result = minimize_scalar(lambda log_t: log_loss(rescale(probabilities, math.exp(log_t)), labels),
                             bounds=(math.log(0.05), math.log(20.0)), method="bounded", options={"xatol": 1e-4})
    return round(math.exp(result.x), 4)


def with_temperature(model: keras.Model, temperature: float) -> keras.Model:
    """`model` followed by a Temperature layer: the same layers and weights, a new (uncompiled) output."""
    outputs = Temperature(temperature, dtype="float32", name="temperature")(model.outputs[0])
    return keras.Model(model.inputs, outputs, name=model.name)


def reliability(probabilities: np.ndarray, labels: np.ndarray, bins: int = CALIBRATION_BINS) -> pd.DataFrame:
    """Per confidence bin: its bounds, images, mean confidence and accuracy (empty bins have 0 images)."""
    confidence = np.asarray(probabilities).max(axis=1)
    correct = np.asarray(probabilities).argmax(axis=1) == labels
    edges = np.linspace(0, 1, bins + 1)
    # Bins are (lower, upper]; a confidence of exactly 0 joins the first.
    position = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    images = np.bincount(position, minlength=bins)
    with np.errstate(invalid="ignore"):
        mean_confidence = np.bincount(position, weights=confidence, minlength=bins) / images
        accuracy = np.bincount(position, weights=correct, minlength=bins) / images
    return pd.DataFrame({"bin_lower": edges[:-1], "bin_upper": edges[1:], "images": images,
                         "confidence": mean_confidence, "accuracy": accuracy})


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = CALIBRATION_BINS) -> float:
    table = reliability(probabilities, labels, bins)
    used = table[table["images"] > 0]
    return float((used["images"] * (used["accuracy"] - used["confidence"]).abs()).sum() / max(len(labels), 1))


def conformal_threshold(probabilities: np.ndarray, target_coverage: float) -> tuple[float, float]:
    """(threshold, coverage honoured): a new photo's confidence is at or above the threshold with probability
    at least the coverage honoured, which is target_coverage unless there are too few photos for it.

    With n photos the rank ceil((n + 1) * t) must be at most n, so the largest
    target n photos can honour is n / (n + 1); above it the stage warns and
    uses that, the lowest confidence of the n.
    """
    confidence = np.sort(np.asarray(probabilities).max(axis=1))[::-1]
    count = len(confidence)
    if count == 0:
        raise ValueError("conformal_threshold needs at least one photo")
    rank = math.ceil((count + 1) * target_coverage - 1e-9)
    if rank > count:
        honoured = math.floor(count / (count + 1) * 1e4) / 1e4
        # n photos honour t when n >= t / (1 - t); no number of them honours a target of 1.
        needed = (f"at least {math.ceil(target_coverage / (1 - target_coverage) - 1e-9)} photos"
                  if target_coverage < 1 else "infinitely many photos")
        print(f"warning: {count} calibration photos can honour a target_coverage of at most {honoured:.4f}"
              f" (n / (n + 1)), not {target_coverage}: using {honoured:.4f}. For {target_coverage} the"
              f" calibration split needs {needed}: raise split.calibration or split.val, or lower"
              " predict_new.target_coverage.")
        return float(confidence[-1]), honoured
    return float(confidence[rank - 1]), target_coverage


def selective_scores(probabilities: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    """Coverage (share answered, not `unknown`) and accuracy on the answered photos at a threshold."""
    probabilities = np.asarray(probabilities)
    answered = probabilities.max(axis=1) >= threshold
    correct = probabilities.argmax(axis=1) == labels
    return {"coverage": float(answered.mean()),
            "selective_accuracy": float(correct[answered].mean()) if answered.any() else None}


def coverage_check(coverage: float, target_coverage: float, photos: int) -> dict:
    """Whether a realised coverage on `photos` test photos meets the target within sampling error.

    The bound is t - 1.96 * sqrt(t * (1 - t) / n): a coverage below it is
    unlikely (under 2.5%) if the threshold really answers t of such photos.
    """
    bound = target_coverage - 1.96 * math.sqrt(target_coverage * (1 - target_coverage) / max(photos, 1))
    return {"target_coverage": target_coverage, "coverage_lower_bound": round(bound, 5),
            "coverage_meets_target": bool(coverage >= bound)}


def calibrate(model: keras.Model, card: dict, batches, labels: np.ndarray, calibration_batches,
              target_coverage: float) -> tuple[keras.Model, dict]:
    """Fit the temperature on the validation split; return the model with it and the card recording it.

    `batches` are the validation images (batches.ImageBatches, split like the
    training's), `labels` their classes. The card gets the temperature, the
    validation log loss and ECE before and after, and the conformal confidence
    threshold for `target_coverage` on `calibration_batches` (the calibration
    split), or on the validation photos when there is no calibration split.
    Without validation photos (batches None: split.val 0) nothing is fitted,
    and the card says so.
    """
    if batches is None:
        print(f"{card['name']}: no validation split (split.val: 0): the last epoch is kept, and no temperature or"
              " `unknown` threshold is fitted (predict_new.min_confidence auto then needs a number instead)")
        return model, {**card, "validation": f"{NO_VALIDATION}: last epoch kept", "temperature": None,
                       "confidence_threshold": None, "threshold_split": None}
    probabilities = predict(model, batches)
    temperature = fit_temperature(probabilities, labels)
    calibrated_model = with_temperature(model, temperature)
    calibrated = predict(calibrated_model, batches)
    if calibration_batches is None:
        print("warning: no calibration photos (split.calibration is 0, or no class has a second validation photo"
              " to hold back): the `unknown` threshold is set on the validation photos, which also chose the"
              " epoch and the temperature, so new photos will fall below it more often than"
              " 1 - predict_new.target_coverage")
        threshold_split, scored = "val", calibrated
    else:
        threshold_split, scored = "calibration", predict(calibrated_model, calibration_batches)
    threshold_photos = len(scored)
    threshold, target_coverage = conformal_threshold(scored, target_coverage)
    card = {**card, "temperature": temperature,
            "val_log_loss": {"before": round(log_loss(probabilities, labels), 5),
                             "after": round(log_loss(calibrated, labels), 5)},
            "val_ece": {"before": round(expected_calibration_error(probabilities, labels), 5),
                        "after": round(expected_calibration_error(calibrated, labels), 5)},
            "confidence_threshold": threshold, "target_coverage": target_coverage,
            "threshold_split": threshold_split, "threshold_photos": threshold_photos}
    print(f"{card['name']}: temperature {temperature:g} fitted on {len(labels)} validation images (log loss"
          f" {card['val_log_loss']['before']:.4f} -> {card['val_log_loss']['after']:.4f}, ECE"
          f" {card['val_ece']['before']:.4f} -> {card['val_ece']['after']:.4f}); confidence threshold"
          f" {threshold:.4f}, conformal on {threshold_photos} {threshold_split} photos for a coverage of"
          f" {target_coverage:.2%}")
    return calibrated_model, card
