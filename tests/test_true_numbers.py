"""True numbers: skipped (non-finite) steps never show as a loss of 0.0, and `NonFiniteError` says what is true of the
parameters."""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import finetune as ft
from finetune import NonFiniteError
from finetune.callbacks import EarlyStopping
from tests.tiny import TinyClassifier, blobs, params_of


def _model(**recipe):
    model = ft.Model(TinyClassifier(), task="text-classification")
    model.compile(optimizer=recipe.pop("optimizer", "adamw"), **{"learning_rate": 1e-2, **recipe})
    return model


def _batches(x, y, size=16):
    return [{"x": x[i : i + size], "labels": y[i : i + size]} for i in range(0, len(x), size)]


def test_F01_an_epoch_whose_steps_were_all_skipped_reports_nan_and_a_warning_naming_the_steps(capfd):
    x, y = blobs(64)
    model = _model(max_nonfinite=1000, log_every=2, metrics=["accuracy", "f1"])
    with pytest.warns(RuntimeWarning) as caught:
        history = model.fit((np.full_like(x, np.nan), y), epochs=1, batch_size=16, verbose=1)
    assert len(history.history["loss"]) == 1 and math.isnan(history.history["loss"][0])
    assert math.isnan(history.history["accuracy"][0]) and math.isnan(history.history["f1"][0])
    assert history.history["skipped_steps"] == [4]
    assert [s["step"] for s in history.steps] == [2, 4]
    assert all(math.isnan(s["loss"]) for s in history.steps) and [s["skipped_steps"] for s in history.steps] == [2, 2]
    messages = [str(w.message) for w in caught]
    assert any("steps 1-2" in m and "all 2 steps" in m and "NaN" in m for m in messages), messages
    assert any("steps 3-4" in m for m in messages), messages
    assert any(m.startswith("Epoch 1 of steps 1-4") for m in messages), messages
    progress = capfd.readouterr().err
    assert "loss=nan" in progress and "loss=0" not in progress


def test_F01_a_mixed_interval_averages_only_its_finite_steps_and_counts_the_skipped_one():
    x, y = blobs(64)
    bad = x.copy()
    bad[16:32] = np.nan  # step 2 of 4
    reference = _model(max_nonfinite=1000, log_every=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # step 2 alone is an interval whose only step is skipped
        single = reference.fit(_batches(bad, y), epochs=1, batch_size=16, verbose=0).steps
    model = _model(max_nonfinite=1000, log_every=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(_batches(bad, y), epochs=1, batch_size=16, verbose=0)
    assert not [w for w in caught if "skipped" in str(w.message)]  # no interval was all skipped
    assert [s["skipped_steps"] for s in history.steps] == [1, 0] and history.history["skipped_steps"] == [1]
    assert math.isnan(single[1]["loss"])
    assert history.steps[0]["loss"] == pytest.approx(single[0]["loss"], rel=1e-6)  # step 1 alone, not halved
    assert history.steps[1]["loss"] == pytest.approx((single[2]["loss"] + single[3]["loss"]) / 2, rel=1e-5)
    finite = [single[0]["loss"], single[2]["loss"], single[3]["loss"]]
    assert history.history["loss"][0] == pytest.approx(sum(finite) / 3, rel=1e-5)


def _loss_with_nan_gradients(logits, labels):
    """Cross-entropy plus sqrt(0 * sum(logits)): the loss is finite, its gradient NaN (0 * inf)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels) + jnp.sqrt(0.0 * jnp.sum(logits))


def test_F01_a_step_skipped_for_its_gradients_alone_is_not_measured_either():
    x, y = blobs(32)
    model = _model(max_nonfinite=1000, log_every=2, loss=_loss_with_nan_gradients)
    with pytest.warns(RuntimeWarning, match="steps 1-2: all 2 steps"):
        history = model.fit((x, y), epochs=1, batch_size=16, verbose=0)
    assert math.isnan(history.steps[0]["loss"]) and history.steps[0]["skipped_steps"] == 2
    assert math.isnan(history.history["loss"][0])


def test_K06_nonfinite_error_says_the_parameters_are_finite_and_which_step_they_are_from():
    x, y = blobs(64)
    bad = x.copy()
    bad[32:] = np.nan  # steps 3 and 4
    model = _model(max_nonfinite=2, log_every=1)
    with pytest.raises(NonFiniteError) as info:
        model.fit(_batches(bad, y), epochs=1, batch_size=16, verbose=0)
    message = str(info.value)
    assert "2 consecutive steps" in message and "`max_nonfinite`=2" in message
    assert "The parameters are finite: they are those after step 2, the last step applied" in message
    assert "NOT finite" not in message and "learning_rate" in message
    two_steps = _model(max_nonfinite=2, log_every=1)
    two_steps.fit(_batches(x[:32], y[:32]), epochs=1, batch_size=16, verbose=0)
    after, expected = params_of(model), params_of(two_steps)
    for path in expected:  # what the message states is what the model holds
        np.testing.assert_array_equal(after[path], expected[path], err_msg=path)


def _nan_updates() -> optax.GradientTransformation:
    """An optimizer whose update is NaN for a finite gradient (what a NaN learning rate does)."""
    return optax.GradientTransformation(
        lambda params: optax.EmptyState(), lambda g, state, params=None: (jax.tree.map(lambda u: u * jnp.nan, g), state)
    )


def test_K06_nonfinite_error_says_the_parameters_are_not_finite_when_an_update_made_them_so():
    x, y = blobs(64)
    model = _model(optimizer=_nan_updates(), max_nonfinite=2, log_every=1)
    with pytest.raises(NonFiniteError) as info:
        model.fit((x, y), epochs=1, batch_size=16, verbose=0)
    message = str(info.value)
    assert "The parameters are NOT finite" in message and "since step 1 or earlier" in message
    assert "are those of the last finite step" not in message and "are finite" not in message
    assert "`learning_rate`" in message and "`weight_decay`" in message
    assert not all(np.isfinite(v).all() for v in params_of(model).values())  # the statement is the truth


def test_early_stopping_never_counts_an_epoch_that_measured_nothing_as_the_best():
    stop = EarlyStopping("loss", patience=5)
    stop.on_epoch_end(0, {"loss": float("nan")})
    stop.on_epoch_end(1, {"loss": 0.7})
    assert stop.best == 0.7 and stop.best_epoch == 1
