"""Stage `train_cnn`: train the CNN from scratch and keep its best epoch as models/cnn.keras.

The network, augmentation, optimizer and schedule all come from the
train_cnn section of params.yaml: its net, augment, optimizer, ema and
test_time sections (see imgcls/cnn.py and imgcls/cnn_training.py). The
epoch with the best validation score is kept; curves go to reports/cnn/
(DVCLive plots data, history.csv, training.png) and the training summary to
reports/cnn/train.json.
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
    class_names, train_set, val_set = load_training_data(image_size, "train_cnn", validation_optional=True)
    # Keras is imported only now, so a bad params.yaml fails in a fraction of a second.
    device.choose_backend()
    from imgcls import callbacks, cnn_training, modelio, training
    from imgcls.calibration import calibrate

    run = training.start_run("train_cnn", section, params.seed, params.distribution, image_size)
    data = cnn_training.Data.prepare(run, section, params.seed, len(class_names), train_set, val_set)
    model = cnn_training.build_and_compile(section, data, image_size, params.seed)

    # Without a validation split (split.val: 0) the last epoch is kept.
    log, best = callbacks.TrainingLog(REPORT_DIR, title="CNN"), cnn_training.keep_best(section, data)
    seconds = training.train_phase(model, data.train, data.val, section.epochs, log, best, section.patience,
                                   run.state, extra_callbacks=cnn_training.lookahead(section, data))
    best.restore(model)
    log.finish()

    saved, val_accuracy = cnn_training.with_test_time_views(model, section.test_time, data, best)
    card = training.model_card(NAME, class_names, params.resize, image_size, val_accuracy,
                               input_size=section.input_size, best_epoch=best.best_epoch,
                               test_time_flip=section.test_time.flip, test_time_shift=section.test_time.shift,
                               trained_on=run.device)
    saved, card = calibrate(saved, card, data.val, data.val_labels, run.calibration_batches(image_size),
                            params.predict_new.target_coverage)
    modelio.save_trained_model(saved, NAME, card)
    metrics = cnn_training.write_metrics(REPORT_DIR / "train.json", model, saved, data, best, seconds, run)
    run.state.finish()
    print(f"train_cnn: kept epoch {best.best_epoch}/{best.epochs_seen} ({section.monitor}"
          f" {best.best_logs.get(section.monitor, float('nan')):.4f});"
          f" {metrics['train_seconds']:.0f} s, {metrics['images_per_second']} images/s; saved models/{NAME}.keras")


if __name__ == "__main__":
    run_stage(main)
