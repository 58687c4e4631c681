"""Benchmark of train_cnn on CIFAR-10 at a budget of training FLOPs: the airbench-style candidate preset
(presets/cifar10-airbench.yaml), optionally beside the previous one (presets/cifar10.yaml).

Runs the pipeline's stages (data, resize, split, train_cnn, evaluate) in a
prepared copy of the project with presets/cifar10-airbench.yaml and `data.source` set
to a local copy of CIFAR-10 laid out train/<class>/… and test/<class>/… (a
folder or archive). With a budget, the number of epochs is the most whose
training FLOPs (3 forward passes per training image, see imgcls/flops.py)
fit in it (at least one), and the warm-up shrinks in proportion; without one, the
preset runs as it is. A slow machine can so run a short budget (e.g. 0.15
PFLOP) of the same recipe.

    python tests/benchmark.py --only cifar --budget 0.15 [--cifar-data PATH] [--cifar-runs preset,previous] [--seeds 0,1]

`--cifar-runs` picks what is trained: `preset` (the airbench-style candidate, the default), `previous`
(presets/cifar10.yaml, the measured preset, as the baseline), `reference` (airbench94 itself, reimplemented
in PyTorch: tests/bench_reference_airbench.py, run by `--reference-python`, on the same data, budget and
seeds), or several, comma-separated. `--candidate
KEY=VALUE ...` changes the preset's train_cnn params for this run (dotted keys for nested ones), e.g.
`--candidate net.activation=relu optimizer.learning_rate=0.8`.
"""

import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from benchmark import REPO, cpu_name, run, with_overrides

PRESET = REPO / "presets/cifar10-airbench.yaml"
DEFAULT_DATA = REPO.parent / "shared/data/datasets/cifar10-jpeg.tar.gz"


def merged(base: dict, changes: dict) -> dict:
    """`base` with `changes` applied, nested sections merged key by key."""
    result = dict(base)
    for key, value in changes.items():
        result[key] = merged(result[key], value) if isinstance(value, dict) and isinstance(result.get(key), dict) else value
    return result


def training_images(workdir: Path) -> int:
    manifest = (workdir / "data/split/manifest.csv").read_text().splitlines()[1:]
    return sum(line.rsplit(",", 1)[-1] == "train" for line in manifest)


