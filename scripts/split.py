"""Stage `split`: a seeded, stratified train/val/test split, written as a manifest.

A split the source already has (CIFAR-10's test/, a dataset's valid/) is kept;
only the missing splits are carved out of train/. A few photos per class are
held out of all three and copied to data/holdout/ for predict_new to show. Duplicates and
near-duplicates found by `resize` move as one unit, so no photo can sit in train and test at once.
Images `resize` marks as left out (the same picture under two classes, with
resize.conflicting_labels: drop) go to no split at all, and so do the photos a
reviewer listed in data/exclude.txt (e.g. label errors the `audit` stage found).

A share of each class's validation photos (split.calibration) becomes a fifth
split, `calibration`. No trainer sees it while choosing an epoch, a C or a
temperature, so the confidence of its photos is distributed as a new photo's
would be, and the `unknown` threshold set on it keeps its coverage promise.
"""

import shutil
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from imgcls.dataset import (
    CALIBRATION,
    CLASSES_FILE,
    EXCLUDE_FILE,
    HOLDOUT_DIR,
    INDEX_FILE,
    MANIFEST_FILE,
    NO_VALIDATION,
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
    carved = [split for split in ("test", "val") if fractions.get(split, 0) > 0]  # split.val 0: no val
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
        group_split.update(_split_class_groups(order, sizes, carved, fractions, holdout))
    return pool["group"].map(group_split)


def _split_class_groups(order: np.ndarray, sizes: pd.Series, carved: list[str], fractions: dict[str, float],
                        holdout: int) -> dict[int, str]:
    """{group: split} for one class's groups, taken in the shuffled `order`; `sizes` holds each group's image count.

    The first `holdout` single photos are held out; then each carved split
    takes groups until it reaches its share (at least one group), leaving one
    group for each later split; train gets the rest.
    """
    # Held-out images are single photos (not duplicates), so none of them has a twin in training.
    singles = [group for group in order if sizes[group] == 1][:holdout]
    group_split = dict.fromkeys(singles, "holdout")
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
    return group_split


def _hold_back_calibration(index: pd.DataFrame, share: float, seed: int) -> pd.Series:
    """Each image's split, with `share` of each class's validation groups moved to the calibration split.

    Every class keeps at least one validation group; duplicates move as one group.
    """
    splits = index["split"].copy()
    if share == 0:
        return splits
    val = index[splits == "val"]
    decided: set = set()
    for class_name, rows in val.groupby("label", sort=True):
        groups = np.array([group for group in rows["group"].unique() if group not in decided])
        decided.update(groups)  # a group filed under two classes goes with its first, as in _carve
        # Its own random stream (the 2), apart from the one _carve draws the splits with.
        rng = np.random.default_rng([seed, zlib.crc32(str(class_name).encode()), 2])
        held_back = groups[rng.permutation(len(groups))][:max(0, min(round(share * len(groups)), len(groups) - 1))]
        # Every photo of a held-back group moves, whatever class it is filed under.
        splits.loc[val.index[val["group"].isin(held_back)]] = CALIBRATION
    return splits


def _exclude_reviewed(index: pd.DataFrame, known: set[str]) -> tuple[pd.DataFrame, list[str]]:
    """The index without the photos data/exclude.txt lists, and those it lists that are not in `known` (the data).

    One path a line, as in the manifest and reports/audit/label_issues.csv
    (relative to data/raw); blank lines and lines starting with # are skipped.
    """
    if not EXCLUDE_FILE.exists():
        return index, []
    lines = [line.strip() for line in EXCLUDE_FILE.read_text().splitlines()]
    listed = {line for line in lines if line and not line.startswith("#")}
    unknown = sorted(listed - known)
    return index[~index["path"].isin(listed)], unknown


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


def _read_index() -> tuple[pd.DataFrame, pd.DataFrame]:
    """(images to split, images resize marked as left out), each image with its `group`: its duplicates move with it."""
    # Class names and paths stay text even when they look like numbers (digits' classes are "0".."9").
    index = pd.read_csv(require(INDEX_FILE, "resize"), keep_default_na=False, dtype={"label": str, "path": str})
    left_out = index[index["left_out"] != ""]
    index = index[index["left_out"] == ""].copy()
    index["group"] = np.where(index["duplicate_group"] >= 0, index["duplicate_group"], index["id"])
    return index, left_out


def _assign_splits(index: pd.DataFrame, section) -> tuple[pd.Series, dict[str, str]]:
    """Each image's split (train, val, test or holdout), and how each split came about.

    Without predefined splits all three are carved in the proportions of
    `section` (split.* in params.yaml); with them, the source's splits are kept
    and only the missing ones are carved out of its train/.
    """
    predefined = sorted(set(index["source_split"]) - {""})
    wanted = {"train": section.train, "val": section.val, "test": section.test}
    if not predefined:
        how = {split: "carved" if wanted[split] else NO_VALIDATION for split in SPLITS}
        return _carve(index, wanted, section.holdout_per_class, section.seed), how
    if "train" not in predefined:
        raise UserError(
            f"the source has {', '.join(predefined)}/ folders but no train/ folder: add train/<class>/ images."
        )
    missing = [split for split in SPLITS if split not in predefined]
    how = {split: "carved from train" if split in missing else "predefined" for split in SPLITS}
    if "val" in missing and not section.val:
        how["val"] = NO_VALIDATION
    splits = index["source_split"].copy()
    # Carve the missing splits out of train/ in the proportions params give them.
    share = sum(wanted[split] for split in missing + ["train"])
    fractions = {split: wanted[split] / share for split in missing + ["train"]}
    pool = index[index["source_split"] == "train"]
    splits.loc[pool.index] = _carve(pool, fractions, section.holdout_per_class, section.seed)
    return splits, how


def _check_every_class_in_every_split(index: pd.DataFrame, class_names: list[str], section) -> None:
    """Stop, naming them, if some classes have no image in train, val (unless split.val is 0) or test."""
    splits = [split for split in SPLITS if split != "val" or section.val > 0]
    missing_classes = [
        f"{name} ({split})" for split in splits for name in class_names
        if not ((index["split"] == split) & (index["label"] == name)).any()
    ]
    if missing_classes:
        raise UserError(
            f"these classes have no image in a split: {', '.join(missing_classes)};"
            " every class needs images in train, val and test: add images to the source's split folders."
        )


def _duplicates_across_splits(index: pd.DataFrame) -> pd.DataFrame:
    """Duplicates that a predefined split already put on both sides: reported, since they inflate test scores."""
    split_count = index[index["duplicate_group"] >= 0].groupby("group")["split"].nunique()
    return index[index["group"].isin(split_count[split_count > 1].index)]


def _write_split(index: pd.DataFrame, class_names: list[str], leaking: pd.DataFrame) -> None:
    """The held-out photos, the manifest and classes.txt for the trainers, and the per-class counts and leaks."""
    columns = [*SPLITS, CALIBRATION, "holdout"]
    counts = pd.crosstab(index["label"], index["split"]).reindex(columns=columns, fill_value=0)
    counts["total"] = counts.sum(axis=1)
    _write_holdout(index[index["split"] == "holdout"])
    write_csv(MANIFEST_FILE, index[["id", "path", "label", "label_index", "split"]])
    with atomic_path(CLASSES_FILE) as temporary:
        temporary.write_text("\n".join(class_names) + "\n")
    write_csv(REPORT_DIR / "counts.csv", counts.reset_index().rename(columns={"label": "class"}))
    write_csv(REPORT_DIR / "duplicates_across_splits.csv",
              leaking[["id", "path", "label", "split", "duplicate_group", "duplicate_kind"]])


def _summary(index: pd.DataFrame, how: dict[str, str], classes: int, leaking: pd.DataFrame,
             left_out: pd.DataFrame, excluded: int) -> dict:
    """reports/split/summary.json: images per split and how each split came about, held out, left out, leaks."""
    how = {**how, CALIBRATION: NO_VALIDATION if how["val"] == NO_VALIDATION else "held back from val"}
    return {
        "splits": {split: {"images": int((index["split"] == split).sum()), "how": how[split]}
                   for split in (*SPLITS, CALIBRATION)},
        "holdout": int((index["split"] == "holdout").sum()),
        "excluded": excluded,
        "classes": classes,
        "duplicate_images_across_splits": len(leaking),
        "near_duplicate_images_across_splits": int((leaking["duplicate_kind"] == "near-duplicate").sum()),
        "left_out_conflicting_labels": len(left_out),
    }


def _print_summary(summary: dict, unknown_exclusions: list[str]) -> None:
    """The images per split, and a word on images excluded, left out or duplicated across splits."""
    if summary["excluded"]:
        print(f"split: excluded {summary['excluded']} photos listed in {EXCLUDE_FILE}, from every split")
    if unknown_exclusions:
        print(f"warning: {EXCLUDE_FILE} lists {len(unknown_exclusions)} paths that are not in the data (e.g."
              f" {unknown_exclusions[0]}): check them against data/raw, relative to it, as in"
              " reports/audit/label_issues.csv")
    if summary["left_out_conflicting_labels"]:
        print(f"split: left out {summary['left_out_conflicting_labels']} images filed under more than one class"
              " (resize.conflicting_labels: drop), in no split; see reports/resize/duplicates.csv")
    print("split: " + ", ".join(f"{split} {value['images']} ({value['how']})" for split, value in summary["splits"].items()))
    if summary["duplicate_images_across_splits"]:
        leaking, near = summary["duplicate_images_across_splits"], summary["near_duplicate_images_across_splits"]
        print(f"warning: the source's own split puts {leaking} duplicate images in more than one split"
              f" ({near} of them near-duplicates); see {REPORT_DIR / 'duplicates_across_splits.csv'}")


def main() -> None:
    params = load_params()
    index, left_out = _read_index()
    included, unknown_exclusions = _exclude_reviewed(index, set(index["path"]) | set(left_out["path"]))
    excluded, index = len(index) - len(included), included.copy()
    index["split"], how = _assign_splits(index, params.split)
    index["split"] = _hold_back_calibration(index, params.split.calibration, params.split.seed)
    class_names = sorted(index["label"].unique())
    index["label_index"] = index["label"].map({name: position for position, name in enumerate(class_names)})
    _check_every_class_in_every_split(index, class_names, params.split)
    leaking = _duplicates_across_splits(index)
    _write_split(index, class_names, leaking)
    summary = _summary(index, how, len(class_names), leaking, left_out, excluded)
    write_json(REPORT_DIR / "summary.json", summary)
    _print_summary(summary, unknown_exclusions)


if __name__ == "__main__":
    run_stage(main)
