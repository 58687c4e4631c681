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

The card also records the confidence threshold that keeps `target_coverage`
of the validation photos (predict_new.min_confidence: auto): below it a
photo is reported as `unknown`.

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


def confidence_threshold(probabilities: np.ndarray, target_coverage: float) -> float:
    """The highest threshold that still answers (confidence >= threshold) at least `target_coverage` of the photos."""
    confidence = np.sort(np.asarray(probabilities).max(axis=1))[::-1]
    answered = max(1, math.ceil(target_coverage * len(confidence) - 1e-9))
    return float(confidence[answered - 1])


def selective_scores(probabilities: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    """Coverage (share answered, not `unknown`) and accuracy on the answered photos at a threshold."""
    probabilities = np.asarray(probabilities)
    answered = probabilities.max(axis=1) >= threshold
    correct = probabilities.argmax(axis=1) == labels
    return {"coverage": float(answered.mean()),
            "selective_accuracy": float(correct[answered].mean()) if answered.any() else None}


def calibrate(model: keras.Model, card: dict, batches, labels: np.ndarray,
              target_coverage: float) -> tuple[keras.Model, dict]:
    """Fit the temperature on the validation split; return the model with it and the card recording it.

    `batches` are the validation images (batches.ImageBatches, split like the
    training's), `labels` their classes. The card gets the temperature, the
    validation log loss and ECE before and after, and the confidence threshold
    that keeps `target_coverage` of the validation photos with the calibrated
    probabilities.
    """
    probabilities = predict(model, batches)
    temperature = fit_temperature(probabilities, labels)
    calibrated_model = with_temperature(model, temperature)
    calibrated = predict(calibrated_model, batches)
    threshold = confidence_threshold(calibrated, target_coverage)
    card = {**card, "temperature": temperature,
            "val_log_loss": {"before": round(log_loss(probabilities, labels), 5),
                             "after": round(log_loss(calibrated, labels), 5)},
            "val_ece": {"before": round(expected_calibration_error(probabilities, labels), 5),
                        "after": round(expected_calibration_error(calibrated, labels), 5)},
            "confidence_threshold": threshold, "target_coverage": target_coverage}
    print(f"{card['name']}: temperature {temperature:g} fitted on {len(labels)} validation images (log loss"
          f" {card['val_log_loss']['before']:.4f} -> {card['val_log_loss']['after']:.4f}, ECE"
          f" {card['val_ece']['before']:.4f} -> {card['val_ece']['after']:.4f}); confidence threshold"
          f" {threshold:.4f} keeps {target_coverage:.1%} of them")
    return calibrated_model, card
