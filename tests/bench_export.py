"""Benchmark of INT8 export: each INT8 file beside the float32 file of the same format, on the gear test split.

    python tests/bench_export.py WORKDIR

WORKDIR is a project whose data stages ran on the gear photos; every model in
WORKDIR/models is exported by scripts/export.py with both INT8 files
(export.quantization int8, export.onnx_quantization int8, calibrated on
export.calibration_images training photos; both gates opened, so that every
figure is measured rather than refused). Beside them: the float32 ONNX file the
stage writes, and the model converted to TFLite in float32 (no optimisation)
and in float16 (the default export), as export converts it. For each file:
its size, its latency per photo at batch 1 and at batch 32 with the runtime
that serves it (imgcls.runtimes: onnxruntime or LiteRT, on every core), and
its test accuracy. Each latency is the best of rounds that time every file in
turn (as timeit takes the best of its repeats): other processes only ever add
time, and a busy machine slows every file alike. Compare ratios from one run.
WORKDIR's models/export, reports/export and params.yaml are left as they were.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from benchmark import cpu_name

MODEL_NAMES = ("cnn", "transfer")
ROUNDS = 7
SINGLE_PHOTOS = 16  # photos timed one at a time in each round
BATCH_SIZE, BATCHES = 32, 3  # batches timed in each round
# (metrics key of export, file name in the work folder, format, precision), float32 first in each format.
FILES = (("tflite_float32", "tflite_float32.tflite", "TFLite", "float32"),
         ("tflite_float16", "tflite_float16.tflite", "TFLite", "float16"),
         ("tflite", "tflite_int8.tflite", "TFLite", "int8"),
         ("onnx", "onnx_float32.onnx", "ONNX", "float32"),
         ("onnx_int8", "onnx_int8.onnx", "ONNX", "int8"))

# The float TFLite files, converted from the model as export converts it.
FLOAT_TFLITE = r"""
import sys
from pathlib import Path
sys.path.insert(0, "scripts")
import tensorflow as tf
import export
from imgcls.predict import Classifier

model_file, folder = sys.argv[1], Path(sys.argv[2])
model = export.in_float32(Classifier(model_file, check_classes=False).runtime.model)
(folder / "tflite_float16.tflite").write_bytes(export.tflite_file(model, "float16", None)[0])
plain = export.without_antialiasing(model) or model
(folder / "tflite_float32.tflite").write_bytes(tf.lite.TFLiteConverter.from_keras_model(plain).convert())
"""

# Accuracy and latency of each file, in a process without TensorFlow or Keras: only the runtimes that serve them.
MEASURE = r"""
import json, sys, time
sys.path.insert(0, "scripts")
import numpy as np
from imgcls.dataset import load_split
from imgcls.runtimes import open_model

rounds, single, batch_size, batches = map(int, sys.argv[1:5])
runtimes = {path: open_model(path, check_classes=False) for path in sys.argv[5:]}
size = int(next(iter(runtimes.values()))[1]["image_size"])
pixels, labels, _ = load_split("test", size)
pixels = pixels.astype(np.float32)
results = {path: {"single": [], "batch": []} for path in runtimes}
for path, (runtime, _) in runtimes.items():
    probabilities = np.concatenate([runtime.predict(pixels[start:start + batch_size])
                                    for start in range(0, len(pixels), batch_size)])
    results[path]["test_accuracy"] = float(np.mean(probabilities.argmax(axis=1) == labels))
    results[path]["top1"] = probabilities.argmax(axis=1).tolist()
for _ in range(rounds):
    for path, (runtime, _) in runtimes.items():
        runtime.predict(pixels[:1])  # warm-up at this shape (LiteRT reallocates when the batch changes)
        start = time.perf_counter()
        for index in range(single):
            runtime.predict(pixels[index:index + 1])
        results[path]["single"].append((time.perf_counter() - start) / single)
        runtime.predict(pixels[:batch_size])
        start = time.perf_counter()
        for index in range(batches):
            runtime.predict(pixels[index * batch_size:(index + 1) * batch_size])
        results[path]["batch"].append((time.perf_counter() - start) / (batches * batch_size))
for entry in results.values():
    entry["single"], entry["batch"] = min(entry["single"]), min(entry["batch"])
