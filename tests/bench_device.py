"""Benchmark of the training backends and of the input pipeline, on the machine at hand.

For the gear CNN (default params) on a seeded sample of 640 training images:
    - epoch throughput (images/s, epochs 2 and 3: compilation excluded) with
      TensorFlow and with JAX, measured one after the other in this run: the
      ratio is what chose the CPU backend (imgcls/device.py);
    - pipeline efficiency: that throughput divided by the images/s of the same
      compiled training step on one batch already on the device (no input
      pipeline at all). 1.0 means the model never waits for its batches.
    - steps/s with every callback a train_cnn phase runs with, against none
      (the goal: at least 0.95x; a per-batch hook that waits on the host costs more).
Then the whole train_transfer stage with each backend. On a GPU machine (`make
bench-gpu`) the same rows come from JAX on the GPU(s). The CPU model is printed
beside every figure, since the same epoch can take 10x longer on another CPU.

    python tests/bench_device.py WORKDIR            # a project copy where data, resize and split ran
    python tests/bench_device.py WORKDIR --probe    # (internal) one measurement with this process's backend
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

SAMPLE = 640
STEP_REPEATS = 20


def probe(workdir: Path) -> dict:
    """Epoch throughput and step-only throughput of the default gear CNN with this process's backend."""
    os.chdir(workdir)
    sys.path.insert(0, str(workdir / "scripts"))
    import numpy as np

    from imgcls import device
    from imgcls.dataset import load_training_data
    from imgcls.params import load_params

    params = load_params()
    section = params.train_cnn
    image_size = params.resize.array_size(section.input_size)
    class_names, (pixels, labels), _ = load_training_data(image_size)
    device.choose_backend()
    import keras

    from imgcls import checkpoint, training
    from imgcls.callbacks import KeepBest, TrainingLog
    from imgcls.cnn import build_cnn
    from imgcls.optim import build_optimizer

    chosen = np.random.default_rng(0).choice(len(labels), size=min(SAMPLE, len(labels)), replace=False)
    pixels, labels = np.asarray(pixels[np.sort(chosen)]), labels[np.sort(chosen)]
    run = training.start_run("train_cnn", section, params.seed, params.distribution, image_size)
    train = run.batches(pixels, labels, len(class_names), section.batch_size, shuffle=True, seed=params.seed)
    model = build_cnn(len(class_names), image_size, section, params.seed, train_images=pixels)
    optimizer = build_optimizer(section.optimizer.model_copy(update={"warmup_epochs": 1}), 3, len(train))
    training.compile_classifier(model, optimizer, section.label_smoothing, section.jit_compile)

    val = run.batches(pixels[:64], labels[:64], len(class_names), batch_size=64)

    def steps_per_second(callbacks: list, validation=None) -> float:
        """Steps/s of the fastest of epochs 2 and 3 of a 3-epoch fit (the first compiles) with `callbacks`,
        timed from the epoch's start to the end of every callback's work: the fastest, so that other jobs
        on the machine count least."""
        seconds = []

        class Clock(keras.callbacks.Callback):  # no per-batch hook: it never makes a step wait for the host
            def on_epoch_begin(self, epoch, logs=None):
                self.started = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):  # last in the list: after every other callback's work
                seconds.append(time.perf_counter() - self.started)

        model.fit(train, validation_data=validation, epochs=3, callbacks=[*callbacks, Clock()], shuffle=False,
                  verbose=0)
        return len(train) / min(seconds[1:])

    images_per_epoch = sum(len(train[index][1]) for index in range(len(train)))
    pipeline = steps_per_second([]) * images_per_epoch / len(train)
    # The same epochs, now validated, with every callback a train_cnn phase runs with (its checkpoint
    # included) and with none; twice each, interleaved, keeping the faster of each.
    log, best = TrainingLog(workdir / "reports/bench_callbacks", title="bench"), KeepBest(section.monitor)
    log.start_phase("train")
    callbacks, _, counting = training.phase_callbacks(model, log, best, max(section.patience, 1))
    state = checkpoint.TrainingState("bench_callbacks", "bench")
    callbacks.append(state.callback("train", log, best, counting))
    bare, staged = 0.0, 0.0
    for _ in range(2):
        bare = max(bare, steps_per_second([], val))
        staged = max(staged, steps_per_second(callbacks, val))
    state.finish()

    # The same compiled step on one batch that is already where the step runs.
    batch = train[0]
    if keras.backend.backend() == "jax":
        import jax

        batch = jax.device_put(batch)
    else:
        batch = keras.ops.convert_to_tensor(batch[0]), keras.ops.convert_to_tensor(batch[1])
    for _ in range(3):
        model.train_on_batch(*batch)
    started = time.perf_counter()
    for _ in range(STEP_REPEATS):
        model.train_on_batch(*batch)
    keras.ops.convert_to_numpy(model.trainable_variables[0].value)  # wait for the last step to finish
    step = STEP_REPEATS * len(batch[0]) / (time.perf_counter() - started)
    return {"backend": keras.backend.backend(), "device": device.summary(run.device), "pipeline": pipeline,
            "step": step, "images": len(labels), "steps_bare": bare, "steps_with_callbacks": staged}


