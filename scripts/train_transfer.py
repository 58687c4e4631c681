"""Stage `train_transfer`: a pretrained ImageNet base with a new head, saved as models/transfer.keras.

Phase 1 fits the head on the frozen base's pooled features, computed once per
image: by default the linear probe (a logistic regression fitted with L-BFGS,
its regularisation chosen on validation). Phase 2 (optional) unfreezes the top
of the base and fine-tunes it together with the head at a lower learning rate,
with augmentation, until validation stops improving; BatchNormalization
layers stay frozen and in inference mode, so their ImageNet statistics are
not overwritten by small, augmented batches. The layers below the unfrozen
ones are still frozen, so by default their output is computed once for each
image and a few augmented copies of it (fine_tune.cached_copies), and each
epoch runs only the top of the base. The epoch with the best validation
score is kept, and the linear probe replaces it when it scores better on
validation (probe_candidate), or the average of the two when it beats both, or
ties them when they tie (ensemble_candidate); the card says which won. With
test_time on, the saved model averages its predictions over each photo's
mirror image and/or shifted copies, and the candidates are compared that way
too. Curves go to
reports/transfer/ (DVCLive plots data, history.csv, training.png with the
phase boundary) and the training summary to reports/transfer/train.json.
The networks are built in imgcls/transfer.py, the phases run in
imgcls/transfer_training.py.
"""

import time

from imgcls import device
from imgcls.dataset import REPORTS_DIR, load_training_data
from imgcls.errors import run_stage
from imgcls.params import load_params

NAME = "transfer"
REPORT_DIR = REPORTS_DIR / NAME


def main() -> None:
    params = load_params()
    section = params.train_transfer
    # Keras is imported only now, with the backend chosen, so a bad params.yaml fails in a fraction of a second.
    device.choose_backend()
    from imgcls import callbacks, flops, modelio, training, transfer, transfer_training
    from imgcls.calibration import calibrate

    # Check the base and its input size before loading any data.
    input_size = transfer.resolve_input_size(section.base, section.input_size)
    transfer.check_weights_setting(section.base, section.weights)
    image_size = params.resize.array_size(input_size)
    class_names, train_set, val_set = load_training_data(image_size, "train_transfer")

    started = time.perf_counter()
    run = training.start_run("train_transfer", section, params.seed, params.distribution, image_size)
    net = transfer.build_networks(section, len(class_names), image_size, input_size)
    data = transfer_training.Data.prepare(run, section, params.seed, len(class_names), train_set, val_set)
    log = callbacks.TrainingLog(REPORT_DIR, title=f"transfer ({section.base})")
    best = callbacks.KeepBest(section.monitor)
    timings, probe = transfer_training.train_phases(net, data, log, best)
    log.finish()
    choice = transfer_training.choose_model(net, data, best, probe)

    seconds = time.perf_counter() - started
    card = training.model_card(NAME, class_names, params.resize, image_size, choice.val_accuracy,
                               base=section.base, input_size=input_size, best_epoch=best.best_epoch,
                               winner=choice.winner, candidates=choice.candidates, trained_on=run.device,
                               test_time_flip=section.test_time.flip, test_time_shift=section.test_time.shift)
    classifier, card = calibrate(choice.classifier, card, run.batches(data.val_pixels, batch_size=64),
                                 data.val_labels, run.calibration_batches(image_size),
                                 params.predict_new.target_coverage)
    modelio.save_trained_model(classifier, NAME, card)
    metrics = training.write_training_metrics(
        REPORT_DIR / "train.json", best, seconds, images_seen=len(data.train_labels) * best.epochs_seen,
        parameters=int(choice.classifier.count_params()), trained_on=run.device, winner=choice.winner,
        val_accuracy=choice.val_accuracy, **timings,
        **flops.transfer_flops(section, net, log, len(data.train_labels), len(data.val_labels),
                               saved=choice.classifier))
    run.state.finish()
    print(f"train_transfer: saved models/{NAME}.keras, the {transfer_training.CANDIDATE_LABELS[choice.winner]}"
          f" (val accuracy {choice.val_accuracy:.4f}; best epoch {best.best_epoch} of {best.epochs_seen});"
          f" {metrics['train_seconds']:.0f} s")


if __name__ == "__main__":
    run_stage(main)
