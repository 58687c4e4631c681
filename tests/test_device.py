"""Device, backend, precision and distribution choices (imgcls/device.py), and resuming a killed training.

No GPU is needed: a fake `nvidia-smi` on PATH stands for one in the install
plan, and JAX's virtual CPU devices (JAX_NUM_CPU_DEVICES=4) stand for several
accelerators in data-parallel training.
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, TINY_CNN, TINY_TRANSFER, make_dataset, stage_env

FOUR_DEVICES = {"KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "4"}
ONE_DEVICE = {"KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1"}


def fake_nvidia_smi(folder: Path, listing: str = "NVIDIA H200, 9.0, 580.82.07", exit_code: int = 0,
                    seconds: float = 0) -> dict:
    """An environment whose PATH starts with a `nvidia-smi` that prints `listing` (as --query-gpu does for
    name, compute_cap and driver_version), after hanging for `seconds` if asked to."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "nvidia-smi"
    hang = f"exec sleep {seconds}\n" if seconds else ""
    script.write_text(f"#!/bin/sh\n{hang}printf '%s\\n' {shlex.quote(listing)}\nexit {exit_code}\n")
    script.chmod(0o755)
    env = stage_env()
    env["PATH"] = f"{folder}{os.pathsep}{env['PATH']}"
    env.pop("KERAS_BACKEND", None)
    env.pop("IMGCLS_DEVICE", None)
    return env


def make_env(env: dict, *arguments: str) -> str:
    result = subprocess.run(["make", "--no-print-directory", "env", *arguments], cwd=REPO, env=env,
                            capture_output=True, text=True)
    return result.stdout + result.stderr


def plan_with(monkeypatch, tmp_path, listing: str = "", exit_code: int = 0, seconds: float = 0,
              device: str = "auto") -> dict:
    """device.plan() in this process, with a fake `nvidia-smi` first on PATH."""
    from imgcls import device as device_module

    env = fake_nvidia_smi(tmp_path / "bin", listing, exit_code, seconds)
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.setenv("IMGCLS_DEVICE", device)
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    return device_module.plan()


# --- the install plan -----------------------------------------------------------------------------------------

def test_without_a_gpu_make_env_plans_the_cpu_stack(tmp_path):
    env = fake_nvidia_smi(tmp_path / "bin", listing="NVIDIA-SMI has failed: no driver", exit_code=9)
    plan = make_env(env)
    assert "device:        cpu (nvidia-smi failed (exit 9: NVIDIA-SMI has failed: no driver)" in plan
    assert "install:       requirements.txt\n" in plan and "KERAS_BACKEND: tensorflow" in plan
    assert "AVX" in plan or "cores" in plan  # the CPU is named beside every timing
    assert "python:        " in plan  # the Python that setup would make the venv with


def test_a_driver_for_cuda_13_plans_the_cuda_13_stack_and_device_cpu_overrides_it(tmp_path):
    env = fake_nvidia_smi(tmp_path / "bin", listing="NVIDIA H200, 9.0, 580.82.07\nNVIDIA H200, 9.0, 580.82.07")
    plan = make_env(env)
    assert "device:        gpu (nvidia-smi lists 2 GPU(s); driver 580.82.07, compute capability 9: CUDA 13;" in plan
    assert "NVIDIA H200 (compute capability 9)" in plan and "driver:        580.82.07" in plan
    assert "install:       requirements-gpu-cuda13.txt with constraints-cuda13.txt" in plan
    assert "KERAS_BACKEND: jax" in plan
    dry_run = subprocess.run(["make", "-n", "setup"], cwd=REPO, env=env, capture_output=True, text=True).stdout
    assert ".installed-gpu-cuda13" in dry_run or dry_run == ""  # up to date when this venv already has the stack
    assert "device:        cpu (IMGCLS_DEVICE=cpu; nvidia-smi lists 2 GPU(s)" in make_env(env, "DEVICE=cpu")
    assert "must be one of auto, cpu, gpu" in make_env(env, "DEVICE=tpu")


