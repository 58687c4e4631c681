"""Benchmark of train_cnn on the gear photos: the default CNN beside the seeds' baseline.

Both are trained and evaluated in the same run, in a prepared copy of the
project (data, resize and split done): first the baseline (conv-pool-conv-pool-dense
at 64 px, 20 epochs, Adam 0.001, no augmentation), then the default params, so
the default model is the one left in models/cnn.keras.

    python tests/bench_cnn.py WORKDIR

`compare_recipes` (`python tests/benchmark.py --only cnn_splits --split-seeds 0,1,2`)
trains the default and a candidate recipe (CANDIDATE, or `--candidate
KEY=VALUE ...`) side by side on several splits of the same photos (`split.seed`),
because one split of 284 test photos moves by a photo or two (0.35% each) with
any change.
"""

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from benchmark import run as run_command
from benchmark import with_overrides

# The seeds' "conv-pool-conv-pool-dense" network, expressed in train_cnn params.
BASELINE = {
    "input_size": 64,
    "net.stem": "none",
    "net.filters": [32, 64],
    "net.convs_per_block": 1,
    "net.pool_after": "last",
    "net.batch_norm": False,
    "net.activation": "relu",
    "net.pooling": "flatten",
    "net.dense_units": [128],
    "net.dropout": 0.0,
    "net.output_scale": 1.0,
    "augment.flip": "none",
    "augment.rotation": 0.0,
    "augment.zoom": 0.0,
    "augment.translation": 0.0,
    "augment.contrast": 0.0,
    "augment.interpolation": "bilinear",
    "optimizer.name": "adam",
    "optimizer.learning_rate": 0.001,
    "optimizer.schedule": "constant",
    "optimizer.warmup_epochs": 0,
    "optimizer.weight_decay": 0.0,
    "label_smoothing": 0.0,
    "batch_size": 32,
    "epochs": 20,
    "patience": 0,
    "class_weight": "none",
}

# 0.47 of the default's training FLOPs: 128 px with half-width blocks and a
# mirror-image average at test time (prediction cost only). It is what
# `compare_recipes` trains beside the default unless given another recipe.
CANDIDATE = {"input_size": 128, "net.filters": [16, 32, 64, 128], "test_time.flip": True}


def _update_params(workdir: Path, section: str, changes: dict) -> None:
    """Set params of one section of the work folder's params.yaml (dotted keys: see with_overrides)."""
    params_file = workdir / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params[section] = with_overrides(params[section], changes)
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))


def _train_and_evaluate(workdir: Path, overrides: dict | None) -> dict:
    """Run train_cnn then evaluate with params.yaml's train_cnn section updated by `overrides`; return figures."""
    params_file = workdir / "params.yaml"
    original = params_file.read_text()
    try:
        if overrides:
            _update_params(workdir, "train_cnn", overrides)
        started = time.perf_counter()
        for script in ("train_cnn", "evaluate"):
            result = subprocess.run([sys.executable, f"scripts/{script}.py"], cwd=workdir, capture_output=True, text=True)
            if result.returncode != 0:
                raise SystemExit(f"{script} failed:\n{result.stdout}\n{result.stderr}")
            if script == "train_cnn":
                stage_seconds = time.perf_counter() - started
    finally:
        params_file.write_text(original)
    training = json.loads((workdir / "reports/cnn/train.json").read_text())
    test = json.loads((workdir / "reports/evaluate/metrics.json").read_text())["cnn"]
    return {"test_accuracy": test["accuracy"], "macro_f1": test["macro_f1"], "train_seconds": training["train_seconds"],
            "stage_seconds": stage_seconds, "images_per_second": training["images_per_second"],
            "epochs": training["epochs_run"], "val_accuracy": training["val_accuracy"],
            "training_flops": training["training_flops"]}


