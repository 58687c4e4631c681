"""What `make setup` and the training image start from: a Python of at least 3.11, a venv with pip
(scripts/venv.sh), and every requirements and constraints file the training image copies.

No install runs here: a fake `python3` on PATH stands for an old system Python, and the venv that is
made again is the real one a machine would get, without the project's packages.
"""

import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO

SCRIPT = str(REPO / "scripts/venv.sh")


def venv_script(*arguments: str, path: str, python: str | None = None) -> subprocess.CompletedProcess:
    """Run scripts/venv.sh with only `path` on PATH (and PYTHON=`python` when given)."""
    env = {"PATH": path, **({"PYTHON": python} if python else {})}
    return subprocess.run(["/bin/sh", SCRIPT, *arguments], env=env, capture_output=True, text=True, timeout=300)


def fake_python(folder: Path, name: str, version: str) -> Path:
    """A `name` on `folder` that answers any question with `version`, as an old Python's version check would."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / name
    script.write_text(f"#!/bin/sh\necho {version}\n")
    script.chmod(0o755)
    return script


def test_a_python_older_than_3_11_stops_setup_with_the_version_found_and_how_to_get_a_newer_one(tmp_path):
    fake_python(tmp_path / "bin", "python3", "3.10")  # Ubuntu 22.04's python3, and no python3.11 to be found
    result = venv_script(str(tmp_path / "venv"), path=str(tmp_path / "bin"))
    assert result.returncode == 2
    assert "imgcls needs Python 3.11 or newer" in result.stderr and "found: python3 is 3.10." in result.stderr
    assert "ppa:deadsnakes/ppa && sudo apt install python3.11 python3.11-venv" in result.stderr
    assert "uv python install 3.11" in result.stderr and "pyenv install 3.11" in result.stderr
    assert "make setup PYTHON=" in result.stderr
    assert not (tmp_path / "venv").exists()
    named = venv_script("--find", path=str(tmp_path / "bin"), python="python3")
    assert named.returncode == 2 and "found: python3 is 3.10." in named.stderr


def test_the_newest_python_of_at_least_3_11_is_found_first(tmp_path):
    fake_python(tmp_path / "bin", "python3", "3.10")
    fake_python(tmp_path / "bin", "python3.11", "3.11")
    fake_python(tmp_path / "bin", "python3.12", "3.12")
    assert venv_script("--find", path=str(tmp_path / "bin")).stdout.strip() == "python3.12"
    assert venv_script("--find", path=str(tmp_path / "bin"), python="python3.11").stdout.strip() == "python3.11"


def test_a_venv_left_without_pip_is_made_again_and_a_working_one_is_kept(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)  # python3-venv missing
    path = f"{Path(sys.executable).parent}:/usr/bin:/bin"
    result = venv_script(str(venv), path=path, python=sys.executable)
    assert result.returncode == 0, result.stderr
    assert "has no pip (a venv creation that failed?); making it again" in result.stderr
    assert subprocess.run([venv / "bin/python", "-m", "pip", "--version"], capture_output=True).returncode == 0
    (venv / ".installed-cpu").touch()
    kept = venv_script(str(venv), path=path, python=sys.executable)
    assert kept.returncode == 0 and kept.stderr == "" and (venv / ".installed-cpu").exists()


def test_the_training_image_copies_files_that_exist_and_keeps_checkpoints_and_compiled_steps_in_volumes():
    containerfile = (REPO / "Containerfile.train").read_text()
    build = containerfile.split("\nARG BASE=")[1]  # what follows the comment at the top
    copied = re.findall(r"\b((?:requirements|constraints)[\w-]*\.txt)\b", build.split("WORKDIR")[0])
    assert {"requirements-gpu-cuda13.txt", "requirements-gpu-cuda12.txt", "constraints-cuda13.txt"} <= set(copied)
    assert all((REPO / name).is_file() for name in copied), copied
    volumes = re.search(r'VOLUME \[(.*)\]', build).group(1)
    assert '"/app/.checkpoints"' in volumes and '"/app/.cache/jax"' in volumes
    assert "-v ./.checkpoints:/app/.checkpoints -v ./.cache/jax:/app/.cache/jax" in containerfile  # the run line
    assert "!constraints-*.txt" in (REPO / ".dockerignore").read_text().splitlines()