@pytest.mark.parametrize("listing, stack", [
    ("NVIDIA H200, 9.0, 580.82.07", "gpu-cuda13"),
    ("NVIDIA H100 80GB HBM3, 9.0, 580.65.06", "gpu-cuda13"),  # exactly CUDA 13.0's minimum
    ("NVIDIA L4, 8.9, 570.172.08", "gpu-cuda12"),
    ("NVIDIA A100-SXM4-80GB, 8.0, 550.54.15", "gpu-cuda12"),
    ("Tesla T4, 7.5, 525.60.13", "gpu-cuda12"),  # exactly CUDA 12.0's minimum
    ("Tesla V100-SXM2-16GB, 7.0, 580.82.07", "gpu-cuda12"),  # CUDA 13 dropped GPUs older than 7.5
    ("NVIDIA H200, 9.0, 580.82.07\nTesla V100-SXM2-16GB, 7.0, 580.82.07", "gpu-cuda12"),  # the oldest GPU decides
])
def test_the_driver_and_the_gpus_pick_the_newest_cuda_they_run(monkeypatch, tmp_path, listing, stack):
    from imgcls.device import pip_arguments

    plan = plan_with(monkeypatch, tmp_path, listing)
    assert plan["device"] == "gpu" and plan["stack"] == stack and plan["keras_backend"] == "jax"
    major = stack[-2:]
    assert pip_arguments(plan) == f"-r requirements-gpu-cuda{major}.txt -c constraints-cuda{major}.txt"
    if stack == "gpu-cuda12":
        assert "CUDA 13 needs driver 580.65.06 and compute capability 7.5 or newer" in plan["reason"]


def test_a_driver_too_old_for_cuda_12_plans_the_cpu_and_names_the_versions(monkeypatch, tmp_path):
    from imgcls.device import pip_arguments

    for driver in ("470.82.01", "525.60.11"):
        plan = plan_with(monkeypatch, tmp_path, f"Tesla T4, 7.5, {driver}")
        assert plan["device"] == "cpu" and plan["stack"] == "cpu" and pip_arguments(plan) == "-r requirements.txt"
        assert f"driver {driver}, compute capability 7.5: too old for JAX's CUDA wheels" in plan["reason"]
        assert "CUDA 12 needs driver 525.60.13" in plan["reason"] and "update the NVIDIA driver" in plan["reason"]
    forced = plan_with(monkeypatch, tmp_path, "Tesla T4, 7.5, 470.82.01", device="gpu")
    assert forced["stack"] == "gpu-cuda12" and "too old" in forced["reason"]  # forced: JAX will say what fails


@pytest.mark.parametrize("listing, exit_code, seconds, reason", [
    ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.", 9, 0,
     "nvidia-smi failed (exit 9: NVIDIA-SMI has failed because"),
    ("Segmentation fault", 0, 0, "nvidia-smi lists no GPU that can be read (Segmentation fault)"),
    ("NVIDIA H200, [N/A], 580.82.07", 0, 0, "nvidia-smi lists no GPU that can be read"),
    ("NVIDIA H200, 9.0, 580.82.07", 0, 30, "nvidia-smi did not answer within 0.5 s"),
])
def test_a_failing_nvidia_smi_plans_the_cpu_with_the_reason(monkeypatch, tmp_path, listing, exit_code, seconds,
                                                             reason):
    from imgcls import device

    monkeypatch.setattr(device, "NVIDIA_SMI_SECONDS", 0.5)
    plan = plan_with(monkeypatch, tmp_path, listing, exit_code, seconds)
    assert plan["device"] == "cpu" and plan["stack"] == "cpu" and plan["gpus"] == []
    assert reason in plan["reason"]
    assert plan_with(monkeypatch, tmp_path, listing, exit_code, seconds, device="gpu")["stack"] == "gpu-cuda13"


def test_each_gpu_stack_pins_jax_and_every_cuda_library_it_installs():
    from imgcls.device import CONSTRAINTS, REQUIREMENTS

    jax_pin = next(line for line in (REPO / "requirements.txt").read_text().splitlines() if line.startswith("jax=="))
    for stack, constraints in CONSTRAINTS.items():
        major = stack[-2:]
        requirements = (REPO / REQUIREMENTS[stack]).read_text()
        assert "-r requirements.txt" in requirements and f"jax[cuda{major}]=={jax_pin[5:]}" in requirements
        pins = [line for line in (REPO / constraints).read_text().splitlines() if line and not line.startswith("#")]
        assert all("==" in pin for pin in pins), pins
        names = {pin.split("==")[0] for pin in pins}
        assert {f"jax-cuda{major}-plugin=={jax_pin[5:]}", f"jax-cuda{major}-pjrt=={jax_pin[5:]}"} <= set(pins)
        assert {"nvidia-cudnn-cu" + major, "nvidia-nccl-cu" + major} <= names  # cuDNN and NCCL, among others


