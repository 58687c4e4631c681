"""Benchmark of the server's memory under a long, mixed load: does it stay flat?

    python tests/bench_soak.py WORKDIR

WORKDIR is a project whose data stages ran on the gear photos. The transfer model
is trained (train_transfer) and exported to ONNX (export) there first when missing.
Then each server, the Keras one (models/transfer.keras) and the slim one
(models/export/transfer.onnx on onnxruntime), answers SOAK_REQUESTS requests from
CLIENTS concurrent clients: gear photos mixed with empty, truncated, text, oversize
and malformed requests, every answer checked. Its resident memory (RSS) is read
after a warm-up (start), after half the requests (middle) and at the end; the
goal is a second half that adds under 5%.
"""

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import yaml

from serving import free_port, running_server

SOAK_REQUESTS = 10_000
CLIENTS = 32
# The soak's upload limit: oversize requests stay cheap to send.
MAX_UPLOAD_BYTES = 1_000_000
# Of every ten requests, three are photos and the rest bad ones, with the status each must get.
KINDS = ["photo"] * 3 + ["empty", "truncated", "text", "oversize", "malformed", "empty", "text"]
EXPECTED_STATUS = {"photo": 200, "empty": 422, "truncated": 422, "text": 415, "oversize": 413, "malformed": 400}


def _env(**extra) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **extra)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def prepare_models(workdir: Path) -> None:
    """Train the transfer model and export it to ONNX, float32 and INT8, in WORKDIR, unless already there."""
    if not (workdir / "models" / "transfer.keras").exists():
        subprocess.run([sys.executable, "scripts/train_transfer.py"], cwd=workdir, env=_env(), check=True,
                       capture_output=True)
    if not (workdir / "models" / "export" / "transfer.int8.onnx").exists():
        params = workdir / "params.yaml"
        original = params.read_text()
        changed = yaml.safe_load(original)
        changed["export"].update(model="transfer", onnx_quantization="int8")
        try:
            params.write_text(yaml.safe_dump(changed, sort_keys=False))
            subprocess.run([sys.executable, "scripts/export.py"], cwd=workdir, env=_env(), check=True,
                           capture_output=True)
        finally:
            params.write_text(original)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def make_request(kind: str, photo: bytes) -> dict:
    """Keyword arguments of requests.post for one request of `kind`."""
    if kind == "malformed":
        return {"data": b"--x\r\ngarbage", "headers": {"Content-Type": "multipart/form-data"}}
    content = {"photo": photo, "empty": b"", "truncated": photo[: len(photo) // 3],
               "text": b"not a photo, just some text\n" * 40, "oversize": os.urandom(MAX_UPLOAD_BYTES + 1000)}[kind]
    return {"files": {"file": (f"{kind}.jpg", content)}}


def soak(url: str, photos: list[bytes], count: int, offset: int) -> int:
    """Send `count` mixed requests from CLIENTS threads; return how many got a wrong answer."""
    def client(number: int) -> int:
        wrong = 0
        with requests.Session() as session:
            for index in range(offset + number, offset + count, CLIENTS):
                kind = KINDS[index % len(KINDS)]
                response = session.post(f"{url}/predict", timeout=300, **make_request(kind, photos[index % len(photos)]))
                answer = response.json()
                right = response.status_code == EXPECTED_STATUS[kind] and ("best_guess" in answer) == (kind == "photo")
                wrong += not right
        return wrong

    with ThreadPoolExecutor(CLIENTS) as executor:
        return sum(executor.map(client, range(CLIENTS)))


def measure(workdir: Path, arguments: list[str], env: dict, photos: list[bytes]) -> dict:
    port = free_port()
    env = {**_env(PORT=str(port), MAX_UPLOAD_BYTES=str(MAX_UPLOAD_BYTES)), **env}
    with running_server(arguments, port, cwd=workdir, env=env) as server:
        soak(server.url, photos, 200, 0)  # warm-up: every batch size, every kind of request
        start = rss_mib(server.process.pid)
        began = time.perf_counter()
        wrong = soak(server.url, photos, SOAK_REQUESTS // 2, 0)
        middle = rss_mib(server.process.pid)
        wrong += soak(server.url, photos, SOAK_REQUESTS - SOAK_REQUESTS // 2, SOAK_REQUESTS // 2)
        end = rss_mib(server.process.pid)
        seconds = time.perf_counter() - began
    return {"start": start, "middle": middle, "end": end, "wrong": wrong, "seconds": seconds}


SERVERS = {
    "Keras (.keras)": ["scripts/serve.py", "--model", "models/transfer.keras"],
    "slim (ONNX, onnxruntime)": ["scripts/serve.py", "--model", "models/export/transfer.onnx"],
}


def run(workdir: Path, variants: dict | None = None) -> list[dict]:
    """One row per server (and per environment variant: {label: extra environment})."""
    workdir = Path(workdir)
    prepare_models(workdir)
    files = sorted(path for path in (workdir / "data" / "raw").rglob("*") if path.is_file())
    photos = [path.read_bytes() for path in files[:: max(1, len(files) // 64)]]
    rows = []
    for label, extra_env in (variants or {"": {}}).items():
        for name, arguments in SERVERS.items():
            result = measure(workdir, arguments, extra_env, photos)
            second_half = (result["end"] - result["middle"]) / result["middle"]
            rows.append({
                "benchmark": f"serve soak RSS, {name}{label}",
                "value": "{start:.0f} / {middle:.0f} / {end:.0f} MiB".format(**result),
                "baseline": "start / middle / end", "ratio": f"{second_half:+.1%} in the second half",
                "note": f"{SOAK_REQUESTS:,} requests, {CLIENTS} clients, 3 in 10 photos, the rest bad requests;"
                        f" {result['wrong']} wrong answers; {SOAK_REQUESTS / result['seconds']:.0f} requests/s",
            })
            print(json.dumps({"server": name + label, **result}), file=sys.stderr, flush=True)
    return rows


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} WORKDIR (a project whose data stages ran on the gear photos)")
    for row in run(Path(sys.argv[1])):
        print(" | ".join(f"{key}: {value}" for key, value in row.items()))
