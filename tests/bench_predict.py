"""Benchmark of using a model: predict_new throughput and the API's latency.

    python tests/bench_predict.py WORKDIR

WORKDIR is a project whose data stages ran on the gear photos; every model in
WORKDIR/models is measured:
  - predict_new throughput in images/s (decoding the original photos of data/raw and
    batched inference, the path `scripts/predict_new.py` takes), against one image per step;
  - `scripts/serve.py` latency of POST /predict with one photo, p50 and p95, with 1 and
    with 8 concurrent clients, over HTTP on 127.0.0.1.
Model loading and start-up are not timed; each measurement starts after a warm-up.
"""

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from serving import free_port, running_server

MODEL_NAMES = ("cnn", "transfer")
BATCH_SIZE = 32
SINGLE_IMAGES = 200  # one-image-per-step inference is slow: timed on a subset
SERIAL_REQUESTS = 60
CLIENTS, REQUESTS_PER_CLIENT = 8, 25

THROUGHPUT = r"""
import json, sys, time
sys.path.insert(0, "scripts")
from imgcls.predict import Classifier
from predict_new import find_images, predict_files

model_file, batch_size, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
classifier = Classifier(model_file, batch_size=batch_size)
files = find_images(["data/raw"], classifier.class_names)[:limit]
predict_files(classifier, files[: 2 * batch_size])  # warm-up: builds the predict function for this batch shape
start = time.perf_counter()
frame, _ = predict_files(classifier, files)
seconds = time.perf_counter() - start
print(json.dumps({"images": len(files), "seconds": seconds, "errors": int((frame["error"] != "").sum())}))
"""


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def throughput(workdir: Path, model_file: str, batch_size: int, limit: int) -> dict:
    result = subprocess.run([sys.executable, "-c", THROUGHPUT, model_file, str(batch_size), str(limit)],
                            cwd=workdir, env=_env(), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"throughput run failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _percentiles(latencies: list[float]) -> tuple[float, float]:
    return float(np.percentile(latencies, 50) * 1000), float(np.percentile(latencies, 95) * 1000)


def latency(workdir: Path, model_file: str, photo: bytes) -> dict:
    """p50/p95 of POST /predict with 1 client, then with CLIENTS concurrent clients."""
    import requests

    port = free_port()
    with running_server(["scripts/serve.py", "--port", str(port), "--model", model_file], port, cwd=workdir,
                        env=_env()) as server:

        def client(requests_to_send: int) -> list[float]:
            timings = []
            with requests.Session() as session:
                for _ in range(requests_to_send):
                    start = time.perf_counter()
                    response = session.post(f"{server.url}/predict", files={"file": ("photo.jpg", photo)},
                                            timeout=120)
                    timings.append(time.perf_counter() - start)
                    if response.status_code != 200:
                        raise RuntimeError(f"/predict answered {response.status_code}: {response.text}")
            return timings

        client(5)  # warm-up
        serial = client(SERIAL_REQUESTS)
        start = time.perf_counter()
        with ThreadPoolExecutor(CLIENTS) as executor:
            concurrent = [t for timings in executor.map(client, [REQUESTS_PER_CLIENT] * CLIENTS) for t in timings]
        concurrent_seconds = time.perf_counter() - start
    return {"serial": _percentiles(serial), "concurrent": _percentiles(concurrent),
            "serial_rate": len(serial) / sum(serial), "concurrent_rate": len(concurrent) / concurrent_seconds}


def run(workdir: Path) -> list[dict]:
    workdir = Path(workdir)
    cores = os.cpu_count()
    models = [name for name in MODEL_NAMES if (workdir / "models" / f"{name}.keras").exists()]
    if not models:
        return [{"benchmark": "predict_new / serve", "value": "skipped", "baseline": "", "ratio": "",
                 "note": f"no model in {workdir / 'models'}: run train_cnn or train_transfer first"}]
    photos = sorted(path for path in (workdir / "data" / "raw").rglob("*") if path.is_file())
    # A typical photo for the latency runs: the median-sized file.
    photo = sorted(photos, key=lambda path: path.stat().st_size)[len(photos) // 2].read_bytes()
    rows = []
    for name in models:
        model_file = f"models/{name}.keras"
        batched = throughput(workdir, model_file, BATCH_SIZE, len(photos))
        single = throughput(workdir, model_file, 1, SINGLE_IMAGES)
        batched_rate = batched["images"] / batched["seconds"]
        single_rate = single["images"] / single["seconds"]
        rows.append({
            "benchmark": f"predict_new throughput, {name}",
            "value": f"{batched_rate:.0f} images/s",
            "baseline": f"{single_rate:.0f} images/s (1 image per step)",
            "ratio": f"{batched_rate / single_rate:.1f}x",
            "note": f"decode + batch {BATCH_SIZE} inference of {batched['images']} photos of data/raw"
                    f" ({batched['errors']} unreadable), {cores} CPU cores",
        })
        timings = latency(workdir, model_file, photo)
        rows.append({
            "benchmark": f"serve POST /predict latency, {name}, 1 client",
            "value": "p50 {:.0f} ms, p95 {:.0f} ms".format(*timings["serial"]),
            "baseline": "", "ratio": "",
            "note": f"{SERIAL_REQUESTS} requests, one {len(photo) / 1000:.0f} kB photo; {timings['serial_rate']:.0f} requests/s",
        })
        rows.append({
            "benchmark": f"serve POST /predict latency, {name}, {CLIENTS} clients",
            "value": "p50 {:.0f} ms, p95 {:.0f} ms".format(*timings["concurrent"]),
            "baseline": "p50 {:.0f} ms (1 client)".format(timings["serial"][0]),
            "ratio": f"{timings['concurrent'][0] / timings['serial'][0]:.1f}x",
            "note": f"{CLIENTS} x {REQUESTS_PER_CLIENT} requests; {timings['concurrent_rate']:.0f} requests/s in all",
        })
    return rows


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} WORKDIR (a project whose data stages ran, with models in WORKDIR/models)")
    for row in run(Path(sys.argv[1])):
        print(" | ".join(f"{key}: {value}" for key, value in row.items()))
