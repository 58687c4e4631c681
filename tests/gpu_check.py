"""`make bench-gpu`: the gear pipeline on this machine's accelerator, end to end, in one script.

Made to be run once on a fresh GPU VM (and tested on a CPU with --quick). In a
throw-away copy of the project it:
    1. runs the stages data → evaluate as `dvc repro` would (each script in
       order, timed), on the backend the device plan picks (JAX on a GPU);
    2. reads each trainer's train.json: training images/s, precision, devices;
    3. measures the input pipeline's efficiency (tests/bench_device.py's probe:
       epoch throughput against the same compiled step on a batch already on
       the device);
    4. kills train_cnn with SIGKILL after its first saved epoch, reruns it, and
       checks that it resumed and ended with the same history;
    5. copies the trained models (bfloat16 where the GPU trains in it) to --out,
       for an export check on a machine with TensorFlow:
           python tests/gpu_check.py --export-check OUT
       which exports them there and prints the agreement (export.min_agreement).
It prints one markdown table and writes it, with the raw figures, to --out.

    python tests/gpu_check.py --out DIR [--quick]
    python tests/gpu_check.py --export-check DIR [--quick]

--quick: tiny generated images and tiny models (a minute on a CPU), to test the
script itself; without it the gear photos are needed (KERAS_HOME, or `make
bench-gpu KERAS_CACHE=...`).
"""

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
sys.path[:0] = [str(REPO / "scripts"), str(TESTS)]

from bench_device import callback_cost_row  # noqa: E402  (after the path is set)
from benchmark import environment, make_workdir, print_table  # noqa: E402

STAGES = ("data", "resize", "split", "train_cnn", "train_transfer", "evaluate")
TRAINERS = {"train_cnn": "cnn", "train_transfer": "transfer"}
# --quick: the tests' tiny settings (tests/conftest.py), on generated 40 px images, in bfloat16 as a
# recent GPU trains (mixed_precision: auto), so that the saved models test the export check too.
QUICK_PARAMS = {
    "train_cnn.mixed_precision": "bfloat16", "train_transfer.mixed_precision": "bfloat16",
    "resize.image_size": 32, "resize.workers": 1,
    "train_cnn.input_size": 24, "train_cnn.net.filters": [8, 16], "train_cnn.net.convs_per_block": 1,
    "train_cnn.batch_size": 8, "train_cnn.epochs": 3, "train_cnn.optimizer.warmup_epochs": 1,
    "train_transfer.weights": "none", "train_transfer.input_size": 32, "train_transfer.batch_size": 8,
    "train_transfer.head.epochs": 2, "train_transfer.fine_tune.epochs": 1, "train_transfer.fine_tune.unfreeze": 10,
    "train_transfer.fine_tune.cached_copies": 1,
}


def run_stage(workdir: Path, stage: str) -> float:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, f"scripts/{stage}.py"], cwd=workdir, env=environment(),
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{stage} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return time.perf_counter() - started


def pipeline_rows(workdir: Path) -> tuple[list[dict], dict]:
    """Run every stage in order; one row per stage, with the trainers' throughput and device."""
    rows, figures = [], {}
    for stage in STAGES:
        seconds = run_stage(workdir, stage)
        figures[stage] = {"seconds": round(seconds, 1)}
        row = {"benchmark": f"{stage} stage", "value": f"{seconds:.1f} s"}
        if stage in TRAINERS:
            summary = json.loads((workdir / f"reports/{TRAINERS[stage]}/train.json").read_text())
            trained_on = summary["trained_on"]
            figures[stage].update(summary)
            row.update(baseline=f"{summary['train_seconds']:.1f} s in fit",
                       ratio=f"{summary['images_per_second']} images/s",
                       flops=f"{summary.get('training_flops', 0) / 1e12:.2f} TFLOP",
                       note=f"{trained_on['backend']}, {trained_on['precision']}, {trained_on['devices']},"
                            f" {trained_on['replicas']} replica(s); val accuracy {summary['val_accuracy']:.4f}")
        rows.append(row)
    metrics = json.loads((workdir / "reports/evaluate/metrics.json").read_text())
    for name, scores in metrics.items():
        rows.append({"benchmark": f"{name}: test accuracy", "value": f"{scores['accuracy']:.4f}",
                     "note": f"{scores['images']} test images"})
    figures["metrics"] = metrics
    return rows, figures


