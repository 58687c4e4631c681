"""train_transfer: ImageNet bases, their weights and preprocessing, both training phases, bad input.

Training runs for real on tiny generated images with randomly initialised
bases (weights: none) at their smallest input size; one test loads the real
MobileNetV2 ImageNet weights from the Keras cache when it holds them.
"""

import io
import json
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from conftest import TINY_TRANSFER
from imgcls import transfer
from imgcls.errors import UserError
from imgcls.features import compute_features

TINY = TINY_TRANSFER
# Phase 1 by gradient descent (the default fits the linear probe instead, with no epochs).
ADAM_HEAD = {"train_transfer.head.solver": "adam"}


# --- bases, preprocessing, weights -------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(transfer.BASES))
def test_preprocessing_layers_match_the_base_preprocess_input(name):
    pixels = np.random.default_rng(0).uniform(0, 255, size=(2, 5, 5, 3)).astype("float32")
    output = pixels
    for layer in transfer.preprocessing_layers(name):
        output = np.asarray(layer(output))
    np.testing.assert_allclose(output, transfer.preprocess_input(name, pixels), rtol=1e-5, atol=1e-4)


def test_unknown_base_is_refused_with_the_known_ones():
    with pytest.raises(UserError, match="'MobileNetV3' is not a known base.*MobileNetV2.*ResNet50.*Xception"):
        transfer.get_base("MobileNetV3")


def test_input_too_small_for_the_base_names_the_minimum():
    with pytest.raises(UserError, match="input_size = 32 is too small for Xception: it needs at least 71 px"):
        transfer.resolve_input_size("Xception", 32)
    assert transfer.resolve_input_size("Xception", 0) == 299  # 0 = the base's default


