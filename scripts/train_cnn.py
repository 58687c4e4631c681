"""Stage `train_cnn`: train the CNN from scratch and keep its best epoch as models/cnn.keras.

The architecture, augmentation, optimizer and schedule all come from the
train_cnn section of params.yaml (see imgcls/cnn.py). The epoch with the best
validation score is kept; curves go to reports/cnn/ (DVCLive plots data,
history.csv, training.png) and the training summary to reports/cnn/train.json.
"""

from imgcls import device
from imgcls.dataset import REPORTS_DIR, load_training_data
from imgcls.errors import run_stage
from imgcls.params import load_params

NAME = "cnn"
REPORT_DIR = REPORTS_DIR / NAME


def main() -> None:
    params = load_params()
    section = params.train_cnn
    image_size = params.resize.array_size(section.input_size)
    class_names, (train_pixels, train_labels), (val_pixels, val_labels) = load_training_data(image_size)
    # Keras is imported only now, so a bad params.yaml fails in a fraction of a second.
    device.choose_backend()
    from imgcls import batches, callbacks, flops, modelio, optim, training
    from imgcls.calibration import calibrate
    from imgcls.cnn import batch_norm_bias_rates, build_cnn, with_test_time_augmentation

    run = training.start_run("train_cnn", section, params.seed, params.distribution, image_size)
    num_classes = len(class_names)
    weights = batches.class_weights(train_labels, num_classes, section.class_weight)
    train = run.batches(train_pixels, train_labels, num_classes, section.batch_size, shuffle=True, seed=params.seed,
                        class_weights=weights, kind=batches.AlternatingFlips if section.alternate_flips else None)
    val = run.batches(val_pixels, val_labels, num_classes, batch_size=max(section.batch_size, 64))

    model = build_cnn(num_classes, image_size, section, params.seed, train_images=train_pixels)
    optimizer = optim.build_optimizer(section.optimizer, section.learning_rate, section.schedule, section.epochs,
                                      len(train), section.warmup_epochs, section.weight_decay,
                                      batch_norm_bias_rates(model, section.batch_norm_bias_lr_scale),
                                      section.ema_momentum, section.ema_every, section.ema_ramp,
                                      section.schedule_start, section.schedule_end, section.weight_decay_biases)
    training.compile_classifier(model, optimizer, section.label_smoothing, section.jit_compile)
    print(f"train_cnn: {model.count_params():,} parameters, {len(train_labels)} training and {len(val_labels)}"
          f" validation images, {num_classes} classes")

    log = callbacks.TrainingLog(REPORT_DIR, title="CNN")
    best = callbacks.KeepBest(section.monitor)
    seconds = training.train_phase(model, train, val, section.epochs, log, best, section.patience, run.state)
    best.restore(model)
    log.finish()

    trained, val_accuracy = model, best.best_logs["val_accuracy"]
    if section.test_time_flip or section.test_time_shift:
        # Training is unchanged; the saved model also looks at each photo's mirror image and/or shifted copies.
        # (An uncompiled copy: a compiled model nested in the saved one would drag its optimizer along.)
        model = with_test_time_augmentation(modelio.uncompiled_copy(trained), section.test_time_flip,
                                            section.test_time_shift)
        val_accuracy = float((batches.predict(model, val).argmax(axis=1) == val_labels).mean())
        print(f"train_cnn: validation accuracy {best.best_logs['val_accuracy']:.4f}, {val_accuracy:.4f} averaged"
              " over the test-time versions of each image")
    card = training.model_card(NAME, class_names, params.resize, image_size, val_accuracy,
                               input_size=section.input_size, best_epoch=best.best_epoch,
                               test_time_flip=section.test_time_flip, test_time_shift=section.test_time_shift,
                               trained_on=run.device)
    model, card = calibrate(model, card, val, val_labels, params.predict_new.target_coverage)
    modelio.save_trained_model(model, NAME, card)
    metrics = training.write_training_metrics(REPORT_DIR / "train.json", best, seconds,
                                              images_seen=best.epochs_seen * len(train_labels),
                                              parameters=int(trained.count_params()), trained_on=run.device,
                                              **flops.cnn_flops(trained, model, len(train_labels), len(val_labels),
                                                                best.epochs_seen))
    run.state.finish()
    print(f"train_cnn: best {section.monitor} {best.best_value:.4f} at epoch {best.best_epoch}/{best.epochs_seen};"
          f" {metrics['train_seconds']:.0f} s, {metrics['images_per_second']} images/s; saved models/{NAME}.keras")


if __name__ == "__main__":
    run_stage(main)
