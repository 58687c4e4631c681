"""The container images, built with podman (or docker), run, and asked over HTTP from the host.

Skipped where no container engine is installed (.ci/run installs podman). Two environment
variables adapt the builds to a machine without a container registry or with a CA bundle of
its own, as in CI: IMGCLS_BASE_IMAGE names a local base image (Debian with python3 and
python3-venv) instead of pulling python:3.11-slim; IMGCLS_PIP_CERT is a CA bundle that pip
inside the build must trust (its folder is mounted read-only).
"""

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests

from serving import free_port
from tiny_model import train_on_project

ENGINE = shutil.which("podman") or shutil.which("docker")
pytestmark = pytest.mark.skipif(ENGINE is None, reason="no container engine: install podman or docker"
                                                      " (.ci/run installs podman) to build and run the images")


def engine(*arguments: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([ENGINE, *arguments], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{ENGINE} {' '.join(arguments[:3])} … failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


DEFAULT_BASE = "python:3.11-slim"  # the Containerfiles' own default


@pytest.fixture(scope="module", autouse=True)
def base_image():
    """The base the images are built FROM: IMGCLS_BASE_IMAGE, or the default one, pulled if need be.

    Without a reachable registry and no local base, the image tests are skipped with the reason
    (.ci/run builds a local Debian base and sets IMGCLS_BASE_IMAGE)."""
    base = os.environ.get("IMGCLS_BASE_IMAGE") or DEFAULT_BASE
    if engine("image", "inspect", base, check=False).returncode != 0:
        try:
            pulled = engine("pull", base, timeout=300, check=False)
        except subprocess.TimeoutExpired:
            pulled = None
        if pulled is None or pulled.returncode != 0:
            pytest.skip(f"no base image {base!r} here and it could not be pulled: set IMGCLS_BASE_IMAGE to a local"
                        " image with python3 and python3-venv (.ci/run makes one with mmdebstrap)")
    return base


def build(root: Path, containerfile: str, tag: str, *extra: str, timeout: float = 1800) -> None:
    """Build `containerfile` of the project at `root`, as `make image-*` does, with this machine's adaptations."""
    arguments = ["build", "-f", containerfile, "-t", tag, *extra]
    if "podman" in ENGINE:
        arguments += ["--format", "docker"]  # keeps HEALTHCHECK
    if os.environ.get("IMGCLS_BASE_IMAGE"):
        arguments += ["--build-arg", f"BASE={os.environ['IMGCLS_BASE_IMAGE']}"]
    if os.environ.get("IMGCLS_PIP_CERT"):
        folder = Path(os.environ["IMGCLS_PIP_CERT"]).parent
        arguments += ["--build-arg", f"PIP_CERT={os.environ['IMGCLS_PIP_CERT']}", "-v", f"{folder}:{folder}:ro",
                      "--network", "host"]
    engine(*arguments, str(root), timeout=timeout)


def wait_for_health(url: str, container: str, seconds: float = 60) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            response = requests.get(f"{url}/health", timeout=2)
            if response.status_code == 200:
                return response.json()
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    logs = engine("logs", container, check=False)
    raise AssertionError(f"the container did not answer /health in {seconds} s:\n{logs.stdout}\n{logs.stderr}")


def test_serving_image_builds_runs_answers_and_stops(prepared):
    from imgcls.predict import Classifier

    shutil.rmtree(prepared.root / "models", ignore_errors=True)
    train_on_project(prepared.root, "cnn")
    prepared.set_params(**{"export.model": "best", "export.formats": ["onnx"]})
    prepared.stage("export")
    tag = f"imgcls-serve-test-{os.getpid()}"
    build(prepared.root, "Containerfile.serve", tag)
    port = free_port()
    container = engine("run", "-d", "-p", f"127.0.0.1:{port}:8000", "-e", "MAX_UPLOAD_BYTES=100000", tag).stdout.strip()
    try:
        url = f"http://127.0.0.1:{port}"
        health = wait_for_health(url, container)
        assert health["model"] == "cnn" and health["model_file"] == "models/export/best.onnx"
        assert health["max_upload_bytes"] == 100_000
        assert engine("exec", container, "id", "-u").stdout.strip() == "10001"
        described = engine("image", "inspect", tag).stdout  # podman and docker name the field differently
        assert "healthcheck" in described.lower() and "/health" in described

        photo = sorted((prepared.root / "data" / "holdout").rglob("*.png"))[0]
        answer = requests.post(f"{url}/predict", files={"file": (photo.name, photo.read_bytes())}, timeout=30)
        assert answer.status_code == 200
        classifier = Classifier(prepared.root / "models" / "export" / "best.onnx", check_classes=False)
        expected = classifier.classify(classifier.decode(photo)[None])[0].as_json()
        assert answer.json()["best_guess"] == expected["best_guess"] and answer.json()["filename"] == photo.name
        assert answer.json()["confidence"] == pytest.approx(expected["confidence"], abs=1e-5)
        assert [entry["class"] for entry in answer.json()["top_k"]] == [entry["class"] for entry in expected["top_k"]]

        garbage = requests.post(f"{url}/predict", files={"file": ("notes.txt", b"not a photo" * 50)}, timeout=30)
        assert garbage.status_code == 415 and "not an image" in garbage.json()["error"]
        too_large = requests.post(f"{url}/predict", files={"file": ("big.png", bytes(200_000))}, timeout=30)
        assert too_large.status_code == 413
    finally:
        stopped = engine("stop", "-t", "10", container, check=False)
        engine("rm", "-f", container, check=False)
        engine("rmi", "-f", tag, check=False)
    assert stopped.returncode == 0


@pytest.mark.skipif(os.environ.get("IMGCLS_TEST_TRAINING_IMAGE") != "1",
                    reason="downloads about 1.5 GB of wheels: set IMGCLS_TEST_TRAINING_IMAGE=1 (.ci/run does)")
def test_training_image_builds_and_has_the_stack(project):
    # Built with the CPU requirements: the GPU wheels (CUDA from pip) are several GB more and need a GPU
    # to be of use; the Containerfile and everything else are the same.
    tag = f"imgcls-train-test-{os.getpid()}"
    build(project.root, "Containerfile.train", tag, "--build-arg", "REQUIREMENTS=requirements.txt", timeout=3000)
    try:
        result = engine("run", "--rm", tag, "python", "-c", "import keras, jax, dvc; print(keras.backend.backend())",
                        timeout=300)
        assert result.stdout.strip().splitlines()[-1] == "jax"
        assert '"dvc",\n' in engine("image", "inspect", tag).stdout
    finally:
        engine("rmi", "-f", tag, check=False)