def _probe_with(workdir: Path, backend: str) -> dict:
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2", PYTHONHASHSEED="0")
    result = subprocess.run([sys.executable, __file__, str(workdir), "--probe"], env=env, capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise SystemExit(f"the {backend} probe failed:\n{result.stdout}\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _transfer_stage_seconds(workdir: Path, backend: str) -> tuple[float, float]:
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2", PYTHONHASHSEED="0")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "scripts/train_transfer.py"], cwd=workdir, env=env, capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise SystemExit(f"train_transfer ({backend}) failed:\n{result.stdout}\n{result.stderr}")
    seconds = time.perf_counter() - started
    return seconds, json.loads((workdir / "reports/transfer/train.json").read_text())["val_accuracy"]


def callback_cost_row(figures: dict) -> dict:
    """What the stage's callbacks cost per step: with asynchronous dispatch kept, close to nothing."""
    return {"benchmark": f"train_cnn steps/s with the stage's callbacks, {figures['backend']}",
            "value": f"{figures['steps_with_callbacks']:.1f} steps/s",
            "baseline": f"{figures['steps_bare']:.1f} steps/s (no callbacks)",
            "ratio": f"{figures['steps_with_callbacks'] / figures['steps_bare']:.2f}x",
            "note": f"KeepBest, TrainingLog, StopOnNonFiniteLoss, EarlyStopping, checkpoint; {figures['device']}"}


def run(workdir: Path) -> list[dict]:
    workdir = Path(workdir)
    from imgcls.device import cpu_model, nvidia_gpus

    backends = ["jax"] if nvidia_gpus() else ["tensorflow", "jax"]
    probes = {backend: _probe_with(workdir, backend) for backend in backends}
    rows = []
    for backend, figures in probes.items():
        rows.append(callback_cost_row(figures))
        rows.append({
            "benchmark": f"train_cnn epoch throughput, {backend} ({figures['images']} gear images, default CNN)",
            "value": f"{figures['pipeline']:.0f} images/s",
            "baseline": f"{figures['step']:.0f} images/s (the same compiled step on a batch already on the device)",
            "ratio": f"{figures['pipeline'] / figures['step']:.2f} pipeline efficiency",
            "note": figures["device"]})
    if len(probes) == 2:
        ratio = probes["tensorflow"]["pipeline"] / probes["jax"]["pipeline"]
        rows.append({"benchmark": "train_cnn: TensorFlow against JAX, same CPU, same run",
                     "value": f"{probes['tensorflow']['pipeline']:.0f} images/s (TensorFlow)",
                     "baseline": f"{probes['jax']['pipeline']:.0f} images/s (JAX)", "ratio": f"{ratio:.2f}x",
                     "note": cpu_model()})
        # JAX first, so the model left behind is the default backend's.
        seconds = {backend: _transfer_stage_seconds(workdir, backend) for backend in ("jax", "tensorflow")}
        rows.append({"benchmark": "train_transfer stage: TensorFlow against JAX, same CPU, same run",
                     "value": f"{seconds['tensorflow'][0]:.0f} s (TensorFlow)",
                     "baseline": f"{seconds['jax'][0]:.0f} s (JAX)",
                     "ratio": f"{seconds['jax'][0] / seconds['tensorflow'][0]:.2f}x",
                     "note": f"val accuracy {seconds['tensorflow'][1]:.4f} vs {seconds['jax'][1]:.4f}; {cpu_model()}"})
    return rows


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[2] == "--probe":
        print(json.dumps(probe(Path(sys.argv[1]))))
    elif len(sys.argv) == 2:
        sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "scripts")]
        for row in run(Path(sys.argv[1])):
            print(" | ".join(str(row[key]) for key in ("benchmark", "value", "baseline", "ratio", "note")))
    else:
        raise SystemExit(__doc__)
