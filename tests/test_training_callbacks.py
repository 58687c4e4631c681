"""The callbacks a training phase runs with (imgcls/training.phase_callbacks): no step waits on the host.

On JAX (the GPU path), a callback with a per-batch hook makes Keras wait for
every step and copy its loss to the host before dispatching the next one; with
small batches that idles the GPU. The phase's callbacks must keep asynchronous
dispatch, and a non-finite loss must still stop training within the epoch.
(TensorFlow's Keras backend never dispatches callbacks asynchronously.) Each
check runs in a JAX process of its own, since a process has one Keras backend.
"""

import re
import subprocess
import sys

from conftest import REPO, stage_env

JAX = {"KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}

SETUP = """
import sys
sys.path.insert(0, sys.argv[1])
import keras
import numpy as np
from imgcls import checkpoint, keras_internals
from imgcls.callbacks import KeepBest, TrainingLog
from imgcls.training import phase_callbacks

def tiny_model(ema_momentum=0.0):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer=keras.optimizers.SGD(0.01, use_ema=ema_momentum > 0, ema_momentum=ema_momentum or 0.99),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model
"""

ALL_CALLBACKS = SETUP + """
model = tiny_model(ema_momentum=0.9)  # with the weight average: SwapEMAWeights joins the list
log, best = TrainingLog("report"), KeepBest("val_accuracy")
callbacks, swap, counting = phase_callbacks(model, log, best, patience=3, plateau=True)
callbacks.append(checkpoint.TrainingState("train_cnn", "fingerprint").callback("train", log, best, counting))
assert swap is not None and set(counting) == {"plateau", "early_stopping"}
print("with the phase's callbacks:", keras_internals.dispatches_asynchronously(callbacks))
print("with TerminateOnNaN too:", keras_internals.dispatches_asynchronously(callbacks + [keras.callbacks.TerminateOnNaN()]))
"""

NON_FINITE_LOSS = SETUP + """
features = np.random.default_rng(0).normal(size=(400, 4)).astype("float32")
features[5:] = np.nan  # every step after the fifth has a NaN loss
model = tiny_model()
callbacks, _, _ = phase_callbacks(model, TrainingLog("report"), KeepBest("val_loss"))
history = model.fit(features, np.zeros(400, dtype="int32"), batch_size=1, epochs=3, callbacks=callbacks[-1:],
                    verbose=0, shuffle=False)
print("epochs:", len(history.epoch), "steps:", int(keras.ops.convert_to_numpy(model.optimizer.iterations)))
"""


def run_on_jax(script: str, folder) -> str:
    result = subprocess.run([sys.executable, "-c", script, str(REPO / "scripts")], cwd=folder,
                            env={**stage_env(), **JAX}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_every_callback_of_a_phase_keeps_steps_dispatched_asynchronously(tmp_path):
    output = run_on_jax(ALL_CALLBACKS, tmp_path)
    assert "with the phase's callbacks: True" in output
    assert "with TerminateOnNaN too: False" in output  # the check is real: a plain per-batch hook turns it off


def test_a_non_finite_loss_stops_the_phase_within_its_first_epoch(tmp_path):
    output = run_on_jax(NON_FINITE_LOSS, tmp_path)
    epochs, steps = (int(number) for number in re.search(r"epochs: (\d+) steps: (\d+)", output).groups())
    assert epochs == 1 and steps < 400, output
    assert "the loss is nan; stopping this phase" in output
