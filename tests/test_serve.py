"""serve: a real server process on a free localhost port, a real HTTP client, a real browser.

Every test runs against three servers of the same tiny model: the .keras file (as `make serve`),
and its exported .onnx and .tflite files served with TensorFlow, Keras and JAX impossible to import.
"""

import io
import shutil
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import yaml
from PIL import Image

from conftest import REPO, TRAINING_STACK, WITHOUT_TENSORFLOW, make_dataset, stage_env
from serving import free_port, running_server
from tiny_model import train_on_folder

MAX_UPLOAD_BYTES = 200_000
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def header_only_png(width: int, height: int) -> bytes:
    """A tiny PNG file that claims width x height pixels: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# What each server runs, and how close its probabilities are to the Keras model's own: ONNX keeps
# float32 weights (the same answers up to float rounding), TFLite's are float16.
MODEL_FILES = {"keras": None, "onnx": "models/export/cnn.onnx", "tflite": "models/export/cnn.tflite"}
TOLERANCE = {"keras": 1e-5, "onnx": 1e-5, "tflite": 2e-2}


class Server:
    def __init__(self, root, running, model, runtime):
        self.root, self.url, self.process, self.model = root, running.url, running.process, model
        self.runtime = runtime

    def predict(self, data: bytes, filename: str = "photo.png", **options) -> requests.Response:
        return requests.post(f"{self.url}/predict", files={"file": (filename, data)}, timeout=60, **options)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A folder with params.yaml, a tiny model trained here, and its .onnx and .tflite exports with its card."""
    import keras

    from export import onnx_file, tflite_file

    root = tmp_path_factory.mktemp("serve")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["serve"]["max_upload_bytes"] = MAX_UPLOAD_BYTES
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    train_on_folder(root, make_dataset(root / "dataset", classes=3, per_class=10, size=32))
    model = keras.saving.load_model(root / "models" / "cnn.keras")
    exported = root / "models" / "export"
    exported.mkdir()
    shutil.copy(root / "models" / "cnn.json", exported / "cnn.json")
    (exported / "cnn.onnx").write_bytes(onnx_file(model, "float16")[0])
    (exported / "cnn.tflite").write_bytes(tflite_file(model, "float16")[0])
    return root, model


@pytest.fixture(scope="module", params=list(MODEL_FILES))
def server(request, trained):
    """`scripts/serve.py` as `make serve` runs it (PORT from the environment), or serving an exported
    file (MODEL from the environment) with the training stack blocked."""
    root, model = trained
    port = free_port()
    serve = str(REPO / "scripts" / "serve.py")
    if request.param == "keras":
        arguments, env = [serve], {}
    else:
        arguments = ["-c", WITHOUT_TENSORFLOW, serve]
        env = {"MODEL": MODEL_FILES[request.param], "BLOCKED_MODULES": TRAINING_STACK}
    with running_server(arguments, port, cwd=root, env={**stage_env(), "PORT": str(port), **env},
                        startup_seconds=120) as running:
        yield Server(root, running, model, request.param)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """New generated photos (other seed, other size than the training ones), as (bytes, class index)."""
    root = make_dataset(tmp_path_factory.mktemp("photos"), classes=3, per_class=2, size=48, seed=11)
    return [(path.read_bytes(), int(path.parent.name[-1])) for path in sorted(root.rglob("*.png"))]


def expected_probabilities(server: Server, data: bytes) -> np.ndarray:
    """What the trained model itself says about a photo decoded the card's way."""
    from imgcls.images import decode_image

    pixels = decode_image(data, 32).pixels[None].astype(np.float32)
    return np.asarray(server.model.predict_on_batch(pixels))[0]


