"""`make tune`: an Optuna search over params.yaml keys in which every trial is a DVC experiment.

    python scripts/tune.py [--workers 2] [--n-trials N] [--timeout SECONDS] [--storage URL]
    python scripts/tune.py --report     # rewrite reports/tune/ from the study as it is
    python scripts/tune.py --apply      # the best trial becomes the pipeline's model

The `tune:` section of params.yaml says what is searched. Each trial draws
values for the keys of tune.space and runs

    dvc exp run --temp --name <study_name>-<trial> -S key=value ... <tune.stage>

in a temporary copy of the workspace, so several workers never share one
(and every trial is listed by `dvc exp show`, with its params and metrics).
The stage reports its validation score after every epoch to the study
(imgcls/tuning.py), which may prune the trial; the trial's value is the
stage's train.json figure `tune.metric`.

The study lives in a database (tune.storage, or TUNE_STORAGE): an SQLite file
for the workers of one machine, a PostgreSQL URL shared by several machines.
A restarted study with the same storage runs only the trials still missing.
An interrupted trial (Ctrl-C, SIGTERM) is marked failed; one whose worker was
killed outright is marked failed by the next worker after its heartbeat stops.
Results go to reports/tune/: trials.csv, best.yaml, history.png,
intermediate.png and importance.png.
"""

import argparse
import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from imgcls import search, tune_report
from imgcls.dataset import REPORTS_DIR
from imgcls.errors import UserError
from imgcls.params import TuneParams, load_params

REPORT_DIR = REPORTS_DIR / "tune"


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=1, help="trials run at once on this machine")
    parser.add_argument("--n-trials", type=int, help="overrides tune.n_trials")
    parser.add_argument("--timeout", type=int, help="overrides tune.timeout (seconds)")
    parser.add_argument("--storage", help="overrides tune.storage and TUNE_STORAGE")
    parser.add_argument("--report", action="store_true", help="only write reports/tune/ from the study")
    parser.add_argument("--apply", action="store_true", help="dvc exp apply the best trial, then dvc repro")
    arguments = parser.parse_args()
    if arguments.workers < 1:
        parser.error("--workers must be 1 or more")
    return arguments


def tune_settings(arguments) -> tuple[TuneParams, str]:
    """params.yaml's tune section with the command line's overrides, and the storage URL to use."""
    settings = load_params().tune
    overrides = {key: value for key, value in (("n_trials", arguments.n_trials), ("timeout", arguments.timeout))
                 if value is not None}
    if overrides:
        settings = TuneParams.model_validate(settings.model_dump() | overrides)
    url = arguments.storage or os.environ.get("TUNE_STORAGE") or settings.storage
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        # A relative SQLite path is from the repository root: the trials run in other folders.
        path = Path(url.removeprefix("sqlite:///")).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{path}"
    return settings, url


def print_progress(study, frozen) -> None:
    """One line per finished trial: its state, value, time and values, and the best so far."""
    seconds = (frozen.datetime_complete - frozen.datetime_start).total_seconds() if frozen.datetime_complete else 0
    values = ", ".join(f"{key.rsplit('.', 1)[-1]}={value:.4g}" if isinstance(value, float) else
                       f"{key.rsplit('.', 1)[-1]}={value}" for key, value in frozen.params.items())
    state = frozen.state.name.lower()
    # A pruned trial's value is its last epoch's score (Optuna's convention): say where it stopped.
    result = (f"epoch {frozen.user_attrs.get('pruned_at_epoch')}" if state == "pruned" else
              f"{frozen.value:.4f}" if frozen.value is not None else "-")
    try:
        best = f"best {study.best_value:.4f} (trial {study.best_trial.number})"
    except ValueError:
        best = "no complete trial yet"
    print(f"tune: trial {frozen.number:3d} {state:8s} {result:>9s}  {seconds:5.0f} s  {best}  [{values}]", flush=True)