def run(workdir: Path) -> list[dict]:
    """Train and evaluate the baseline and the default CNN in `workdir`; return the benchmark rows."""
    workdir = Path(workdir)
    sys.path.insert(0, str(workdir / "scripts"))
    from imgcls.flops import format_flops

    baseline = _train_and_evaluate(workdir, BASELINE)
    default = _train_and_evaluate(workdir, None)
    note = (f"default: {default['epochs']} epochs, macro F1 {default['macro_f1']:.3f};"
            f" baseline: {baseline['epochs']} epochs, macro F1 {baseline['macro_f1']:.3f}")
    return [
        {"benchmark": "train_cnn: test accuracy on gear (goal >= 96%)",
         "value": f"{default['test_accuracy']:.1%}", "baseline": f"{baseline['test_accuracy']:.1%} (seeds' net)",
         "ratio": f"{(1 - baseline['test_accuracy']) / max(1 - default['test_accuracy'], 1e-9):.2f}x fewer errors",
         "flops": f"{format_flops(default['training_flops'])} (baseline {format_flops(baseline['training_flops'])})",
         "note": note},
        {"benchmark": "train_cnn: stage time, 2 CPU cores (goal <= 10 min)",
         "value": f"{default['stage_seconds']:.0f} s", "baseline": f"{baseline['stage_seconds']:.0f} s (seeds' net)",
         "ratio": f"{default['stage_seconds'] / baseline['stage_seconds']:.1f}x",
         "note": f"fit time {default['train_seconds']:.0f} s vs {baseline['train_seconds']:.0f} s; includes startup and saving"},
        {"benchmark": "train_cnn: training throughput",
         "value": f"{default['images_per_second']:.0f} images/s", "baseline": f"{baseline['images_per_second']:.0f} images/s",
         "ratio": f"{default['images_per_second'] / baseline['images_per_second']:.2f}x",
         "note": "training images x epochs / fit time (validation included)"},
    ]


def _mean_and_spread(values: list[float]) -> str:
    """'95.4% (94.7–96.1)': the mean, then the lowest and highest."""
    return f"{statistics.mean(values):.2%} ({min(values):.1%}–{max(values):.1%})"


def compare_recipes(workdir: Path, split_seeds: tuple[int, ...], candidate: dict = CANDIDATE) -> list[dict]:
    """Train the default and `candidate` (train_cnn overrides) on each split.seed; return rows of mean accuracy
    and FLOPs, the default's beside the candidate's."""
    workdir = Path(workdir)
    sys.path.insert(0, str(workdir / "scripts"))
    from imgcls.flops import format_flops

    original_params = (workdir / "params.yaml").read_text()
    results = {"default": [], "candidate": []}
    try:
        for split_seed in split_seeds:
            _update_params(workdir, "split", {"seed": split_seed})
            run_command([sys.executable, "scripts/split.py"], workdir)
            for name, overrides in (("default", None), ("candidate", candidate)):
                figures = _train_and_evaluate(workdir, overrides)
                results[name].append(figures)
                print(f"(split.seed {split_seed}, {name}: test accuracy {figures['test_accuracy']:.2%},"
                      f" {format_flops(figures['training_flops'])}, train_cnn {figures['stage_seconds']:.0f} s)",
                      file=sys.stderr, flush=True)
    finally:
        (workdir / "params.yaml").write_text(original_params)
    accuracy = {name: [figures["test_accuracy"] for figures in runs] for name, runs in results.items()}
    seconds = {name: statistics.mean(figures["stage_seconds"] for figures in runs) for name, runs in results.items()}
    flops = {name: format_flops(runs[0]["training_flops"]) for name, runs in results.items()}
    errors = {name: 1 - statistics.mean(values) for name, values in accuracy.items()}
    seeds = ",".join(str(seed) for seed in split_seeds)
    return [
        {"benchmark": f"train_cnn on gear, split.seed {seeds}: mean test accuracy (lowest–highest)",
         "value": _mean_and_spread(accuracy["default"]),
         "baseline": _mean_and_spread(accuracy["candidate"]) + " (candidate)",
         "ratio": f"{errors['candidate'] / max(errors['default'], 1e-9):.2f}x fewer errors",
         "flops": f"{flops['default']} (candidate {flops['candidate']})",
         "note": f"candidate {candidate}; each split's accuracies: default "
                 + ", ".join(f"{value:.2%}" for value in accuracy["default"])
                 + "; candidate " + ", ".join(f"{value:.2%}" for value in accuracy["candidate"])},
        {"benchmark": f"train_cnn on gear, split.seed {seeds}: mean stage time, 2 CPU cores",
         "value": f"{seconds['default']:.0f} s", "baseline": f"{seconds['candidate']:.0f} s (candidate)",
         "ratio": f"{seconds['candidate'] / seconds['default']:.2f}x faster", "note": "includes start-up and saving"},
    ]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python tests/bench_cnn.py WORKDIR  (a project copy where data, resize and split ran)")
    for row in run(Path(sys.argv[1])):
        print(" | ".join(str(row[key]) for key in ("benchmark", "value", "baseline", "ratio", "note")))
