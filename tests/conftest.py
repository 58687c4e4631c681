"""Shared test helpers: tiny generated datasets and throw-away copies of the project.

Stage scripts are run as real subprocesses in a temporary copy of the
repository (a fresh git repo), exactly as `dvc repro` runs them.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

# Class colours of the generated datasets: easy to learn, so a few epochs reach high accuracy.
COLOURS = [(220, 40, 40), (40, 200, 60), (40, 70, 220), (230, 200, 40), (160, 60, 200), (40, 200, 200)]


# Params that make each trainer tiny and fast on the generated 32 px images.
TINY_CNN = {
    "train_cnn.input_size": 24,
    "train_cnn.net.filters": [8, 16],
    "train_cnn.net.convs_per_block": 1,
    "train_cnn.batch_size": 8,
    "train_cnn.epochs": 3,
    "train_cnn.optimizer.warmup_epochs": 1,
    "train_cnn.optimizer.learning_rate": 0.01,
}
TINY_TRANSFER = {
    "train_transfer.weights": "none",
    "train_transfer.input_size": 32,
    "train_transfer.batch_size": 8,
    "train_transfer.head.epochs": 2,
    "train_transfer.fine_tune.epochs": 1,
    "train_transfer.fine_tune.cached_copies": 1,
}


def make_dataset(root: Path, classes: int = 3, per_class: int = 12, size: int = 40, seed: int = 0,
                 splits: tuple[str, ...] = ()) -> Path:
    """Write `per_class` noisy images of a coloured square for each class, as <class>/<n>.png.

    With `splits`, the same layout sits under each split folder (train/, test/ …).
    """
    rng = np.random.default_rng(seed)
    for split in splits or ("",):
        for class_index in range(classes):
            folder = root / split / f"class_{class_index}"
            folder.mkdir(parents=True, exist_ok=True)
            for number in range(per_class):
                pixels = rng.integers(0, 80, size=(size, size, 3)).astype(np.uint8)
                low, high = sorted(rng.integers(size // 8, size - size // 8, size=2))
                high = max(high, low + size // 4)
                pixels[low:high, low:high] = COLOURS[class_index % len(COLOURS)]
                Image.fromarray(pixels).save(folder / f"{number:03d}.png")
    return root


def make_photo(seed: int, width: int = 160, height: int = 120) -> Image.Image:
    """A smooth, photo-like RGB image: soft coloured blobs on a plain background, with a little noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / width
    pixels = np.zeros((height, width, 3)) + rng.uniform(60, 200, 3)
    for _ in range(8):
        centre, radius = rng.uniform(0, 1, 2) * (1, height / width), rng.uniform(0.08, 0.2)
        blob = np.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2) / (2 * radius ** 2))
        pixels += rng.uniform(-150, 150, 3) * blob[..., None]
    return Image.fromarray(np.clip(pixels + rng.normal(0, 4, pixels.shape), 0, 255).astype(np.uint8))


def tree_digest(root: Path) -> dict[str, bytes]:
    """Every file below `root` with its bytes: compare two digests to prove nothing changed."""
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def stage_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONHASHSEED"] = "0"
    return env


# Runs a script with every import of the top-level modules named in $BLOCKED_MODULES (default:
# tensorflow) refused, then lists any of them that got loaded anyway. A meta-path finder is needed:
# `sys.modules["tensorflow"] = None` is not enough, Keras' preprocessing layers would then believe
# TensorFlow is loaded.
WITHOUT_TENSORFLOW = """
import importlib.abc, os, runpy, sys

BLOCKED = os.environ.get("BLOCKED_MODULES", "tensorflow").split(",")

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in BLOCKED or top.startswith("tensorflow_") and "tensorflow" in BLOCKED:
            raise ImportError(f"{name} is blocked: this run must not need {', '.join(BLOCKED)}")
        return None

sys.meta_path.insert(0, Blocked())
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[1])))
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    loaded = sorted(name for name in sys.modules if name.split(".")[0] in BLOCKED)
    print(f"{'/'.join(BLOCKED)} modules:", loaded)
"""
# The training stack a server of an exported model must do without.
TRAINING_STACK = "tensorflow,keras,jax,jaxlib"


class Project:
    """A copy of the repository in a temporary git repo, with helpers to edit params and run stages."""

    def __init__(self, root: Path):
        self.root = root

    def params(self) -> dict:
        return yaml.safe_load((self.root / "params.yaml").read_text())

    def set_params(self, **changes) -> None:
        """set_params(**{"split.train": 0.8}) edits params.yaml in place, keeping its comments."""
        text = (self.root / "params.yaml").read_text()
        data = yaml.safe_load(text)
        for dotted, value in changes.items():
            section, _, key = dotted.rpartition(".")
            target = data
            for part in filter(None, section.split(".")):
                target = target[part]
            target[key] = value
        (self.root / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))

    def run(self, *command: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run(command, cwd=self.root, env={**stage_env(), **(env or {})}, capture_output=True, text=True)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def stage(self, name: str, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run scripts/<name>.py directly (not through DVC)."""
        return self.run(sys.executable, f"scripts/{name}.py", *args, check=check, env=env)

    def stage_on_jax_without_tensorflow(self, name: str) -> subprocess.CompletedProcess:
        """Run scripts/<name>.py with KERAS_BACKEND=jax and TensorFlow made impossible to import."""
        return self.run(sys.executable, "-c", WITHOUT_TENSORFLOW, f"scripts/{name}.py",
                        env={"KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"})

    def dvc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "dvc", *args, check=check)


@pytest.fixture
def project(tmp_path) -> Project:
    """A fresh git repo holding the project's tracked files, with data.source set to a tiny generated dataset."""
    root = tmp_path / "repo"
    tracked = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=REPO, capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, tracked):
        source = REPO / name
        # Outputs of the working tree's own runs stay behind: each test starts from a clean pipeline.
        if source.is_file() and (not name.startswith(("reports/", "models/", "data/", "dvc.lock"))
                                 or name == "data/exclude.txt"):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    source = make_dataset(tmp_path / "source")
    project = Project(root)
    project.set_params(**{"data.source": str(source), "resize.image_size": 32, "resize.workers": 1})
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    project.run("git", "init", "-q")
    project.run("git", "add", "-A")
    project.run(*git, "commit", "-q", "-m", "initial")
    return project


@pytest.fixture
def prepared(project) -> Project:
    """A project whose data, resize and split stages have run (without DVC, for speed)."""
    for name in ("data", "resize", "split"):
        project.stage(name)
    return project
