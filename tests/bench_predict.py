"""Benchmark of using a model: predict_new throughput, bulk prediction and the API's latency.

    python tests/bench_predict.py WORKDIR [--bulk-only]

WORKDIR is a project whose data stages ran on the gear photos. First the bulk rows:
`scripts/predict_new.py` run as a user runs it on generated folders of 2,000 and
20,000 photos of mixed sizes, with the transfer model exported to ONNX (onnxruntime,
float32 and INT8) and as the .keras file: photos/s and the peak RSS of its largest process,
which must not grow with the folder. The transfer model is trained and exported
first where WORKDIR has none. Then every model in WORKDIR/models is measured:
  - predict_new throughput in images/s (decoding the original photos of data/raw and
    batched inference, the path `scripts/predict_new.py` takes), against one image per step;
  - `scripts/serve.py` latency of POST /predict with one photo, p50 and p95, with 1 and
    with 8 concurrent clients, over HTTP on 127.0.0.1.
Model loading and start-up are not timed in these; each starts after a warm-up.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from bench_soak import prepare_models
from benchmark import cpu_name
from serving import free_port, running_server

MODEL_NAMES = ("cnn", "transfer")
BATCH_SIZE = 32
SINGLE_IMAGES = 200  # one-image-per-step inference is slow: timed on a subset
SERIAL_REQUESTS = 60
CLIENTS, REQUESTS_PER_CLIENT = 8, 25
BULK_SIZES = (2_000, 20_000)
# Long sides of the generated photos, in turn: phone thumbnails up to a 12-megapixel camera's.
LONG_SIDES = (256, 512, 1024, 2048, 4032)
DISTINCT_PHOTOS = 100  # re-encoded once each, then hard-linked under as many names as a folder needs

THROUGHPUT = r"""
import json, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, "scripts")
from tqdm import tqdm
from imgcls import bulk
from imgcls.predict import Classifier, find_images
from predict_new import default_workers

model_file, batch_size, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
classifier = Classifier(model_file, batch_size=batch_size)
files = [str(path) for path, _ in find_images(["data/raw"], classifier.class_names)[:limit]]
workers = default_workers()

def classify(paths, scratch):
    table = bulk.PredictionTable(Path(scratch) / "predictions.csv", bulk.csv_columns(classifier.top_k), 0, False)
    table.open()
    bulk.classify_all(classifier, decoders, workers, paths, table, tqdm(disable=True))
    table.close()
    return table.summary

with tempfile.TemporaryDirectory() as scratch, bulk.decoding_workers(classifier.card, workers) as decoders:
    classify(files[: 2 * batch_size], scratch)  # warm-up: starts the workers, builds the predict function
    start = time.perf_counter()
    summary = classify(files, scratch)
    seconds = time.perf_counter() - start
