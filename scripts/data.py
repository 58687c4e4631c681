"""Stage `data`: bring the dataset named by `data.source` into data/raw.

data/raw is written once here and only ever read afterwards: every later stage
treats it as the untouchable original.
"""

import shutil
import tempfile
from pathlib import Path

from imgcls.dataset import RAW_DIR, class_folders, image_files
from imgcls.errors import UserError, run_stage
from imgcls.params import load_params
from imgcls.sources import fetch_source, limit_per_class


def main() -> None:
    params = load_params()
    RAW_DIR.parent.mkdir(parents=True, exist_ok=True)
    # Build into a temporary folder beside data/raw and swap it in at the end,
    # so an interrupted download never leaves a partial dataset behind.
    with tempfile.TemporaryDirectory(prefix=".raw.", dir=RAW_DIR.parent) as workspace:
        building = Path(workspace) / "raw"
        scratch = Path(workspace) / "scratch"
        building.mkdir()
        scratch.mkdir()
        origin = fetch_source(params.data.source, building, scratch)
        limit_per_class(building, params.data.limit_per_class, params.data.seed)
        folders = class_folders(building)
        if not folders:
            raise UserError(f"data.source = {params.data.source!r} gave no class folders.")
        shutil.rmtree(RAW_DIR, ignore_errors=True)
        building.rename(RAW_DIR)
    file_count = sum(len(image_files(folder)) for _, _, folder in class_folders(RAW_DIR))
    class_count = len({class_name for _, class_name, _ in class_folders(RAW_DIR)})
    print(f"data/raw: {file_count} files in {class_count} classes, {origin}")


if __name__ == "__main__":
    run_stage(main)
