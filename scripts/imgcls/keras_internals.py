"""Every use of a private Keras name, in one place: what a Keras upgrade may break.

The rest of the project uses public `keras.*` APIs only. What follows reaches
inside Keras where no public API gives what is needed; above each use, one
line says why. tests/test_keras_internals.py checks each of them against the
installed Keras and fails with a message naming what changed, so an upgrade
that breaks one stops there rather than quietly changing a result.
"""

import keras
# No public API tells which calls (nodes) of a layer belong to a model's graph: a Functional keys them so.
from keras.src.ops.function import make_node_key


def calls_in_graph(model) -> list[tuple[object, list[tuple[list, list]]]]:
    """[(layer, [(input tensors, output tensors) of each of its calls in `model`])] for each of `model`'s layers.

    A layer called several times in `model` has several calls (nodes); a layer
    shared with another model also has that model's calls, which are left out.
    A subclassed model has no graph: then every call of its layers counts.
    """
    # A built Sequential keeps its graph in a private Functional; no public attribute exposes it.
    graph = getattr(model, "_functional", None) or model
    # A Functional's set of node keys is private; only it separates this model's calls from other models'.
    in_graph = getattr(graph, "_nodes", None)
    # A layer's calls (its inbound nodes, each with its input and output tensors) have no public accessor.
    return [(layer, [(node.input_tensors, node.output_tensors) for index, node in enumerate(layer._inbound_nodes)
                     if in_graph is None or make_node_key(layer, index) in in_graph])
            for layer in model.layers]


def variable_index(optimizer, variable) -> int:
    """The position of a trainable `variable` in `optimizer`'s own variable lists."""
    # update_step is handed a variable, not its index; the optimizer's lookup of the index is private.
    return optimizer._get_variable_index(variable)


def weight_averages(optimizer) -> list:
    """The optimizer's moving averages of the trainable variables (use_ema), in their order."""
    # The averages that use_ema keeps are stored under a private name; no public property returns them.
    return optimizer._model_variables_moving_average


class MovingAverageUpdate:
    """Optimizer mixin: each step's update of the weight average (use_ema) is `update_weight_averages`.

    A subclass defines update_weight_averages(trainable_variables, averages).
    """

    # Keras updates the average in this private method and offers no public hook to change how.
    def _update_model_variables_moving_average(self, trainable_variables):
        if self.use_ema:
            self.update_weight_averages(trainable_variables, weight_averages(self))


def set_averaged_weights_in_model(callback: keras.callbacks.SwapEMAWeights) -> None:
    """Tell SwapEMAWeights that the averaged weights are in the model now (a resumed run put them there)."""
    # SwapEMAWeights keeps which weights the model holds in a private flag, and has no public way to set it.
    callback._ema_weights_in_model = True


def allow_jit(layer) -> None:
    """Let Keras compile the steps of a model holding `layer` (see device.compile_on_jax)."""
    # Keras reads this undocumented layer attribute to decide whether a model can be compiled; no public API sets it.
    layer.supports_jit = True


class RelativeEarlyStopping(keras.callbacks.EarlyStopping):
    """EarlyStopping that counts a new score as progress only when it beats the best by `share` of the best
    (and by min_delta at least): a loss near 0.55 must fall by 0.0055 at share 0.01. With
    `accuracy_progress`, a validation accuracy higher than any before is progress too, whatever the score."""

    def __init__(self, share: float, accuracy_progress: bool = False, **options):
        super().__init__(**options)
        self.share, self.accuracy_progress = share, accuracy_progress
        self.best_accuracy = -1.0  # below any accuracy: the first epoch's is progress

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.best_accuracy = -1.0

    def on_epoch_end(self, epoch, logs=None):
        accuracy = (logs or {}).get("val_accuracy")
        if self.accuracy_progress and accuracy is not None and accuracy > self.best_accuracy:
            self.best_accuracy = float(accuracy)
            # EarlyStopping adds one to its count of epochs without progress before it compares the count
            # with the patience; from -1 the count is 0 after this epoch, as after any progress.
            self.wait = -1
        super().on_epoch_end(epoch, logs)

    def _is_improvement(self, monitor_value, reference_value):
        # EarlyStopping compares every epoch through this undocumented method, with a fixed min_delta;
        # overriding it is the only way to make the margin follow the score.
        if reference_value is None:
            return True
        margin = max(abs(self.min_delta), self.share * abs(float(reference_value)))
        if self.monitor_op == keras.ops.less:
            return bool(monitor_value + margin < reference_value)
        return bool(monitor_value - margin > reference_value)


# The counts EarlyStopping and ReduceLROnPlateau keep between epochs. Neither exposes public state to
# save; these undocumented attributes are their whole count.
COUNTS = {keras.callbacks.EarlyStopping: ("wait", "best", "best_epoch"),
          RelativeEarlyStopping: ("wait", "best", "best_epoch", "best_accuracy"),
          keras.callbacks.ReduceLROnPlateau: ("wait", "best", "cooldown_counter")}


def counts(callback) -> dict:
    """What an EarlyStopping or ReduceLROnPlateau counts between epochs: epochs without improvement, the best value."""
    names = COUNTS[type(callback)]
    return {name: (float if name in ("best", "best_accuracy") else int)(getattr(callback, name)) for name in names}


def restore_counts(callback, state: dict) -> None:
    """Put back `counts`, after fit's on_train_begin has reset them."""
    # Neither callback has a public way to carry its count over into another fit; these attributes are that count.
    for key, value in state.items():
        setattr(callback, key, value)


def run_batch_hooks_in_background(callback_class: type) -> type:
    """Mark a callback class whose per-batch hooks may run on Keras' callback thread (class decorator).

    Without the mark, any callback with a per-batch hook makes fit wait for every
    step to finish and copy its loss to the host before the next one starts.
    """
    # Keras reads this undocumented class attribute to keep dispatching steps asynchronously; no public API sets it.
    callback_class.async_safe = True
    return callback_class


def dispatches_asynchronously(callbacks: list) -> bool:
    """Whether fit with these callbacks dispatches training steps without waiting on the host after each one."""
    # The decision is a private flag of the CallbackList that fit builds; no public API reports it.
    return bool(keras.callbacks.CallbackList(callbacks)._async_train)
