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
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import yaml

from imgcls import tuning
from imgcls.dataset import REPORTS_DIR
from imgcls.errors import UserError
from imgcls.params import TuneParams, load_params

REPORT_DIR = REPORTS_DIR / "tune"
LOG_DIR = REPORT_DIR / "logs"  # one log per trial (git-ignored)
# A worker that stops sending heartbeats for this long (killed, machine lost) has its trial marked failed.
HEARTBEAT_SECONDS, GRACE_SECONDS = 30, 120


class TrialFailed(Exception):
    """The trial's stage failed; the study goes on with the next trial."""


# The trials' `dvc exp run` processes, each in its own process group: an interrupt stops them all.
_running: set[subprocess.Popen] = set()
_running_lock = threading.Lock()


def interrupt(signal_number=None, frame=None):
    """On Ctrl-C or SIGTERM: stop every running trial (each is then marked failed) and end the study."""
    with _running_lock:
        for process in _running:
            try:
                os.killpg(process.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
    raise KeyboardInterrupt


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


def stages_above(stage: str) -> tuple[list[str], set[str]]:
    """The stages `stage` depends on, directly or not (in dvc.yaml's order), and every param they and it read."""
    stages = yaml.safe_load(Path("dvc.yaml").read_text())["stages"]

    def outputs(name):
        entries = stages[name].get("outs", []) + stages[name].get("metrics", [])
        return [Path(next(iter(entry)) if isinstance(entry, dict) else entry) for entry in entries]

    def feeds(upstream, downstream):
        deps = [Path(dep) for dep in stages[downstream].get("deps", [])]
        return any(dep == out or out in dep.parents or dep in out.parents
                   for dep in deps for out in outputs(upstream))

    needed, frontier = set(), [stage]
    while frontier:
        current = frontier.pop()
        for name in stages:
            if name not in needed and name != current and feeds(name, current):
                needed.add(name)
                frontier.append(name)
    params = {entry for name in needed | {stage} for entry in stages[name].get("params", [])
              if isinstance(entry, str)}
    return [name for name in stages if name in needed], params


def check_space(settings: TuneParams, read: set[str]) -> None:
    """Every key searched must be one the tuned stage (or a stage above it) reads, or its trials all tie."""
    unread = [key for key in settings.space
              if not any(key == name or key.startswith(name + ".") for name in read)]
    if unread:
        raise UserError(f"tune.space has key(s) that {settings.stage} and the stages above it do not read"
                        f" (dvc.yaml lists their params): {', '.join(unread)}. Trials would differ only in"
                        " name: remove them, or tune the stage that reads them (tune.stage).")


def open_study(settings: TuneParams, url: str):
    import optuna

    import sqlalchemy

    for attempt in range(5):
        try:
            storage = optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_SECONDS,
                                                 grace_period=GRACE_SECONDS)
            break
        except sqlalchemy.exc.IntegrityError:
            # Workers started together on an empty database race to create its tables: the losers retry.
            time.sleep(1 + attempt)
    else:
        raise UserError(f"could not set up the study's tables in {safe_url(url)}: see the error above")
    study = optuna.create_study(study_name=settings.study_name, storage=storage, load_if_exists=True,
                                direction=settings.direction)
    if study.direction.name.lower() != settings.direction:
        raise UserError(f"study {settings.study_name} in {safe_url(url)} was created to {study.direction.name.lower()}"
                        f" its metric, but tune.direction is {settings.direction}: give tune.study_name a new name")
    # Seeded from tune.seed, the trials already run and the machine: reproducible on one machine,
    # and two machines joining one study do not draw the same first values.
    seed = zlib.crc32(f"{settings.seed}/{len(study.trials)}/{socket.gethostname()}".encode())
    study.sampler = (optuna.samplers.TPESampler(seed=seed, constant_liar=True) if settings.sampler == "tpe"
                     else optuna.samplers.RandomSampler(seed=seed))
    return study


def safe_url(url: str) -> str:
    """The storage URL without its password, for messages."""
    scheme, _, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if at and ":" in credentials:
        return f"{scheme}://{credentials.split(':')[0]}:***@{host}"
    return url


def suggest(trial, key: str, dimension):
    if dimension.type == "categorical":
        return trial.suggest_categorical(key, dimension.choices)
    if dimension.type == "int":
        return trial.suggest_int(key, int(dimension.low), int(dimension.high), step=int(dimension.step or 1),
                                 log=dimension.log)
    return trial.suggest_float(key, dimension.low, dimension.high, step=dimension.step, log=dimension.log)