print(json.dumps({"images": len(files), "seconds": seconds, "errors": summary.unreadable}))
"""
# Runs a command and reports the peak resident memory of its largest process (itself or a worker).
MEASURED = (
    "import resource, subprocess, sys; result = subprocess.run(sys.argv[1:], capture_output=True, text=True);"
    " sys.stderr.write(result.stderr[-3000:]); print(result.stdout);"
    " print('peak_rss_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(result.returncode)"
)


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


def photo_folder(workdir: Path, count: int) -> Path:
    """WORKDIR/bulk_<count>/<class>/<n>.jpg: `count` photos of mixed sizes, one unreadable file per thousand.

    DISTINCT_PHOTOS gear photos re-encoded at the LONG_SIDES in turn (JPEG, one in five PNG),
    then hard-linked: every file is decoded in full, without writing gigabytes of photos.
    """
    folder = workdir / f"bulk_{count}"
    if folder.exists():
        return folder
    sources = sorted(path for path in (workdir / "data" / "raw").rglob("*") if path.is_file())
    step = max(1, len(sources) // DISTINCT_PHOTOS)
    distinct = workdir / "bulk_distinct"
    if not distinct.exists():
        distinct.mkdir()
        for number, source in enumerate(sources[::step][:DISTINCT_PHOTOS]):
            with Image.open(source) as image:
                image = image.convert("RGB")
                scale = LONG_SIDES[number % len(LONG_SIDES)] / max(image.size)
                image = image.resize((round(image.width * scale), round(image.height * scale)))
                # One in five a PNG of 512 or 1,024 px (a screenshot's sizes): a 12-megapixel PNG takes 0.4 s to decode.
                suffix = "png" if number % 10 in (1, 2) else "jpg"
                image.save(distinct / f"{number:03d}_{source.parent.name}.{suffix}", quality=90)
    photos = sorted(distinct.iterdir())
    for number in range(count):
        photo = photos[number % len(photos)]
        target = folder / photo.stem.split("_", 1)[1] / f"{number:05d}{photo.suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        if number % 1000 == 999:
            target.write_bytes(photo.read_bytes()[:300])  # truncated: gets a row with its reason
            continue
        try:
            os.link(photo, target)
        except OSError:
            shutil.copy(photo, target)
    return folder


def bulk_run(workdir: Path, model_file: str, count: int) -> dict:
    """`predict_new.py --images` on a folder of `count` photos: photos/s (its own figure) and peak RSS in MiB."""
    folder = photo_folder(workdir, count)
    out = workdir / f"bulk_{count}_{Path(model_file).name.replace('.', '_')}.csv"  # one per model file: compare them
    command = [sys.executable, "scripts/predict_new.py", "--images", str(folder), "--out", str(out),
               "--model", model_file]
    result = subprocess.run([sys.executable, "-c", MEASURED, *command], cwd=workdir, env=_env(),
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"bulk prediction failed:\n{result.stderr[-3000:]}")
    rate = float(re.search(r"\((\d+) photos/s\)", result.stdout).group(1))
    peak = int(re.search(r"peak_rss_kib (\d+)", result.stdout).group(1)) / 1024
    rows = sum(1 for _ in open(out)) - 1
    if rows != count:
        raise RuntimeError(f"bulk prediction wrote {rows} rows for {count} photos")
    summary = re.search(r"predict_new with [^:]+: (.+) \(\d+ photos/s\)", result.stdout).group(1)
    return {"rate": rate, "peak_mib": peak, "summary": summary}


def bulk_rows(workdir: Path) -> list[dict]:
    """Bulk prediction of the transfer model, as ONNX (float32 and INT8) on onnxruntime and as the .keras file,
    at each BULK_SIZES."""
    prepare_models(workdir)
    cpu = cpu_name()
    rows = []
    for runtime, model_file in (("onnxruntime float32", "models/export/transfer.onnx"),
                                ("onnxruntime INT8", "models/export/transfer.int8.onnx"),
                                ("Keras", "models/transfer.keras")):
        small, large = (bulk_run(workdir, model_file, count) for count in BULK_SIZES)
        rows.append({
            "benchmark": f"bulk predict_new, transfer, {runtime}",
            "value": f"{large['rate']:.0f} photos/s ({BULK_SIZES[1]:,} photos)",
            "baseline": f"{small['rate']:.0f} photos/s ({BULK_SIZES[0]:,} photos)",
            "ratio": f"{large['rate'] / small['rate']:.2f}x",
            "note": f"{BULK_SIZES[1]:,} photos: {large['summary']}; {cpu}",
        })
        rows.append({
            "benchmark": f"bulk predict_new peak RSS, transfer, {runtime}",
            "value": f"{large['peak_mib']:.0f} MiB ({BULK_SIZES[1]:,} photos)",
            "baseline": f"{small['peak_mib']:.0f} MiB ({BULK_SIZES[0]:,} photos)",
            "ratio": f"{large['peak_mib'] / small['peak_mib']:.2f}x",
            "note": "largest process (the main one or a decoding worker); flat means memory is bounded",
        })
    return rows


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


def run(workdir: Path, bulk_only: bool = False) -> list[dict]:
    workdir = Path(workdir)
    cores = os.cpu_count()
    rows = bulk_rows(workdir)
    if bulk_only:
        return rows
    models = [name for name in MODEL_NAMES if (workdir / "models" / f"{name}.keras").exists()]
    photos = sorted(path for path in (workdir / "data" / "raw").rglob("*") if path.is_file())
    # A typical photo for the latency runs: the median-sized file.
    photo = sorted(photos, key=lambda path: path.stat().st_size)[len(photos) // 2].read_bytes()
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
                    f" ({batched['errors']} unreadable), CSV rows synced per batch, {cores} CPU cores",
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
    if len(sys.argv) not in (2, 3) or sys.argv[2:] not in ([], ["--bulk-only"]):
        sys.exit(f"usage: {sys.argv[0]} WORKDIR [--bulk-only] (a project whose data stages ran on the gear photos)")
    for row in run(Path(sys.argv[1]), bulk_only=sys.argv[2:] == ["--bulk-only"]):
        print(" | ".join(f"{key}: {value}" for key, value in row.items()))
