"""Real `dvc repro` of the data stages in a temporary git repo."""

import json
import re

from PIL import Image

from conftest import TINY_CNN, TINY_TRANSFER


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def test_repro_runs_once_then_nothing_and_a_split_param_reruns_only_split(project):
    first = project.dvc("repro", "split")
    assert ran_stages(first.stdout) == ["data", "resize", "split"]
    assert (project.root / "data/split/manifest.csv").exists()

    second = project.dvc("repro", "split")
    assert ran_stages(second.stdout) == []

    project.set_params(**{"split.train": 0.6, "split.val": 0.2, "split.test": 0.2})
    third = project.dvc("repro", "split")
    assert ran_stages(third.stdout) == ["split"]

    # New pixels but the same index: DVC sees split's inputs unchanged and skips it.
    project.set_params(**{"resize.aspect": "stretch"})
    fourth = project.dvc("repro", "split")
    assert ran_stages(fourth.stdout) == ["resize"]

    # Only dvc.lock and the small git-tracked reports change: data is ignored by git.
    status = project.run("git", "status", "--porcelain", "--untracked-files=all").stdout
    changed = sorted(line[3:] for line in status.splitlines())
    assert [path for path in changed if path.startswith("data/")] == [
        path for path in changed if path.endswith(".gitignore")
    ]
    assert "params.yaml" in changed and "dvc.lock" in changed


def test_the_whole_pipeline_runs_end_to_end_then_does_nothing(project):
    # Two sizes of arrays: the CNN (input 24) reads the 24 px ones, the transfer model (input 32) the 32 px ones.
    project.set_params(**TINY_CNN, **TINY_TRANSFER, **{"resize.image_size": [32, 24]})
    # Photos of one 4:3 shape: resize.max_stretch auto lengthens them to fill the square, and every stage
    # after it, export included, decodes new photos the same way from the cards.
    for photo in (project.root.parent / "source").rglob("*.png"):
        with Image.open(photo) as square:
            four_by_three = square.resize((40, 30))
        four_by_three.save(photo)
    project.run("git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qam", "tiny models")
    first = project.dvc("repro")
    assert ran_stages(first.stdout) == [
        "data", "resize", "split", "train_cnn", "train_transfer", "evaluate", "audit", "predict_new", "export",
    ]
    metrics = project.dvc("metrics", "show", "--json").stdout
    for key in ('"cnn"', '"transfer"', '"accuracy"', '"macro_f1"'):
        assert key in metrics
    predictions = (project.root / "reports/predictions.csv").read_text().splitlines()
    assert len(predictions) == 1 + 3  # one held-out photo per class
    cards = {name: json.loads((project.root / f"models/{name}.json").read_text()) for name in ("cnn", "transfer")}
    assert (cards["cnn"]["image_size"], cards["transfer"]["image_size"]) == (24, 32)
    assert cards["cnn"]["max_stretch"] == cards["transfer"]["max_stretch"] == 4 / 3
    exported = json.loads(next((project.root / "models/export").glob("*.onnx")).with_suffix(".json").read_text())
    assert exported["max_stretch"] == 4 / 3
    assert ran_stages(project.dvc("repro").stdout) == []

    # A later stage's param reruns that stage and what depends on its output, never the data stages.
    project.set_params(**{"predict_new.top_k": 2})
    assert ran_stages(project.dvc("repro").stdout) == ["predict_new"]