def epochs_for_budget(section: dict, budget_flops: float, train_images: int) -> tuple[int, float]:
    """(the most epochs whose training FLOPs fit in the budget, forward FLOPs per image) for a train_cnn section."""
    from imgcls.cnn import build_cnn
    from imgcls.flops import TRAINING_PASSES, forward_flops
    from imgcls.cnn_params import TrainCnnParams

    params = TrainCnnParams.model_validate(section)
    sample = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)  # FLOPs do not depend on it
    forward = forward_flops(build_cnn(10, 32, params, seed=0, train_images=sample))
    return max(1, int(budget_flops // (TRAINING_PASSES * forward * train_images))), forward


def train_and_evaluate(workdir: Path, params: dict, section: dict, budget_pflop: float | None) -> dict:
    """train_cnn then evaluate with this train_cnn section, at the budget; return the figures."""
    section = copy.deepcopy(section)
    if budget_pflop:
        epochs, _ = epochs_for_budget(section, budget_pflop * 1e15, training_images(workdir))
        optimizer = section["optimizer"]
        optimizer["warmup_epochs"] = round(optimizer["warmup_epochs"] * epochs / section["epochs"], 2)
        section["epochs"] = epochs
    (workdir / "params.yaml").write_text(yaml.safe_dump({**params, "train_cnn": section}, sort_keys=False))
    stage_seconds = run([sys.executable, "scripts/train_cnn.py"], workdir)
    run([sys.executable, "scripts/evaluate.py"], workdir)
    trained = json.loads((workdir / "reports/cnn/train.json").read_text())
    test = json.loads((workdir / "reports/evaluate/metrics.json").read_text())["cnn"]
    return {"accuracy": test["accuracy"], "epochs": trained["epochs_run"], "fit_seconds": trained["train_seconds"],
            "stage_seconds": stage_seconds, "training_flops": trained["training_flops"],
            "forward_flops": trained["forward_flops_per_image"], "val_accuracy": trained["val_accuracy"],
            "filters": section["net"]["filters"], "batch_size": section["batch_size"]}


def describe(result: dict) -> str:
    from imgcls.flops import format_flops

    return (f"{'-'.join(map(str, result['filters']))} at batch {result['batch_size']}, {result['epochs']} epochs"
            f" of {format_flops(result['forward_flops'])} per image: {format_flops(result['training_flops'])},"
            f" train_cnn {result['stage_seconds'] / 60:.1f} min ({result['fit_seconds'] / 60:.1f} in fit)")


# What to train: each preset's train_cnn section over params.yaml's. "previous" is presets/cifar10.yaml, the
# measured preset (90.06% in 21 epochs, about 0.55 PFLOP): 56-224-224 at batch 256, random flips, none of the new ideas.
RUNS = {"preset": PRESET, "previous": REPO / "presets/cifar10.yaml"}


def prepare(workdir: Path, data: Path) -> dict:
    """Bring CIFAR-10 from `data` into `workdir` through the data stages; return the params they ran with (the
    preset's over params.yaml). params.yaml itself is left as it was."""
    data = Path(data).resolve()
    if not data.exists():
        raise SystemExit(f"{data} not found: pass --cifar-data, a CIFAR-10 copy laid out train/<class>/… and"
                         " test/<class>/… (folder or archive)")
    params_file = workdir / "params.yaml"
    original = params_file.read_text()
    params = merged(yaml.safe_load(original), yaml.safe_load(PRESET.read_text()))
    params["data"]["source"] = str(data)
    try:
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        for stage in ("data", "resize", "split"):
            run([sys.executable, f"scripts/{stage}.py"], workdir)
    finally:
        params_file.write_text(original)
    return params


def run_section(workdir: Path, budget_pflop: float | None, data: Path = DEFAULT_DATA, runs: tuple[str, ...] = ("preset",),
                seeds: tuple[int, ...] = (0,), changes: dict | None = None,
                reference_python: str = sys.executable) -> list[dict]:
    """Prepare CIFAR-10 in `workdir` through the data stages, train at the budget once per training seed;
    return the benchmark rows (accuracy: the mean over the seeds). `changes` (dotted train_cnn keys) apply to
    the preset. With "reference" in `runs`, the first row is airbench94's recipe in PyTorch on the same data,
    budget and seeds (run by `reference_python`)."""
    from imgcls.flops import format_flops

    rows = []
    if "reference" in runs:
        rows.append(reference_row(data, budget_pflop or 0.36, seeds, reference_python))
        runs = tuple(name for name in runs if name != "reference")
        if not runs:
            return rows

    params_file = workdir / "params.yaml"
    original = params_file.read_text()
    started = time.perf_counter()
    params = prepare(workdir, data)
    data_seconds = time.perf_counter() - started
    defaults = yaml.safe_load(original)["train_cnn"]
    sections = {name: merged(defaults, yaml.safe_load(RUNS[name].read_text())["train_cnn"]) for name in runs}
    if changes and "preset" in sections:
        sections["preset"] = with_overrides(sections["preset"], changes)
    try:
        results = {name: [train_and_evaluate(workdir, {**params, "seed": seed}, sections[name], budget_pflop)
                          for seed in seeds] for name in runs}
    finally:
        params_file.write_text(original)
    budget = f"{budget_pflop:g} PFLOP budget" if budget_pflop else "its own epochs"
    machine = f"{cpu_name()}; data stages {data_seconds:.0f} s"
    main, earlier = results.get("preset"), results.get("previous")
    if main is None:  # the previous preset alone
        main, earlier = earlier, None
    name = "presets/cifar10-airbench.yaml" if "preset" in results else "the previous CIFAR-10 preset"
    if changes and "preset" in results:
        name += " with " + " ".join(f"{key}={value}" for key, value in changes.items())
    main_accuracy = float(np.mean([result["accuracy"] for result in main]))
    earlier_accuracy = float(np.mean([result["accuracy"] for result in earlier])) if earlier else None
    over = f"mean of seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else f"seed {seeds[0]}"
    return rows + [{
        "benchmark": f"train_cnn on CIFAR-10, {name} at {budget} (test accuracy, 10,000 images, {over})",
        "value": f"{main_accuracy:.2%}",
        "baseline": f"{earlier_accuracy:.2%} (previous preset, same budget)" if earlier else "",
        "ratio": (f"{(1 - earlier_accuracy) / max(1 - main_accuracy, 1e-9):.2f}x fewer errors" if earlier else ""),
        "flops": format_flops(main[0]["training_flops"])
                 + (f" (previous: {format_flops(earlier[0]['training_flops'])})" if earlier else ""),
        "note": describe_seeds(main, seeds) + (f"; previous: {describe_seeds(earlier, seeds)}" if earlier else "")
                + f"; {machine}",
    }]


def reference_row(data: Path, budget_pflop: float, seeds: tuple[int, ...], python: str) -> dict:
    """airbench94 reimplemented in PyTorch (tests/bench_reference_airbench.py) on `data` at the budget, per seed."""
    from imgcls.flops import format_flops

    command = [python, str(REPO / "tests/bench_reference_airbench.py"), "--data", str(Path(data).resolve()),
               "--budget", str(budget_pflop), "--seeds", ",".join(map(str, seeds))]
    _, output = run(command, REPO, output=True)
    results = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    accuracy = float(np.mean([result["test_accuracy"] for result in results]))
    each = ", ".join(f"seed {result['seed']}: {result['test_accuracy']:.2%} in {result['train_seconds'] / 60:.1f} min"
                     for result in results)
    return {"benchmark": f"airbench94 reference (PyTorch) on CIFAR-10 at a {budget_pflop:g} PFLOP budget (test"
                         f" accuracy, 10,000 images, mean of {len(results)} seed(s))",
            "value": f"{accuracy:.2%}", "baseline": "", "ratio": "",
            "flops": format_flops(results[0]["training_flops"]),
            "note": f"{results[0]['epochs']} epochs of 50,000 images less the last part-batch, six test views;"
                    f" {each}; {results[0]['device']}"}


def describe_seeds(results: list[dict], seeds: tuple[int, ...]) -> str:
    """The recipe once, then each seed's test accuracy and minutes."""
    each = ", ".join(f"seed {seed}: {result['accuracy']:.2%} in {result['stage_seconds'] / 60:.1f} min"
                     for seed, result in zip(seeds, results))
    return f"{describe(results[0])}; {each}"
