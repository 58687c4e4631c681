"""What every section of params.yaml's schema builds on: a strict base class, and the augmentation settings
that train_cnn and train_transfer share (in training, and the views a saved model averages over)."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    # extra="forbid" turns a misspelt key into an error instead of a silent default.
    model_config = ConfigDict(extra="forbid", frozen=True)


class AugmentParams(Section):
    """Random changes to training images, as Keras preprocessing layers inside the model.

    They are active only while training, so evaluation and prediction see the
    image as it is. 0 (or "none") turns a change off.
    """

    flip: Literal["none", "horizontal", "vertical", "horizontal_and_vertical"]
    rotation: float = Field(ge=0, le=0.5)  # fraction of a full turn, e.g. 0.05 = up to ±18°
    zoom: float = Field(ge=0, lt=1)  # fraction of the side, in or out
    translation: float = Field(ge=0, lt=1)  # fraction of the side, horizontally and vertically
    contrast: float = Field(ge=0, le=1)  # contrast factor range 1 ± contrast
    interpolation: Literal["bilinear", "nearest"]  # how rotated, zoomed and moved pixels are resampled

    @property
    def off(self) -> bool:
        """Whether every change is off: the images are seen as they are."""
        return self.flip == "none" and not (self.rotation or self.zoom or self.translation or self.contrast)


class TestTimeParams(Section):
    """test_time of train_cnn and train_transfer: the saved model averages its predictions over these versions
    of each photo (augment.with_test_time_augmentation)."""

    flip: bool  # the mirror image
    shift: bool  # copies of each version moved by one pixel, up-left and down-right

    @property
    def on(self) -> bool:
        """Whether the saved model averages over any view besides the photo itself."""
        return self.flip or self.shift
