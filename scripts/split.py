"""Stage `split`: a seeded, stratified train/val/test split, written as a manifest.

A split the source already has (CIFAR-10's test/, a dataset's valid/) is kept;
only the missing splits are carved out of train/. A few photos per class are
held out of all three and copied to data/holdout/ for predict_new to show. Duplicates and
near-duplicates found by `resize` move as one unit, so no photo can sit in train and test at once.
Images `resize` marks as left out (the same picture under two classes, with
resize.conflicting_labels: drop) go to no split at all.
"""

import shutil
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from imgcls.dataset import (
    CLASSES_FILE,
    HOLDOUT_DIR,
    INDEX_FILE,
    MANIFEST_FILE,
    RAW_DIR,
    REPORTS_DIR,
    SPLITS,
    atomic_path,
    require,
    write_csv,
    write_json,
)
from imgcls.errors import UserError, run_stage
from imgcls.params import load_params

REPORT_DIR = REPORTS_DIR / "split"


def _carve(pool: pd.DataFrame, fractions: dict[str, float], holdout: int, seed: int) -> pd.Series:
    """Assign each row of `pool` to a split, class by class, keeping duplicate groups together.

    `fractions` maps "train" and the splits to carve out of the pool to their
    shares. First `holdout` images per class are set aside for predict_new;
    then every class gets at least one group in each split; train gets the rest.
    """
    carved = [split for split in ("test", "val") if split in fractions]
    group_split: dict[int, str] = {}
    for class_name, rows in pool.groupby("label", sort=True):
        sizes = rows.groupby("group")["id"].size()
        sizes = sizes[~sizes.index.isin(group_split)]  # a group spanning classes goes with its first class
        needed = holdout + len(carved) + 1
        if len(sizes) < needed:
            raise UserError(
                f"class '{class_name}' has {len(sizes)} distinct image(s) (duplicates count once) but needs at least"
                f" {needed}: {holdout} held out (split.holdout_per_class) and one in each of"
                f" {', '.join(['train'] + carved)}. Add images to it, remove the class, or lower split.holdout_per_class."
            )
        # A per-class random stream keeps each class's split stable when another class changes.
        rng = np.random.default_rng([seed, zlib.crc32(str(class_name).encode())])
        order = sizes.index.to_numpy()[rng.permutation(len(sizes))]
        # Held-out images are single photos (not duplicates), so none of them has a twin in training.
        singles = [group for group in order if sizes[group] == 1][:holdout]
        group_split.update(dict.fromkeys(singles, "holdout"))
        order = np.array([group for group in order if group not in set(singles)])
        total = int(sizes.sum()) - len(singles)
        cursor = 0
        for number, split in enumerate(carved):
            target = max(1, round(total * fractions[split]))
            reserve = len(carved) - number  # the later splits, train included, need one group each
            filled = 0
            while cursor < len(order) - reserve and (filled == 0 or filled < target):
                group_split[order[cursor]] = split
                filled += int(sizes[order[cursor]])
                cursor += 1
        group_split.update(dict.fromkeys(order[cursor:], "train"))
    return pool["group"].map(group_split)


def _write_holdout(rows: pd.DataFrame) -> None:
    """Copy the held-out photos to data/holdout/<class>/ for predict_new, swapping the folder in whole."""
    building = HOLDOUT_DIR.with_name(f".{HOLDOUT_DIR.name}.tmp")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    for row in rows.itertuples():
        (building / row.label).mkdir(exist_ok=True)
        shutil.copyfile(RAW_DIR / row.path, building / row.label / Path(row.path).name)
    shutil.rmtree(HOLDOUT_DIR, ignore_errors=True)
    building.rename(HOLDOUT_DIR)


