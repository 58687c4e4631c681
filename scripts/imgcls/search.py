"""The machinery of scripts/tune.py: the pipeline's stages above the tuned one, the study, and one trial.

A trial draws its values, then runs `dvc exp run --temp` of the tuned stage as
a process group of its own (so that Ctrl-C or SIGTERM of the study stops every
running trial), with IMGCLS_TUNE_TRIAL telling the stage which trial it is
(imgcls/tuning.py). Its value is the metric the stage recorded on the trial.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
import zlib
from pathlib import Path

import yaml

from imgcls import tuning
from imgcls.errors import UserError
from imgcls.params import TuneParams

# One log per trial. Like the study's default SQLite file, in .tune/ (git-ignored): `dvc exp apply` deletes
# ignored files inside folders that an experiment holds, such as reports/.
LOG_DIR = Path(".tune/logs")
# A worker that stops sending heartbeats for this long (killed, machine lost) has its trial marked failed.
HEARTBEAT_SECONDS, GRACE_SECONDS = 30, 120


def stages_above(stage: str) -> tuple[list[str], dict[str, set[str]]]:
    """The stages `stage` depends on, directly or not (in dvc.yaml's order), and the params each of them
    and `stage` itself declare in dvc.yaml."""
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
    params = {name: {entry for entry in stages[name].get("params", []) if isinstance(entry, str)}
              for name in needed | {stage}}
    return [name for name in stages if name in needed], params


def reads(declared: set[str], key: str) -> bool:
    """Whether a stage that declares the params `declared` reads the dotted `key` (or its whole section)."""
    return any(key == name or key.startswith(name + ".") for name in declared)


def check_stages_read_space(settings: TuneParams) -> tuple[list[str], bool]:
    """Check that the tuned stage (or a stage above it) reads every key searched, or its trials would all
    tie; return the stages above it and whether the search changes any of their params."""
    above, params = stages_above(settings.stage)
    unread = [key for key in settings.space if not any(reads(declared, key) for declared in params.values())]
    if unread:
        raise UserError(f"tune.space has key(s) that {settings.stage} and the stages above it do not read"
                        f" (dvc.yaml lists their params): {', '.join(unread)}. Trials would differ only in"
                        " name: remove them, or tune the stage that reads them (tune.stage).")
    return above, any(reads(params[name], key) for name in above for key in settings.space)


def check_layer_names(settings: TuneParams, transfer_section) -> None:
    """Fail before the first trial when tune.space offers fine_tune.unfreeze a layer name that a base it may
    train lacks: a layer name belongs to one base, and the params' check cannot see layers without building
    the network, so each such trial would fail on its own."""
    dimension = settings.space.get("train_transfer.fine_tune.unfreeze")
    choices = dimension.choices if dimension and dimension.type == "categorical" else []  # int: layer counts
    names = [value for value in choices if isinstance(value, str) and value != "auto"]
    if not names:
        return
    searched_bases = settings.space.get("train_transfer.base")
    from imgcls import transfer  # Keras, imported only when there are names to check

    problems = []
    for base in searched_bases.choices if searched_bases else [transfer_section.base]:
        layers = {layer.name for layer in transfer.build_base(base, 0, "none").layers}
        if missing := [name for name in names if name not in layers]:
            problems.append(f"{base} has no layer {', '.join(missing)}")
    if problems:
        raise UserError(f"tune.space.train_transfer.fine_tune.unfreeze offers layers a base does not have:"
                        f" {'; '.join(problems)}. Offer auto (each base's last stage), numbers of top layers,"
                        " or names of the tuned base's layers.")


def open_study(settings: TuneParams, url: str):
    import optuna

    # One line per trial is printed below; Optuna's own log would repeat each, and the heartbeat
    # (experimental since Optuna 2.9) warns at every start.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    import sqlalchemy

    for attempt in range(5):
        try:
            storage = optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_SECONDS,
                                                 grace_period=GRACE_SECONDS)
            break
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as error:
            # Workers started together on an empty database race to create its tables and types (a
            # duplicate key, or PostgreSQL's 'type "studydirection" already exists'): the losers retry.
            setup_error = error
            time.sleep(1 + attempt)
    else:
        raise UserError(f"could not set up the study's tables in {safe_url(url)}: {setup_error.orig}")
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


def experiment_names() -> list[str]:
    """Names of this repository's experiments, on every commit."""
    listed = subprocess.run([sys.executable, "-m", "dvc", "exp", "list", "--all-commits", "--name-only"],
                            capture_output=True, text=True, check=True)
    return listed.stdout.split()


def check_names_are_free(settings: TuneParams, study) -> None:
    """Stop if experiments named like this study's next trials exist: a study begun again in a new storage
    would give its trials the names of the old one's, and every `dvc exp run --name` would fail."""
    prefix, known = f"{settings.study_name}-", len(study.trials)
    taken = sorted(name for name in experiment_names() if name.startswith(prefix)
                   and name.removeprefix(prefix).isdigit() and int(name.removeprefix(prefix)) >= known)
    if taken:
        raise UserError(f"experiments {', '.join(taken[:5])}{' …' if len(taken) > 5 else ''} exist, but study"
                        f" {settings.study_name} in this storage has only {known} trials (a new storage?): set"
                        f" tune.study_name to a new name, or remove them (dvc exp remove {' '.join(taken[:5])})")


def safe_url(url: str) -> str:
    """The storage URL without its password, for messages."""
    scheme, _, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if at and ":" in credentials:
        return f"{scheme}://{credentials.split(':')[0]}:***@{host}"
    return url


class TrialFailed(Exception):
    """The trial's stage failed; the study goes on with the next trial."""


# The trials' `dvc exp run` processes, each in its own process group: an interrupt stops them all.
_running: set[subprocess.Popen] = set()
# Reentrant: `interrupt` runs in the main thread, which may hold it while starting a trial.
_running_lock = threading.RLock()


def interrupt(signal_number=None, frame=None):
    """On Ctrl-C or SIGTERM: stop every running trial (each is then marked failed) and end the study."""
    with _running_lock:
        for process in _running:
            try:
                os.killpg(process.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
    raise KeyboardInterrupt


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
    if returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-5:])
        raise TrialFailed(f"dvc exp run exited with status {returncode} (log: {log_path}):\n{tail}")
    frozen = next(item for item in trial.study.get_trials(deepcopy=False) if item.number == trial.number)
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
