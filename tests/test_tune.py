"""`make tune` (scripts/tune.py): an Optuna study whose trials are real `dvc exp run --temp` experiments.

The studies tune train_cnn on the tiny generated images (a trial takes seconds
of training). They run with several workers against SQLite and against a real
PostgreSQL server (Debian's, started here), prune a trial that trails the
others, survive a killed trial, and go on after an interrupt.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from conftest import TINY_CNN, TINY_TRANSFER, make_dataset, stage_env
from imgcls.search import safe_url

SEARCH = {
    "train_cnn.optimizer.learning_rate": {"type": "float", "low": 0.003, "high": 0.03, "log": True},
    "train_cnn.label_smoothing": {"type": "float", "low": 0.0, "high": 0.2},
}


def tuning_project(project, **tune):
    """The tiny CNN, a search over its learning rate and label smoothing, the data stages already run.

    The transfer model is the tiny one too: `--apply` runs `dvc repro`, and the default MobileNetV2
    at 224 px, fine-tuned on 21 photos, is unsure enough that its TFLite file (which resizes
    without antialiasing) disagreed on one of the export gate's 6 test images on some CPUs.
    """
    settings = {"stage": "train_cnn", "metric": "val_accuracy", "direction": "maximize", "n_trials": 4,
                "pruner": "none", "startup_trials": 1, "warmup_epochs": 1, "space": SEARCH} | tune
    project.set_params(**TINY_CNN, **TINY_TRANSFER, **{f"tune.{key}": value for key, value in settings.items()})
    project.run("git", "config", "user.name", "test")
    project.run("git", "config", "user.email", "test@example.com")
    project.run("git", "commit", "-qam", "tune tiny")
    return project


def tune(project, *arguments, check=True, env=None):
    return project.run(sys.executable, "scripts/tune.py", *arguments, check=check, env=env)


def study(project, storage=None):
    url = storage or f"sqlite:///{project.root / '.tune/study.db'}"
    return optuna.load_study(study_name="imgcls", storage=url)


def states(project, storage=None) -> list[str]:
    return [trial.state.name for trial in study(project, storage).trials]


def experiments(project) -> set[str]:
    listed = project.dvc("exp", "list", "--name-only").stdout.split()
    return set(listed)


def test_invalid_search_space_names_its_key(project):
    """A dimension that no param has, a value the param refuses, and a key the stage never reads."""
    project.set_params(**{"tune.space": {"train_cnn.learning_rate": {"type": "float", "low": 0.001, "high": 0.1}}})
    result = tune(project, check=False)
    assert result.returncode != 0
    assert "tune.space.train_cnn.learning_rate: no such param" in result.stderr

    project.set_params(**{"tune.space": {"train_cnn.net.dropout": {"type": "float", "low": 0.0, "high": 1.5}}})
    result = tune(project, check=False)
    assert "tune.space.train_cnn.net.dropout: the value 1.5 is not a valid train_cnn.net.dropout" in result.stderr

    project.set_params(**{"tune.space": {"train_cnn.epochs": {"type": "float", "low": 5, "high": 2}}})
    result = tune(project, check=False)
    assert "tune.space.train_cnn.epochs.low" not in result.stderr  # named by its dimension, not a field of it
    assert "tune.space.train_cnn.epochs" in result.stderr and "low < high" in result.stderr

    project.set_params(**{"tune.stage": "train_cnn", "tune.space": {
        "train_transfer.dropout": {"type": "float", "low": 0.0, "high": 0.5}}})
    result = tune(project, check=False)
    assert "train_cnn and the stages above it do not read" in result.stderr
    assert "train_transfer.dropout" in result.stderr

    # Layer names belong to one base: MobileNetV2's, offered while the pipeline fine-tunes EfficientNetB0.
    project.set_params(**{"tune.stage": "train_transfer", "train_transfer.base": "EfficientNetB0", "tune.space": {
        "train_transfer.fine_tune.unfreeze": {"type": "categorical", "choices": ["auto", "block_12_expand"]}}})
    result = tune(project, check=False)
    assert "offers layers a base does not have: EfficientNetB0 has no layer block_12_expand." in result.stderr


def test_two_workers_run_every_trial_as_an_experiment_and_the_best_one_applies(project):
    """4 trials, 2 at a time, each a DVC experiment; reports/tune/; then `--apply` makes the best the model."""
    tuning_project(project, n_trials=4)
    result = tune(project, "--workers", "2")
    assert result.stdout.count("tune: trial") == 4, result.stdout
    assert states(project) == ["COMPLETE"] * 4
    assert experiments(project) >= {f"imgcls-{number}" for number in range(4)}

    trials = pd.read_csv(project.root / "reports/tune/trials.csv")
    assert list(trials["state"]) == ["complete"] * 4
    assert trials["train_cnn.optimizer.learning_rate"].between(0.003, 0.03).all()
    for name in ("history.png", "intermediate.png", "importance.png"):
        assert (project.root / "reports/tune" / name).stat().st_size > 1000
    best = yaml.safe_load((project.root / "reports/tune/best.yaml").read_text())
    assert best["value"] == trials["value"].max()

    # Each experiment holds its trial's params and the metric the study recorded for it.
    shown = json.loads(project.dvc("exp", "show", "--json").stdout)
    recorded = {}
    for row in shown:
        for experiment in row.get("experiments") or []:
            revision = experiment["revs"][0]
            data = revision["data"]
            metric = data["metrics"]["reports/cnn/train.json"]["data"]["val_accuracy"]
            rate = data["params"]["params.yaml"]["data"]["train_cnn"]["optimizer"]["learning_rate"]
            recorded[revision.get("name")] = (metric, rate)
    for _, trial in trials.iterrows():
        metric, rate = recorded[trial["experiment"]]
        assert metric == pytest.approx(trial["value"])
        assert rate == pytest.approx(trial["train_cnn.optimizer.learning_rate"])

    # The study is complete: a rerun runs nothing.
    assert "already has its 4 trials" in tune(project).stdout

    tune(project, "--apply")
    applied = project.params()["train_cnn"]
    assert applied["optimizer"]["learning_rate"] == pytest.approx(best["params"]["train_cnn.optimizer.learning_rate"])
    card = json.loads((project.root / "models/cnn.json").read_text())
    assert card["val_accuracy"] == pytest.approx(best["value"], abs=1e-6)
    assert "train_cnn" not in project.dvc("status").stdout  # the applied experiment's model, not retrained

    # A new storage would give its trials the old study's experiment names: the search refuses to start.
    assert states(project) == ["COMPLETE"] * 4  # the study outlived `dvc exp apply`
    (project.root / ".tune/study.db").unlink()
    result = tune(project, check=False)
    assert result.returncode != 0
    assert "experiments imgcls-0, imgcls-1, imgcls-2, imgcls-3 exist, but study imgcls" in result.stderr


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_a_trial_behind_the_others_is_pruned_and_its_experiment_kept(project, backend):
    """The median pruner stops a trial whose accuracy after an epoch trails the finished trial's, through the
    pruning callback on either Keras backend."""
    # 40 photos a class, so that validation accuracy has a few photos to tell the trials apart.
    source = make_dataset(project.root.parent / "larger", per_class=40)
    project.set_params(**{"data.source": str(source), "train_cnn.epochs": 4})
    tuning_project(project, n_trials=2, pruner="median", startup_trials=1, warmup_epochs=0,
                   space=SEARCH | {"train_cnn.optimizer.learning_rate": {
                       "type": "float", "low": 1e-7, "high": 0.03, "log": True}})
    # A rate that learns the coloured squares within an epoch, then one too small to learn anything.
    url = f"sqlite:///{project.root / '.tune/study.db'}"
    (project.root / ".tune").mkdir()
    enqueued = optuna.create_study(study_name="imgcls", storage=url, direction="maximize")
    enqueued.enqueue_trial({"train_cnn.optimizer.learning_rate": 0.01, "train_cnn.label_smoothing": 0.0})
    enqueued.enqueue_trial({"train_cnn.optimizer.learning_rate": 1e-7, "train_cnn.label_smoothing": 0.0})

    result = tune(project, env={"KERAS_BACKEND": backend, "JAX_PLATFORMS": "cpu"})
    assert states(project) == ["COMPLETE", "PRUNED"], result.stdout
    assert f"train_cnn: backend {backend}," in (project.root / ".tune/logs/imgcls-1.log").read_text()
    pruned = study(project).trials[1]
    assert pruned.user_attrs["pruned_at_epoch"] < 4
    assert "pruned" in result.stdout and "1 pruned" in result.stdout
    assert "imgcls-1" in experiments(project)  # a pruned trial's experiment is still there to look at
    trials = pd.read_csv(project.root / "reports/tune/trials.csv")
    assert list(trials["state"]) == ["complete", "pruned"]
    assert trials["pruned_at_epoch"].iloc[1] == pruned.user_attrs["pruned_at_epoch"]


def wait_for(condition, seconds=300, every=0.5):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    raise AssertionError("timed out")


def stage_processes(root: Path) -> list[int]:
    """Pids of the train_cnn stages running in temporary copies of `root` (DVC's .dvc/tmp/exps)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().split(b"\0")
                cwd = os.readlink(entry / "cwd")
            except OSError:
                continue
            if any(part.endswith(b"scripts/train_cnn.py") for part in command) and cwd.startswith(str(root)):
                found.append(int(entry.name))
    return found


def test_a_killed_trial_fails_and_an_interrupted_study_goes_on(project):
    """A trial's stage killed outright is a failed trial, the study goes on; Ctrl-C stops it; a rerun finishes it."""
    tuning_project(project, n_trials=3)
    project.set_params(**{"train_cnn.epochs": 6})
    project.run("git", "commit", "-qam", "6 epochs")
    command = [sys.executable, "scripts/tune.py"]
    worker = subprocess.Popen(command, cwd=project.root, env=stage_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        # Trial 0's stage is killed, as by the out-of-memory killer.
        wait_for(lambda: stage_processes(project.root))
        for pid in stage_processes(project.root):
            os.kill(pid, signal.SIGKILL)
        # Trial 1 runs; once it is training, Ctrl-C.
        wait_for(lambda: len(study(project).trials) >= 2 and stage_processes(project.root))
        os.killpg(worker.pid, signal.SIGINT)
        output, _ = worker.communicate(timeout=120)
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
    assert worker.returncode != 0
    assert "interrupted" in output and "Run the same command again" in output, output
    assert states(project) == ["FAIL", "FAIL"], output
    assert not stage_processes(project.root)  # no trial left running behind the study
    assert (project.root / "reports/tune/trials.csv").exists()

    result = tune(project)
    assert states(project) == ["FAIL", "FAIL", "COMPLETE", "COMPLETE", "COMPLETE"], result.stdout
    assert "3 complete, 0 pruned, 2 fail" in result.stdout


POSTGRES_BINARIES = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))


