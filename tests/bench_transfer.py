"""Benchmark of train_transfer on a prepared project (data, resize and split done).

In one run it measures:
  - the stage itself (default params): wall-clock time and test accuracy of models/transfer.keras;
  - a linear probe: scikit-learn logistic regression on the frozen base's pooled
    features (same base, input size and split), the score the stage must beat;
  - phase 1 with cached features (feature extraction + all head epochs) against
    phase 1 on images through the frozen base (one epoch timed, times the number
    of head epochs), both timed here in one process;
  - phase 2 per epoch: the stage's epochs on cached activations against one
    epoch on images through the whole base (fine_tune.cached_copies = 0).

    python tests/bench_transfer.py WORKDIR
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _measure(workdir: Path) -> dict:
    """Runs inside WORKDIR (a subprocess): test accuracy, linear probe, one uncached phase-1 epoch."""
    sys.path.insert(0, str(workdir / "scripts"))
    from sklearn.linear_model import LogisticRegression

    from imgcls import modelio, training, transfer
    from imgcls.batches import ImageBatches
    from imgcls.dataset import load_class_names, load_split
    from imgcls.optim import OptimizerSettings, build_optimizer
    from imgcls.features import compute_features
    from imgcls.params import load_params

    params = load_params()
    section = params.train_transfer
    input_size = transfer.resolve_input_size(section.base, section.input_size)
    image_size = params.resize.array_size(input_size)
    splits = {name: load_split(name, image_size)[:2] for name in ("train", "val", "test")}
    num_classes = len(load_class_names())

    model, _ = modelio.load_model("models/transfer.keras")
    test_pixels, test_labels = splits["test"]
    predicted = model.predict(test_pixels.astype("float32"), batch_size=64, verbose=0).argmax(axis=1)
    stage_accuracy = float((predicted == test_labels).mean())

    training.seed_everything(params.seed)
    base = transfer.build_base(section.base, input_size, section.weights)
    extractor = transfer.feature_extractor(section.base, base, image_size, input_size)
    started = time.perf_counter()
    features = {name: compute_features(extractor, pixels) for name, (pixels, _) in splits.items()
                if name != "test"}
    feature_seconds = time.perf_counter() - started
    features["test"] = compute_features(extractor, splits["test"][0])
    probe = LogisticRegression(max_iter=5000).fit(features["train"], splits["train"][1])
    probe_accuracy = float(probe.score(features["test"], splits["test"][1]))

    def fit_seconds(model, train, val, epochs, learning_rate):
        optimizer = build_optimizer(OptimizerSettings("adam", learning_rate, "constant"), epochs, len(train))
        training.compile_classifier(model, optimizer, section.label_smoothing)
        started = time.perf_counter()
        model.fit(train, validation_data=val, epochs=epochs, verbose=0)
        return time.perf_counter() - started

    # Phase 1 with cached features: features once, then every head epoch on them.
    base.trainable = False
    head = transfer.build_head(base.output_shape[-1], num_classes, section.dense_units, section.dropout)
    cached_train = ImageBatches(features["train"], splits["train"][1], num_classes, section.batch_size,
                                shuffle=True, seed=params.seed)
    cached_val = ImageBatches(features["val"], splits["val"][1], num_classes, 64)
    cached = feature_seconds + fit_seconds(head, cached_train, cached_val, section.head.epochs,
                                           section.head.learning_rate)
    # Phase 1 without the cache: the frozen base runs on every image in every epoch (one epoch timed).
    classifier = transfer.build_classifier(section.base, base, head, image_size, input_size)
    train = ImageBatches(*splits["train"], num_classes, section.batch_size, shuffle=True, seed=params.seed)
    val = ImageBatches(*splits["val"], num_classes, 64)
    uncached_epoch = fit_seconds(classifier, train, val, 1, section.head.learning_rate)
    # One phase-2 epoch on freshly augmented images (cached_copies = 0), against the stage's cached epochs.
    transfer.unfreeze_top(base, transfer.first_trainable_layer(base, section))
    augmented = transfer.with_augmentation(classifier, section.fine_tune.augment, params.seed, image_size)
    fine_tune_epoch = fit_seconds(augmented, train, val, 1, section.fine_tune.learning_rate)
    return {"stage_accuracy": stage_accuracy, "probe_accuracy": probe_accuracy, "test_images": int(len(test_labels)),
            "cached_phase1_seconds": cached, "uncached_epoch_seconds": uncached_epoch,
            "fine_tune_epoch_on_images_seconds": fine_tune_epoch, "head_epochs": section.head.epochs,
            "base": section.base, "input_size": input_size}


def run(workdir: Path) -> list[dict]:
    workdir = Path(workdir)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONHASHSEED="0")
    started = time.perf_counter()
    subprocess.run(["python", "scripts/train_transfer.py"], cwd=workdir, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    stage_seconds = time.perf_counter() - started
    trained = json.loads((workdir / "reports/transfer/train.json").read_text())
    output = subprocess.run(["python", str(Path(__file__).resolve()), "--measure", str(workdir)], cwd=workdir,
                            env=env, check=True, capture_output=True, text=True).stdout
    measured = json.loads(output.strip().splitlines()[-1])
    sys.path.insert(0, str(workdir / "scripts"))
    from imgcls.flops import format_flops

    what = f"{measured['base']} {measured['input_size']} px, {measured['test_images']} test images"
    cached = measured["cached_phase1_seconds"]
    uncached = measured["uncached_epoch_seconds"] * measured["head_epochs"]
    rows = [
        {"benchmark": f"train_transfer test accuracy ({what})",
         "value": f"{measured['stage_accuracy']:.2%}",
         "baseline": f"linear probe {measured['probe_accuracy']:.2%}",
         "ratio": f"{measured['stage_accuracy'] / measured['probe_accuracy']:.4f}",
         "flops": format_flops(trained["training_flops"]),
         "note": "probe: LogisticRegression on the frozen base's pooled features, same split; target >= 99.5%"},
        {"benchmark": "train_transfer wall-clock (default params)",
         "value": f"{stage_seconds:.0f} s",
         "baseline": "120 s target",
         "ratio": f"{stage_seconds / 120:.2f}",
         "note": (f"in-stage {trained['train_seconds']:.0f} s: activations/features"
                  f" {trained.get('cache_seconds', 0) + trained.get('feature_seconds', 0):.0f} s,"
                  f" head {trained['head_seconds']:.0f} s, fine-tune {trained.get('fine_tune_seconds', 0):.0f} s;"
                  " the rest is start-up and saving")},
        {"benchmark": f"phase 1 ({measured['head_epochs']} head epochs), features cached vs not",
         "value": f"{cached:.0f} s cached",
         "baseline": f"{uncached:.0f} s uncached",
         "ratio": f"{uncached / cached:.1f}x faster",
         "note": f"cached: features of train+val, then all epochs; uncached: one timed epoch on images through"
                 f" the frozen base ({measured['uncached_epoch_seconds']:.1f} s) x {measured['head_epochs']}"},
    ]
    if trained.get("fine_tune_seconds"):
        epochs = trained["epochs_run"] - measured["head_epochs"]
        per_epoch = trained["fine_tune_seconds"] / max(epochs, 1)
        rows.append(
            {"benchmark": "phase 2 seconds per epoch, cached activations vs images",
             "value": f"{per_epoch:.1f} s cached",
             "baseline": f"{measured['fine_tune_epoch_on_images_seconds']:.1f} s on images",
             "ratio": f"{measured['fine_tune_epoch_on_images_seconds'] / per_epoch:.1f}x faster",
             "note": f"cached: the stage's {epochs} epochs after a one-off {trained.get('cache_seconds', 0):.0f} s"
                     " pass below the unfrozen layers (image + augmented copies); images: one timed epoch"})
    return rows

if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--measure":
        print(json.dumps(_measure(Path(sys.argv[2]).resolve())))
    elif len(sys.argv) == 2:
        for row in run(Path(sys.argv[1]).resolve()):
            print(" | ".join(str(row[key]) for key in ("benchmark", "value", "baseline", "ratio", "note")))
    else:
        sys.exit("usage: python tests/bench_transfer.py WORKDIR  (a project copy where data, resize and split ran)")