def test_missing_weights_file_is_refused(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        transfer.build_base("MobileNetV2", 32, str(tmp_path / "absent.weights.h5"))


def test_local_weights_file_loads_and_one_of_another_architecture_is_refused(tmp_path):
    source = transfer.build_base("MobileNetV2", 32, "none")
    path = tmp_path / "mobilenet.weights.h5"
    source.save_weights(path)
    loaded = transfer.build_base("MobileNetV2", 32, str(path))
    for expected, actual in zip(source.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(expected, actual)
    with pytest.raises(UserError, match=r"does not fit EfficientNetB0 at 32 px.*include_top=False"):
        transfer.build_base("EfficientNetB0", 32, str(path))


def test_missing_imagenet_weights_offline_names_file_url_and_cache(tmp_path, monkeypatch):
    # An empty cache, and every download sent to a closed local port: exactly "offline".
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    for variable in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(variable, "http://127.0.0.1:9")
    for variable in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(variable, raising=False)
    file_name = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_96_no_top.h5"
    with pytest.raises(UserError) as raised:
        transfer.build_base("MobileNetV2", 96, "imagenet")
    message = str(raised.value)
    assert file_name in message
    assert "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/" + file_name in message
    assert str(tmp_path / "models" / file_name) in message


def _unfreezing(base_name, unfreeze):
    return SimpleNamespace(base=base_name, fine_tune=SimpleNamespace(unfreeze=unfreeze))


@pytest.mark.parametrize("name", sorted(transfer.BASES))
def test_unfreeze_auto_trains_each_bases_last_stage(name):
    # auto is the default, so that changing train_transfer.base needs no other param: its layer must exist in
    # every base, and leave most of the base frozen.
    base = transfer.build_base(name, transfer.BASES[name].min_size, "none")
    first = transfer.first_trainable_layer(base, _unfreezing(name, "auto"))
    assert base.layers[first].name == transfer.BASES[name].top_layer
    assert 0 < transfer.unfreeze_top(base, first) < len(base.layers) / 2


def test_unfreeze_top_layers_or_from_a_named_layer_keeps_batch_norm_frozen():
    import keras

    base = transfer.build_base("MobileNetV2", 32, "none")
    names = [layer.name for layer in base.layers]
    assert transfer.unfreeze_top(base, transfer.first_trainable_layer(base, _unfreezing("MobileNetV2", 10))) == 10
    assert [layer.trainable for layer in base.layers[:-10]] == [False] * (len(base.layers) - 10)
    assert all(layer.trainable != isinstance(layer, keras.layers.BatchNormalization) for layer in base.layers[-10:])
    named = transfer.first_trainable_layer(base, _unfreezing("MobileNetV2", "block_16_expand"))
    assert named == names.index("block_16_expand")
    with pytest.raises(UserError, match="has no layer of that name.*block_16_project"):
        transfer.first_trainable_layer(base, _unfreezing("MobileNetV2", "block_99"))
    with pytest.raises(UserError, match=f"has only {len(base.layers)} layers"):
        transfer.first_trainable_layer(base, _unfreezing("MobileNetV2", 1000))


def test_classifier_turns_raw_pixels_into_probabilities_and_features_match_it():
    base = transfer.build_base("ResNet50", 32, "none")
    head = transfer.build_head(base.output_shape[-1], 3, [8], 0.1)
    classifier = transfer.build_classifier("ResNet50", base, head, 40, 32)  # 40 px images resized to 32
    pixels = np.random.default_rng(1).integers(0, 256, size=(5, 40, 40, 3)).astype("uint8")
    probabilities = classifier.predict(pixels.astype("float32"), verbose=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-5)
    features = compute_features(transfer.feature_extractor("ResNet50", base, 40, 32), pixels, batch_size=2)
    np.testing.assert_allclose(head.predict(features, verbose=0), probabilities, rtol=1e-4, atol=1e-6)


def _cached_mobilenet_weights() -> Path | None:
    file_name, _ = transfer.BASES["MobileNetV2"].imagenet_weights(96)
    path = transfer.weights_cache_path(file_name)
    return path if path.exists() else None


def _gear_archive() -> Path | None:
    path = transfer.keras_cache_dir() / "datasets" / "gear_images.zip"
    return path if path.exists() else None


@pytest.mark.skipif(_cached_mobilenet_weights() is None or _gear_archive() is None,
                    reason="needs MobileNetV2 96 px ImageNet weights and gear_images.zip in the Keras cache"
                           " (KERAS_HOME, e.g. `make test KERAS_CACHE=...`)")
def test_real_imagenet_weights_give_a_linear_probe_far_above_chance():
    from sklearn.linear_model import LogisticRegression

    from imgcls.images import decode_image

    # 12 photos each of 4 gear classes, decoded exactly as the resize stage does.
    classes = ["boots", "carabiners", "helmets", "tents"]
    pixels, labels = [], []
    with zipfile.ZipFile(_gear_archive()) as archive:
        names = sorted(name for name in archive.namelist() if not name.endswith("/"))
        for label, class_name in enumerate(classes):
            for name in [name for name in names if f"/{class_name}/" in name][:12]:
                decoded = decode_image(io.BytesIO(archive.read(name)), 96, "pad", (255, 255, 255), 89478485)
                pixels.append(decoded.pixels)
                labels.append(label)
    pixels, labels = np.stack(pixels), np.array(labels)
    base = transfer.build_base("MobileNetV2", 96, "imagenet")
    features = compute_features(transfer.feature_extractor("MobileNetV2", base, 96, 96), pixels)
    train = np.arange(len(labels)) % 3 != 0  # 8 photos per class to fit, 4 to score
    probe = LogisticRegression(max_iter=2000).fit(features[train], labels[train])
    accuracy = probe.score(features[~train], labels[~train])
    assert accuracy >= 0.85, f"linear probe on ImageNet features: {accuracy:.2f} (chance 0.25)"


# --- the stage ---------------------------------------------------------------------------------------


def test_both_phases_train_and_save_a_self_contained_model(prepared):
    prepared.set_params(**TINY, **ADAM_HEAD, **{"train_transfer.test_time.flip": True})
    result = prepared.stage("train_transfer")
    assert "features of" in result.stdout and "computed once" in result.stdout
    # fine_tune.unfreeze: auto, MobileNetV2's last stage: from block_12_expand, 47 layers.
    assert "fine-tuning 47 layers of MobileNetV2 (154 in all), on cached activations" in result.stdout
    assert "activations below layer" in result.stdout and "(1 augmented copies each)" in result.stdout
    root = prepared.root

    card = json.loads((root / "models/transfer.json").read_text())
    assert card["name"] == "transfer" and card["base"] == "MobileNetV2" and card["image_size"] == 32
    assert card["class_names"] == (root / "data/split/classes.txt").read_text().split()
    # The linear probe and the average of the two were candidates too, and the card says which was saved.
    assert card["winner"] in card["candidates"] and set(card["candidates"]) == {"fine_tune", "probe", "ensemble"}
    history = pd.read_csv(root / "reports/transfer/history.csv")
    assert list(history["phase"]) == ["head", "head", "fine-tune"]
    assert (root / "reports/transfer/training.png").stat().st_size > 0
    assert (root / "reports/transfer/live/plots/metrics/val/loss.tsv").exists()
    metrics = json.loads((root / "reports/transfer/train.json").read_text())
    assert {"val_accuracy", "cache_seconds", "feature_seconds", "head_seconds", "fine_tune_seconds"} <= metrics.keys()
    phases = [metrics[f"training_flops_{part}"] for part in ("cache", "head", "fine_tune")]
    assert min(phases) > 0 and metrics["training_flops"] == sum(phases)
    # On cached activations a fine-tuning epoch trains only the top of the base: less than 3 whole passes per image.
    train_images = pd.read_csv(root / "data/split/manifest.csv")["split"].eq("train").sum()
    assert 0 < metrics["training_flops_fine_tune"] < 3 * metrics["forward_flops_per_image"] * train_images

    # The saved model averages over each photo and its mirror image (test_time.flip), which costs two
    # passes per photo evaluated (of the average of the fine-tuned model and the probe, when it won: more
    # than one pass of the base each, less than two).
    assert card["test_time_flip"] is True and card["test_time_shift"] is False
    passes = metrics["evaluation_flops_per_image"] / metrics["forward_flops_per_image"]
    assert 2 < passes < 4 if card["winner"] == "ensemble" else 1.9 < passes < 2.1

    # The saved model loads in safe mode (no Lambda layers) and predicts from 0..255 pixels alone; averaged
    # over the photo and its mirror image, it answers the same for both.
    check = (
        "import sys; sys.path.insert(0, 'scripts'); import numpy as np\n"
        "from imgcls.modelio import load_model\n"
        "from imgcls.dataset import load_split\n"
        "model, card = load_model('models/transfer.keras')\n"
        "pixels, labels, _ = load_split('val', card['image_size'])\n"
        "p = model.predict(pixels.astype('float32'), verbose=0)\n"
        "mirrored = model.predict(pixels[:, :, ::-1].astype('float32'), verbose=0)\n"
        "print(float(np.abs(p - mirrored).max()) < 1e-5, p.shape, round(float(p.sum(axis=1).mean()), 4))\n"
    )
    output = prepared.run(sys.executable, "-c", check).stdout
    assert output.strip().endswith(", 3) 1.0") and output.strip().splitlines()[-1].startswith("True")


def test_augmentation_afresh_every_epoch_trains_both_phases_on_images(prepared):
    prepared.set_params(**{**TINY, **ADAM_HEAD, "train_transfer.head.epochs": 1, "train_transfer.probe_candidate": False,
                           "train_transfer.head.augment.flip": "horizontal", "train_transfer.fine_tune.cached_copies": 0})
    result = prepared.stage("train_transfer")
    assert "computed once" not in result.stdout and "fine-tuning 47 layers of MobileNetV2 (" in result.stdout
    assert "on images" in result.stdout
    history = pd.read_csv(prepared.root / "reports/transfer/history.csv")
    assert list(history["phase"]) == ["head", "fine-tune"]
    metrics = json.loads((prepared.root / "reports/transfer/train.json").read_text())
    assert "feature_seconds" not in metrics and "cache_seconds" not in metrics
    # Every epoch on images: the frozen bottom forward once, the trained part three times, per training image.
    train_images = pd.read_csv(prepared.root / "data/split/manifest.csv")["split"].eq("train").sum()
    assert metrics["training_flops_cache"] == 0
    assert metrics["forward_flops_per_image"] * train_images < metrics["training_flops_fine_tune"]
    assert metrics["training_flops_fine_tune"] < 3 * metrics["forward_flops_per_image"] * train_images


@pytest.mark.parametrize("changes, message", [
    ({"train_transfer.base": "ResNet18"}, "'ResNet18' is not a known base network"),
    ({"train_transfer.base": "Xception", "train_transfer.input_size": 32}, "too small for Xception"),
    ({"train_transfer.weights": "weights/absent.h5"}, "'weights/absent.h5': no such file"),
    ({"train_transfer.min_improvement": 1.5}, "train_transfer.min_improvement"),
    ({"train_transfer.accuracy_progress": "sometimes"}, "train_transfer.accuracy_progress"),
    ({"train_transfer.fine_tune.beta_2": 1.0}, "train_transfer.fine_tune.beta_2"),
    ({"train_transfer.fine_tune.clip_norm": -1}, "train_transfer.fine_tune.clip_norm"),
    ({"train_transfer.base": "EfficientNetB0", "train_transfer.fine_tune.unfreeze": "block_12_expand"},
     "top layers, or auto (the base's last stage)"),
])
def test_bad_transfer_params_stop_the_stage_with_one_clear_message(prepared, changes, message):
    prepared.set_params(**{**TINY, "train_transfer.head.epochs": 1, **changes})
    (prepared.root / "models/transfer.keras").unlink(missing_ok=True)
    result = prepared.stage("train_transfer", check=False)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (prepared.root / "models/transfer.keras").exists()


def test_train_transfer_runs_on_jax_without_tensorflow(prepared):
    prepared.set_params(**{**TINY, "train_transfer.head.epochs": 1, "train_transfer.fine_tune.unfreeze": 5})
    result = prepared.stage_on_jax_without_tensorflow("train_transfer")
    assert "backend jax" in result.stdout and "tensorflow modules: []" in result.stdout
    assert "computed once" in result.stdout and "fine-tuning 5 layers" in result.stdout
    card = json.loads((prepared.root / "models/transfer.json").read_text())
    assert card["backend"] == "jax"


def test_dvc_repro_runs_the_stage_with_phase_two_off_and_metrics_show_lists_it(prepared):
    prepared.set_params(**{**TINY, **ADAM_HEAD, "train_transfer.fine_tune.epochs": 0})
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    prepared.run(*git, "commit", "-qam", "tiny transfer")
    result = prepared.dvc("repro", "train_transfer")
    assert "Running stage 'train_transfer'" in result.stdout
    assert "fine-tuning" not in result.stdout and "activations below" not in result.stdout
    history = pd.read_csv(prepared.root / "reports/transfer/history.csv")
    assert list(history["phase"]) == ["head", "head"]
    assert (prepared.root / "models/transfer.keras").exists()
    shown = prepared.dvc("metrics", "show", "--json").stdout
    assert "reports/transfer/train.json" in shown and "val_accuracy" in shown
    again = prepared.dvc("repro", "train_transfer")
    assert "Running stage 'train_transfer'" not in again.stdout