def test_on_the_gpu_plan_without_jax_cuda_a_stage_says_what_to_do(prepared, tmp_path):
    env = fake_nvidia_smi(tmp_path / "bin")
    result = prepared.run(sys.executable, "scripts/train_cnn.py", check=False, env=env)
    assert result.returncode == 2, result.stderr
    assert "JAX's CUDA plugin is not installed: run `make setup` (it installs requirements-gpu-cuda13.txt" \
        in result.stderr
    assert "IMGCLS_DEVICE=cpu" in result.stderr


GPU_PLAN_ON_JAX = """
import os, sys
sys.path.insert(0, "scripts")
import keras
from imgcls import device

for platforms in sys.argv[1:]:
    os.environ["JAX_PLATFORMS"] = platforms
    try:
        print(f"JAX_PLATFORMS={platforms}: {device.distribute('none', {})} replica")
    except device.DeviceError as error:
        print(f"JAX_PLATFORMS={platforms}: DeviceError: {error}")
"""


def _distribute_on_the_gpu_plan(tmp_path, *platforms: str) -> str:
    # The plan says GPU (a fake nvidia-smi with driver 580.82.07), but this JAX has only its CPU.
    env = {**fake_nvidia_smi(tmp_path / "bin"), "KERAS_BACKEND": "jax", "JAX_PLATFORMS": platforms[0]}
    result = subprocess.run([sys.executable, "-c", GPU_PLAN_ON_JAX, *platforms], cwd=REPO, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_on_the_gpu_plan_a_trainer_stops_when_jax_falls_back_to_the_cpu(tmp_path):
    output = _distribute_on_the_gpu_plan(tmp_path, "", "cpu")
    fell_back, chosen = output.splitlines()
    assert fell_back.startswith("JAX_PLATFORMS=: DeviceError: this machine is planned to train on the GPU"
                                " (gpu-cuda13, NVIDIA driver 580.82.07), but JAX fell back to the CPU: ")
    assert "`make run DEVICE=cpu` (IMGCLS_DEVICE=cpu for one script)" in fell_back
    assert chosen == "JAX_PLATFORMS=cpu: 1 replica"  # the CPU asked for by name is a choice, and is kept
    could_not_start = _distribute_on_the_gpu_plan(tmp_path, "cuda")  # JAX raises instead of falling back
    assert "DeviceError: this machine is planned to train on the GPU (gpu-cuda13, NVIDIA driver 580.82.07)," \
           " but JAX could not start: " in could_not_start and "DEVICE=cpu" in could_not_start


def test_mixed_precision_auto_is_bfloat16_only_on_ampere_or_newer_gpus():
    from imgcls.device import resolve_precision

    h200, t4 = (SimpleNamespace(platform="gpu", compute_capability=capability) for capability in ("9.0", "7.5"))
    cpu = SimpleNamespace(platform="cpu")
    assert resolve_precision("auto", [h200, h200]) == "bfloat16"
    assert resolve_precision("auto", [t4]) == "none"
    assert resolve_precision("auto", [cpu]) == "none"
    assert resolve_precision("auto", []) == "none"  # TensorFlow on a CPU
    assert resolve_precision("float16", [cpu]) == "float16"  # an explicit setting wins


# --- data-parallel training on virtual devices ----------------------------------------------------------------

def test_validation_batches_are_padded_and_training_batches_trimmed_to_split_across_devices():
    from imgcls.batches import ImageBatches

    images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1).repeat(3, axis=3)
    labels = np.arange(10) % 3
    val = ImageBatches(images, labels, 3, batch_size=6, replicas=4)
    assert val.batch_size == 8 and len(val) == 2  # rounded up to a multiple of the devices
    pixels, targets, weights = val[1]
    assert len(pixels) == 4 and targets.tolist() == [2, 0, -1, -1] and weights.tolist() == [1, 1, 0, 0]
    train = ImageBatches(images, labels, 3, batch_size=4, shuffle=True, replicas=4)
    assert len(train) == 2 and all(len(train[index][0]) == 4 for index in range(2))  # the last 2 wait for next epoch
    halves = [ImageBatches(images, labels, 3, batch_size=8, replicas=4, process=(process, 2))[1] for process in (0, 1)]
    assert [half[1].tolist() for half in halves] == [[2, 0], [-1, -1]]  # each host feeds its own slice


