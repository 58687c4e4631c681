"""Resume a killed training stage from its last completed epoch, with the same result.

GPU VMs are often preemptible: a training stage can be killed at any epoch.
At the end of every epoch a trainer writes its whole state to one file,
.checkpoints/<stage>.npz (ignored by git and never read by DVC), in a single
atomic rename, so a kill leaves either the previous epoch's file or this one:
    - every model variable (weights, BatchNorm statistics and the random-seed
      state of the augmentation and dropout layers) and every optimizer
      variable (step count, so the learning-rate schedule; momenta);
    - the kept best epoch (KeepBest), the curves so far (TrainingLog), the
      early-stopping count, and which phase and epoch it was.
Keras' BackupAndRestore saves weights and the epoch only, in two files written
one after the other, so this module writes its own file; it still uses
Keras' own variable lists, so it needs no knowledge of any layer.

A rerun resumes only when the state was made from the same params, data,
backend and devices (its fingerprint); any other state is deleted and the
stage starts afresh, and so does a state that cannot be read (moved aside to
<stage>.npz.unreadable, with a warning). A stage that finishes deletes its state.
On SIGTERM a stage exits at once (errors.run_stage): it loses the epoch in
progress, and the state on disk is the last completed epoch's.
"""

import hashlib
import json
import sys
import zipfile
from pathlib import Path

import keras
import numpy as np

from imgcls import keras_internals
from imgcls.dataset import atomic_path

CHECKPOINTS_DIR = Path(".checkpoints")


def fingerprint(settings: dict, files: list[Path]) -> str:
    """A digest of everything a training run depends on: `settings` (params, backend, devices) and the
    bytes of `files` (the image array, the manifest). Any change means an old state must not be used."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for path in files:
        with open(path, "rb") as file:
            digest.update(hashlib.file_digest(file, "sha256").digest())
    return digest.hexdigest()


class TrainingState:
    """The saved state of one training stage.

    A trainer calls, for each phase in order: `skips(phase)` (a resumed run
    skips a phase that had finished), `resume(...)` after compiling the phase's
    model (it returns the epoch to start from), and puts `callback(...)` last in
    that phase's callbacks; after saving the model, `finish()`.
    """

    def __init__(self, name: str, fingerprint: str):
        self.path = CHECKPOINTS_DIR / f"{name}.npz"
        self.fingerprint = fingerprint
        self.saved = self._load()
        self.resumed_phase = None
        self.stopped_early = False  # the resumed phase had already ended (early stopping, or a NaN loss)

    def _load(self) -> dict | None:
        if not self.path.exists():
            return None
        try:
            with np.load(self.path) as archive:
                meta = json.loads(str(archive["meta"]))
                arrays = {key: archive[key] for key in archive.files if key != "meta"}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            # An empty or truncated file (a full disk, a copy cut short): keep it for a look, out of the way.
            aside = self.path.with_name(self.path.name + ".unreadable")
            self.path.replace(aside)
            print(f"warning: checkpoint {self.path} is unreadable ({type(error).__name__}: {error}); moved it to"
                  f" {aside} and training from the start", file=sys.stderr)
            return None
        if meta.get("fingerprint") != self.fingerprint:
            print(f"checkpoint: {self.path} was made with other params, data or devices; training from the start")
            self.path.unlink()
            return None
        return {"meta": meta, "arrays": arrays}

    def skips(self, phase: str) -> bool:
        """Whether a resumed run is already past `phase` (its result is inside the saved state)."""
        return bool(self.saved) and phase in self.saved["meta"]["phases"][:-1]

    def resume(self, phase: str, model, train, log, best) -> int:
        """Put the saved state back if it belongs to `phase`; return the epoch to start from (0: afresh)."""
        if not self.saved or self.saved["meta"]["phases"][-1] != phase:
            return 0
        meta, arrays = self.saved["meta"], self.saved["arrays"]
        log.restore(meta["log"])
        best.restore_state(meta["best"], _numbered(arrays, "best"))
        _assign(model.variables, _numbered(arrays, "model"))
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        _assign(model.optimizer.variables, _numbered(arrays, "optimizer"))
        train.set_epoch(meta["epoch"])
        self.resumed_phase, self.stopped_early = phase, meta["stopped"]
        print(f"checkpoint: resuming phase {phase!r} after epoch {meta['epoch']} (from {self.path})")
        return meta["epoch"]

    def callback(self, phase: str, log, best, counting: dict | None = None):
        """A Keras callback that saves the state after each epoch of `phase` (put it last in the list).

        `counting` holds the phase's EarlyStopping ("early_stopping") and ReduceLROnPlateau ("plateau").
        """
        state, counting = self, counting or {}

        class SaveEachEpoch(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                # EarlyStopping and ReduceLROnPlateau reset their counts when fit starts; a resumed
                # phase carries on with them (a rate already cut is in the optimizer's variables).
                if state.resumed_phase == phase:
                    saved = state.saved["meta"].get("counting") or {}
                    for name, callback in counting.items():
                        if saved.get(name) is not None:
                            keras_internals.restore_counts(callback, saved[name])

            def on_epoch_end(self, epoch, logs=None):
                state.save(phase, epoch + 1, self.model, log, best, counting)

        return SaveEachEpoch()

    def save(self, phase: str, epoch: int, model, log, best, counting: dict | None = None) -> None:
        phases = [] if not self.saved else list(self.saved["meta"]["phases"])
        if not phases or phases[-1] != phase:
            phases.append(phase)
        meta = {
            "fingerprint": self.fingerprint,
            "phases": phases,  # every phase begun; the last is the one in progress
            "epoch": epoch,  # epochs completed in that phase
            "stopped": bool(model.stop_training),
            "log": log.state(),
            "best": best.state(),
            "counting": {name: keras_internals.counts(callback) for name, callback in (counting or {}).items()},
        }
        arrays = {**_numbered_arrays("model", model.variables),
                  **_numbered_arrays("optimizer", model.optimizer.variables),
                  **{f"best_{index}": weight for index, weight in enumerate(best.weights or [])}}
        CHECKPOINTS_DIR.mkdir(exist_ok=True)
        with atomic_path(self.path) as temporary:
            with open(temporary, "wb") as file:
                np.savez(file, meta=np.array(json.dumps(meta)), **arrays)
        self.saved = {"meta": meta, "arrays": arrays}

    def finish(self) -> None:
        """The stage has saved its model: the state is of no further use."""
        self.path.unlink(missing_ok=True)


def _numbered_arrays(prefix: str, variables) -> dict:
    return {f"{prefix}_{index}": keras.ops.convert_to_numpy(variable.value)
            for index, variable in enumerate(variables)}


def _numbered(arrays: dict, prefix: str) -> list[np.ndarray]:
    count = sum(1 for key in arrays if key.startswith(prefix + "_"))
    return [arrays[f"{prefix}_{index}"] for index in range(count)]


def _assign(variables, values: list[np.ndarray]) -> None:
    if len(variables) != len(values):
        raise ValueError(f"the checkpoint holds {len(values)} values for {len(variables)} variables")
    for variable, value in zip(variables, values):
        variable.assign(value)