def run_trial(trial, settings: TuneParams, url: str) -> float:
    """One trial: its values, its `dvc exp run`, and its value (or TrialPruned, or TrialFailed)."""
    import optuna

    values = {key: suggest(trial, key, dimension) for key, dimension in settings.space.items()}
    name = f"{settings.study_name}-{trial.number}"
    trial.set_user_attr("experiment", name)
    trial.set_user_attr("machine", socket.gethostname())
    # --wait-for-lock: the workers of this machine take the workspace's lock in turn while queueing.
    command = [sys.executable, "-m", "dvc", "--wait-for-lock", "exp", "run", "--temp", "--name", name]
    for key, value in values.items():
        # As YAML, which is how DVC reads the value: 1e-05 written by Python would be read as a string.
        text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        command.append(f"--set-param={key}={text}")
    command.append(settings.stage)
    environment = os.environ | {tuning.ENVIRONMENT_VARIABLE: json.dumps({
        "storage": url, "study": settings.study_name, "trial": trial.number, "metric": settings.metric,
        "pruner": settings.pruner, "startup_trials": settings.startup_trials,
        "warmup_epochs": settings.warmup_epochs})}
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log_path = LOG_DIR / f"{name}.log"
    with open(log_path, "w") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        returncode = run_to_end(command, environment, log)
    frozen = next(item for item in trial.study.get_trials(deepcopy=False) if item.number == trial.number)
    if returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-5:])
        raise TrialFailed(f"dvc exp run exited with status {returncode} (log: {log_path}):\n{tail}")
    if "pruned_at_epoch" in frozen.user_attrs:
        raise optuna.TrialPruned(f"pruned after epoch {frozen.user_attrs['pruned_at_epoch']}")
    value = frozen.user_attrs.get("metrics", {}).get(settings.metric)
    if value is None:
        raise TrialFailed(f"{settings.stage} recorded no {settings.metric} for the trial (log: {log_path})")
    return value


def run_to_end(command: list[str], environment: dict, log) -> int:
    """Run `command` in a process group of its own, which `interrupt` stops (DVC then removes its copy)."""
    with _running_lock:
        process = subprocess.Popen(command, env=environment, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        _running.add(process)
    try:
        try:
            return process.wait()
        except BaseException:  # this thread was interrupted: `interrupt` has stopped the process
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
            raise
    finally:
        with _running_lock:
            _running.discard(process)


def print_progress(study, frozen) -> None:
    """One line per finished trial: its state, value, time and values, and the best so far."""
    seconds = (frozen.datetime_complete - frozen.datetime_start).total_seconds() if frozen.datetime_complete else 0
    values = ", ".join(f"{key.rsplit('.', 1)[-1]}={value:.4g}" if isinstance(value, float) else
                       f"{key.rsplit('.', 1)[-1]}={value}" for key, value in frozen.params.items())
    state = frozen.state.name.lower()
    result = f"{frozen.value:.4f}" if frozen.value is not None else {
        "pruned": f"epoch {frozen.user_attrs.get('pruned_at_epoch')}", "fail": "-"}.get(state, "-")
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
    print(f"tune: study {settings.study_name} in {safe_url(url)}: {remaining} of {settings.n_trials} trials to run,"
          f" {workers} at a time, tuning {settings.stage} for {settings.metric}", flush=True)
    study.optimize(lambda trial: run_trial(trial, settings, url), n_trials=remaining, n_jobs=workers,
                   timeout=settings.timeout or None, catch=(TrialFailed,),
                   callbacks=[optuna.study.MaxTrialsCallback(settings.n_trials, states=counted), print_progress])


def apply_best(study, settings: TuneParams) -> None:
    """`dvc exp apply` the best trial's experiment, then `dvc repro` the stages below it."""
    try:
        best = study.best_trial
    except ValueError:
        raise UserError(f"study {settings.study_name} has no complete trial yet: run `make tune` first") from None
    name = best.user_attrs["experiment"]
    listed = subprocess.run([sys.executable, "-m", "dvc", "exp", "list", "--all-commits", "--name-only"],
                            capture_output=True, text=True, check=True).stdout.split()
    if name not in listed:
        raise UserError(f"the best trial's experiment {name} is not in this repository: it ran on"
                        f" {best.user_attrs.get('machine', 'another machine')}. There, run `dvc exp push origin"
                        f" {name}` (and `dvc push`); here, `dvc exp pull origin {name}`, then rerun this.")
    print(f"tune: applying trial {best.number} ({name}: {settings.metric} {best.value:.4f}), then dvc repro")
    applied = subprocess.run([sys.executable, "-m", "dvc", "exp", "apply", name], capture_output=True, text=True)
    print(applied.stdout + applied.stderr, end="")
    if applied.returncode != 0 and not only_unrun_outputs_missing(applied.stdout + applied.stderr):
        raise UserError(f"dvc exp apply {name} failed (above); the workspace may be half applied: `git status`")
    subprocess.run([sys.executable, "-m", "dvc", "repro"], check=True)


def only_unrun_outputs_missing(output: str) -> bool:
    """Whether `dvc exp apply` failed only to check out outputs of stages that never ran (no dvc.lock entry):
    the experiment ran the tuned stage and those above it, and `dvc repro` makes the rest."""
    if "Checkout failed for following targets:" not in output:
        return False
    targets = output.split("Checkout failed for following targets:", 1)[1].split("Is your cache up to date?")[0]
    lock = yaml.safe_load(Path("dvc.lock").read_text()) if Path("dvc.lock").exists() else {}
    locked = {out["path"]
              for stage in (lock or {}).get("stages", {}).values() for out in stage.get("outs", [])}
    return all(target.strip() not in locked for target in targets.splitlines() if target.strip())


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
    above, read = stages_above(settings.stage)
    check_space(settings, read)
    from imgcls import tune_report

    study = open_study(settings, url)
    if arguments.apply:
        return apply_best(study, settings)
    started = time.perf_counter()
    if not arguments.report:
        # The stages above the tuned one, once, so that no trial runs them (when the search leaves them alone).
        if above and not any(key.split(".")[0] in {"data", "resize", "split"} for key in settings.space):
            bring_up_to_date(above)
        # SIGTERM (a spot VM's notice, `kill`) ends the study like Ctrl-C: the running trials are marked failed.
        for signal_number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signal_number, interrupt)
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
