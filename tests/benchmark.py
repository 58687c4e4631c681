"""`make bench`: speed and memory of the pipeline on the gear photos, each beside a baseline.

Runs in a throw-away copy of the project (a fresh git repo) so the working
tree is never touched, and prints one markdown table. Needs the gear photos:
a Keras cache holding gear_images.zip (KERAS_HOME, or `make bench KERAS_CACHE=...`).

    python tests/benchmark.py [--only data,cnn,transfer,predict,device,near_duplicates,soak,images,export] [--keep DIR]

device: TensorFlow against JAX and the input pipeline's efficiency (`make bench-gpu` on a GPU machine);
near_duplicates needs no gear photos: it reads CIFAR-10 (tests/bench_near_duplicates.py); soak: the
servers' memory under 10,000 mixed requests; images: the serving image's size and start-up (needs
podman or docker); export: each INT8 file against its float32 one (tests/bench_export.py).

`--only cifar` (not part of the default run: hours on a CPU at full budget)
trains the CIFAR-10 preset through the pipeline on a local copy of CIFAR-10,
at `--budget` PFLOP of training (see tests/bench_cifar.py):

    python tests/benchmark.py --only cifar --budget 0.15 [--reference] [--cifar-runs preset,previous] [--seeds 0,1]
                                          [--candidate net.activation=relu ...]

`--only cnn_splits` (also not in the default run: about 20 minutes per split on
2 CPU cores) trains the default gear CNN and a candidate recipe side by side on
several splits (tests/bench_cnn.py):

    python tests/benchmark.py --only cnn_splits --split-seeds 0,1,2 [--candidate input_size=128 net.filters=[16,32,64,128]]

`--only transfer_splits` (about 70 minutes on 2 CPU cores) trains train_transfer
with the previous defaults, today's and the linear probe alone, on gear,
trashnet and trashnet at 30 photos a class, on each split (tests/bench_transfer_splits.py):

    python tests/benchmark.py --only transfer_splits --split-seeds 0,1,2
"""

import argparse
import copy
import importlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
sys.path[:0] = [str(REPO / "scripts"), str(TESTS)]
from imgcls.cnn_params import old_cnn_key  # noqa: E402  (found through the path above)
SECTIONS = ("data", "cnn", "transfer", "predict", "device", "near_duplicates", "soak", "images",
            "export")  # `make bench`
EXTRA_SECTIONS = ("cnn_splits", "cifar", "transfer_splits")  # only when asked for
# Sections that need no gear photos in the work folder.
STANDALONE_SECTIONS = {"near_duplicates", "cifar", "transfer_splits"}


def cpu_name() -> str:
    """The CPU model as lscpu names it (every timing is reported beside it), and the cores this process may use."""
    lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name:")), "unknown CPU")
    return f"{model}, {len(os.sched_getaffinity(0))} cores"


def environment() -> dict[str, str]:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONHASHSEED="0")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def run(command: list[str], cwd: Path, output: bool = False):
    """Run a command, fail loudly, return its wall time in seconds (and its stdout when asked)."""
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=environment(), capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    elapsed = time.perf_counter() - start
    return (elapsed, result.stdout) if output else elapsed


def parse_overrides(pairs: list[str]) -> dict:
    """Param changes from KEY=VALUE pairs, as `dvc exp run -S` takes them: each value is YAML,
    and a dotted key names a nested param (net.filters=[16,32])."""
    changes = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key:
            raise SystemExit(f"--candidate {pair!r}: expected KEY=VALUE, e.g. net.filters=[16,32,64,128]")
        changes[key] = yaml.safe_load(value)
    return changes


