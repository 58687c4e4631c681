"""The linear probe: a multinomial logistic regression on the frozen base's pooled features.

It is the simplest strong baseline of transfer learning, and train_transfer
uses it twice: as the head that fine-tuning starts from (head.solver: lbfgs,
"LP-FT": Kumar et al., 2022, "Fine-Tuning can Distort Pretrained Features"),
and as a candidate model that ships when it beats the fine-tuned one on
validation (probe_candidate), alone or averaged with it (ensemble_candidate),
so the stage is never worse than it.

scikit-learn fits it with L-BFGS on centred features divided by their overall
spread (one scale for all of them), for each inverse
regularisation strength C in C_VALUES; the C with the best validation
accuracy wins (ties: the lower validation log loss). The scaling is
then folded into the weights, so the probe is exactly one Dense softmax layer
on the raw pooled features: softmax(features @ kernel + bias).
"""

import dataclasses
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

# Half-decades from strong to weak regularisation. Scaled features make the grid
# independent of the base's feature scale (MobileNetV2 against ResNet50).
C_VALUES = tuple(float(10.0 ** exponent) for exponent in np.arange(-3.0, 1.01, 0.5))


@dataclasses.dataclass(frozen=True)
class Probe:
    kernel: np.ndarray  # features × classes, on the raw (not scaled) pooled features
    bias: np.ndarray  # classes
    c: float  # the inverse regularisation strength chosen on validation
    val_accuracy: float
    val_log_loss: float
    val_probabilities: np.ndarray | None = None  # on the validation features it was chosen on

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        logits = features @ self.kernel + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        exponentials = np.exp(logits)
        return exponentials / exponentials.sum(axis=1, keepdims=True)

    def set_into(self, dense) -> None:
        """Put the probe's weights into a Dense softmax layer with as many units as classes."""
        kernel, bias = dense.get_weights()
        if kernel.shape != self.kernel.shape:
            raise ValueError(f"the probe has {self.kernel.shape} weights, the layer {kernel.shape}")
        dense.set_weights([self.kernel.astype(kernel.dtype), self.bias.astype(bias.dtype)])


def score(probabilities: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(accuracy, log loss) of predicted probabilities, the two figures candidates are compared on."""
    accuracy = float((probabilities.argmax(axis=1) == labels).mean())
    return accuracy, float(log_loss(labels, probabilities, labels=range(probabilities.shape[1])))


def better(first: tuple[float, float], second: tuple[float, float]) -> bool:
    """Whether (accuracy, log loss) `first` beats `second`: higher accuracy, or the same and a lower loss."""
    return first[0] > second[0] or (first[0] == second[0] and first[1] < second[1])


def fit_probe(train_features: np.ndarray, train_labels: np.ndarray, val_features: np.ndarray,
              val_labels: np.ndarray, num_classes: int, class_weight: str = "none") -> Probe:
    """The probe with the C of C_VALUES that scores best on validation (see the module's docstring)."""
    missing = sorted(set(range(num_classes)) - set(np.unique(train_labels).tolist()))
    if missing:
        raise ValueError(f"the linear probe needs training images of every class; classes {missing} have none")
    mean = train_features.mean(axis=0)
    # One scale for all features, not one per feature: a feature that barely varies on the training photos
    # (many of a ReLU network's pooled features) would otherwise get a weight of its coefficient over its
    # tiny spread: on the photos it was fitted on that hardly shows, but fine-tuning from it (LP-FT) then
    # sees huge gradients through those features, and an augmented photo moves its logits wildly.
    scale = max(float(np.sqrt(train_features.var(axis=0).mean())), 1e-6)
    standard_train = (train_features - mean) / scale
    best = None
    for c in C_VALUES:
        model = LogisticRegression(C=c, max_iter=1000, class_weight=None if class_weight == "none" else class_weight)
        with warnings.catch_warnings():
            # A C this weak may stop at max_iter; its validation score says whether it matters.
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(standard_train, train_labels)
        kernel, bias = _softmax_weights(model)
        kernel, bias = kernel / scale, bias - (mean / scale) @ kernel
        candidate = Probe(kernel.astype("float32"), bias.astype("float32"), c, 0.0, 0.0)
        probabilities = candidate.probabilities(val_features)
        accuracy, loss = score(probabilities, val_labels)
        if best is None or better((accuracy, loss), (best.val_accuracy, best.val_log_loss)):
            best = dataclasses.replace(candidate, val_accuracy=accuracy, val_log_loss=loss,
                                       val_probabilities=probabilities)
    return best


def _softmax_weights(model: LogisticRegression) -> tuple[np.ndarray, np.ndarray]:
    """(kernel features × classes, bias) of a fitted model as softmax weights.

    With two classes scikit-learn keeps one row w (the log-odds of class 1);
    softmax over [-w/2, w/2] gives the same probabilities.
    """
    coefficients, intercepts = model.coef_, model.intercept_
    if coefficients.shape[0] == 1:
        coefficients = np.concatenate([-coefficients / 2, coefficients / 2])
        intercepts = np.concatenate([-intercepts / 2, intercepts / 2])
    return coefficients.T.astype("float64"), intercepts.astype("float64")