def test_the_padding_changes_neither_loss_nor_accuracy():
    import keras

    from imgcls.batches import ImageBatches
    from imgcls.training import compile_classifier

    images = np.random.default_rng(0).integers(0, 255, (6, 4, 4, 3)).astype(np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2])
    model = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Rescaling(1 / 255), keras.layers.Flatten(),
                              keras.layers.Dense(3, activation="softmax", kernel_initializer="ones")])
    compile_classifier(model, "sgd", label_smoothing=0.1)
    plain = model.evaluate(ImageBatches(images, labels, 3, batch_size=64), verbose=0, return_dict=True)
    padded = model.evaluate(ImageBatches(images, labels, 3, batch_size=64, replicas=4), verbose=0, return_dict=True)
    assert padded["loss"] == pytest.approx(plain["loss"], rel=1e-6)
    assert padded["accuracy"] == pytest.approx(plain["accuracy"])


RESIDENT_AGAINST_HOST = """
import sys
import keras, numpy as np
sys.path.insert(0, "scripts")
from imgcls import device
from imgcls.batches import AlternatingFlips, ImageBatches
from imgcls.training import compile_classifier

replicas = device.distribute("auto", {"batch_size": 8})
rng = np.random.default_rng(0)
images, labels = rng.integers(0, 255, (22, 6, 6, 3)).astype(np.uint8), np.arange(22) % 3
histories = []
for resident in (False, True):
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((6, 6, 3)), keras.layers.Rescaling(1 / 255), keras.layers.Flatten(),
                              keras.layers.Dense(3, activation="softmax")])
    compile_classifier(model, "sgd")
    batches = [kind(images, labels, 3, batch_size=8, shuffle=True, seed=3, replicas=replicas, resident=resident)
               for kind in (ImageBatches, AlternatingFlips)]
    val = ImageBatches(images[:7], labels[:7], 3, batch_size=8, replicas=replicas, resident=resident)
    history = []
    for train in batches:
        history += model.fit(train, validation_data=val, epochs=2, verbose=0).history["val_loss"]
    histories.append(history)
print(replicas, histories[0] == histories[1], histories)
"""


def test_a_training_set_kept_on_the_device_trains_exactly_like_one_sent_batch_by_batch():
    # On a GPU (device.fits_on_device) the images stay on the device and each batch is gathered there;
    # here the same path runs on 4 virtual CPU devices, with training batches trimmed and validation padded.
    result = subprocess.run([sys.executable, "-c", RESIDENT_AGAINST_HOST], cwd=REPO, capture_output=True, text=True,
                            env={**stage_env(), **FOUR_DEVICES})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("4 True"), result.stdout


COMPILED_WITH_RANDOM_TRANSFORMS = """
import sys
from types import SimpleNamespace
import keras, numpy as np
sys.path.insert(0, "scripts")
from imgcls import training
from imgcls.augment import augmentation
from imgcls.modelio import load_keras, uncompiled_copy

augment = SimpleNamespace(flip="horizontal", rotation=0.1, zoom=0.1, translation=0.1, contrast=0.1,
                          interpolation="nearest")
inputs = keras.Input((8, 8, 3))
x = augmentation(augment, seed=0)(inputs)
x = keras.layers.Rescaling(1 / 255)(keras.layers.Flatten()(x))
model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
training.compile_classifier(model, "sgd")
rng = np.random.default_rng(0)
model.fit(rng.integers(0, 255, (16, 8, 8, 3)).astype("uint8"), np.arange(16) % 3, epochs=1, verbose=0)
copy = uncompiled_copy(model)  # saved as the trainers save: without the optimizer
copy.save(sys.argv[1])
plain = keras.layers.RandomTranslation(0.1, 0.1)
print(plain.supports_jit, model.jit_compile, copy.jit_compile, load_keras(sys.argv[1]).jit_compile)
"""


