"""A training stage's side of a hyperparameter search (scripts/tune.py): report each epoch, stop when pruned.

scripts/tune.py runs each trial as `dvc exp run --temp`, a stage in another
process (and another folder), and tells it which trial it is through one
environment variable, IMGCLS_TUNE_TRIAL (JSON: storage, study, trial number,
metric, pruner). When it is set:

  - `pruning_callbacks()` gives the training phases a Keras callback that
    reports the metric after every epoch to the trial in the study's storage
    and, when the study's pruner rejects the trial, ends training. The stage
    then finishes as usual (its experiment is saved, with the model it had),
    and the trial is marked pruned, not failed.
  - `record_metrics(metrics)` stores the stage's train.json figures on the
    trial, where tune.py reads the trial's value.

Without the variable both do nothing, and Optuna is never imported. The
callback uses only `keras.callbacks.Callback` and the epoch logs, so it works
on every backend (Optuna's own TFKerasPruningCallback imports tensorflow.keras).
"""

import json
import os

import keras

ENVIRONMENT_VARIABLE = "IMGCLS_TUNE_TRIAL"


def trial_settings() -> dict | None:
    """The trial this process trains for, from the environment, or None outside a search."""
    text = os.environ.get(ENVIRONMENT_VARIABLE)
    return json.loads(text) if text else None


def build_pruner(name: str, startup_trials: int, warmup_epochs: int):
    """The Optuna pruner `name` (tune.pruner): median, successive_halving or none."""
    import optuna

    if name == "median":
        # n_min_trials: at an epoch that fewer than startup_trials finished trials reached (the others
        # stopped early), the "median" would be that of the few that kept improving: no pruning there.
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_epochs,
                                           n_min_trials=max(1, startup_trials))
    if name == "successive_halving":
        # Rungs at warmup_epochs × 2^k epochs, keeping the best third of the trials at each.
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, warmup_epochs))
    return optuna.pruners.NopPruner()


class Trial:
    """The running trial of a study, reached through the storage's public interface from this process."""

    def __init__(self, settings: dict):
        import optuna

        self.storage = optuna.storages.RDBStorage(settings["storage"])
        self.pruner = build_pruner(settings["pruner"], settings["startup_trials"], settings["warmup_epochs"])
        self.study = optuna.load_study(study_name=settings["study"], storage=self.storage, pruner=self.pruner)
        self.number = settings["trial"]
        study_id = self.storage.get_study_id_from_name(settings["study"])
        self.trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, self.number)
        if self.storage.get_trial(self.trial_id).state != optuna.trial.TrialState.RUNNING:
            raise RuntimeError(f"trial {self.number} of study {settings['study']} is not running: it was ended"
                               " by its worker (interrupted?), so this run no longer belongs to the study")

    def report(self, value: float, epoch: int) -> None:
        self.storage.set_trial_intermediate_value(self.trial_id, epoch, value)

    def should_prune(self) -> bool:
        return self.pruner.prune(self.study, self.storage.get_trial(self.trial_id))

    def set_user_attr(self, key: str, value) -> None:
        self.storage.set_trial_user_attr(self.trial_id, key, value)


class ReportToTrial(keras.callbacks.Callback):
    """After each epoch, report `metric` to the trial; stop training (this phase and any later one) once pruned.

    Epochs are counted across the stage's phases, so the pruner compares the
    trials at the same point of training.
    """

    def __init__(self, trial, metric: str):
        super().__init__()
        self.trial = trial
        self.metric = metric
        self.epochs_seen = 0
        self.pruned_at_epoch = None

    def on_train_begin(self, logs=None):
        if self.pruned_at_epoch is not None:  # a later phase of a pruned trial does not train
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        self.epochs_seen += 1
        value = (logs or {}).get(self.metric)
        if value is None or self.pruned_at_epoch is not None:
            return
        self.trial.report(float(value), self.epochs_seen)
        if self.trial.should_prune():
            self.pruned_at_epoch = self.epochs_seen
            self.trial.set_user_attr("pruned_at_epoch", self.epochs_seen)
            print(f"tune: trial {self.trial.number} pruned after epoch {self.epochs_seen} ({self.metric}"
                  f" {value:.4f}, behind the study's other trials at this epoch)")
            self.model.stop_training = True


_reporter = None  # one per process: its epoch count and pruned state span every phase


def pruning_callbacks() -> list:
    """[ReportToTrial] while a search runs this stage as one of its trials, else []."""
    global _reporter
    settings = trial_settings()
    if settings is None:
        return []
    if _reporter is None:
        _reporter = ReportToTrial(Trial(settings), settings["metric"])
    return [_reporter]


def record_metrics(metrics: dict) -> None:
    """Store the stage's training metrics on its trial (where tune.py reads the trial's value)."""
    settings = trial_settings()
    if settings is None:
        return
    trial = _reporter.trial if _reporter is not None else Trial(settings)
    trial.set_user_attr("metrics", {key: value for key, value in metrics.items()
                                    if isinstance(value, (int, float)) and not isinstance(value, bool)})
