"""The `unknown` threshold's coverage on the test split, and what the label audit flags, over several splits.

For each dataset and `split.seed` it runs the pipeline's stages in a copy of
the project (data and resize once; then split, the trainers, evaluate and
audit) and reads, per model, from reports/evaluate/metrics.json: the target
coverage, the realised test coverage, the bound t - 1.96 * sqrt(t(1 - t)/n)
it must meet, and the accuracy on the answered photos. Beside it, in the same
run and from the same saved model, the baseline: the threshold the release
before this one would have set, the empirical quantile of the validation
photos that chose the epoch and the temperature.

    python tests/bench_trust.py WORKROOT [--split-seeds 0,1,2] [--datasets gear,trashnet] [--cnn gear]

--cnn names the datasets on which train_cnn runs too (its coverage is then
reported beside train_transfer's). The audit's reports of the first split
seed stay in WORKROOT/<dataset>/reports/audit for review.
trashnet is ../shared/data/datasets/trashnet-256.tar.gz beside the repository
(or --trashnet PATH); gear comes through the Keras cache (KERAS_HOME).
"""

import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import yaml

from bench_transfer_splits import TRASHNET, datasets, splits_parser
from benchmark import cpu_name, make_workdir
from benchmark import run as run_command

# The previous release's threshold, for the same saved model: the highest confidence that still answers
# target_coverage of the validation photos (which chose its epoch and temperature).
VALIDATION_QUANTILE = """
import json, math, sys
import numpy as np
sys.path.insert(0, 'scripts')
from imgcls import modelio
from imgcls.dataset import load_split
model, card = modelio.load_model(f'models/{sys.argv[1]}.keras')
confidence = {}
for split in ('val', 'test'):
    pixels, _, _ = load_split(split, card['image_size'])
    confidence[split] = model.predict(pixels.astype('float32'), batch_size=64, verbose=0).max(axis=1)
ranked = np.sort(confidence['val'])[::-1]
threshold = ranked[max(1, math.ceil(card['target_coverage'] * len(ranked) - 1e-9)) - 1]
print(json.dumps({'threshold': float(threshold), 'coverage': float((confidence['test'] >= threshold).mean())}))
"""


def _set_params(workdir: Path, section: str, changes: dict) -> None:
    params_file = workdir / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params[section].update(changes)
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))


def measure(root: Path, split_seeds: tuple[int, ...], names: tuple[str, ...], cnn_on: set[str],
            trashnet: Path = TRASHNET) -> dict:
    """{dataset: {"runs": [per split seed: {model: figures}], "audit": metrics of the first seed's audit}}."""
    results = {}
    for name in names:
        workdir = make_workdir(root / name)
        _set_params(workdir, "data", datasets(trashnet)[name])
        for stage in ("data", "resize"):
            run_command([sys.executable, f"scripts/{stage}.py"], workdir)
        results[name] = {"runs": []}
        trainers = ["train_cnn", "train_transfer"] if name in cnn_on else ["train_transfer"]
        for split_seed in split_seeds:
            _set_params(workdir, "split", {"seed": split_seed})
            shutil.rmtree(workdir / "models", ignore_errors=True)
            seconds = {stage: run_command([sys.executable, f"scripts/{stage}.py"], workdir)
                       for stage in ("split", *trainers, "evaluate", "audit")}
            metrics = json.loads((workdir / "reports/evaluate/metrics.json").read_text())
            run = {"split_seed": split_seed, "seconds": seconds,
                   "audit": json.loads((workdir / "reports/audit/metrics.json").read_text())}
            for model, scores in metrics.items():
                _, output = run_command([sys.executable, "-c", VALIDATION_QUANTILE, model], workdir, output=True)
                card = json.loads((workdir / f"models/{model}.json").read_text())
                run[model] = {**{key: scores[key] for key in ("accuracy", "images", "coverage", "selective_accuracy",
                                                               "target_coverage", "coverage_lower_bound",
                                                               "coverage_meets_target", "min_confidence")},
                              "threshold_photos": card["threshold_photos"],
                              "validation_quantile": json.loads(output.strip().splitlines()[-1])}
                print(f"({name}, split.seed {split_seed}, {model}: test coverage {scores['coverage']:.2%} of"
                      f" {scores['images']} (bound {scores['coverage_lower_bound']:.2%}), validation quantile"
                      f" {run[model]['validation_quantile']['coverage']:.2%}; accuracy {scores['accuracy']:.2%};"
                      f" audit flags {run['audit']['label_issues']})", file=sys.stderr, flush=True)
            results[name]["runs"].append(run)
            if split_seed == split_seeds[0]:
                shutil.copytree(workdir / "reports/audit", root / f"{name}-audit-seed{split_seed}", dirs_exist_ok=True)
    return results


def rows(results: dict) -> list[dict]:
    """One row per dataset and model: mean realised coverage against the bound, and the baseline's."""
    table = []
    for name, result in results.items():
        runs = result["runs"]
        for model in [key for key in runs[0] if key not in ("split_seed", "seconds", "audit")]:
            figures = [run[model] for run in runs]
            coverage = [entry["coverage"] for entry in figures]
            baseline = [entry["validation_quantile"]["coverage"] for entry in figures]
            table.append({
                "benchmark": f"{model} on {name} ({figures[0]['images']} test photos,"
                             f" {statistics.mean(entry['threshold_photos'] for entry in figures):.0f} calibration)",
                "target": f"{figures[0]['target_coverage']:.2%} (bound {figures[0]['coverage_lower_bound']:.2%})",
                "value": f"{statistics.mean(coverage):.2%} (" + ", ".join(f"{value:.1%}" for value in coverage) + ")",
                "meets": ", ".join("yes" if entry["coverage_meets_target"] else "no" for entry in figures),
                "baseline": f"{statistics.mean(baseline):.2%} (" + ", ".join(f"{value:.1%}" for value in baseline) + ")",
                "selective": f"{statistics.mean(entry['selective_accuracy'] for entry in figures):.2%}",
                "accuracy": f"{statistics.mean(entry['accuracy'] for entry in figures):.2%}",
            })
    return table


def main() -> None:
    parser = splits_parser(__doc__, "gear,trashnet")
    parser.add_argument("--cnn", default="gear", help="datasets on which train_cnn runs too")
    arguments = parser.parse_args()
    started = time.perf_counter()
    results = measure(arguments.root, tuple(int(seed) for seed in arguments.split_seeds.split(",")),
                      tuple(name for name in arguments.datasets.split(",") if name),
                      set(filter(None, arguments.cnn.split(","))), arguments.trashnet)
    (arguments.root / "results.json").write_text(json.dumps(results, indent=1))
    print(f"CPU: {cpu_name()}; {time.perf_counter() - started:.0f} s in all")
    print("| model and data | target (bound) | test coverage, mean (per split) | meets bound | validation quantile"
          " (baseline) | selective accuracy | accuracy |")
    print("|---|---|---|---|---|---|---|")
    for row in rows(results):
        print("| " + " | ".join(row[key] for key in ("benchmark", "target", "value", "meets", "baseline", "selective",
                                                       "accuracy")) + " |")
    for name, result in results.items():
        print(f"{name}: audit flags " + ", ".join(f"{run['audit']['label_issues']} of {run['audit']['photos']}"
                                                  for run in result["runs"]))


if __name__ == "__main__":
    main()
