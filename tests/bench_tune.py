"""`make tune` on trashnet for an hour, then the tuned train_transfer against the default one on 3 splits.

In a copy of the project with data.source set to trashnet, it runs the study
of params.yaml's tune section (train_transfer, validation accuracy, on
split.seed 0) with `scripts/tune.py --timeout SECONDS`, as a user would. Then,
for each split seed, it trains train_transfer with the default params and with
the best trial's, and measures test accuracy: the search only ever saw
validation photos of split 0, so splits 1 and 2 also show whether what it
found carries over.

    python tests/bench_tune.py WORKROOT [--timeout 3600] [--split-seeds 0,1,2] [--trashnet PATH]
"""

import json
import statistics
import subprocess
import sys
import time

import pandas as pd
import yaml

from bench_transfer_splits import _set, recipes_on_splits, splits_parser
from benchmark import cpu_name, environment, make_workdir
from benchmark import run as run_command


def run_study(workdir, timeout: int) -> tuple[dict, pd.DataFrame, float]:
    """The study, on split.seed 0; returns the best trial's train_transfer overrides, the trials, seconds."""
    started = time.perf_counter()
    # Not captured: its line per trial is the benchmark's progress.
    subprocess.run([sys.executable, "scripts/tune.py", "--timeout", str(timeout), "--n-trials", "1000"], cwd=workdir,
                   env=environment(), check=True)
    seconds = time.perf_counter() - started
    best = yaml.safe_load((workdir / "reports/tune/best.yaml").read_text())
    outside = [key for key in best["params"] if not key.startswith("train_transfer.")]
    if outside:
        raise SystemExit(f"this benchmark compares train_transfer params; the search also tuned {outside}")
    overrides = {key.removeprefix("train_transfer."): value for key, value in best["params"].items()}
    return overrides, pd.read_csv(workdir / "reports/tune/trials.csv"), seconds


def main() -> None:
    parser = splits_parser(__doc__, "trashnet")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds after which the study starts no trial")
    arguments = parser.parse_args()
    if not arguments.trashnet.exists():
        raise SystemExit(f"{arguments.trashnet}: no such file (pass --trashnet PATH)")
    workdir = make_workdir(arguments.root / "trashnet")
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    _set(params, "data", {"source": str(arguments.trashnet), "limit_per_class": 0})
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run_command(["git", "-c", "user.name=bench", "-c", "user.email=bench@example.com", "commit", "-qam",
                 "trashnet"], workdir)

    overrides, trials, study_seconds = run_study(workdir, arguments.timeout)
    split_seeds = tuple(int(seed) for seed in arguments.split_seeds.split(","))
    results = recipes_on_splits(workdir, {"default": {}, "tuned": overrides}, split_seeds, "trashnet")
    (arguments.root / "results.json").write_text(json.dumps({"overrides": overrides, **results}, indent=1))

    counts = trials["state"].value_counts().to_dict()
    print(f"CPU: {cpu_name()}; study: {len(trials)} trials ({counts.get('complete', 0)} complete,"
          f" {counts.get('pruned', 0)} pruned, {counts.get('fail', 0)} failed) in {study_seconds:.0f} s;"
          f" best: {overrides}")
    print("| train_transfer on trashnet | mean test accuracy | per split seed | mean val accuracy | mean stage time |")
    print("|---|---|---|---|---|")
    for recipe, runs in results.items():
        accuracy = [run["test_accuracy"] for run in runs]
        print(f"| {recipe} | {statistics.mean(accuracy):.2%} | " + " / ".join(f"{value:.2%}" for value in accuracy)
              + f" | {statistics.mean(run['val_accuracy'] for run in runs):.2%}"
              f" | {statistics.mean(run['stage_seconds'] for run in runs):.0f} s |")


if __name__ == "__main__":
    main()
