"""Benchmark of the serving image: its size and how soon it answers /health after `run`.

    python tests/bench_images.py WORKDIR

WORKDIR is a project whose transfer model was trained and exported (the soak
section prepares it). Two images are built from Containerfile.serve the same way
(same base, same layers): the slim one (requirements-serve.txt, the ONNX file on
onnxruntime) and, as the baseline, one of the Keras server (requirements.txt, the
.keras model). Each is started STARTS times; the time from `run` to the first
200 from /health is the median. Needs podman or docker; IMGCLS_BASE_IMAGE and
IMGCLS_PIP_CERT adapt the builds as in tests/test_containers.py.
"""

import shutil
import statistics
import sys
import time
from pathlib import Path

import requests

from bench_soak import prepare_models
from serving import free_port
from test_containers import ENGINE, build, engine

STARTS = 3
IMAGES = {
    # name: (REQUIREMENTS build argument, MODEL inside the image)
    "slim (ONNX on onnxruntime)": ("requirements-serve.txt", "models/export/transfer.onnx"),
    "Keras server (.keras on TensorFlow)": ("requirements.txt", "models/export/keras/transfer.keras"),
}


def seconds_to_health(tag: str, model: str) -> float:
    port = free_port()
    start = time.perf_counter()
    container = engine("run", "-d", "-p", f"127.0.0.1:{port}:8000", "-e", f"MODEL={model}", tag).stdout.strip()
    try:
        while time.perf_counter() - start < 300:
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    return time.perf_counter() - start
            except requests.ConnectionError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{tag} did not answer /health in 300 s:\n{engine('logs', container, check=False).stderr}")
    finally:
        engine("rm", "-f", container, check=False)


def run(workdir: Path) -> list[dict]:
    if ENGINE is None:
        return [{"benchmark": "serving image", "value": "skipped", "note": "no container engine (podman or docker)"}]
    workdir = Path(workdir)
    prepare_models(workdir)
    results = {}
    for name, (requirements, model) in IMAGES.items():
        if model.endswith(".keras"):  # the baseline's model goes where the build context lets it in
            keras_folder = workdir / "models" / "export" / "keras"
            keras_folder.mkdir(exist_ok=True)
            for suffix in (".keras", ".json"):
                shutil.copy(workdir / "models" / f"transfer{suffix}", keras_folder / f"transfer{suffix}")
        tag = f"imgcls-serve-bench-{len(results)}"
        began = time.perf_counter()
        build(workdir, "Containerfile.serve", tag, "--build-arg", f"REQUIREMENTS={requirements}", timeout=3600)
        build_seconds = time.perf_counter() - began
        size = int(engine("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())
        starts = [seconds_to_health(tag, model) for _ in range(STARTS)]
        results[name] = {"size": size, "health": statistics.median(starts), "build": build_seconds}
        print(f"({name}: {results[name]})", file=sys.stderr, flush=True)
        engine("rmi", "-f", tag, check=False, timeout=600)  # a few GB for the baseline: slow to delete
    shutil.rmtree(workdir / "models" / "export" / "keras", ignore_errors=True)
    slim, keras = results.values()
    return [
        {"benchmark": "serving image size", "value": f"{slim['size'] / 1e6:.0f} MB (slim, ONNX)",
         "baseline": f"{keras['size'] / 1e6:.0f} MB (Keras server, same Containerfile)",
         "ratio": f"{keras['size'] / slim['size']:.1f}x smaller", "note": "goal <= 400 MB"},
        {"benchmark": "serving image: `run` to first /health", "value": f"{slim['health']:.1f} s (slim)",
         "baseline": f"{keras['health']:.1f} s (Keras server)", "ratio": f"{keras['health'] / slim['health']:.1f}x",
         "note": f"median of {STARTS} starts; goal <= 3 s"},
    ]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} WORKDIR (a project whose data stages ran on the gear photos)")
    for row in run(Path(sys.argv[1])):
        print(" | ".join(f"{key}: {value}" for key, value in row.items()))
