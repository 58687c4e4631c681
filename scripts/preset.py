"""Print a preset from presets/ as `-S key=value` arguments for `dvc exp run`.

    dvc exp run -n cifar10 $(python scripts/preset.py cifar10)

A preset lists only the params it changes, nested as in params.yaml. Each
value is printed as compact YAML without spaces, so the shell keeps every
argument whole and DVC reads back the same value.
"""

import sys
from pathlib import Path

import yaml

PRESETS_DIR = Path("presets")


def flatten(section: dict, prefix: str = "") -> list[tuple[str, object]]:
    """[("train_cnn.augment.flip", "horizontal"), ...]: one entry per leaf, lists kept whole."""
    items = []
    for key, value in section.items():
        if isinstance(value, dict):
            items += flatten(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def compact(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    text = text.removesuffix("...").strip()  # a bare scalar document ends with "..."
    return text.replace(", ", ",")


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: python scripts/preset.py NAME  (one of: "
                         + ", ".join(sorted(path.stem for path in PRESETS_DIR.glob("*.yaml"))) + ")")
    path = PRESETS_DIR / f"{sys.argv[1].removesuffix('.yaml')}.yaml"
    if not path.exists():
        raise SystemExit(f"{path} not found: presets are " + ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))))
    for key, value in flatten(yaml.safe_load(path.read_text()) or {}):
        if " " in compact(value):
            raise SystemExit(f"{path}: {key} has a space in its value; the shell would split it")
        print(f"-S {key}={compact(value)}", end=" ")
    print()


if __name__ == "__main__":
    main()
