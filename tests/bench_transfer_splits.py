"""train_transfer's defaults against the previous ones and the linear probe, on several datasets and splits.

For each dataset (gear, trashnet, trashnet at 30 photos a class; on request
cifar10_100, CIFAR-10 at 100 photos a class in each of its train and test folders) and each
`split.seed`, in one run on one machine, it trains train_transfer three ways
in a copy of the project, and measures test accuracy on that split:

  - previous: the defaults before this release (PREVIOUS: a fixed schedule, the
    head by Adam for 20 epochs, 10 fine-tuning epochs at 3e-5 with flips only,
    no probe);
  - default: params.yaml as it is;
  - probe: the linear probe alone (params.yaml with phase 2 off: the saved
    model is then the probe, base + one Dense layer).

Test accuracy is a mean over the split seeds, because one split of a few hundred
test photos moves by a photo or two with any change.

    python tests/benchmark.py --only transfer_splits [--split-seeds 0,1,2] [--datasets gear,trashnet,trashnet30]
    python tests/bench_transfer_splits.py WORKROOT [--split-seeds 0,1] [--datasets trashnet30]
    python tests/bench_transfer_splits.py WORKROOT --recipes default,candidate --candidate fine_tune.augment.zoom=0

Each split also reports the saved model's test accuracy when it averages its
predictions over each photo and its mirror image (test-time flips), and keeps
the run's history.csv in WORKROOT as <dataset>-split<seed>-<recipe>-history.csv.

trashnet is ../shared/data/datasets/trashnet-256.tar.gz beside the repository
(or --trashnet PATH); gear comes through the Keras cache (KERAS_HOME).
"""

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import yaml

from benchmark import REPO, cpu_name, make_workdir, parse_overrides
from benchmark import run as run_command

TRASHNET = REPO.parent / "shared" / "data" / "datasets" / "trashnet-256.tar.gz"
# CIFAR-10 as JPEG files with its train/ and test/ folders: 32 px photos, a kind no default was tuned on.
CIFAR10 = REPO.parent / "shared" / "data" / "datasets" / "cifar10-jpeg.tar.gz"

# train_transfer params of the previous release that differ from today's.
PREVIOUS = {
    "schedule": "cosine",
    "probe_candidate": False,
    "head.solver": "adam",
    "head.epochs": 20,
    "head.patience": 0,
    "fine_tune.epochs": 10,
    "fine_tune.learning_rate": 0.00003,
    "fine_tune.patience": 3,
    "min_improvement": 0.0,
    "accuracy_progress": False,
    "fine_tune.beta_2": 0.999,
    "fine_tune.augment.rotation": 0.0,
    "fine_tune.augment.zoom": 0.0,
}
PROBE_ONLY = {"fine_tune.epochs": 0}
RECIPES = {"previous": PREVIOUS, "default": {}, "probe": PROBE_ONLY}


def datasets(trashnet: Path) -> dict[str, dict]:
    """The data params of each dataset."""
    return {"gear": {"source": "gear", "limit_per_class": 0},
            "trashnet": {"source": str(trashnet), "limit_per_class": 0},
            "trashnet30": {"source": str(trashnet), "limit_per_class": 30},
            "cifar10_100": {"source": str(CIFAR10), "limit_per_class": 100}}


def _set(params: dict, section: str, changes: dict) -> None:
    for dotted, value in changes.items():
        *parents, name = dotted.split(".")
        target = params[section]
        for parent in parents:
            target = target[parent]
        if name not in target:
            raise SystemExit(f"no param {section}.{dotted} in params.yaml")
        target[name] = value


