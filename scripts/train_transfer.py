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

from imgcls.dataset import REPORTS_DIR, load_training_data
from imgcls.errors import run_stage
from imgcls.params import load_params

NAME = "transfer"
REPORT_DIR = REPORTS_DIR / NAME


def main() -> None:
    params = load_params()
    section = params.train_transfer
    # Check the base and its input size before loading any data or Keras.
    from imgcls import transfer

    input_size = transfer.resolve_input_size(section.base, section.input_size)
    transfer.check_weights_setting(section.base, section.weights)
    image_size = params.resize.array_size(input_size)
    class_names, (train_pixels, train_labels), (val_pixels, val_labels) = load_training_data(image_size)

    import keras

    from imgcls import flops, training

    started = time.perf_counter()
    training.seed_everything(params.seed)
    num_classes = len(class_names)
    base = transfer.build_base(section.base, input_size, section.weights)
    base.trainable = False
    head = transfer.build_head(base.output_shape[-1], num_classes, section.dense_units, section.dropout)
    classifier = transfer.build_classifier(section.base, base, head, image_size, input_size)
    weights = training.class_weights(train_labels, num_classes, section.class_weight)

    def batches(inputs, labels, shuffle):
        return training.ImageBatches(inputs, labels, num_classes, section.batch_size if shuffle else 64,
                                     shuffle=shuffle, seed=params.seed, class_weights=weights if shuffle else None)

    def compile_for(model, phase):
        steps = -(-len(train_labels) // section.batch_size)
        optimizer = training.build_optimizer("adam", phase.learning_rate, section.schedule, phase.epochs, steps)
        training.compile_classifier(model, optimizer, section.label_smoothing)

    print(f"train_transfer: {section.base} at {input_size} px ({section.weights} weights),"
          f" {len(train_labels)} training and {len(val_labels)} validation images, {num_classes} classes,"
          f" backend {keras.backend.backend()}")
    log = training.TrainingLog(REPORT_DIR, title=f"transfer ({section.base})")
    best = training.KeepBest(section.monitor)
    timings = {}

    fine_tune = section.fine_tune.epochs > 0
    first = transfer.first_trainable_layer(base, section.fine_tune.unfreeze) if fine_tune else len(base.layers)
    cache_phase1 = transfer.augmentation_is_off(section.head.augment)
    cache_phase2 = fine_tune and section.fine_tune.cached_copies > 0
    if cache_phase2:
        # The layers below the fine-tuned ones stay frozen: their output for each image and for
        # a few augmented copies of it is computed once; phase 2 then runs only the top of the base.
        bottom, top = transfer.split_base(base, first)
        clock = time.perf_counter()
        below = transfer.bottom_extractor(section.base, bottom, image_size, input_size)
        train_versions = [transfer.as_list(transfer.compute_features(below, train_pixels))]
        if not transfer.augmentation_is_off(section.fine_tune.augment):
            for copy in range(section.fine_tune.cached_copies):
                augment = transfer.augmented_copy(section.fine_tune.augment, params.seed + 100 + copy)
                train_versions.append(transfer.as_list(transfer.compute_features(below, train_pixels, transform=augment)))
        val_versions = [transfer.as_list(transfer.compute_features(below, val_pixels))]
        top_model = transfer.top_classifier(top, head)
        timings["cache_seconds"] = round(time.perf_counter() - clock, 2)
        print(f"train_transfer: activations below layer {base.layers[first].name} of {len(train_pixels)} training"
              f" images ({len(train_versions) - 1} augmented copies each) and {len(val_pixels)} validation images"
              f" computed once in {timings['cache_seconds']:.1f} s")

    # Phase 1: the head on the frozen base.
    log.start_phase("head")
    if cache_phase1:
        clock = time.perf_counter()
        if cache_phase2:
            pooled = transfer.pooled_top(top)
            train_features = transfer.compute_features(pooled, train_versions[0])
            val_features = transfer.compute_features(pooled, val_versions[0])
        else:
            extractor = transfer.feature_extractor(section.base, base, image_size, input_size)
            train_features = transfer.compute_features(extractor, train_pixels)
            val_features = transfer.compute_features(extractor, val_pixels)
        timings["feature_seconds"] = round(time.perf_counter() - clock, 2)
        print(f"train_transfer: features of {len(train_features) + len(val_features)} images computed once"
              f" in {timings['feature_seconds']:.1f} s")
        phase1_model = head
        train, val = batches(train_features, train_labels, True), batches(val_features, val_labels, False)
    else:
        phase1_model = transfer.with_augmentation(classifier, section.head.augment, params.seed, image_size)
        train, val = batches(train_pixels, train_labels, True), batches(val_pixels, val_labels, False)
    compile_for(phase1_model, section.head)
    timings["head_seconds"] = round(training.train_phase(phase1_model, train, val, section.head.epochs, log, best), 2)
    best.restore(phase1_model)  # the head (and so the classifier) now holds phase 1's best weights

    # Phase 2: fine-tune the top of the base with the head.
    if fine_tune:
        trainable = transfer.unfreeze_top(base, section.fine_tune.unfreeze)
        if cache_phase2:
            fine_tune_model = top_model
            train = transfer.CachedBatches(train_versions, train_labels, num_classes, section.batch_size, shuffle=True,
                                           seed=params.seed + 100, class_weights=weights)
            val = transfer.CachedBatches(val_versions, val_labels, num_classes, 64)
        else:
            fine_tune_model = transfer.with_augmentation(classifier, section.fine_tune.augment, params.seed + 100,
                                                         image_size)
            train, val = batches(train_pixels, train_labels, True), batches(val_pixels, val_labels, False)
        # The best weights so far (phase 1's) expressed as this model's weights, so that
        # restoring after phase 2 falls back to them when fine-tuning never did better.
        best.weights = [weight.copy() for weight in fine_tune_model.get_weights()]
        compile_for(fine_tune_model, section.fine_tune)
        print(f"train_transfer: fine-tuning {trainable} layers of {section.base} ({len(base.layers)} in all)"
              + (", on cached activations" if cache_phase2 else ", on images"))
        log.start_phase("fine-tune")
        timings["fine_tune_seconds"] = round(training.train_phase(fine_tune_model, train, val, section.fine_tune.epochs,
                                                                  log, best, section.fine_tune.patience), 2)
        best.restore(fine_tune_model)
    log.finish()

    seconds = time.perf_counter() - started
    card = training.model_card(NAME, class_names, params.resize, image_size, best.best_logs["val_accuracy"],
                               base=section.base, input_size=input_size, best_epoch=best.best_epoch)
    training.save_trained_model(classifier, NAME, card)
    metrics = training.write_training_metrics(REPORT_DIR / "train.json", best, seconds,
                                              images_seen=len(train_labels) * best.epochs_seen,
                                              parameters=int(classifier.count_params()), **timings,
                                              **flops.transfer_flops(section, base, head, classifier, log,
                                                                     len(train_labels), len(val_labels)))
    print(f"train_transfer: best {section.monitor} {best.best_value:.4f} (val accuracy"
          f" {best.best_logs['val_accuracy']:.4f}) at epoch {best.best_epoch}/{best.epochs_seen};"
          f" {metrics['train_seconds']:.0f} s; saved models/{NAME}.keras")


if __name__ == "__main__":
    run_stage(main)
