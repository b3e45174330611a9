"""The shared dropout: the rate is kept, the mean is preserved, inference is the identity, masks are reproducible."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from finetune.models.blocks.dropout import Dropout


def test_drops_at_the_rate_and_rescales_to_keep_the_mean():
    layer = Dropout(0.1, rngs=nnx.Rngs(0))
    out = np.asarray(layer(jnp.ones((512, 512))))
    dropped = (out == 0).mean()
    assert abs(dropped - 0.1) < 0.003  # 262k draws: 5 sigma is about 0.003
    assert abs(out.mean() - 1.0) < 0.005
    assert np.allclose(out[out != 0], 65536 / round(0.9 * 65536))


def test_inference_is_the_identity_and_the_same_seed_gives_the_same_mask():
    x = jnp.arange(64.0).reshape(8, 8)
    assert np.array_equal(Dropout(0.5, rngs=nnx.Rngs(0), deterministic=True)(x), x)
    a, b = Dropout(0.5, rngs=nnx.Rngs(3))(x), Dropout(0.5, rngs=nnx.Rngs(3))(x)
    assert np.array_equal(a, b)
    layer = Dropout(0.5, rngs=nnx.Rngs(3))
    assert not np.array_equal(layer(x), layer(x))  # the stream advances


def test_draws_are_uniform_and_independent_across_neighbours_and_keys():
    import jax

    from finetune.models.blocks.dropout import bits16

    key_a, key_b = jax.random.split(jax.random.key(0))
    a = np.asarray(bits16(key_a, (64, 4, 33, 31))).astype(np.int64).reshape(-1)  # odd last dim: a half pair cut off
    b = np.asarray(bits16(key_b, (64, 4, 33, 31))).astype(np.int64).reshape(-1)
    counts = np.bincount(a >> 8, minlength=256)  # 267k draws in 256 bins of the high byte
    expected = len(a) / 256
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 330  # chi-square, 255 degrees of freedom: p ~ 0.001
    assert abs(np.corrcoef(a[:-1], a[1:])[0, 1]) < 0.01  # the two halves of one hash, and neighbouring pairs
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.01  # two keys
    assert abs(np.corrcoef(a[:-31], a[31:])[0, 1]) < 0.01  # the next row


def test_draws_are_reproducible_for_any_rank():
    import jax

    from finetune.models.blocks.dropout import bits16

    key = jax.random.key(7)
    whole = np.asarray(bits16(key, (4, 6)))
    assert whole.shape == (4, 6) and whole.dtype == np.uint16
    assert np.array_equal(np.asarray(bits16(key, (4, 6))), whole)  # reproducible
    assert np.asarray(bits16(key, ())).shape == () and np.asarray(bits16(key, (5,))).shape == (5,)


def test_rates_that_round_to_keeping_or_dropping_everything():
    # A rate below 2**-17 rounds to keeping every element (the threshold 2**16 does not fit the 16-bit draws); one
    # within 2**-17 of 1 drops every element, with no infinite scale in either pass.
    import jax

    from finetune.models.blocks.dropout import drop

    x = jnp.arange(1.0, 65.0).reshape(8, 8)
    key = jax.random.key(0)
    assert np.array_equal(drop(x, key, 1e-9), x)
    assert np.array_equal(drop(x, key, 1 - 1e-9), np.zeros((8, 8)))
    grad = jax.grad(lambda x: drop(x, key, 1 - 1e-9).sum())(x)
    assert np.array_equal(grad, np.zeros((8, 8)))


def test_attention_through_dropout_matches_spelling_it_out_with_its_gradients():
    # `attend` redraws the mask in the backward pass instead of storing the dropped probabilities: same values and
    # gradients as dropout then einsum, and only the undropped probabilities are kept for the backward pass.
    import jax

    from finetune.models.blocks.dropout import attend, drop

    def saved(f, *args):  # the arrays the backward pass keeps: the leaves of the vjp closure
        return [x for x in jax.tree.leaves(jax.vjp(f, *args)[1]) if x.shape == args[0].shape]

    rng = np.random.default_rng(0)
    logits, v = jnp.asarray(rng.normal(size=(2, 3, 5, 5)), jnp.float32), jnp.asarray(rng.normal(size=(2, 5, 3, 4)))
    key = jax.random.key(4)

    def ours(logits, v):
        layer = Dropout(0.3, rngs=nnx.Rngs(dropout=key))
        return (attend(jax.nn.softmax(logits), v, layer) ** 2).sum()

    def spelled(logits, v):
        layer = Dropout(0.3, rngs=nnx.Rngs(dropout=key))
        dropped = drop(jax.nn.softmax(logits), layer.rngs(), 0.3)
        return (jnp.einsum("bhqk,bkhd->bqhd", dropped, v) ** 2).sum()

    assert float(ours(logits, v)) == float(spelled(logits, v))
    for a, b in zip(jax.grad(ours, (0, 1))(logits, v), jax.grad(spelled, (0, 1))(logits, v), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # Spelled out, the backward pass keeps the mask and the dropped probabilities besides what the softmax keeps;
    # `attend` keeps neither (only the key).
    kept, kept_spelled = saved(ours, logits, v), saved(spelled, logits, v)
    assert len(kept) == len(kept_spelled) - 2
    assert any(x.dtype == bool for x in kept_spelled) and not any(x.dtype == bool for x in kept)


def test_keys_are_the_ones_nnx_streams_hand_out_and_the_count_advances():
    import jax

    from finetune.models.blocks.dropout import next_key

    ours, theirs = Dropout(0.1, rngs=nnx.Rngs(dropout=7)), Dropout(0.1, rngs=nnx.Rngs(dropout=7))
    keys = [next_key(ours) for _ in range(3)]
    expected = [theirs.rngs() for _ in range(3)]  # nnx's own RngStream.__call__
    for a, b in zip(keys, expected, strict=True):
        np.testing.assert_array_equal(jax.random.key_data(a), jax.random.key_data(b))
    assert len({tuple(np.asarray(jax.random.key_data(k)).ravel()) for k in keys}) == 3
    assert int(ours.rngs.count.get_value()) == 3

    # Under jit, on a traced stream: the same keys, and the advanced count comes back out.
    graphdef, state = nnx.split(Dropout(0.1, rngs=nnx.Rngs(dropout=7)))

    @jax.jit
    def two_keys(state):
        layer = nnx.merge(graphdef, state)
        pair = jax.random.key_data(next_key(layer)), jax.random.key_data(next_key(layer))
        return pair, nnx.state(layer)

    pair, after = two_keys(state)
    assert np.array_equal(pair[0], jax.random.key_data(expected[0]))
    assert np.array_equal(pair[1], jax.random.key_data(expected[1]))
    assert int(nnx.merge(graphdef, after).rngs.count.get_value()) == 2