def optimize(study, settings: TuneParams, url: str, workers: int) -> None:
    import optuna

    counted = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    remaining = settings.n_trials - len(study.get_trials(deepcopy=False, states=counted))
    if remaining <= 0:
        print(f"tune: study {settings.study_name} already has its {settings.n_trials} trials (raise tune.n_trials"
              " or --n-trials for more)")
        return
    print(f"tune: study {settings.study_name} in {search.safe_url(url)}: {remaining} of {settings.n_trials} trials"
          f" to run, {workers} at a time, tuning {settings.stage} for {settings.metric}", flush=True)
    study.optimize(lambda trial: search.run_trial(trial, settings, url), n_trials=remaining, n_jobs=workers,
                   timeout=settings.timeout or None, catch=(search.TrialFailed,),
                   callbacks=[optuna.study.MaxTrialsCallback(settings.n_trials, states=counted), print_progress])


def apply_best(study, settings: TuneParams) -> None:
    """`dvc exp apply` the best trial's experiment, then `dvc repro` the stages below it."""
    try:
        best = study.best_trial
    except ValueError:
        raise UserError(f"study {settings.study_name} has no complete trial yet: run `make tune` first") from None
    name = best.user_attrs["experiment"]
    if name not in search.experiment_names():
        raise UserError(f"the best trial's experiment {name} is not in this repository: it ran on"
                        f" {best.user_attrs.get('machine', 'another machine')}. There, run `dvc exp push origin"
                        f" {name}` (and `dvc push`); here, `dvc exp pull origin {name}`, then rerun this.")
    print(f"tune: applying trial {best.number} ({name}: {settings.metric} {best.value:.4f}), then dvc repro")
    applied = subprocess.run([sys.executable, "-m", "dvc", "exp", "apply", name], capture_output=True, text=True)
    print(applied.stdout + applied.stderr, end="")
    if applied.returncode != 0:
        if "Checkout failed for following targets:" not in applied.stdout + applied.stderr:
            raise UserError(f"dvc exp apply {name} failed (above); the workspace may be half applied: `git status`")
        # The experiment ran only the tuned stage and those above it: outputs of the others that this
        # workspace never made are not in its cache, and `dvc repro` makes them.
        print("tune: the outputs above are not in this workspace's DVC cache; dvc repro makes them")
    subprocess.run([sys.executable, "-m", "dvc", "repro"], check=True)


def bring_up_to_date(stages: list[str]) -> None:
    """`dvc repro` the stages above the tuned one, one tune process of this workspace at a time."""
    lock_path = Path(".dvc/tmp/tune.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        # DVC's own lock fails at once when another process reproduces the same outputs.
        fcntl.flock(lock, fcntl.LOCK_EX)
        subprocess.run([sys.executable, "-m", "dvc", "repro", *stages], check=True)


def main() -> None:
    arguments = parse_arguments()
    settings, url = tune_settings(arguments)
    above, searched_above = search.check_stages_read_space(settings)
    study = search.open_study(settings, url)
    if arguments.apply:
        return apply_best(study, settings)
    started = time.perf_counter()
    if not arguments.report:
        search.check_names_are_free(settings, study)
        search.check_layer_names(settings, load_params().train_transfer)
        if above and not searched_above:  # once here, instead of in every trial
            bring_up_to_date(above)
        # SIGTERM (a spot VM's notice, `kill`) ends the study like Ctrl-C: the running trials are marked failed.
        for signal_number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signal_number, search.interrupt)
    try:
        if not arguments.report:
            optimize(study, settings, url, arguments.workers)
    finally:
        tune_report.write(study, settings, REPORT_DIR)
        print(tune_report.summary(study, settings, time.perf_counter() - started))


if __name__ == "__main__":
    try:
        main()
    except UserError as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:
        sys.exit("tune: interrupted; its running trials are marked failed. Run the same command again (same"
                 " storage) to go on with the study.")
