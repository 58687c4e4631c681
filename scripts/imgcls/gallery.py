"""A PNG grid of photos, each with a caption: evaluate's worst mistakes, the audit's suspects."""

import matplotlib
import numpy as np

from imgcls.dataset import atomic_path

matplotlib.use("Agg")  # figures go to files; no screen is needed
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the Agg backend)


def save_gallery(path, images, captions: list[str], title: str, empty_message: str, columns: int = 4) -> None:
    """Draw `images` (uint8 arrays) four to a row, each under its caption, with `title` above them all."""
    columns = max(1, min(columns, len(captions)))
    rows = max(1, int(np.ceil(len(captions) / columns)))
    # With one or two photos (or none) the grid alone would be narrower than the title.
    width = max(3.2 * columns, 0.11 * len(title))
    figure, axes = plt.subplots(rows, columns, figsize=(width, 3.5 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, image, caption in zip(axes.flat, images, captions):
        axis.imshow(image)
        axis.set_title(caption, fontsize=8)
    if not captions:
        axes[0, 0].text(0.5, 0.5, empty_message, ha="center", va="center")
    figure.suptitle(title)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (3.5 * rows)))  # leave the title its own strip
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    plt.close(figure)
