"""A preemptible GPU VM: SIGTERM mid-epoch, and a checkpoint left damaged, must cost at most one epoch.

The stage scripts run as real subprocesses in a copy of the project; the
checkpoint files are the ones the trainers write (imgcls/checkpoint.py).
"""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from conftest import TINY_CNN, stage_env
from imgcls import checkpoint

# A preemption notice gives a VM about 30 s before it is stopped for good.
NOTICE_SECONDS = 30


def test_sigterm_mid_epoch_exits_promptly_and_the_rerun_ends_as_if_never_interrupted(prepared):
    prepared.set_params(**{**TINY_CNN, "train_cnn.epochs": 6})
    prepared.stage("train_cnn")
    uninterrupted = pd.read_csv(prepared.root / "reports/cnn/history.csv").drop(columns="seconds")
    model = prepared.root / "models/cnn.keras"
    model.unlink()

    state = prepared.root / ".checkpoints/train_cnn.npz"
    process = subprocess.Popen([sys.executable, "scripts/train_cnn.py"], cwd=prepared.root, env=stage_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not state.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if process.poll() is not None:
        pytest.fail(f"train_cnn ended before it could be stopped:\n{process.communicate()}")
    process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _, stderr = process.communicate(timeout=NOTICE_SECONDS * 4)
    assert time.monotonic() - sent < NOTICE_SECONDS
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "stopped by SIGTERM" in stderr and "resumes" in stderr
    assert not model.exists()  # no model from a run that did not finish
    with np.load(state) as archive:  # the state on disk is whole: the last completed epoch's
        completed = json.loads(str(archive["meta"]))["epoch"]
    assert 1 <= completed < 6

    result = prepared.stage("train_cnn")
    assert f"resuming phase 'train' after epoch {completed}" in result.stdout
    resumed = pd.read_csv(prepared.root / "reports/cnn/history.csv").drop(columns="seconds")
    pd.testing.assert_frame_equal(resumed, uninterrupted)
    assert model.exists() and not state.exists()


def _write_damaged(path, damage: str) -> None:
    """A checkpoint file as a full disk, a cut copy or a stray file would leave it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as file:
        np.savez(file, meta=np.array(json.dumps({"fingerprint": "f", "phases": ["train"], "epoch": 1})),
                 model_0=np.zeros((64, 64), np.float32))
    whole = path.read_bytes()
    damaged = {"empty": b"", "truncated": whole[: len(whole) // 2], "not a zip": b"not a checkpoint\n" * 10,
               "no meta": None}[damage]
    if damaged is None:
        with open(path, "wb") as file:
            np.savez(file, model_0=np.zeros(3))
    else:
        path.write_bytes(damaged)


@pytest.mark.parametrize("damage", ["empty", "truncated", "not a zip", "no meta"])
def test_an_unreadable_checkpoint_is_moved_aside_with_a_warning(tmp_path, monkeypatch, capsys, damage):
    monkeypatch.chdir(tmp_path)
    path = checkpoint.CHECKPOINTS_DIR / "train_cnn.npz"
    _write_damaged(path, damage)
    state = checkpoint.TrainingState("train_cnn", "f")
    assert state.saved is None and not state.skips("train")
    assert not path.exists()
    assert (checkpoint.CHECKPOINTS_DIR / "train_cnn.npz.unreadable").exists()
    warning = capsys.readouterr().err
    assert "warning: checkpoint" in warning and "unreadable" in warning and "training from the start" in warning


def test_a_stage_with_an_empty_checkpoint_trains_from_the_start(prepared):
    prepared.set_params(**{**TINY_CNN, "train_cnn.epochs": 2})
    _write_damaged(prepared.root / ".checkpoints/train_cnn.npz", "empty")
    result = prepared.stage("train_cnn")
    assert "is unreadable" in result.stderr and "resuming" not in result.stdout
    assert len(pd.read_csv(prepared.root / "reports/cnn/history.csv")) == 2
    assert (prepared.root / ".checkpoints/train_cnn.npz.unreadable").exists()


def test_a_stages_worker_processes_end_quietly_when_their_pool_is_closed(project):
    # resize's decoding pool is forked, so its workers inherit the stage's SIGTERM handler; closing the
    # pool sends them SIGTERM, which must not print a traceback per worker.
    project.set_params(**{"resize.workers": 2})
    project.stage("data")
    result = project.stage("resize")
    assert "2 workers" in result.stdout
    assert "Traceback" not in result.stderr and "Terminated" not in result.stderr, result.stderr


def test_a_stages_forked_workers_get_sigterms_default_back(project):
    # The stage's SIGTERM handler is Python-level, so it runs only between bytecodes. A forked worker
    # that kept it and was asleep on its pool's task lock when the pool sent SIGTERM never ran it, and
    # resize hung for good in the pool's join. Forked children get the default: the kernel ends them.
    # One task per worker, so the second worker is forked by the pool's own thread, not the main one.
    script = (
        "import multiprocessing, signal, sys\n"
        "sys.path.insert(0, 'scripts')\n"
        "from imgcls.errors import run_stage\n"
        "def main():\n"
        "    with multiprocessing.get_context('fork').Pool(1, maxtasksperchild=1) as pool:\n"
        "        print([pool.apply(signal.getsignal, (signal.SIGTERM,)) is signal.SIG_DFL for _ in range(2)])\n"
        "run_stage(main)\n"
    )
    result = project.run(sys.executable, "-c", script)
    assert result.stdout.strip() == "[True, True]", "a forked worker kept the stage's SIGTERM handler"
