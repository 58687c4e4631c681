"""The GPU path on the CPU: `dvc repro`, data through export, as a recent GPU runs it.

On a GPU of compute capability 8.0 or higher `mixed_precision: auto` trains in
bfloat16 on JAX, and `distribution: auto` splits each batch across every
device. This runs all of that but CUDA itself: KERAS_BACKEND=jax, both
trainers in bfloat16, two virtual CPU devices (JAX_NUM_CPU_DEVICES), then
evaluate and predict_new on JAX with the bfloat16 models, and export (on
TensorFlow, as always) of a model that computes in bfloat16.
"""

import contextlib
import json
import sys

import numpy as np

from conftest import TINY_CNN, TINY_TRANSFER
from test_pipeline import ran_stages

# IMGCLS_DEVICE=cpu: the CPU plan whatever this machine has, with the user's KERAS_BACKEND.
GPU_PATH = {"KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "2", "IMGCLS_DEVICE": "cpu"}


def read_json(project, path: str) -> dict:
    return json.loads((project.root / path).read_text())


def every_layer(model):
    """The layers of `model` and of every model nested in it."""
    for layer in model.layers:
        yield layer
        yield from every_layer(layer) if hasattr(layer, "layers") else ()


def test_jax_bfloat16_on_two_devices_runs_every_stage_and_exports_within_min_agreement(project):
    # The CNN (input 24) reads the 24 px arrays, the transfer model (input 32) the 32 px ones; batches of 8
    # split into 4 per device.
    project.set_params(**TINY_CNN, **TINY_TRANSFER, **{
        "resize.image_size": [32, 24], "distribution": "auto",
        "train_cnn.mixed_precision": "bfloat16", "train_transfer.mixed_precision": "bfloat16"})
    project.run("git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qam", "GPU path")
    result = project.run(sys.executable, "-m", "dvc", "repro", env=GPU_PATH)
    assert ran_stages(result.stdout) == [
        "data", "resize", "split", "train_cnn", "train_transfer", "evaluate", "audit", "predict_new", "export",
    ]

    # Each trainer ran on JAX, in bfloat16, data-parallel over both devices, and its card says so.
    for name in ("cnn", "transfer"):
        trained_on = read_json(project, f"reports/{name}/train.json")["trained_on"]
        assert (trained_on["backend"], trained_on["precision"], trained_on["distribution"], trained_on["replicas"]) == (
            "jax", "bfloat16", "data-parallel", 2), trained_on
        assert read_json(project, f"models/{name}.json")["trained_on"] == trained_on
    # evaluate and predict_new ran on JAX with both bfloat16 models.
    assert set(read_json(project, "reports/evaluate/metrics.json")) >= {"cnn", "transfer"}
    assert len((project.root / "reports/predictions.csv").read_text().splitlines()) == 1 + 3

    metrics = read_json(project, "reports/export/metrics.json")
    exported = project.root / "models" / "export"
    assert metrics["rebuilt_in_float32"] is True
    assert read_json(project, "models/export/best.json")["trained_on"]["precision"] == "bfloat16"
    for format_name in project.params()["export"]["formats"]:
        assert (exported / f"best.{format_name}").stat().st_size == metrics[format_name]["bytes"]
        assert metrics[format_name]["top1_agreement"] >= project.params()["export"]["min_agreement"]

    # Whichever model export chose, the transfer model's float32 copy is right too: every layer of the
    # MobileNetV2 base nested in it computes in float32, with the same weights and (nearly) the same answers.
    from export import in_float32
    from imgcls.dataset import load_split
    from imgcls.modelio import load_keras

    with contextlib.chdir(project.root):
        model = load_keras("models/transfer.keras")
        pixels, _, _ = load_split("test", 32)
    assert "mixed_bfloat16" in {layer.dtype_policy.name for layer in every_layer(model)}
    copy = in_float32(model)
    assert {layer.dtype_policy.name for layer in every_layer(copy)} == {"float32"}
    assert len(list(every_layer(copy))) == len(list(every_layer(model))) > 150
    assert all(np.array_equal(first, second) for first, second in zip(copy.get_weights(), model.get_weights()))
    np.testing.assert_allclose(copy.predict(pixels, verbose=0), model.predict(pixels, verbose=0), atol=0.02)