def test_on_jax_a_model_with_random_rotations_zooms_and_shifts_is_compiled(tmp_path):
    # Keras marks these layers as not compilable (for TensorFlow's sake) and would then run the whole model
    # eagerly on JAX, op by op; built, copied or loaded, the project's models are compiled all the same.
    result = subprocess.run([sys.executable, "-c", COMPILED_WITH_RANDOM_TRANSFORMS, str(tmp_path / "model.keras")],
                            cwd=REPO, capture_output=True, text=True,
                            env={**stage_env(), "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-4:] == ["False", "True", "True", "True"], result.stdout


def test_only_an_accelerator_with_room_to_spare_keeps_the_training_set():
    from imgcls.device import fits_on_device

    def gpu(free_bytes):
        return SimpleNamespace(platform="gpu", memory_stats=lambda: {"bytes_limit": free_bytes, "bytes_in_use": 0})

    cifar = 50_000 * 32 * 32 * 3
    assert fits_on_device(cifar, [gpu(141 * 2**30)])  # an H200
    assert not fits_on_device(cifar, [gpu(2**30)])  # more than a tenth of what is free
    assert not fits_on_device(cifar, [SimpleNamespace(platform="cpu")])
    assert not fits_on_device(cifar, [])  # TensorFlow on a CPU


def _val_scores(project) -> tuple[float, float]:
    metrics = json.loads((project.root / "reports/cnn/train.json").read_text())
    return metrics["val_accuracy"], metrics["val_loss"]


def _one_device_run_on_even_batches(project, folder: Path) -> tuple[float, float]:
    """Train the tiny CNN on one JAX device, on 13 photos per class: 24 training images, so every batch of
    8 splits evenly over 2 or 4 devices, and runs on several devices differ from this one only in the
    order of floating-point sums (measured: equal to 4 decimals). Returns its validation scores."""
    project.set_params(**{"data.source": str(make_dataset(folder, per_class=13)), **TINY_CNN})
    for name in ("data", "resize", "split"):
        project.stage(name)
    project.stage("train_cnn", env=ONE_DEVICE)
    return _val_scores(project)


def test_train_cnn_on_four_virtual_devices_matches_one_device(project, tmp_path):
    one = _one_device_run_on_even_batches(project, tmp_path / "even")
    result = project.stage("train_cnn", env=FOUR_DEVICES)
    assert "data-parallel over 4 devices, global batch 8" in result.stdout
    four = _val_scores(project)
    assert four[0] == pytest.approx(one[0], abs=1e-6) and four[1] == pytest.approx(one[1], abs=1e-3)
    trained_on = json.loads((project.root / "models/cnn.json").read_text())["trained_on"]
    assert trained_on["replicas"] == 4 and trained_on["distribution"] == "data-parallel"
    assert trained_on["backend"] == "jax" and trained_on["global_batch"] == 8
    project.stage("evaluate", env=FOUR_DEVICES)


def test_train_transfer_on_four_virtual_devices_with_uneven_batches(prepared):
    # 21 training and 6 validation images: the last training batch is trimmed and validation padded.
    prepared.set_params(**TINY_TRANSFER)
    result = prepared.stage("train_transfer", env=FOUR_DEVICES)
    assert "data-parallel over 4 devices" in result.stdout and "linear probe (C = " in result.stdout
    history = pd.read_csv(prepared.root / "reports/transfer/history.csv")
    assert set(history["phase"]) == {"fine-tune"}  # phase 1 is the probe, fitted on features padded to 4 devices
    # 6 validation images: every accuracy is a whole number of sixths, so the padding was not counted.
    assert all(abs(value * 6 - round(value * 6)) < 1e-4 for value in history["val_accuracy"])


def test_a_batch_size_that_does_not_divide_by_the_devices_names_the_key(prepared):
    prepared.set_params(**{**TINY_CNN, "train_cnn.batch_size": 6})
    result = prepared.stage("train_cnn", check=False, env=FOUR_DEVICES)
    assert result.returncode == 2
    assert "train_cnn.batch_size = 6" in result.stderr and "multiple of 4" in result.stderr
    prepared.set_params(**{"distribution": "none"})
    assert "global batch 6" in prepared.stage("train_cnn", env=FOUR_DEVICES).stdout  # one device: any size


# --- resuming a killed training -------------------------------------------------------------------------------

def _kill_after_first_checkpoint(project) -> None:
    """Start train_cnn, and SIGKILL it once it has saved the state of an epoch (before its last one)."""
    state = project.root / ".checkpoints/train_cnn.npz"
    process = subprocess.Popen([sys.executable, "scripts/train_cnn.py"], cwd=project.root, env=stage_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not state.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert state.exists(), "train_cnn ended before saving any epoch's state"


def test_a_killed_train_cnn_resumes_and_ends_as_if_never_interrupted(prepared):
    prepared.set_params(**{**TINY_CNN, "train_cnn.epochs": 4})
    prepared.stage("train_cnn")
    uninterrupted = pd.read_csv(prepared.root / "reports/cnn/history.csv").drop(columns="seconds")
    summary = json.loads((prepared.root / "reports/cnn/train.json").read_text())
    assert not (prepared.root / ".checkpoints/train_cnn.npz").exists()  # a finished stage cleans up

    _kill_after_first_checkpoint(prepared)
    result = prepared.stage("train_cnn")
    resumed_after = int(result.stdout.split("resuming phase 'train' after epoch ")[1].split()[0])
    assert 1 <= resumed_after < 4
    resumed = pd.read_csv(prepared.root / "reports/cnn/history.csv").drop(columns="seconds")
    pd.testing.assert_frame_equal(resumed, uninterrupted)
    again = json.loads((prepared.root / "reports/cnn/train.json").read_text())
    for key in ("val_accuracy", "val_loss", "best_epoch", "epochs_run"):
        assert again[key] == summary[key]
    live = (prepared.root / "reports/cnn/live/plots/metrics/val/loss.tsv").read_text().splitlines()
    assert len(live) == 1 + 4  # DVCLive's curve holds every epoch once
    assert not (prepared.root / ".checkpoints/train_cnn.npz").exists()


def test_a_state_saved_under_other_params_is_never_used(prepared):
    prepared.set_params(**{**TINY_CNN, "train_cnn.epochs": 4})
    _kill_after_first_checkpoint(prepared)
    prepared.set_params(**{"train_cnn.optimizer.learning_rate": 0.02})
    result = prepared.stage("train_cnn")
    assert "was made with other params, data or devices; training from the start" in result.stdout
    assert "resuming" not in result.stdout
    assert len(pd.read_csv(prepared.root / "reports/cnn/history.csv")) == 4


def test_a_killed_train_transfer_resumes_in_its_second_phase(prepared):
    prepared.set_params(**{**TINY_TRANSFER, "train_transfer.fine_tune.epochs": 3})
    prepared.stage("train_transfer")
    uninterrupted = pd.read_csv(prepared.root / "reports/transfer/history.csv").drop(columns="seconds")
    state = prepared.root / ".checkpoints/train_transfer.npz"
    process = subprocess.Popen([sys.executable, "scripts/train_transfer.py"], cwd=prepared.root, env=stage_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while process.poll() is None:  # wait for the first saved epoch of phase 2
        if state.exists() and "fine-tune" in json.loads(str(np.load(state)["meta"]))["phases"]:
            process.send_signal(signal.SIGKILL)
        time.sleep(0.01)
    result = prepared.stage("train_transfer")
    assert "resuming phase 'fine-tune'" in result.stdout
    resumed = pd.read_csv(prepared.root / "reports/transfer/history.csv").drop(columns="seconds")
    pd.testing.assert_frame_equal(resumed, uninterrupted)


# --- several hosts ----------------------------------------------------------------------------------------------

def _model_files(path):
    """The architecture and weights inside a .keras file, without metadata.json, which holds the save time
    (as do the zip's own timestamps)."""
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist() if name != "metadata.json"}


def test_two_processes_with_a_real_coordinator_train_one_model_like_one_device(project, tmp_path):
    # Two "hosts" on localhost, each with its own copy of the project and 2 virtual devices, joined by
    # jax.distributed through Keras' KERAS_DISTRIBUTION_* variables (collectives over Gloo on the CPU).
    import shutil
    import socket

    one = _one_device_run_on_even_batches(project, tmp_path / "even")
    hosts = [project.root, tmp_path / "second_host"]
    shutil.copytree(project.root, hosts[1])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    shared = {**stage_env(), "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "2",
              "KERAS_DISTRIBUTION_JOB_ADDRESSES": f"127.0.0.1:{port},127.0.0.1:{port + 1}",
              "KERAS_DISTRIBUTION_NUM_PROCESSES": "2"}
    processes = [subprocess.Popen([sys.executable, "scripts/train_cnn.py"], cwd=root, text=True,
                                  env={**shared, "KERAS_DISTRIBUTION_PROCESS_ID": str(index)},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                 for index, root in enumerate(hosts)]
    outputs = [process.communicate(timeout=1200)[0] for process in processes]
    assert all(process.returncode == 0 for process in processes), outputs
    assert "data-parallel over 4 devices on 2 hosts, global batch 8" in outputs[0]
    # One model: the same architecture and weights, saved perhaps a second apart.
    assert _model_files(hosts[0] / "models/cnn.keras") == _model_files(hosts[1] / "models/cnn.keras")
    two_hosts = _val_scores(project)
    assert two_hosts[0] == pytest.approx(one[0], abs=1e-6) and two_hosts[1] == pytest.approx(one[1], abs=1e-3)
