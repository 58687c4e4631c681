"""Real `dvc repro` of the data stages in a temporary git repo."""

import re


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