TEST_ACCURACY = """
import json, sys
sys.path.insert(0, 'scripts')
from imgcls import modelio
from imgcls.dataset import load_split
model, card = modelio.load_model('models/transfer.keras')
pixels, labels, _ = load_split('test', card['image_size'])
from imgcls.augment import with_test_time_augmentation
predicted = model.predict(pixels.astype('float32'), batch_size=64, verbose=0).argmax(axis=1)
flipped = with_test_time_augmentation(model, flip=True, shift=False)
predicted_flipped = flipped.predict(pixels.astype('float32'), batch_size=64, verbose=0).argmax(axis=1)
print(json.dumps({'test_accuracy': float((predicted == labels).mean()), 'test_images': len(labels),
                  'test_accuracy_flips': float((predicted_flipped == labels).mean()),
                  'winner': card.get('winner')}))
"""


def _train_and_test(workdir: Path, recipe: dict) -> dict:
    """train_transfer with `recipe` (train_transfer overrides), then its test accuracy; params.yaml is restored."""
    params_file = workdir / "params.yaml"
    original = params_file.read_text()
    try:
        params = yaml.safe_load(original)
        _set(params, "train_transfer", recipe)
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        stage_seconds = run_command([sys.executable, "scripts/train_transfer.py"], workdir)
    finally:
        params_file.write_text(original)
    _, output = run_command([sys.executable, "-c", TEST_ACCURACY], workdir, output=True)
    training = json.loads((workdir / "reports/transfer/train.json").read_text())
    return {**json.loads(output.strip().splitlines()[-1]), "stage_seconds": round(stage_seconds, 1),
            "val_accuracy": training["val_accuracy"], "best_epoch": training["best_epoch"],
            "epochs_run": training["epochs_run"], "training_flops": training["training_flops"]}


