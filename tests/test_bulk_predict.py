"""Bulk prediction: folders of a few hundred generated photos classified by the exported ONNX file of a
tiny model trained here, with TensorFlow, Keras, JAX, pandas and matplotlib impossible to import."""

import csv
import io
import json
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO, TRAINING_STACK, WITHOUT_TENSORFLOW, make_dataset, make_photo, stage_env
from tiny_model import train_on_folder

# The serving environment's lack: the training stack, and what the stage's CSV and figure used to need.
BLOCKED = f"{TRAINING_STACK},pandas,matplotlib"
BATCH_SIZE = 8
PHOTOS = 300
COLUMNS = 13  # image, true_label, predicted, confidence, unknown, best_guess, 3 x top-k class and probability, error


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A folder with params.yaml (batches of BATCH_SIZE) and models/export/cnn.onnx with its card."""
    import keras

    from export import onnx_file

    root = tmp_path_factory.mktemp("bulk")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["predict_new"]["batch_size"] = BATCH_SIZE
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    train_on_folder(root, make_dataset(root / "dataset", classes=3, per_class=10, size=32))
    exported = root / "models" / "export"
    exported.mkdir()
    shutil.copy(root / "models" / "cnn.json", exported / "cnn.json")
    (exported / "cnn.onnx").write_bytes(onnx_file(keras.saving.load_model(root / "models" / "cnn.keras"), "float16")[0])
    return root


def photo_folder(root: Path, count: int, largest: int = 160) -> Path:
    """`count` photos of mixed sizes and formats in class sub-folders, plus two files that are not photos."""
    sizes = np.random.default_rng(count).integers(24, largest, size=(count, 2))
    for number, (width, height) in enumerate(sizes):
        folder = root / f"class_{number % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        make_photo(number, int(width), int(height)).save(folder / f"{number:04d}.{'png' if number % 4 else 'jpg'}")
    (root / "class_1" / "notes.txt").write_text("not a photo")
    (root / "truncated.jpg").write_bytes((root / "class_0" / "0000.jpg").read_bytes()[:150])
    return root


def bulk_command(*arguments) -> list[str]:
    return [sys.executable, "-c", WITHOUT_TENSORFLOW, str(REPO / "scripts" / "predict_new.py"),
            "--model", "models/export/cnn.onnx", *map(str, arguments)]


def run_bulk(root: Path, *arguments, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(bulk_command(*arguments), cwd=root, env={**stage_env(), "BLOCKED_MODULES": BLOCKED},
                            capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"predict_new failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def stop_when_rows(root: Path, out: Path, arguments: list, rows: int, stop: signal.Signals
                   ) -> subprocess.CompletedProcess:
    """Start a run, send it `stop` once `out` holds more than `rows` lines, and wait for it (and its workers) to end."""
    process = subprocess.Popen(bulk_command(*arguments), cwd=root, env={**stage_env(), "BLOCKED_MODULES": BLOCKED},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out.exists() and out.read_bytes().count(b"\n") > rows):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run wrote no rows in 5 minutes"
        time.sleep(0.005)
    workers = Path(f"/proc/{process.pid}/task/{process.pid}/children")
    worker_ids = workers.read_text().split() if workers.exists() else []
    process.send_signal(stop)
    stdout, stderr = process.communicate(timeout=60)
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{worker}").exists() for worker in worker_ids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [worker for worker in worker_ids if Path(f"/proc/{worker}").exists()], "decoding workers outlived the run"
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_a_stopped_run_resumes_to_the_csv_of_an_uninterrupted_run(exported, tmp_path):
    photos = photo_folder(tmp_path / "photos", PHOTOS)
    whole = run_bulk(exported, "--images", photos, "--out", tmp_path / "whole.csv")
    assert f"{BLOCKED.replace(',', '/')} modules: []" in whole.stdout
    assert "matplotlib is not installed: writing the CSV only" in whole.stderr
    assert not (tmp_path / "whole.png").exists()
    expected = (tmp_path / "whole.csv").read_bytes()
    rows = list(csv.DictReader(io.StringIO(expected.decode())))
    assert len(rows) == PHOTOS + 2 and all(len(row) == COLUMNS for row in rows)
    reasons = {Path(row["image"]).name: row["error"] for row in rows if row["error"]}
    assert reasons.keys() == {"notes.txt", "truncated.jpg"}
    assert reasons["notes.txt"].startswith("not an image") and reasons["truncated.jpg"].startswith("truncated")
    assert rows[0]["true_label"] == "class_0" and rows[0]["predicted"] in ("class_0", "class_1", "class_2", "unknown")

    # SIGKILL after a few batches: no chance to clean up, yet the CSV holds whole rows, the first ones in order.
    out = tmp_path / "stopped.csv"
    arguments = ["--images", photos, "--out", out]
    killed = stop_when_rows(exported, out, arguments, rows=2 * BATCH_SIZE, stop=signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    kept = out.read_bytes()
    kept_rows = kept.count(b"\n") - 1
    assert expected.startswith(kept) and len(kept) < len(expected), "the kill came after the run had finished"
    # A kill in mid-write leaves part of a row: resume cuts it off.
    with open(out, "ab") as file:
        file.write(f"{photos}/class_2/0299.png,class_2,class_1,0.6".encode())

    # Resuming with other columns is refused before anything is done.
    refused = run_bulk(exported, *arguments, "--resume", "--top-k", "1", check=False)
    assert refused.returncode == 2 and "resume with the same --top-k" in refused.stderr

    # Ctrl-C (SIGINT) on a resumed run: it stops cleanly, says where, keeps its rows.
    interrupted = stop_when_rows(exported, out, [*arguments, "--resume"], rows=kept_rows + 1 + BATCH_SIZE,
                                 stop=signal.SIGINT)
    assert "cut off an incomplete last row" in interrupted.stderr
    assert f"resuming: {out} lists {kept_rows} photos" in interrupted.stdout
    if interrupted.returncode == 130:  # else it had finished before the signal came
        assert f"stopped: {out} keeps the" in interrupted.stderr and "Traceback" not in interrupted.stderr
    assert expected.startswith(out.read_bytes())

    resumed = run_bulk(exported, *arguments, "--resume")
    assert out.read_bytes() == expected
    assert f"{PHOTOS} classified" in resumed.stdout and "2 unreadable" in resumed.stdout
    again = run_bulk(exported, *arguments, "--resume")  # nothing left: the CSV stays as it is
    assert f"0 of {PHOTOS + 2} left to classify" in again.stdout and out.read_bytes() == expected


def test_memory_does_not_grow_with_the_number_of_photos(exported, tmp_path):
    """Python's allocations (numpy arrays included) at their peak, while 100 and then 1,000 photos stream through:
    the same, where keeping each decoded photo would add 3 kB per photo."""
    from tqdm import tqdm

    from imgcls import bulk
    from imgcls.predict import Classifier

    classifier = Classifier(exported / "models" / "export" / "cnn.onnx", batch_size=BATCH_SIZE, check_classes=False)
    card = json.loads((exported / "models" / "export" / "cnn.json").read_text())

    def peak_bytes(count: int, run: int) -> int:
        photos = tmp_path / f"photos_{count}"
        if run == 1:
            photo_folder(photos, count, largest=48)
        table = bulk.PredictionTable(tmp_path / f"{count}_{run}.csv", bulk.csv_columns(3), figure_limit=10,
                                     resume=False)
        table.open()
        with bulk.decoding_workers(card, 2) as decoders:
            tracemalloc.start()
            try:
                bulk.classify_all(classifier, decoders, 2, [photos], table, tqdm(disable=True))
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
                table.close()
        assert table.summary.rows == count + 2 and len(table.summary.shown) == 10
        return peak

    # Each the lower of two runs: a passing burst of another thread's allocations (once, in a full test
    # run: 8 MB, more than all 1,000 photos' pixels) says nothing about what the stream keeps.
    small = min(peak_bytes(100, run) for run in (1, 2))
    large = min(peak_bytes(1_000, run) for run in (1, 2))
    photo_bytes = 32 * 32 * 3
    assert large - small < 900 * photo_bytes / 4, (small, large)
