"""Batches of images for Keras: shuffled from the seed, split across devices, optionally weighted by class.

An ImageBatches is a `keras.utils.PyDataset` over numpy arrays, so a trainer
built on it runs unchanged with the TensorFlow, JAX or PyTorch backend.
`predict` runs a model over one and drops the predictions of any padding.
"""

import math

import keras
import numpy as np

from imgcls.errors import UserError
from imgcls.modelio import uncompiled_copy


class ImageBatches(keras.utils.PyDataset):
    """Batches of images (N, S, S, 3) as the uint8 pixels they are stored in, with class indices as labels.

    uint8 is a quarter of float32's bytes on the way to a GPU; the model casts
    them itself, and the loss one-hot encodes the indices inside the compiled
    step (see compile_classifier). With `shuffle`, each epoch visits the images
    in a new order drawn from (seed, epoch number), so a rerun (or a resumed run,
    after `set_epoch`) sees the same batches. Without labels the batches hold images
    only (for `model.predict`). With `class_weights` ({class index: weight}) each
    batch also carries per-image loss weights.

    Data-parallel training (`replicas` > 1) needs every batch to divide by the
    number of devices. A shuffled (training) batch that does not leaves out its
    last few images (others each epoch), so BatchNormalization never sees
    padding; a validation or prediction batch is padded with copies of its
    first images, marked as padding for the loss and accuracy (label -1,
    weight 0), and `predict` drops their predictions. With several hosts,
    each process yields only its own slice of each batch (`process`: index, count).

    With `resident`, the images are copied to the accelerator once, and each
    batch is gathered there: only its indices (and labels) leave the host.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray | None = None, num_classes: int | None = None,
                 batch_size: int = 32, shuffle: bool = False, seed: int = 0, class_weights: dict | None = None,
                 replicas: int = 1, process: tuple[int, int] = (0, 1), resident: bool = False):
        # Two threads, no processes: batches are cheap slices of arrays in memory.
        # With more than one worker Keras fetches batches with its ordered enqueuer
        # (same order, so the same metrics) and switches off tf.data's autotuned
        # prefetching, which on a 2-core CPU otherwise competes with training for
        # the cores (gear CNN epochs: 7.5 s instead of 10 s). Processes would also
        # break JAX on a GPU (keras-team/keras#20619).
        super().__init__(workers=2, use_multiprocessing=False)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if len(images) == 0:
            raise ValueError("ImageBatches needs at least one image")
        if labels is not None:
            if num_classes is None:
                raise ValueError("num_classes is required with labels (the loss one-hot encodes them)")
            if len(labels) != len(images):
                raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if replicas % process[1]:
            raise ValueError(f"{replicas} replicas cannot be split evenly over {process[1]} processes")
        self.resident = resident
        self.images = keras.ops.convert_to_tensor(images) if resident else images
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int32)
        self.num_classes = num_classes
        # With several replicas only the last batch may need padding.
        self.batch_size = math.ceil(batch_size / replicas) * replicas
        self.shuffle = shuffle
        self.seed = seed
        self.replicas = replicas
        self.process_index, self.process_count = process
        self.epoch = 0
        self.weights = None
        if class_weights is not None and self.labels is not None:
            lookup = np.array([class_weights.get(index, 1.0) for index in range(num_classes)], dtype=np.float32)
            self.weights = lookup[self.labels]
        self.order = self._order()

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.images))
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.images))

    def __len__(self) -> int:
        if self.shuffle and len(self.images) % self.batch_size < self.replicas:
            return max(1, len(self.images) // self.batch_size)  # a last batch too small to split is left out
        return math.ceil(len(self.images) / self.batch_size)

    def inputs(self, picked: np.ndarray):
        """The model inputs of the images at positions `picked` (a subclass may serve other inputs)."""
        if self.resident:
            return keras.ops.take(self.images, picked, axis=0)
        return np.asarray(self.images[picked])

    def __getitem__(self, index: int):
        picked = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        if self.shuffle:
            picked = picked[:len(picked) - len(picked) % self.replicas]
        real = len(picked)
        padding = -real % self.replicas
        if padding:
            picked = np.concatenate([picked, np.resize(picked, padding)])
        weights = None
        # Split across devices every batch carries weights (JAX fixes the batch's structure at the first one).
        if self.labels is not None and (self.weights is not None or self.replicas > 1):
            weights = self.weights[picked] if self.weights is not None else np.ones(len(picked), dtype=np.float32)
            weights[real:] = 0.0  # padding: counted by no loss and no metric
        labels = None if self.labels is None else self.labels[picked]
        if labels is not None and padding:
            labels[real:] = -1  # padding: the loss leaves it out (IndexCrossentropy)
        if self.process_count > 1:
            share = len(picked) // self.process_count
            mine = slice(self.process_index * share, (self.process_index + 1) * share)
            picked, weights = picked[mine], None if weights is None else weights[mine]
            labels = None if labels is None else labels[mine]
        inputs = self.inputs(picked)
        if labels is None:
            return (inputs,)
        if weights is None:
            return inputs, labels
        return inputs, labels, weights

    def on_epoch_end(self) -> None:
        self.set_epoch(self.epoch + 1)

    def set_epoch(self, epoch: int) -> None:
        """Continue from epoch `epoch` (0-based): its order, and for CachedBatches its versions."""
        self.epoch = epoch
        self.order = self._order()


def predict(model: keras.Model, batches: ImageBatches) -> np.ndarray:
    """model.predict over `batches`, without the predictions of any padding (see ImageBatches)."""
    if batches.process_count > 1:
        return _predict_on_this_host(model, batches)
    return model.predict(batches, verbose=0)[:len(batches.images)]


def _predict_on_this_host(model: keras.Model, batches: ImageBatches) -> np.ndarray:
    # Keras cannot bring back outputs spread over several hosts' devices, so each host predicts every
    # image with its own copy of the (replicated) model, on its own device.
    distribution = keras.distribution.distribution()
    keras.distribution.set_distribution(None)
    try:
        local = uncompiled_copy(model)
        return local.predict(ImageBatches(batches.images, batch_size=batches.batch_size), verbose=0)
    finally:
        keras.distribution.set_distribution(distribution)


class AlternatingFlips(ImageBatches):
    """ImageBatches whose images are mirrored left-right on every other epoch, instead of at random.

    Which half of the images starts mirrored is drawn once from the seed; from
    then on each image flips at every epoch, so any two epochs in a row show
    every image both ways round (random flips show a quarter of them the same
    way twice). The batches are the same for the same seed.
    """

    def __init__(self, *arguments, **keywords):
        super().__init__(*arguments, **keywords)
        self.mirrored_first = np.random.default_rng([self.seed, 0, 1]).random(len(self.images)) < 0.5

    def inputs(self, picked: np.ndarray):
        pixels = super().inputs(picked)
        mirrored = self.mirrored_first[picked] ^ (self.epoch % 2 == 1)
        if self.resident:
            return keras.ops.where(mirrored[:, None, None, None], keras.ops.flip(pixels, axis=2), pixels)
        pixels[mirrored] = pixels[mirrored, :, ::-1]
        return pixels


def class_weights(labels: np.ndarray, num_classes: int, mode: str) -> dict[int, float] | None:
    """{class index: weight} for mode "balanced" (weight ∝ 1 / class count, mean 1 per image), None for "none"."""
    if mode == "none":
        return None
    if mode != "balanced":
        raise ValueError(f"class weighting must be 'none' or 'balanced', got {mode!r}")
    counts = np.bincount(labels, minlength=num_classes)
    missing = [index for index, count in enumerate(counts) if count == 0]
    if missing:
        raise UserError(f"classes {missing} have no training image: every class needs images in the train split.")
    # n / (k * count): a class with the average count gets 1, the mean weight over all images is 1.
    return {index: float(len(labels) / (num_classes * count)) for index, count in enumerate(counts)}