def compare(root: Path, split_seeds: tuple[int, ...], names: tuple[str, ...], trashnet: Path = TRASHNET,
            recipes: dict = RECIPES) -> dict:
    """Every dataset × split seed × recipe; returns {dataset: {recipe: [figures per split seed]}}."""
    if {"trashnet", "trashnet30"} & set(names) and not trashnet.exists():
        raise SystemExit(f"{trashnet}: no such file (pass --trashnet PATH)")
    if "cifar10_100" in names and not CIFAR10.exists():
        raise SystemExit(f"{CIFAR10}: no such file")
    results = {}
    for name in names:
        workdir = make_workdir(root / name)
        params = yaml.safe_load((workdir / "params.yaml").read_text())
        _set(params, "data", datasets(trashnet)[name])
        (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        for stage in ("data", "resize"):
            run_command([sys.executable, f"scripts/{stage}.py"], workdir)
        results[name] = recipes_on_splits(workdir, recipes, split_seeds, name)
    return results


def recipes_on_splits(workdir: Path, recipes: dict, split_seeds: tuple[int, ...], name: str) -> dict:
    """Each split seed (split.py rerun) × each recipe (train_transfer overrides) in `workdir`, whose data
    and resize stages have run; returns {recipe: [figures per split seed]}."""
    results = {recipe: [] for recipe in recipes}
    for split_seed in split_seeds:
        params = yaml.safe_load((workdir / "params.yaml").read_text())
        params["split"]["seed"] = split_seed
        (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        run_command([sys.executable, "scripts/split.py"], workdir)
        for recipe, changes in recipes.items():
            figures = _train_and_test(workdir, changes)
            results[recipe].append({"split_seed": split_seed, **figures})
            # Each run's curve, kept beside the work folder: where another early-stop threshold would
            # have stopped can be read off it, since a stricter stop only truncates the same path.
            shutil.copy(workdir / "reports/transfer/history.csv",
                        workdir.parent / f"{name}-split{split_seed}-{recipe}-history.csv")
            print(f"({name}, split.seed {split_seed}, {recipe}: test {figures['test_accuracy']:.2%} of"
                  f" {figures['test_images']} ({figures['test_accuracy_flips']:.2%} with flips),"
                  f" val {figures['val_accuracy']:.2%}, best epoch"
                  f" {figures['best_epoch'] or '–'} of {figures['epochs_run']}, {figures['stage_seconds']:.0f} s,"
                  f" winner {figures['winner']})", file=sys.stderr, flush=True)
    return results


def rows(results: dict) -> list[dict]:
    """One table row per dataset and recipe."""
    sys.path.insert(0, str(REPO / "scripts"))
    from imgcls.flops import format_flops

    table = []
    for name, recipes in results.items():
        baseline = "previous" if "previous" in recipes else next(iter(recipes))
        previous = statistics.mean(run["test_accuracy"] for run in recipes[baseline])
        for recipe, runs in recipes.items():
            accuracy = [run["test_accuracy"] for run in runs]
            flips = [run["test_accuracy_flips"] for run in runs]
            seconds = statistics.mean(run["stage_seconds"] for run in runs)
            base_seconds = statistics.mean(run["stage_seconds"] for run in recipes[baseline])
            epochs = ", ".join(f"{run['best_epoch'] or '–'}/{run['epochs_run']}" for run in runs)
            winners = ", ".join(str(run["winner"]) for run in runs)
            table.append({
                "benchmark": f"train_transfer on {name} ({runs[0]['test_images']} test photos), {recipe}",
                "value": f"{statistics.mean(accuracy):.2%} ({min(accuracy):.1%}–{max(accuracy):.1%})",
                "baseline": f"{previous:.2%} ({baseline})",
                "ratio": f"{seconds / base_seconds:.2f}x the {baseline} stage time ({seconds:.0f} s)",
                "flops": format_flops(statistics.mean(run["training_flops"] for run in runs)),
                "note": "per split: " + ", ".join(f"{value:.2%}" for value in accuracy)
                        + f"; with test-time flips {statistics.mean(flips):.2%}"
                        + f"; best epoch/epochs run: {epochs}; winner: {winners}"})
    return table


def splits_parser(description: str, datasets: str) -> argparse.ArgumentParser:
    """The arguments of a benchmark over datasets and split seeds: WORKROOT, --split-seeds, --datasets, --trashnet."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="a new folder for the project copies, kept afterwards")
    parser.add_argument("--split-seeds", default="0,1,2")
    parser.add_argument("--datasets", default=datasets)
    parser.add_argument("--trashnet", type=Path, default=TRASHNET)
    return parser


def chosen_recipes(names: str, candidate: list[str] | None) -> dict:
    """The recipes named in --recipes, with "candidate" being the --candidate KEY=VALUE train_transfer changes."""
    available = {**RECIPES, "candidate": parse_overrides(candidate or [])}
    unknown = [name for name in names.split(",") if name not in available]
    if unknown:
        raise SystemExit(f"--recipes: no recipe {', '.join(unknown)}; choose from {', '.join(available)}")
    if "candidate" in names.split(",") and not candidate:
        raise SystemExit("--recipes candidate needs --candidate KEY=VALUE ... (train_transfer params)")
    return {name: available[name] for name in names.split(",")}


def main() -> None:
    parser = splits_parser(__doc__, "gear,trashnet,trashnet30")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="which of previous, default, probe, candidate")
    parser.add_argument("--candidate", nargs="+", metavar="KEY=VALUE", help="train_transfer params of the candidate")
    arguments = parser.parse_args()
    recipes = chosen_recipes(arguments.recipes, arguments.candidate)
    started = time.perf_counter()
    results = compare(arguments.root, tuple(int(seed) for seed in arguments.split_seeds.split(",")),
                      tuple(name for name in arguments.datasets.split(",") if name), arguments.trashnet, recipes)
    (arguments.root / "results.json").write_text(json.dumps(results, indent=1))
    print(f"CPU: {cpu_name()}; {time.perf_counter() - started:.0f} s in all")
    print("| benchmark | mean test accuracy (lowest–highest) | baseline | time | training FLOPs | note |")
    print("|---|---|---|---|---|---|")
    for row in rows(results):
        print("| " + " | ".join(row[key] for key in ("benchmark", "value", "baseline", "ratio", "flops", "note")) + " |")


if __name__ == "__main__":
    main()