def main() -> None:
    params = load_params()
    # Class names and paths stay text even when they look like numbers (digits' classes are "0".."9").
    index = pd.read_csv(require(INDEX_FILE, "resize"), keep_default_na=False, dtype={"label": str, "path": str})
    left_out = index[index["left_out"] != ""]
    index = index[index["left_out"] == ""].copy()
    index["group"] = np.where(index["duplicate_group"] >= 0, index["duplicate_group"], index["id"])
    predefined = sorted(set(index["source_split"]) - {""})
    wanted = {"train": params.split.train, "val": params.split.val, "test": params.split.test}

    if not predefined:
        how = dict.fromkeys(SPLITS, "carved")
        pool, fractions = index, wanted
    else:
        if "train" not in predefined:
            raise UserError(
                f"the source has {', '.join(predefined)}/ folders but no train/ folder: add train/<class>/ images."
            )
        missing = [split for split in SPLITS if split not in predefined]
        how = {split: "carved from train" if split in missing else "predefined" for split in SPLITS}
        index["split"] = index["source_split"]
        # Carve the missing splits out of train/ in the proportions params give them.
        share = sum(wanted[split] for split in missing + ["train"])
        fractions = {split: wanted[split] / share for split in missing + ["train"]}
        pool = index[index["source_split"] == "train"]
    index.loc[pool.index, "split"] = _carve(pool, fractions, params.split.holdout_per_class, params.split.seed)

    class_names = sorted(index["label"].unique())
    index["label_index"] = index["label"].map({name: position for position, name in enumerate(class_names)})
    missing_classes = [
        f"{name} ({split})" for split in SPLITS for name in class_names
        if not ((index["split"] == split) & (index["label"] == name)).any()
    ]
    if missing_classes:
        raise UserError(
            f"these classes have no image in a split: {', '.join(missing_classes)};"
            " every class needs images in train, val and test: add images to the source's split folders."
        )
    # Duplicates that a predefined split already put on both sides: reported, since they inflate test scores.
    split_count = index[index["duplicate_group"] >= 0].groupby("group")["split"].nunique()
    leaking = index[index["group"].isin(split_count[split_count > 1].index)]

    manifest = index[["id", "path", "label", "label_index", "split"]]
    counts = pd.crosstab(index["label"], index["split"]).reindex(columns=[*SPLITS, "holdout"], fill_value=0)
    counts["total"] = counts.sum(axis=1)
    _write_holdout(index[index["split"] == "holdout"])
    write_csv(MANIFEST_FILE, manifest)
    with atomic_path(CLASSES_FILE) as temporary:
        temporary.write_text("\n".join(class_names) + "\n")
    write_csv(REPORT_DIR / "counts.csv", counts.reset_index().rename(columns={"label": "class"}))
    write_csv(REPORT_DIR / "duplicates_across_splits.csv",
              leaking[["id", "path", "label", "split", "duplicate_group", "duplicate_kind"]])
    summary = {
        "splits": {split: {"images": int((index["split"] == split).sum()), "how": how[split]} for split in SPLITS},
        "holdout": int((index["split"] == "holdout").sum()),
        "classes": len(class_names),
        "duplicate_images_across_splits": len(leaking),
        "near_duplicate_images_across_splits": int((leaking["duplicate_kind"] == "near-duplicate").sum()),
        "left_out_conflicting_labels": len(left_out),
    }
    write_json(REPORT_DIR / "summary.json", summary)
    if len(left_out):
        print(f"split: left out {len(left_out)} images filed under more than one class (resize.conflicting_labels:"
              " drop), in no split; see reports/resize/duplicates.csv")
    print("split: " + ", ".join(f"{split} {value['images']} ({value['how']})" for split, value in summary["splits"].items()))
    if len(leaking):
        near = summary["near_duplicate_images_across_splits"]
        print(f"warning: the source's own split puts {len(leaking)} duplicate images in more than one split"
              f" ({near} of them near-duplicates); see {REPORT_DIR / 'duplicates_across_splits.csv'}")


if __name__ == "__main__":
    run_stage(main)