@pytest.fixture
def postgresql():
    """A real PostgreSQL server on a free local port, in a data folder of its own; yields its URL."""
    initdb = shutil.which("initdb") or (str(POSTGRES_BINARIES[-1]) if POSTGRES_BINARIES else None)
    if initdb is None:
        pytest.skip("PostgreSQL's server is not installed (Debian: apt-get install postgresql)")
    binaries = Path(initdb).parent
    # Not under pytest's folder, which only root may enter.
    data = Path(tempfile.mkdtemp(prefix="imgcls-postgres-"))
    # The server refuses to run as root: as root, run it as Debian's postgres user.
    prefix = []
    if os.geteuid() == 0:
        shutil.chown(data, "postgres", "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    subprocess.run([*prefix, str(binaries / "initdb"), "-D", str(data), "-U", "tune", "--auth=trust"],
                   check=True, capture_output=True)
    subprocess.run([*prefix, str(binaries / "pg_ctl"), "-D", str(data), "-l", str(data / "server.log"), "-w",
                    "-o", f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start"], check=True,
                   capture_output=True)
    try:
        subprocess.run([*prefix, str(binaries / "postgres"), "--version"], check=True, capture_output=True)
        url = f"postgresql://tune@127.0.0.1:{port}/postgres"
        yield url
    finally:
        subprocess.run([*prefix, str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


def test_two_workers_share_one_postgresql_study(project, postgresql):
    """Two tune processes (as on two machines) against one PostgreSQL study split its trials between them."""
    tuning_project(project, n_trials=4)
    environment = {"TUNE_STORAGE": postgresql}
    workers = [subprocess.Popen([sys.executable, "scripts/tune.py"], cwd=project.root,
                                env={**stage_env(), **environment}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [worker.communicate(timeout=900)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], "\n".join(outputs)
    finished = study(project, postgresql).trials
    complete = [trial for trial in finished if trial.state.name == "COMPLETE"]
    assert len(complete) >= 4  # each worker stops once the study has 4 (the other may be finishing one)
    assert all(output.count("tune: trial") >= 1 for output in outputs), outputs  # both took part
    assert "postgresql://tune@127.0.0.1" in outputs[0]
    assert safe_url("postgresql://tune:secret@db:5432/studies") == "postgresql://tune:***@db:5432/studies"
    assert {trial.user_attrs["experiment"] for trial in complete} <= experiments(project)
