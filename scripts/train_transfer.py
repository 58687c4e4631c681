"""Stage `train_transfer`: a pretrained ImageNet base with a new head, saved as models/transfer.keras.

Phase 1 trains only the new head (pooling, dropout, dense) on the frozen base.
Without phase-1 augmentation the base's pooled features never change, so they
are computed once per image and the head trains on them: each epoch then costs
milliseconds instead of a full pass of the base over every image.
Phase 2 (optional) unfreezes the top of the base and fine-tunes it together
with the head at a lower learning rate, with augmentation and early stopping;
BatchNormalization layers stay frozen and in inference mode, so their
ImageNet statistics are not overwritten by small, augmented batches. The
layers below the unfrozen ones are still frozen, so by default their output
is computed once for each image and a few augmented copies of it
(fine_tune.cached_copies), and each epoch runs only the top of the base.
The epoch with the best validation score over both phases is kept. Curves go
to reports/transfer/ (DVCLive plots data, history.csv, training.png with the
phase boundary) and the training summary to reports/transfer/train.json.
"""

import time
from types import SimpleNamespace

from imgcls import device
from imgcls.dataset import REPORTS_DIR, load_training_data
from imgcls.errors import run_stage
from imgcls.params import load_params

NAME = "transfer"
REPORT_DIR = REPORTS_DIR / NAME


def main() -> None:
    params = load_params()
    section = params.train_transfer
    device.choose_backend()
    # Check the base and its input size before loading any data.
    from imgcls import flops, training, transfer
    from imgcls.calibration import calibrate

    input_size = transfer.resolve_input_size(section.base, section.input_size)
    transfer.check_weights_setting(section.base, section.weights)
    image_size = params.resize.array_size(input_size)
    class_names, train_set, val_set = load_training_data(image_size)

    started = time.perf_counter()
    run = training.start_run("train_transfer", section, params.seed, params.distribution, image_size)
    net = build_networks(section, len(class_names), image_size, input_size)
    data = Data(run, section, params.seed, len(class_names), train_set, val_set)
    print(f"train_transfer: {section.base} at {input_size} px ({section.weights} weights),"
          f" {len(data.train_labels)} training and {len(data.val_labels)} validation images,"
          f" {len(class_names)} classes")
    log = training.TrainingLog(REPORT_DIR, title=f"transfer ({section.base})")
    best = training.KeepBest(section.monitor)

    timings = data.cache_below_fine_tuning(net) if net.fine_tune and section.fine_tune.cached_copies else {}
    if not run.state.skips("head"):
        timings |= train_head(run, section, net, data, log, best)
    if net.fine_tune:
        timings |= fine_tune(run, section, net, data, log, best)
    log.finish()

    seconds = time.perf_counter() - started
    card = training.model_card(NAME, class_names, params.resize, image_size, best.best_logs["val_accuracy"],
                               base=section.base, input_size=input_size, best_epoch=best.best_epoch,
                               trained_on=run.device)
    classifier, card = calibrate(net.classifier, card, data.run.batches(data.val_pixels, batch_size=64),
                                 data.val_labels, params.predict_new.target_coverage)
    training.save_trained_model(classifier, NAME, card)
    metrics = training.write_training_metrics(REPORT_DIR / "train.json", best, seconds,
                                              images_seen=len(data.train_labels) * best.epochs_seen,
                                              parameters=int(net.classifier.count_params()), trained_on=run.device,
                                              **timings, **flops.transfer_flops(section, net.base, net.head,
                                                                                net.classifier, log,
                                                                                len(data.train_labels),
                                                                                len(data.val_labels)))
    run.state.finish()
    print(f"train_transfer: best {section.monitor} {best.best_value:.4f} (val accuracy"
          f" {best.best_logs['val_accuracy']:.4f}) at epoch {best.best_epoch}/{best.epochs_seen};"
          f" {metrics['train_seconds']:.0f} s; saved models/{NAME}.keras")


def build_networks(section, num_classes: int, image_size: int, input_size: int) -> SimpleNamespace:
    """The frozen base, the new head and the saved classifier (pixels → base → head), which share layers."""
    from imgcls import transfer

    base = transfer.build_base(section.base, input_size, section.weights)
    base.trainable = False
    head = transfer.build_head(base.output_shape[-1], num_classes, section.dense_units, section.dropout)
    classifier = transfer.build_classifier(section.base, base, head, image_size, input_size)
    fine_tune = section.fine_tune.epochs > 0
    first = transfer.first_trainable_layer(base, section.fine_tune.unfreeze) if fine_tune else len(base.layers)
    return SimpleNamespace(base=base, head=head, classifier=classifier, fine_tune=fine_tune, first_trainable=first,
                           image_size=image_size, input_size=input_size, top=None)