def with_overrides(section: dict, changes: dict) -> dict:
    """A copy of a train_cnn params section with `changes` set; a dotted key (net.filters) sets that nested
    param alone. Every key must already be there, so a misspelt one fails by name, and a key of train_cnn's
    old flat layout (filters) fails naming its new place, as params.yaml does."""
    result = copy.deepcopy(section)
    for dotted, value in changes.items():
        old_key = old_cnn_key(dotted, value)
        if old_key:
            raise SystemExit(f"--candidate {dotted}={value}: {old_key}")
        *parents, name = dotted.split(".")
        target = result
        for parent in parents:
            target = target.get(parent) if isinstance(target, dict) else None
        if not isinstance(target, dict) or name not in target:
            raise SystemExit(f"--candidate {dotted}={value}: no param {dotted!r} in this section")
        target[name] = value
    return result


def median_time(command: list[str], cwd: Path, repeats: int = 3) -> float:
    return statistics.median(run(command, cwd) for _ in range(repeats))


def make_workdir(root: Path) -> Path:
    """Copy the project's tracked files into `root` and make it a git repo of its own."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True)
    for name in filter(None, files.stdout.split("\0")):
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    (root / "dvc.lock").unlink(missing_ok=True)
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.com"]
    for command in (["git", "init", "-q"], ["git", "add", "-A"], git + ["commit", "-q", "-m", "bench"]):
        subprocess.run(command, cwd=root, check=True)
    return root


def peak_rss_kib(command: list[str], cwd: Path) -> int:
    """Peak resident memory of the largest process of `command` (itself or a worker), in KiB.

    Measured from a fresh interpreter, so nothing this benchmark ran before counts.
    """
    probe = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL,"
        " stderr=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    result = subprocess.run([sys.executable, "-c", probe, *command], cwd=cwd, env=environment(),
                            capture_output=True, text=True, check=True)
    return int(result.stdout.strip())


def plain_pillow_loop(files: list[Path], size: int) -> float:
    """The baseline: one process, open, convert and resize each file, no draft decoding."""
    start = time.perf_counter()
    for path in files:
        with Image.open(path) as image:
            np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
    return time.perf_counter() - start


def dvc_status_time(root: Path, make_output) -> float:
    """Median `dvc status` time of a repo tracking what `make_output(folder)` writes, via `dvc add`."""
    root.mkdir()
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(command, cwd=root, check=True, env=environment())
    target = make_output(root)
    run([sys.executable, "-m", "dvc", "add", "-q", target.name], root)
    return median_time([sys.executable, "-m", "dvc", "status", "-q"], root)


def data_rows(workdir: Path) -> list[dict]:
    rows = []
    repro_time = run([sys.executable, "-m", "dvc", "repro", "split"], workdir)
    files = sorted(path for path in (workdir / "data/raw").rglob("*") if path.is_file())
    size = 128
    # Resize at 128 px in the workdir, timed; the baseline reads the same files in this process.
    params_file = workdir / "params.yaml"
    original = params_file.read_text()
    params_file.write_text(re.sub(r"(?m)^  image_size: .+$", f"  image_size: {size}", original))
    resize_time, output = run([sys.executable, "scripts/resize.py"], workdir, output=True)
    decode_time = float(re.search(r"decoded \d+ files in ([\d.]+) s", output).group(1))
    peak_kib = peak_rss_kib([sys.executable, "scripts/resize.py"], workdir)
    params_file.write_text(original)
    run([sys.executable, "-m", "dvc", "repro", "split"], workdir)  # back to the default size
    baseline_time = plain_pillow_loop(files, size)
    rows.append({
        "benchmark": f"resize {len(files)} gear photos at {size} px (decoding)",
        "value": f"{len(files) / decode_time:.0f} img/s",
        "baseline": f"{len(files) / baseline_time:.0f} img/s (plain Pillow loop, 1 process)",
        "ratio": f"{baseline_time / decode_time:.1f}x",
        "note": f"draft JPEG decoding, one worker per core ({len(os.sched_getaffinity(0))})",
    })
    rows.append({
        "benchmark": "resize stage, whole process",
        "value": f"{resize_time:.1f} s", "baseline": f"{baseline_time:.1f} s (plain Pillow loop)",
        "ratio": f"{baseline_time / resize_time:.1f}x",
        "note": f"with start-up, hashing, duplicate search and reports; peak RSS {peak_kib / 1024:.0f} MiB (largest process)",
    })
    rows.append({
        "benchmark": "data stages from scratch (dvc repro split)",
        "value": f"{repro_time:.1f} s", "baseline": "", "ratio": "", "note": "copy 1,890 photos, resize, split",
    })

    with tempfile.TemporaryDirectory() as scratch:
        count = 20_000

        def many_files(root: Path) -> Path:
            folder = root / "images"
            folder.mkdir()
            pixels = np.random.default_rng(0).integers(0, 255, (count, 8, 8, 3), dtype=np.uint8)
            for number, image in enumerate(pixels):
                (folder / f"{number:05d}.npy").write_bytes(image.tobytes())
            return folder

        def one_array(root: Path) -> Path:
            path = root / "images.npy"
            np.save(path, np.random.default_rng(0).integers(0, 255, (count, 8, 8, 3), dtype=np.uint8))
            return path

        packed = dvc_status_time(Path(scratch) / "packed", one_array)
        folder = dvc_status_time(Path(scratch) / "folder", many_files)
    rows.append({
        "benchmark": f"dvc status, {count:,} images tracked",
        "value": f"{packed:.2f} s (one packed .npy)",
        "baseline": f"{folder:.2f} s (a folder of {count:,} files)",
        "ratio": f"{folder / packed:.1f}x",
        "note": "why resize writes one array: DVC hashes and stats every file of a directory",
    })
    return rows


# Stages the sections run with the default params (each section restores params.yaml when it is done).
STAGES_RUN_BY_SECTIONS = ("data", "resize", "split", "train_cnn", "train_transfer")


def noop_rows(workdir: Path) -> list[dict]:
    # The sections ran those stage scripts directly: record their outputs in dvc.lock instead of
    # training again (a stage whose outputs are missing is left to repro), let repro run the
    # stages after them for real, then time a repro with nothing to do.
    for stage in STAGES_RUN_BY_SECTIONS:
        subprocess.run([sys.executable, "-m", "dvc", "commit", "--force", "--quiet", stage], cwd=workdir,
                       env=environment(), capture_output=True)
    run([sys.executable, "-m", "dvc", "repro"], workdir)
    noop = median_time([sys.executable, "-m", "dvc", "repro"], workdir)
    return [{"benchmark": "no-op `dvc repro` (default pipeline, all up to date)", "value": f"{noop:.2f} s",
             "baseline": "", "ratio": "", "note": "median of 3"}]


def print_table(rows: list[dict]) -> None:
    columns = ["benchmark", "value", "baseline", "ratio", "flops", "note"]
    print("| " + " | ".join("training FLOPs" if column == "flops" else column for column in columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row.get(column, "")) for column in columns) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help="comma-separated sections: " + ", ".join(SECTIONS + EXTRA_SECTIONS))
    parser.add_argument("--keep", type=Path, help="work in this (new) folder and keep it afterwards")
    parser.add_argument("--budget", type=float, help="cifar: PFLOP of training (default: the preset's own epochs)")
    parser.add_argument("--cifar-data", type=Path, help="cifar: CIFAR-10 laid out train/<class>/… and test/<class>/…"
                        " (default ../shared/data/datasets/cifar10-jpeg.tar.gz beside the repository)")
    parser.add_argument("--seeds", default="0", help="cifar: training seeds, e.g. 0,1 (the row gives their mean)")
    parser.add_argument("--split-seeds", default="0,1,2", help="cnn_splits, transfer_splits: split.seed values")
    parser.add_argument("--candidate", nargs="+", metavar="KEY=VALUE",
                        help="train_cnn params, e.g. input_size=128 net.filters=[16,32,64,128]; cnn_splits: the"
                             " candidate trained beside the default (default: tests/bench_cnn.py's CANDIDATE);"
                             " cifar: changes to the preset's")
    parser.add_argument("--cifar-runs", default="preset",
                        help="cifar: preset, previous (the preset before airbench's ideas, the baseline) and/or"
                             " reference (airbench94 in PyTorch, tests/bench_reference_airbench.py), comma-separated")
    parser.add_argument("--reference", action="store_true",
                        help="cifar: also run the reference (the same as adding reference to --cifar-runs)")
    parser.add_argument("--reference-python", default=sys.executable,
                        help="cifar: the Python that has PyTorch, for the reference run (default: this one)")
    arguments = parser.parse_args()
    sections = [name for name in arguments.only.split(",") if name]
    unknown = sorted(set(sections) - set(SECTIONS + EXTRA_SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {SECTIONS + EXTRA_SECTIONS}")
    changes = parse_overrides(arguments.candidate) if arguments.candidate else None
    if changes:
        if not {"cnn_splits", "cifar"} & set(sections):
            parser.error("--candidate changes train_cnn for the cnn_splits or cifar section: add one to --only")
        # A typo in a candidate fails here, before any work, not after an hour of training.
        with_overrides(yaml.safe_load((REPO / "params.yaml").read_text())["train_cnn"], changes)
    if "cnn_splits" in sections:
        from bench_cnn import CANDIDATE, compare_recipes

        candidate = changes or CANDIDATE
    cifar_runs = tuple(name for name in arguments.cifar_runs.split(",") if name)
    if arguments.reference and "reference" not in cifar_runs:
        cifar_runs = ("reference", *cifar_runs)
    if not cifar_runs or set(cifar_runs) - {"preset", "previous", "reference"}:
        parser.error(f"--cifar-runs {arguments.cifar_runs!r}: choose from preset, previous and reference")

    scratch = None
    if arguments.keep:
        arguments.keep.mkdir(parents=True)
        workdir = make_workdir(arguments.keep)
    else:
        scratch = tempfile.TemporaryDirectory(prefix="imgcls-bench-")
        workdir = make_workdir(Path(scratch.name))
    rows = []
    try:
        if "data" in sections:
            rows += data_rows(workdir)
        elif set(sections) - STANDALONE_SECTIONS:
            run([sys.executable, "-m", "dvc", "repro", "split"], workdir)
        for name in sections:
            if name in ("data", *EXTRA_SECTIONS):
                continue
            try:
                module = importlib.import_module(f"bench_{name}")
            except ModuleNotFoundError:
                print(f"(no tests/bench_{name}.py: section skipped)", file=sys.stderr)
                continue
            rows += module.run(workdir)
            print(f"({name} done)", file=sys.stderr)
        if set(SECTIONS) <= set(sections):
            rows += noop_rows(workdir)
        if "cnn_splits" in sections:
            rows += compare_recipes(workdir, tuple(int(seed) for seed in arguments.split_seeds.split(",")), candidate)
        if "transfer_splits" in sections:
            from bench_transfer_splits import compare, rows as transfer_rows

            with tempfile.TemporaryDirectory(prefix="imgcls-transfer-splits-") as copies:
                rows += transfer_rows(compare(Path(copies), tuple(int(seed) for seed in arguments.split_seeds.split(",")),
                                              ("gear", "trashnet", "trashnet30")))
        if "cifar" in sections:  # last: it replaces the gear photos in the work folder with CIFAR-10
            from bench_cifar import DEFAULT_DATA, run_section

            seeds = tuple(int(seed) for seed in arguments.seeds.split(","))
            rows += run_section(workdir, arguments.budget, arguments.cifar_data or DEFAULT_DATA, cifar_runs, seeds,
                                changes, arguments.reference_python)
    finally:
        print_table(rows)
        if scratch:
            scratch.cleanup()


if __name__ == "__main__":
    main()
