"""The optimizer built from rules: LR multipliers, decay mask, frozen = free, clipping, accumulation, NaN skipping."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import finetune as ft
from finetune import ConfigError, Group, NonFiniteError
from finetune.optim import (
    OptimizerSpec,
    apply_step,
    build,
    clip_by_global_norm,
    current_lrs,
    make_schedule,
    skip_nonfinite,
)
from finetune.params.rules import assign, decay_mask
from tests.tiny import TinyClassifier, blobs, params_of

PARAMS = {
    "backbone": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)},
    "head": {"kernel": jnp.ones((2, 2))},
    "new": {"kernel": jnp.ones((2, 4)), "bias": jnp.ones(4)},
}
RULES = [(r"backbone/.*", "backbone"), (r"head/.*", "head"), (r"new/.*", "new")]


def _tx(groups, **spec):
    flat = {
        "backbone/kernel": PARAMS["backbone"]["kernel"],
        "backbone/bias": PARAMS["backbone"]["bias"],
        "head/kernel": PARAMS["head"]["kernel"],
        "new/kernel": PARAMS["new"]["kernel"],
        "new/bias": PARAMS["new"]["bias"],
    }
    a = assign(list(flat), RULES, groups)
    return build(a, decay_mask(flat), OptimizerSpec(**spec), total_steps=10)


def test_group_updates_scale_with_lr_mult():
    groups = {"backbone": Group(lr_mult=0.1), "head": Group(lr_mult=1.0), "new": Group(lr_mult=10.0)}
    tx, _ = _tx(groups, optimizer="sgd", learning_rate=0.01)
    grads = jax.tree.map(jnp.ones_like, PARAMS)
    updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
    np.testing.assert_allclose(updates["backbone"]["kernel"], -0.001, rtol=1e-6)
    np.testing.assert_allclose(updates["head"]["kernel"], -0.01, rtol=1e-6)
    np.testing.assert_allclose(updates["new"]["bias"], -0.1, rtol=1e-6)


def test_weight_decay_mask_leaves_biases_untouched():
    tx, _ = _tx(None, optimizer="adamw", learning_rate=0.1, weight_decay=0.5)
    zeros = jax.tree.map(jnp.zeros_like, PARAMS)
    updates, _ = tx.update(zeros, tx.init(PARAMS), PARAMS)
    np.testing.assert_allclose(updates["backbone"]["kernel"], -0.05, rtol=1e-6)  # -lr * wd * param
    assert np.all(np.asarray(updates["backbone"]["bias"]) == 0.0)
    assert np.all(np.asarray(updates["new"]["bias"]) == 0.0)


def test_wd_mult_zero_turns_decay_off_for_a_group():
    tx, _ = _tx(
        {"backbone": Group(wd_mult=0.0), "head": Group(), "new": Group()},
        optimizer="adamw",
        learning_rate=0.1,
        weight_decay=0.5,
    )
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, PARAMS), tx.init(PARAMS), PARAMS)
    assert np.all(np.asarray(updates["backbone"]["kernel"]) == 0.0)
    np.testing.assert_allclose(updates["head"]["kernel"], -0.05, rtol=1e-6)


def test_clipping_bounds_the_global_norm():
    tx, _ = _tx(None, optimizer="sgd", learning_rate=1.0, clip_norm=1.0)
    grads = jax.tree.map(lambda p: 100.0 * jnp.ones_like(p), PARAMS)
    updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
    assert float(optax.tree.norm(updates)) == pytest.approx(1.0, rel=1e-5)


def test_each_group_lr_is_logged_from_the_optimizer_state():
    groups = {"backbone": Group(lr_mult=0.1), "head": Group(), "new": Group(lr_mult=10.0)}
    tx, scheds = _tx(groups, optimizer="adamw", learning_rate=1e-3)
    _, state = tx.update(jax.tree.map(jnp.ones_like, PARAMS), tx.init(PARAMS), PARAMS)
    lrs = {k: float(v) for k, v in current_lrs(state).items()}
    assert lrs == pytest.approx({"backbone": 1e-4, "head": 1e-3, "new": 1e-2})


def test_schedules_by_name_with_warmup_fraction():
    s = make_schedule("cosine", learning_rate=1.0, total_steps=100, warmup=0.1)
    assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(0.5) and float(s(10)) == pytest.approx(1.0)
    assert float(s(100)) == pytest.approx(0.0, abs=1e-6)
    lin = make_schedule({"name": "linear", "end_factor": 0.5}, learning_rate=2.0, total_steps=10)
    assert float(lin(10)) == pytest.approx(1.0)
    pw = make_schedule({"name": "piecewise", "boundaries": [0.5], "scales": [0.1]}, learning_rate=1.0, total_steps=10)
    assert float(pw(4)) == 1.0 and float(pw(6)) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"spec": "cosinus"}, "did you mean 'cosine'.*received spec='cosinus'"),
        ({"spec": "linear", "warmup": 200}, "longer than training"),
    ],
)
def test_schedule_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        make_schedule(kwargs.pop("spec"), learning_rate=1.0, total_steps=100, **kwargs)


def test_unknown_optimizer_suggests_the_closest_name():
    with pytest.raises(ConfigError, match="did you mean 'adamw'.*received optimizer='adamww'"):
        _tx(None, optimizer="adamww")


def test_frozen_parameters_are_bit_identical_and_absent_from_optimizer_state():
    x, y = blobs()
    model = ft.Model(TinyClassifier(), task="text-classification")
    before = params_of(model)
    model.compile(optimizer="adamw", learning_rate=1e-2, groups={"backbone": Group(trainable=False)})
    model.fit((x, y), epochs=2, batch_size=16, verbose=0)
    after = params_of(model)
    frozen = [p for p in before if not p.startswith(("head/", "classifier/"))]
    assert frozen and all(np.array_equal(before[p], after[p]) for p in frozen)
    assert not np.array_equal(before["classifier/kernel"], after["classifier/kernel"])
    # The optimizer state holds exactly the trainable parameters: adam's mu has their paths and nothing else.
    state = model.trainer.state
    assert set(jax.tree_util.tree_structure(state["params"]).node_data()[1]) == {"head", "classifier"}
    mus = optax.tree_utils.tree_get_all_with_path(state["opt"], "mu")
    leaves = [leaf for _, mu in mus for leaf in jax.tree.leaves(mu)]
    assert sum(leaf.size for leaf in leaves) == sum(before[p].size for p in before if p not in frozen)


def test_accumulated_micro_batches_equal_one_big_batch():
    x, y = blobs(64)

    def train(batch_size, accumulate):
        model = ft.Model(TinyClassifier(), task="text-classification")
        model.compile(optimizer="sgd", learning_rate=0.1, accumulate=accumulate)
        model.fit((x, y), epochs=1, batch_size=batch_size, verbose=0)
        return params_of(model)

    big, small = train(16, 1), train(8, 2)
    for path in big:
        np.testing.assert_allclose(small[path], big[path], atol=1e-6, err_msg=path)


def test_nan_batch_is_skipped_and_counted():
    x, y = blobs(48)
    bad = x.copy()
    bad[16:32] = np.nan
    model = ft.Model(TinyClassifier(), task="text-classification")
    model.compile(optimizer="adamw", learning_rate=1e-2, log_every=1)
    batches = [{"x": bad[i : i + 16], "labels": y[i : i + 16]} for i in range(0, 48, 16)]
    history = model.fit(batches, epochs=1, batch_size=16, verbose=0)
    assert [s["skipped"] for s in history.steps] == [0, 1, 1]
    assert all(np.isfinite(v).all() for v in params_of(model).values())
    assert np.isfinite(history.history["loss"][0])  # the skipped batch does not poison the metrics


@pytest.mark.parametrize("scale", [0.0, 0.3, 1.0, 7.5, 1e6])
def test_clip_by_global_norm_matches_optax(scale):
    rng = np.random.default_rng(1)
    grads = {"a": rng.normal(size=(5, 3)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}
    grads = jax.tree.map(lambda g: jnp.asarray(g / np.sqrt(2.0 * 19) * scale), grads)  # norm about `scale`
    ours, _ = clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    theirs, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=0)
    if scale < 1.0:  # under the limit: untouched, bit for bit
        assert all(np.array_equal(a, g) for a, g in zip(jax.tree.leaves(ours), jax.tree.leaves(grads), strict=True))
    assert float(optax.tree.norm(ours)) <= 1.0 + 1e-6


def test_apply_step_matches_optax_apply_if_finite():
    """One cond around the step gives optax.apply_if_finite's parameters and state, NaN and Inf included."""
    inner = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))
    ours, theirs = skip_nonfinite(inner), optax.apply_if_finite(inner, max_consecutive_errors=2**30)
    params, p_theirs = ({"a": jnp.ones((3, 2)), "b": jnp.arange(4.0)} for _ in range(2))  # ours are donated
    s_ours, s_theirs = ours.init(params), theirs.init(params)
    step = jax.jit(lambda g, s, p: apply_step(ours, g, s, p), donate_argnums=(1, 2))
    rng = np.random.default_rng(0)
    for poison in (None, np.nan, None, np.inf, -np.inf, None):
        grads = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in p_theirs.items()}
        if poison is not None:
            grads["b"][1] = poison
        params, s_ours = step(grads, s_ours, params)
        updates, s_theirs = theirs.update(grads, s_theirs, p_theirs)
        p_theirs = optax.apply_updates(p_theirs, updates)
        for a, b in zip(jax.tree.leaves((params, s_ours)), jax.tree.leaves((p_theirs, s_theirs)), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    assert int(s_ours.total_notfinite) == 3 and int(s_ours.notfinite_count) == 0
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves((params, s_ours)))


def test_training_stops_after_max_nonfinite_consecutive_steps():
    x, y = blobs(64)
    model = ft.Model(TinyClassifier(), task="text-classification")
    model.compile(optimizer="adamw", learning_rate=1e-2, max_nonfinite=2, log_every=1)
    before = params_of(model)
    with pytest.raises(NonFiniteError, match="2 consecutive steps"):
        model.fit((np.full_like(x, np.inf), y), epochs=1, batch_size=16, verbose=0)
    after = params_of(model)
    assert all(np.array_equal(before[p], after[p]) for p in before)  # nothing non-finite was applied
