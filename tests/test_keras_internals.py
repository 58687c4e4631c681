"""Each private Keras name the project relies on (imgcls/keras_internals.py), checked against the installed Keras.

A Keras upgrade that renames, removes or changes one of them fails here, with
a message naming it, instead of quietly changing a FLOP count, a learning
rate, the averaged weights or a resumed run.
"""

import inspect
import subprocess
import sys

import keras
import numpy as np
import pytest

from conftest import REPO, stage_env
from imgcls import keras_internals

VERSION = f"Keras {keras.__version__}"


def require(owner, name: str, used_by: str) -> None:
    if not hasattr(owner, name):
        where = owner.__name__ if isinstance(owner, type) else type(owner).__name__
        pytest.fail(f"{VERSION}: {where}.{name} is gone; keras_internals.{used_by} needs another way to do its job")


def require_parameters(function, expected: list[str], used_by: str) -> None:
    found = list(inspect.signature(function).parameters)
    if found != expected:
        pytest.fail(f"{VERSION}: {function.__qualname__} now takes {found}, not {expected};"
                    f" check keras_internals.{used_by}")


def test_calls_in_graph_keeps_each_call_of_a_layer_in_the_model_and_no_other_models():
    from keras.src.ops import function

    require(function, "make_node_key", "calls_in_graph")
    require_parameters(function.make_node_key, ["op", "node_index"], "calls_in_graph")
    shared = keras.layers.Dense(3, name="shared")
    inputs = keras.Input((3,))
    twice = keras.Model(inputs, shared(shared(inputs)))
    keras.Model(inputs, shared(inputs))  # another model's call of the same layer
    require(twice, "_nodes", "calls_in_graph")
    require(shared, "_inbound_nodes", "calls_in_graph")
    calls = dict((layer.name, found) for layer, found in keras_internals.calls_in_graph(twice))
    assert len(shared._inbound_nodes) == 3
    assert len(calls["shared"]) == 2, f"{VERSION}: a Functional's calls are no longer told apart by _nodes"
    first_inputs, first_outputs = calls["shared"][0]
    assert [tensor.shape for tensor in first_inputs] == [(None, 3)]
    assert [tensor.shape for tensor in first_outputs] == [(None, 3)]


def test_calls_in_graph_reads_a_sequential_through_its_functional():
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(2)])
    require(model, "_functional", "calls_in_graph")
    assert model._functional is not None, f"{VERSION}: a built Sequential no longer keeps its graph in _functional"
    [(layer, calls)] = keras_internals.calls_in_graph(model)
    assert len(calls) == 1 and calls[0][1][0].shape == (None, 2)


def built_optimizer(**options) -> tuple[keras.optimizers.Optimizer, list]:
    variables = [keras.Variable(np.zeros(size), name=f"weight_{size}") for size in (1, 2, 3)]
    optimizer = keras.optimizers.SGD(0.1, **options)
    optimizer.build(variables)
    return optimizer, variables


def test_variable_index_is_each_variables_position():
    optimizer, variables = built_optimizer()
    require(optimizer, "_get_variable_index", "variable_index")
    require_parameters(optimizer._get_variable_index, ["variable"], "variable_index")
    assert [keras_internals.variable_index(optimizer, variable) for variable in variables] == [0, 1, 2]


def test_the_weight_average_is_updated_through_the_overridden_method():
    base = keras.optimizers.Optimizer
    require(base, "_update_model_variables_moving_average", "MovingAverageUpdate")
    require_parameters(base._update_model_variables_moving_average, ["self", "trainable_variables"],
                       "MovingAverageUpdate")
    seen = []

    class Recording(keras_internals.MovingAverageUpdate, keras.optimizers.SGD):
        def update_weight_averages(self, trainable_variables, averages):
            seen.append((len(trainable_variables), len(averages)))

    variable = keras.Variable(np.zeros(2), name="kernel")
    optimizer = Recording(0.1, use_ema=True, ema_momentum=0.9)
    optimizer.apply([keras.ops.ones(2)], [variable])
    assert seen == [(1, 1)], f"{VERSION}: apply() no longer updates the weight average through the overridden method"
    require(optimizer, "_model_variables_moving_average", "weight_averages")
    averages = keras_internals.weight_averages(optimizer)
    assert len(averages) == 1 and tuple(averages[0].shape) == (2,)