class Data:
    """The training and validation images, and what is computed once from them: the frozen layers' outputs."""

    def __init__(self, run, section, seed: int, num_classes: int, train_set, val_set):
        from imgcls import training

        self.run, self.section, self.seed, self.num_classes = run, section, seed, num_classes
        (self.train_pixels, self.train_labels), (self.val_pixels, self.val_labels) = train_set, val_set
        self.class_weights = training.class_weights(self.train_labels, num_classes, section.class_weight)
        self.train_versions = self.val_versions = None  # activations below the fine-tuned layers, once cached

    def batches(self, train_inputs, val_inputs, seed: int, kind=None):
        """(training batches, validation batches) of the given inputs (pixels, features or cached activations)."""
        run, section = self.run, self.section
        train = run.batches(train_inputs, self.train_labels, self.num_classes, section.batch_size, kind=kind,
                            shuffle=True, seed=seed, class_weights=self.class_weights)
        return train, run.batches(val_inputs, self.val_labels, self.num_classes, 64, kind=kind)

    def cache_below_fine_tuning(self, net) -> dict:
        """The layers below the fine-tuned ones stay frozen: their output for each image, and for a few
        augmented copies of it, is computed once; phase 2 then runs only the top of the base."""
        from imgcls import transfer

        clock = time.perf_counter()
        section, replicas = self.section, self.run.replicas
        bottom, net.top = transfer.split_base(net.base, net.first_trainable)
        below = transfer.bottom_extractor(section.base, bottom, net.image_size, net.input_size)
        self.train_versions = [transfer.as_list(transfer.compute_features(below, self.train_pixels,
                                                                          replicas=replicas))]
        if not transfer.augmentation_is_off(section.fine_tune.augment):
            for copy in range(section.fine_tune.cached_copies):
                augment = transfer.augmented_copy(section.fine_tune.augment, self.seed + 100 + copy)
                self.train_versions.append(transfer.as_list(
                    transfer.compute_features(below, self.train_pixels, transform=augment, replicas=replicas)))
        self.val_versions = [transfer.as_list(transfer.compute_features(below, self.val_pixels, replicas=replicas))]
        seconds = round(time.perf_counter() - clock, 2)
        print(f"train_transfer: activations below layer {net.base.layers[net.first_trainable].name} of"
              f" {len(self.train_pixels)} training images ({len(self.train_versions) - 1} augmented copies each)"
              f" and {len(self.val_pixels)} validation images computed once in {seconds:.1f} s")
        return {"cache_seconds": seconds}

    def pooled_features(self, net) -> tuple:
        """The frozen base's pooled features of every image (phase 1 without augmentation trains on these)."""
        from imgcls import transfer

        replicas = self.run.replicas
        if self.train_versions is not None:  # from the cached activations: only the top of the base runs
            extractor = transfer.pooled_top(net.top)
            return (transfer.compute_features(extractor, self.train_versions[0], replicas=replicas),
                    transfer.compute_features(extractor, self.val_versions[0], replicas=replicas))
        extractor = transfer.feature_extractor(self.section.base, net.base, net.image_size, net.input_size)
        return (transfer.compute_features(extractor, self.train_pixels, replicas=replicas),
                transfer.compute_features(extractor, self.val_pixels, replicas=replicas))


def compile_phase(model, section, phase, steps_per_epoch: int) -> None:
    from imgcls import training

    optimizer = training.build_optimizer("adam", phase.learning_rate, section.schedule, phase.epochs, steps_per_epoch)
    training.compile_classifier(model, optimizer, section.label_smoothing)


def train_head(run, section, net, data, log, best) -> dict:
    """Phase 1: the head alone on the frozen base. Without augmentation the base's features never change,
    so they are computed once and each epoch costs milliseconds instead of a pass of the base."""
    import keras

    from imgcls import training, transfer

    timings = {}
    if transfer.augmentation_is_off(section.head.augment):
        clock = time.perf_counter()
        train_features, val_features = data.pooled_features(net)
        timings["feature_seconds"] = round(time.perf_counter() - clock, 2)
        print(f"train_transfer: features of {len(train_features) + len(val_features)} images computed once"
              f" in {timings['feature_seconds']:.1f} s")
        # A model around the head, so that the head nested in the saved classifier is never compiled
        # (a compiled layer would carry its loss and optimizer into models/transfer.keras).
        features = keras.Input(net.head.input_shape[1:], name="features")
        model = keras.Model(features, net.head(features), name="head_on_features")
        train, val = data.batches(train_features, val_features, data.seed)
    else:
        model = transfer.with_augmentation(net.classifier, section.head.augment, data.seed, net.image_size)
        train, val = data.batches(data.train_pixels, data.val_pixels, data.seed)
    compile_phase(model, section, section.head, len(train))
    seconds = training.train_phase(model, train, val, section.head.epochs, log, best, state=run.state, phase="head")
    best.restore(model)  # the head (and so the classifier) now holds phase 1's best weights
    return timings | {"head_seconds": round(seconds, 2)}


def fine_tune(run, section, net, data, log, best) -> dict:
    """Phase 2: the top of the base unfrozen, with the head, at a lower learning rate (BatchNorm stays frozen)."""
    from imgcls import training, transfer

    trainable = transfer.unfreeze_top(net.base, section.fine_tune.unfreeze)
    if data.train_versions is not None:
        model = transfer.top_classifier(net.top, net.head)
        train, val = data.batches(data.train_versions, data.val_versions, data.seed + 100, kind=transfer.CachedBatches)
    else:
        model = transfer.with_augmentation(net.classifier, section.fine_tune.augment, data.seed + 100, net.image_size)
        train, val = data.batches(data.train_pixels, data.val_pixels, data.seed)
    # The best weights so far (phase 1's) expressed as this model's weights, so that
    # restoring after phase 2 falls back to them when fine-tuning never did better.
    best.weights = [weight.copy() for weight in model.get_weights()]
    compile_phase(model, section, section.fine_tune, len(train))
    print(f"train_transfer: fine-tuning {trainable} layers of {section.base} ({len(net.base.layers)} in all)"
          + (", on cached activations" if data.train_versions is not None else ", on images"))
    seconds = training.train_phase(model, train, val, section.fine_tune.epochs, log, best, section.fine_tune.patience,
                                   run.state, phase="fine-tune")
    best.restore(model)
    return {"fine_tune_seconds": round(seconds, 2)}


if __name__ == "__main__":
    run_stage(main)