print(json.dumps({"test_images": len(labels), "files": results}))
"""


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def _run(command: list[str], workdir: Path) -> str:
    result = subprocess.run(command, cwd=workdir, env=_env(), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return result.stdout


def export_int8(workdir: Path, name: str, folder: Path) -> dict:
    """Run the export stage for `name` with both INT8 files and open gates; copy its files into `folder`."""
    params_file = workdir / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    params["export"].update(model=name, formats=["tflite", "onnx"], quantization="int8", onnx_quantization="int8",
                            min_agreement=1e-9, max_accuracy_drop=1.0)
    try:
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        _run([sys.executable, "scripts/export.py"], workdir)
    finally:
        params_file.write_text(original)
    exported = workdir / "models" / "export"
    for source, target in ((f"{name}.tflite", "tflite_int8.tflite"), (f"{name}.onnx", "onnx_float32.onnx"),
                           (f"{name}.int8.onnx", "onnx_int8.onnx")):
        shutil.copy(exported / source, folder / target)
    for _, file_name, _, _ in FILES:  # each runtime reads the card under the file's own name
        shutil.copy(exported / f"{name}.json", (folder / file_name).with_suffix(".json"))
    return json.loads((workdir / "reports" / "export" / "metrics.json").read_text())


def measure_model(workdir: Path, name: str, folder: Path) -> dict:
    """Every file of FILES for one model, with its size, latencies and test accuracy."""
    metrics = export_int8(workdir, name, folder)
    _run([sys.executable, "-c", FLOAT_TFLITE, f"models/{name}.keras", str(folder)], workdir)
    paths = [str(folder / file_name) for _, file_name, _, _ in FILES]
    measured = json.loads(_run([sys.executable, "-c", MEASURE, str(ROUNDS), str(SINGLE_PHOTOS), str(BATCH_SIZE),
                                str(BATCHES), *paths], workdir).strip().splitlines()[-1])
    files = {}
    for (key, file_name, format_name, precision), path in zip(FILES, paths):
        entry = measured["files"][path]
        files[key] = {"format": format_name, "precision": precision, "bytes": Path(path).stat().st_size,
                      "ms_batch_1": entry["single"] * 1000, "ms_batch_32": entry["batch"] * 1000,
                      "test_accuracy": entry["test_accuracy"], "top1": entry["top1"]}
    keras_top1 = files["onnx"]["top1"]  # the float32 ONNX file answers as Keras (export checks it)
    for entry in files.values():
        entry["agreement_with_float32_onnx"] = sum(a == b for a, b in zip(entry.pop("top1"), keras_top1)) / len(
            keras_top1)
    return {"keras_test_accuracy": metrics["keras_test_accuracy"], "test_images": measured["test_images"],
            "calibration_images": metrics["calibration_images"], "files": files}


def measure(workdir: Path) -> dict:
    """{model name: measure_model(...)} for every trained model, with WORKDIR's export outputs restored."""
    workdir = Path(workdir)
    models = [name for name in MODEL_NAMES if (workdir / "models" / f"{name}.keras").exists()]
    kept = [workdir / "models" / "export", workdir / "reports" / "export"]
    with tempfile.TemporaryDirectory(prefix="bench-export-") as scratch:
        backup = Path(scratch) / "backup"
        for number, path in enumerate(kept):
            if path.exists():
                shutil.copytree(path, backup / str(number))
        try:
            results = {}
            for name in models:
                folder = Path(scratch) / name
                folder.mkdir()
                results[name] = measure_model(workdir, name, folder)
        finally:
            for number, path in enumerate(kept):
                shutil.rmtree(path, ignore_errors=True)
                if (backup / str(number)).exists():
                    shutil.copytree(backup / str(number), path)
    return results


def run(workdir: Path) -> list[dict]:
    return rows_of(measure(workdir), workdir)


def rows_of(results: dict, workdir: Path) -> list[dict]:
    """The benchmark table's rows: each INT8 file against the float32 file of its format."""
    if not results:
        return [{"benchmark": "INT8 export", "value": "skipped", "baseline": "", "ratio": "",
                 "note": f"no model in {Path(workdir) / 'models'}: run train_cnn or train_transfer first"}]
    rows = []
    for name, result in results.items():
        for format_name, float_key, int8_key in (("TFLite", "tflite_float32", "tflite"), ("ONNX", "onnx", "onnx_int8")):
            int8, float32 = result["files"][int8_key], result["files"][float_key]
            label = f"{name} {format_name} INT8"
            rows += [
                {"benchmark": f"{label}: file size", "value": f"{int8['bytes'] / 1e6:.2f} MB",
                 "baseline": f"{float32['bytes'] / 1e6:.2f} MB (float32)",
                 "ratio": f"{float32['bytes'] / int8['bytes']:.1f}x smaller", "note": ""},
                {"benchmark": f"{label}: latency per photo, batch 1", "value": f"{int8['ms_batch_1']:.2f} ms",
                 "baseline": f"{float32['ms_batch_1']:.2f} ms (float32)",
                 "ratio": f"{float32['ms_batch_1'] / int8['ms_batch_1']:.1f}x",
                 "note": f"best of {ROUNDS} rounds of {SINGLE_PHOTOS} photos; {cpu_name()}"},
                {"benchmark": f"{label}: latency per photo, batch {BATCH_SIZE}",
                 "value": f"{int8['ms_batch_32']:.2f} ms",
                 "baseline": f"{float32['ms_batch_32']:.2f} ms (float32)",
                 "ratio": f"{float32['ms_batch_32'] / int8['ms_batch_32']:.1f}x",
                 "note": f"best of {ROUNDS} rounds of {BATCHES} batches"},
                {"benchmark": f"{label}: test accuracy", "value": f"{int8['test_accuracy']:.2%}",
                 "baseline": f"{float32['test_accuracy']:.2%} (float32)", "ratio": "",
                 "note": f"{result['test_images']} test photos; Keras {result['keras_test_accuracy']:.2%};"
                         f" calibrated on {result['calibration_images']} training photos"},
            ]
    return rows


def print_tables(results: dict) -> None:
    """One markdown table per model: every file with its figures."""
    for name, result in results.items():
        print(f"\n{name}: {result['test_images']} test photos, Keras test accuracy {result['keras_test_accuracy']:.2%},"
              f" INT8 calibrated on {result['calibration_images']} training photos; {cpu_name()}\n")
        print("| file | precision | size | ms/photo, batch 1 | ms/photo, batch 32 | test accuracy |"
              " top-1 agreement with float32 ONNX |")
        print("|---|---|---|---|---|---|---|")
        for entry in result["files"].values():
            print(f"| {entry['format']} | {entry['precision']} | {entry['bytes'] / 1e6:.2f} MB |"
                  f" {entry['ms_batch_1']:.2f} | {entry['ms_batch_32']:.2f} | {entry['test_accuracy']:.2%} |"
                  f" {entry['agreement_with_float32_onnx']:.2%} |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} WORKDIR (a project whose data stages ran, with models in WORKDIR/models)")
    measured = measure(Path(sys.argv[1]))
    print_tables(measured)
    print()
    for row in rows_of(measured, Path(sys.argv[1])):
        print(" | ".join(f"{key}: {value}" for key, value in row.items()))