def test_swap_ema_weights_reads_the_flag_that_says_the_average_is_in_the_model():
    callback = keras.callbacks.SwapEMAWeights(swap_on_epoch=True)
    require(callback, "_ema_weights_in_model", "set_averaged_weights_in_model")
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, kernel_initializer="ones")])
    model.compile(optimizer=keras.optimizers.SGD(0.1, use_ema=True), loss="mse")
    model.fit(np.ones((4, 2)), np.zeros((4, 1)), epochs=1, verbose=0)
    callback.set_model(model)
    keras_internals.set_averaged_weights_in_model(callback)
    callback.on_epoch_begin(0)  # swaps the averaged weights out again, and says so
    assert callback._ema_weights_in_model is False, f"{VERSION}: SwapEMAWeights no longer acts on its flag"


def test_random_transforms_still_mark_themselves_not_compilable():
    plain = keras.layers.Dense(1)
    require(plain, "supports_jit", "allow_jit")
    assert plain.supports_jit is True
    for layer in (keras.layers.RandomRotation(0.1), keras.layers.RandomZoom(0.1),
                  keras.layers.RandomTranslation(0.1, 0.1)):
        # When Keras stops marking them, device.compile_on_jax has nothing left to do.
        assert layer.supports_jit is False, f"{VERSION}: {type(layer).__name__} is compilable now"
        keras_internals.allow_jit(layer)
        assert layer.supports_jit is True


def counting_after_two_epochs(callback_class, model, val_losses=(1.0, 2.0)):
    """A fresh EarlyStopping or ReduceLROnPlateau (patience 2) of `model` after one better and one worse epoch."""
    counting = callback_class(monitor="val_loss", mode="min", patience=2, min_delta=0)
    counting.set_model(model)
    counting.on_train_begin()
    for epoch, loss in enumerate(val_losses):
        counting.on_epoch_end(epoch, {"val_loss": loss})
    return counting


@pytest.mark.parametrize("callback_class, names", [
    (keras.callbacks.EarlyStopping, ("wait", "best", "best_epoch")),
    (keras.callbacks.ReduceLROnPlateau, ("wait", "best", "cooldown_counter")),
])
def test_early_stopping_and_the_plateau_cut_carry_their_count_into_another_fit(callback_class, names):
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.1), loss="mse")
    counting = counting_after_two_epochs(callback_class, model)
    for name in names:
        require(counting, name, "counts")
    state = keras_internals.counts(counting)
    assert state == {"wait": 1, "best": 1.0, names[2]: 0}
    resumed = counting_after_two_epochs(callback_class, model, val_losses=())  # fit resets the count...
    keras_internals.restore_counts(resumed, state)  # ... and a resumed run puts it back
    resumed.on_epoch_end(2, {"val_loss": 3.0})  # the second epoch without improvement
    if callback_class is keras.callbacks.EarlyStopping:
        assert model.stop_training, f"{VERSION}: EarlyStopping no longer counts on from wait, best and best_epoch"
        assert keras_internals.counts(resumed) == {"wait": 2, "best": 1.0, "best_epoch": 0}
    else:
        rate = float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
        assert rate == pytest.approx(0.01), f"{VERSION}: ReduceLROnPlateau no longer counts on from wait and best"


ASYNC_SAFE_CHECK = """
import sys
sys.path.insert(0, sys.argv[1])
import keras
from imgcls import keras_internals

class PerBatch(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        pass

marked = keras_internals.run_batch_hooks_in_background(type("Marked", (PerBatch,), {}))
print(keras_internals.dispatches_asynchronously([PerBatch()]), keras_internals.dispatches_asynchronously([marked()]))
"""


def test_a_callback_marked_async_safe_keeps_steps_dispatched_asynchronously():
    # On JAX, in a process of its own: TensorFlow's Keras backend never dispatches callbacks asynchronously.
    result = subprocess.run([sys.executable, "-c", ASYNC_SAFE_CHECK, str(REPO / "scripts")], capture_output=True,
                            text=True, env={**stage_env(), "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr
    plain, marked = result.stdout.split()[-2:]
    if plain != "False":
        pytest.fail(f"{VERSION}: a per-batch hook no longer turns asynchronous dispatch off, or CallbackList's"
                    " _async_train flag changed meaning; check keras_internals.dispatches_asynchronously")
    if marked != "True":
        pytest.fail(f"{VERSION}: CallbackList ignores a callback's async_safe attribute now;"
                    " keras_internals.run_batch_hooks_in_background needs another way")
