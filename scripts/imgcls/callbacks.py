"""What a training stage watches: the best epoch so far (KeepBest), the curves (TrainingLog), a non-finite loss."""

import math
import time
from pathlib import Path

import keras
import numpy as np
import pandas as pd
from dvclive import Live

from imgcls import keras_internals
from imgcls.dataset import atomic_path, write_csv
from imgcls.errors import UserError

MONITOR_MODES = {"val_accuracy": "max", "val_loss": "min"}


@keras_internals.run_batch_hooks_in_background
class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stop the phase once the loss is NaN or infinite: no later step can recover from it.

    Keras' TerminateOnNaN does the same, but its per-batch hook makes every step
    wait for the host to read its loss. This one runs on Keras' callback thread
    while the next steps are already dispatched, so it stops the phase a few
    steps after the bad one, still within the epoch.
    """

    def set_model(self, model):
        super().set_model(model)
        # Kept apart from `self.model`: on JAX, reading that property copies the training state into the
        # model's variables, which from the callback thread would race with the steps being run.
        self.trained_model = model

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss) and not self.trained_model.stop_training:
            print(f"batch {batch + 1}: the loss is {loss}; stopping this phase (lower the learning rate?)")
            self.trained_model.stop_training = True


class KeepBest(keras.callbacks.Callback):
    """Remember the weights of the epoch with the best validation score (across several fits)."""

    def __init__(self, monitor: str = "val_accuracy", keep_last: bool = False):
        super().__init__()
        if monitor not in MONITOR_MODES:
            raise ValueError(f"monitor must be one of {sorted(MONITOR_MODES)}, got {monitor!r}")
        self.monitor = monitor
        self.keep_last = keep_last  # no validation data: every epoch with finite losses replaces the one before
        self.mode = MONITOR_MODES[monitor]
        self.best_value = None
        self.best_epoch = None  # 1-based, counted across all fits
        self.best_logs = {}
        self.weights = None
        self.epochs_seen = 0

    def improved(self, value: float, logs: dict | None = None) -> bool:
        """Whether `value` beats the best so far (higher accuracy, lower loss).

        Accuracy on a few hundred images ties often; a tie goes to the epoch with
        the lower validation loss (usually a later one, at a lower learning rate).
        """
        if self.best_value is None:
            return True
        if value == self.best_value and self.monitor != "val_loss" and logs and "val_loss" in logs:
            return logs["val_loss"] < self.best_logs.get("val_loss", float("inf"))
        return value > self.best_value if self.mode == "max" else value < self.best_value

    def on_epoch_end(self, epoch, logs=None):
        self.epochs_seen += 1
        logs = logs or {}
        value = self.epochs_seen if self.keep_last else logs.get(self.monitor)
        if value is None:
            raise ValueError(f"{self.monitor} is not in the epoch logs: pass validation data to fit")
        # An epoch whose losses are not finite has broken weights, whatever its accuracy says.
        finite = all(math.isfinite(logs.get(key, 0.0)) for key in ("loss", "val_loss"))
        if finite and (self.keep_last or self.improved(value, logs)):
            self.best_value = float(value)
            self.best_epoch = self.epochs_seen
            self.best_logs = {key: float(number) for key, number in logs.items()}
            self.weights = [np.array(weight) for weight in self.model.get_weights()]

    def state(self) -> dict:
        """What a checkpoint needs besides the weights (see checkpoint.TrainingState)."""
        return {"best_value": self.best_value, "best_epoch": self.best_epoch, "best_logs": self.best_logs,
                "epochs_seen": self.epochs_seen}

    def restore_state(self, state: dict, weights: list[np.ndarray]) -> None:
        self.best_value, self.best_epoch = state["best_value"], state["best_epoch"]
        self.best_logs, self.epochs_seen = state["best_logs"], state["epochs_seen"]
        self.weights = weights or None

    def restore(self, model: keras.Model) -> None:
        """Load the best weights into `model`; fail clearly if no epoch had a finite score."""
        if self.weights is None:
            raise UserError(f"training never produced a finite {self.monitor} (the loss diverged):"
                            " lower the learning rate in params.yaml and rerun.")
        model.set_weights(self.weights)


class TrainingLog(keras.callbacks.Callback):
    """Per-epoch train/validation loss and accuracy → DVCLive plots data, history.csv and a PNG.

    Files in `report_dir`: live/plots/metrics/{train,val}/{loss,accuracy}.tsv
    (declared as plots in dvc.yaml; DVCLive is told not to edit dvc.yaml),
    history.csv, and training.png "training vs validation loss" (and accuracy),
    with a dashed line where each phase after the first begins.
    """

    def __init__(self, report_dir: Path | str, title: str = "model"):
        super().__init__()
        self.report_dir = Path(report_dir)
        self.title = title
        self.rows: list[dict] = []
        self.phases: list[tuple[int, str]] = []  # (first epoch of the phase, 1-based; phase name)
        self.live = Live(dir=str(self.report_dir / "live"), dvcyaml=None, save_dvc_exp=False)
        self._started = None

    def start_phase(self, name: str) -> None:
        """Mark that the next epochs belong to phase `name` (shown in history.csv and on the plot)."""
        self.phases.append((len(self.rows) + 1, name))

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        row = {
            "epoch": len(self.rows) + 1,
            "phase": self.phases[-1][1] if self.phases else "",
            "loss": logs.get("loss"),
            "accuracy": logs.get("accuracy"),
            "val_loss": logs.get("val_loss"),
            "val_accuracy": logs.get("val_accuracy"),
            "learning_rate": _current_learning_rate(self.model),
            "seconds": time.perf_counter() - self._started if self._started else None,
        }
        self.rows.append(row)
        self._log_live(row)

    def _log_live(self, row: dict) -> None:
        self.live.step = row["epoch"]  # DVCLive's x axis is then the epoch number, across phases
        for split, prefix in (("train", ""), ("val", "val_")):
            for metric in ("loss", "accuracy"):
                if row[prefix + metric] is not None:
                    self.live.log_metric(f"{split}/{metric}", float(row[prefix + metric]))
        self.live.next_step()

    def state(self) -> dict:
        return {"rows": self.rows, "phases": self.phases}

    def restore(self, state: dict) -> None:
        """Continue the curves of a resumed run: its epochs so far, written again to DVCLive's files."""
        self.rows = [dict(row) for row in state["rows"]]
        self.phases = [tuple(phase) for phase in state["phases"]]
        for row in self.rows:
            self._log_live(row)

    def finish(self) -> None:
        """Write history.csv and training.png, and close DVCLive."""
        self.live.end()
        write_csv(self.report_dir / "history.csv", pd.DataFrame(self.rows))
        self.plot(self.report_dir / "training.png")

    def plot(self, path: Path) -> None:
        """Write the loss and accuracy curves side by side as a PNG, phase boundaries dashed."""
        # Imported here: pyplot must load after the file-only Agg backend is chosen, and choosing it at
        # import time would impose it on every program that imports this module.
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = [row["epoch"] for row in self.rows]
        figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for axis, metric, label in ((axes[0], "loss", "loss"), (axes[1], "accuracy", "accuracy")):
            axis.plot(epochs, [row[metric] for row in self.rows], marker=".", label=f"training {label}")
            axis.plot(epochs, [row[f"val_{metric}"] for row in self.rows], marker=".", label=f"validation {label}")
            for first_epoch, name in self.phases[1:]:
                axis.axvline(first_epoch - 0.5, color="grey", linestyle="--", linewidth=1)
                axis.text(first_epoch - 0.4, 0.98, name, transform=axis.get_xaxis_transform(), va="top",
                          fontsize=8, color="grey")
            axis.set_xlabel("epoch")
            axis.set_ylabel(label)
            axis.grid(alpha=0.3)
            axis.legend()
        axes[0].set_title(f"{self.title}: training vs validation loss")
        axes[1].set_title(f"{self.title}: training vs validation accuracy")
        figure.tight_layout()
        with atomic_path(path) as temporary:
            figure.savefig(temporary, format="png", dpi=110)
        plt.close(figure)


def _current_learning_rate(model) -> float | None:
    try:
        optimizer = model.optimizer
        rate = optimizer.learning_rate  # a schedule evaluated at the current step, or a variable
        return float(keras.ops.convert_to_numpy(rate))
    except Exception:  # a learning rate is informative only; never fail training over it
        return None
