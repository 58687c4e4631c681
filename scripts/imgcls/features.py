"""Frozen features: what a pretrained base (or any Keras model) outputs for every image, computed once.

train_transfer's phase 1 and its linear probe train on the frozen base's
pooled features of the un-augmented photos, and phase 2 on the cached
activations below the fine-tuned layers; the label audit fits its
cross-validated classifier on the same pooled features. All of them run the
network one batch at a time, so the float copy of every image never exists.
"""

import numpy as np

from imgcls import transfer
from imgcls.augment import augmentation


def compute_features(extractor, inputs, batch_size: int = 64, transform=None, replicas: int = 1):
    """Run `extractor` over every image, one batch at a time (the float copy of all images never exists).

    `inputs` is one array or a list of arrays (a model with several inputs);
    the result is likewise one float32 array or a list, per model output.
    `transform(batch)` is applied to each uint8 batch first (e.g. augmented_copy).
    Split across `replicas` devices, a last batch that does not divide by their
    number is padded with copies of its first images, whose results are dropped.
    """
    arrays = inputs if isinstance(inputs, (list, tuple)) else [inputs]
    batch_size = -(-batch_size // replicas) * replicas
    outputs = None
    for start in range(0, len(arrays[0]), batch_size):
        batch = [np.asarray(array[start:start + batch_size]) for array in arrays]
        if transform is not None:
            batch = [transform(part) for part in batch]
        real = len(batch[0])
        if real % replicas:
            batch = [np.concatenate([part, np.resize(part, (-real % replicas, *part.shape[1:]))]) for part in batch]
        batch = [part.astype("float32") for part in batch]
        result = extractor.predict_on_batch(batch if len(batch) > 1 else batch[0])
        result = [np.asarray(part, dtype="float32")[:real]
                  for part in (result if isinstance(result, (list, tuple)) else [result])]
        outputs = [[] for _ in result] if outputs is None else outputs
        for collected, part in zip(outputs, result):
            collected.append(part)
    if outputs is None:
        raise ValueError("compute_features needs at least one image")
    joined = [np.concatenate(parts) for parts in outputs]
    return joined if len(joined) > 1 or isinstance(extractor.output, (list, tuple)) else joined[0]


def augmented_copy(augment, seed: int):
    """A transform for compute_features: one random draw of an augmentation section per image (training mode)."""
    layers = augmentation(augment, seed)
    return lambda batch: np.asarray(layers(batch.astype("float32"), training=True))


def pooled_features(base_name: str, base, image_size: int, input_size: int, *pixel_arrays,
                    replicas: int = 1) -> list[np.ndarray]:
    """The frozen base's pooled features (images × channels, float32) of each array of un-augmented photos."""
    extractor = transfer.feature_extractor(base_name, base, image_size, input_size)
    return [compute_features(extractor, pixels, replicas=replicas) for pixels in pixel_arrays]
