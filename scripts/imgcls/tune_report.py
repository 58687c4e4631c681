"""reports/tune/ from a study (scripts/tune.py): every trial, the best one's params, and Optuna's plots.

  trials.csv        one row per trial: number, state, value, seconds, experiment, machine, the epoch a
                    pruned trial stopped at, and its value for each searched key
  best.yaml         the best trial: value, experiment, params (dotted keys) and how to apply it
  history.png       the value of each trial, and the best so far (optimisation history)
  intermediate.png  the metric after each epoch of every trial: where pruned ones stopped
  importance.png    how much of the value's variation each key explains (fANOVA), from 2 complete trials
"""

import warnings
from pathlib import Path

import pandas as pd
import yaml

from imgcls.dataset import atomic_path, write_csv


def trials_table(study, searched: list[str]) -> pd.DataFrame:
    rows = []
    for trial in study.get_trials(deepcopy=False):
        ended = trial.datetime_complete
        rows.append({
            "trial": trial.number,
            "state": trial.state.name.lower(),
            "value": trial.value,
            "seconds": round((ended - trial.datetime_start).total_seconds(), 1) if ended and trial.datetime_start
            else None,
            "experiment": trial.user_attrs.get("experiment"),
            "machine": trial.user_attrs.get("machine"),
            "pruned_at_epoch": trial.user_attrs.get("pruned_at_epoch"),
            "epochs_run": trial.user_attrs.get("metrics", {}).get("epochs_run"),
            **{key: trial.params.get(key) for key in searched},
        })
    return pd.DataFrame(rows, columns=["trial", "state", "value", "seconds", "experiment", "machine",
                                       "pruned_at_epoch", "epochs_run", *searched])


def best_trial_or_none(study):
    try:
        return study.best_trial
    except ValueError:  # no complete trial yet
        return None


def save_figure(axes, path: Path) -> None:
    figure = axes.figure if hasattr(axes, "figure") else axes[0].figure
    figure.set_size_inches(8, 5)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    import matplotlib.pyplot as plt

    plt.close(figure)


def write(study, settings, folder: Path) -> None:
    """Write every file of reports/tune/ (those that need complete trials once there are enough)."""
    import matplotlib

    matplotlib.use("Agg")
    import optuna
    from optuna.visualization import matplotlib as plots

    folder = Path(folder)
    write_csv(folder / "trials.csv", trials_table(study, list(settings.space)))
    best = best_trial_or_none(study)
    if best is None:
        return
    summary = {
        "study": settings.study_name, "stage": settings.stage, "metric": settings.metric,
        "value": best.value, "trial": best.number, "experiment": best.user_attrs.get("experiment"),
        "params": best.params,
        "apply": "make tune-apply  (dvc exp apply <experiment>, then dvc repro)",
    }
    with atomic_path(folder / "best.yaml") as temporary:
        temporary.write_text(yaml.safe_dump(summary, sort_keys=False))
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        save_figure(plots.plot_optimization_history(study), folder / "history.png")
        save_figure(plots.plot_intermediate_values(study), folder / "intermediate.png")
        if len(complete) >= 2:
            try:
                save_figure(plots.plot_param_importances(study), folder / "importance.png")
            except (RuntimeError, ValueError) as error:  # e.g. every complete trial drew the same values
                print(f"tune: no importance plot yet ({error})")


def summary(study, settings, seconds: float) -> str:
    """The study's closing line: trials by state, the best value and how to apply it."""
    counts = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name.lower()] = counts.get(trial.state.name.lower(), 0) + 1
    states = ", ".join(f"{counts.get(state, 0)} {state}" for state in ("complete", "pruned", "fail"))
    line = f"tune: study {settings.study_name}: {sum(counts.values())} trials ({states}); {seconds:.0f} s this run"
    best = best_trial_or_none(study)
    if best is None:
        return line + "; no complete trial yet"
    return (f"{line}\ntune: best {settings.metric} {best.value:.4f}, trial {best.number}"
            f" (experiment {best.user_attrs.get('experiment')}); reports/tune/best.yaml has its params."
            " Make it the pipeline's model: make tune-apply")