def test_health_classes_and_page(server):
    health = requests.get(f"{server.url}/health", timeout=10).json()
    assert health["status"] == "ok" and health["model"] == "cnn" and health["classes"] == 3
    assert health["max_upload_bytes"] == MAX_UPLOAD_BYTES
    assert requests.get(f"{server.url}/classes", timeout=10).json() == {"classes": ["class_0", "class_1", "class_2"]}
    page = requests.get(f"{server.url}/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'type="file"' in page.text
    missing = requests.get(f"{server.url}/nothing-here", timeout=10)
    assert missing.status_code == 404 and "error" in missing.json()


def test_predict_answers_like_the_model(server, photos):
    for data, label in photos:
        answer = server.predict(data).json()
        probabilities = expected_probabilities(server, data)
        assert answer["best_guess"] == f"class_{probabilities.argmax()}"
        assert answer["confidence"] == pytest.approx(float(probabilities.max()), abs=TOLERANCE[server.runtime])
        for entry in answer["top_k"]:
            expected = float(probabilities[int(entry["class"][-1])])
            assert entry["probability"] == pytest.approx(expected, abs=TOLERANCE[server.runtime])
        assert answer["unknown"] == (answer["confidence"] < 0.5)
        assert answer["predicted"] == ("unknown" if answer["unknown"] else answer["best_guess"])
        assert [entry["class"] for entry in answer["top_k"]][0] == answer["best_guess"]
        assert len(answer["top_k"]) == 3 and answer["model"] == "cnn" and answer["filename"] == "photo.png"
    right = sum(server.predict(data).json()["best_guess"] == f"class_{label}" for data, label in photos)
    assert right >= len(photos) - 1
    # The raw bytes with an image content type work as well as a form upload.
    data, _ = photos[0]
    raw = requests.post(f"{server.url}/predict", data=data, headers={"Content-Type": "image/png"}, timeout=30)
    assert raw.status_code == 200 and raw.json()["best_guess"] == server.predict(data).json()["best_guess"]


def test_bad_requests_get_clear_4xx_json_errors(server, photos):
    good, _ = photos[0]
    cases = {
        "no file field": (requests.post(f"{server.url}/predict", files={"photo": ("a.png", good)}, timeout=30),
                          400, "no file"),
        "no body": (requests.post(f"{server.url}/predict", timeout=30), 400, "no file"),
        "form without file": (requests.post(f"{server.url}/predict", data={"note": "hi"}, timeout=30), 400, "no file"),
        "malformed multipart": (requests.post(f"{server.url}/predict", data=b"--x\r\ngarbage",
                                              headers={"Content-Type": "multipart/form-data"}, timeout=30),
                                400, "malformed multipart upload"),
        "not an image": (server.predict(b"just some text, not a photo\n" * 10, "notes.txt"), 415, "not an image"),
        "empty file": (server.predict(b"", "empty.png"), 422, "empty file"),
        "truncated": (server.predict(good[: len(good) // 3], "cut.png"), 422, "truncated"),
        "corrupt": (server.predict(good[:60] + bytes(range(256)) * 8, "corrupt.png"), 422, "corrupt"),
        "decompression bomb": (server.predict(header_only_png(20_000, 20_000), "bomb.png"), 422,
                               "over the pixel limit"),
        "too large": (server.predict(np.random.default_rng(0).bytes(MAX_UPLOAD_BYTES + 1), "big.png"), 413,
                      "upload too large"),
        # Far over the limit: refused from its Content-Length, without holding it in memory.
        "far too large": (server.predict(bytes(5_000_000), "huge.png"), 413, "upload too large"),
    }
    for name, (response, status, message) in cases.items():
        assert response.status_code == status, (name, response.status_code, response.text)
        assert response.headers["content-type"] == "application/json", name
        assert message in response.json()["error"], (name, response.json())
    # A photo just under the limit is fine: the limit is on the file, not on the multipart wrapping.
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (250, 250, 3), dtype=np.uint8)).save(buffer, "PNG")
    assert MAX_UPLOAD_BYTES - 20_000 < len(buffer.getvalue()) <= MAX_UPLOAD_BYTES
    assert server.predict(buffer.getvalue(), "under.png").status_code == 200
    assert server.process.poll() is None
    assert requests.get(f"{server.url}/health", timeout=10).status_code == 200


def test_concurrent_clients_all_answered_correctly(server, photos):
    expected = {index: server.predict(data).json()["best_guess"] for index, (data, _) in enumerate(photos)}

    def client(number: int) -> list[bool]:
        with requests.Session() as session:
            results = []
            for request in range(25):
                index = (number + request) % len(photos)
                response = session.post(f"{server.url}/predict", files={"file": ("p.png", photos[index][0])}, timeout=120)
                results.append(response.status_code == 200 and response.json()["best_guess"] == expected[index])
            return results

    with ThreadPoolExecutor(max_workers=8) as executor:
        outcomes = [ok for results in executor.map(client, range(8)) for ok in results]
    assert len(outcomes) == 200 and all(outcomes)
    assert server.process.poll() is None


def test_upload_page_in_headless_chromium(server, photos, tmp_path):
    if shutil.which("chromium") is None and not shutil.which(CHROMIUM):
        pytest.skip(f"Chromium is not installed ({CHROMIUM}); `apt-get install chromium` (as .ci/run does) to run this test")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    data, _ = photos[2]
    photo = tmp_path / "photo.png"
    photo.write_bytes(data)
    (tmp_path / "notes.txt").write_text("not a photo")
    answer = server.predict(data).json()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium") or CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{server.url}/")
            page.wait_for_function("document.getElementById('model').textContent.startsWith('Model: cnn')")
            page.set_input_files("#file", str(photo))
            page.click("#submit")
            page.wait_for_selector("#result:not([hidden])", timeout=30_000)
            labels = page.locator(".bar-label").all_inner_texts()
            values = page.locator(".bar-value").all_inner_texts()
            verdict = page.inner_text("#verdict")
            widths = page.locator(".fill").evaluate_all("bars => bars.map(bar => bar.style.width)")
            # A file that is not an image: the page shows the server's message.
            page.set_input_files("#file", str(tmp_path / "notes.txt"))
            page.click("#submit")
            page.wait_for_selector("#error:not([hidden])", timeout=30_000)
            error = page.inner_text("#error")
        finally:
            browser.close()

    assert labels == [entry["class"] for entry in answer["top_k"]]
    assert values == [f"{100 * entry['probability']:.1f}%" for entry in answer["top_k"]]
    assert [float(width.rstrip('%')) for width in widths] == pytest.approx([float(value.rstrip('%')) for value in values])
    assert verdict.startswith("unknown" if answer["unknown"] else answer["predicted"])
    assert error.startswith("Error 415") and "not an image" in error


def test_environment_variables_configure_the_slim_server_and_bad_values_are_named(trained):
    import subprocess
    import sys

    root, _ = trained
    serve = str(REPO / "scripts" / "serve.py")
    port = free_port()
    env = {**stage_env(), "PORT": str(port), "MODEL": MODEL_FILES["onnx"], "MIN_CONFIDENCE": "0.99",
           "MAX_UPLOAD_BYTES": "5000", "BLOCKED_MODULES": TRAINING_STACK}
    with running_server(["-c", WITHOUT_TENSORFLOW, serve], port, cwd=root, env=env, startup_seconds=120) as running:
        health = requests.get(f"{running.url}/health", timeout=10).json()
        assert health["min_confidence"] == 0.99 and health["max_upload_bytes"] == 5000
        assert health["model_file"] == MODEL_FILES["onnx"] and health["model"] == "cnn"
    for name, value, message in (("MIN_CONFIDENCE", "1.5", "MIN_CONFIDENCE='1.5' is out of range"),
                                 ("MAX_UPLOAD_BYTES", "lots", "MAX_UPLOAD_BYTES='lots' is not a valid int"),
                                 ("MODEL", "model.pt", "nor a .keras, .onnx, .tflite file")):
        result = subprocess.run([sys.executable, serve], cwd=root, capture_output=True, text=True, timeout=120,
                                env={**stage_env(), "MODEL": MODEL_FILES["onnx"], name: value})
        assert result.returncode == 2 and message in result.stderr, (name, result.stderr)