def efficiency_rows(workdir: Path) -> list[dict]:
    """The input pipeline's efficiency on this device, with the backend the plan picks."""
    result = subprocess.run([sys.executable, str(TESTS / "bench_device.py"), str(workdir), "--probe"],
                            env=environment(), capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"the device probe failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    return [callback_cost_row(probe), {"benchmark": f"train_cnn epoch throughput, {probe['backend']} ({probe['images']} images)",
             "value": f"{probe['pipeline']:.0f} images/s",
             "baseline": f"{probe['step']:.0f} images/s (the compiled step alone, batch on the device)",
             "ratio": f"{probe['pipeline'] / probe['step']:.2f} pipeline efficiency", "note": probe["device"]}]


def resume_rows(workdir: Path) -> list[dict]:
    """Kill train_cnn after its first saved epoch, rerun it: it must resume and end with the same history."""
    history = workdir / "reports/cnn/history.csv"
    finished = [line.rsplit(",", 1)[0] for line in history.read_text().splitlines()]  # without `seconds`
    state = workdir / ".checkpoints/train_cnn.npz"
    process = subprocess.Popen([sys.executable, "scripts/train_cnn.py"], cwd=workdir, env=environment(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not state.exists() and process.poll() is None:
        time.sleep(0.05)
    killed = process.poll() is None
    process.send_signal(signal.SIGKILL)
    process.wait()
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "scripts/train_cnn.py"], cwd=workdir, env=environment(),
                            capture_output=True, text=True)
    seconds = time.perf_counter() - started
    resumed = "resuming phase 'train' after epoch" in result.stdout
    again = [line.rsplit(",", 1)[0] for line in history.read_text().splitlines()]
    same = result.returncode == 0 and again == finished
    return [{"benchmark": "train_cnn killed (SIGKILL) after its first saved epoch, then rerun",
             "value": f"{seconds:.1f} s rerun",
             "ratio": ("resumed, same history" if resumed and same else
                       f"FAILED: killed={killed} resumed={resumed} same history={same}"),
             "note": "the history's every column but seconds, compared line by line"}]


def save_models(workdir: Path, out: Path) -> None:
    """The trained models and their cards, plus what export needs to check them on another machine."""
    (out / "models").mkdir(parents=True, exist_ok=True)
    for path in (workdir / "models").glob("*"):
        if path.is_file():
            shutil.copy2(path, out / "models" / path.name)
    shutil.copy2(workdir / "params.yaml", out / "params.yaml")


def use_quick_data(workdir: Path, scratch: Path, changes: dict | None = None) -> None:
    """Point workdir's params at the --quick images (generated and seeded, so an export check can make them
    again), with `changes` (dotted keys); a misspelt key stops the first stage, which validates params.yaml."""
    from conftest import Project, make_dataset

    Project(workdir).set_params(**(changes or {}), **{"data.source": str(make_dataset(scratch / "images"))})


def export_check(saved: Path, quick: bool) -> list[dict]:
    """Export the models saved by a GPU run (bfloat16 where it trained in it) in a copy of this project."""
    with tempfile.TemporaryDirectory(prefix="imgcls-export-check-") as scratch:
        workdir = make_workdir(Path(scratch) / "project")
        shutil.copy2(saved / "params.yaml", workdir / "params.yaml")
        if quick:
            use_quick_data(workdir, Path(scratch))
        for stage in ("data", "resize", "split"):
            run_stage(workdir, stage)
        for path in (saved / "models").glob("*"):
            shutil.copy2(path, workdir / "models" / path.name)
        seconds = run_stage(workdir, "export")
        metrics = json.loads((workdir / "reports/export/metrics.json").read_text())
    return [{"benchmark": "export of the saved models on this machine", "value": f"{seconds:.1f} s",
             "note": json.dumps(metrics)[:300]}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for the table, the figures and the trained models")
    parser.add_argument("--quick", action="store_true", help="tiny generated data and models: tests the script")
    parser.add_argument("--export-check", type=Path, metavar="DIR", help="export the models a GPU run saved in DIR")
    arguments = parser.parse_args()
    if arguments.export_check:
        print_table(export_check(arguments.export_check, arguments.quick))
        return
    if not arguments.out:
        parser.error("--out DIR is needed (where the table and the trained models go)")
    arguments.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="imgcls-gpu-check-") as scratch:
        workdir = make_workdir(Path(scratch) / "project")
        if arguments.quick:
            use_quick_data(workdir, Path(scratch), QUICK_PARAMS)
        rows, figures = pipeline_rows(workdir)
        rows += efficiency_rows(workdir)
        rows += resume_rows(workdir)
        save_models(workdir, arguments.out)
    (arguments.out / "figures.json").write_text(json.dumps(figures, indent=2, default=str) + "\n")
    print_table(rows)
    with open(arguments.out / "table.md", "w") as file:
        sys.stdout, console = file, sys.stdout
        try:
            print_table(rows)
        finally:
            sys.stdout = console


if __name__ == "__main__":
    main()
