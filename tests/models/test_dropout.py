"""The shared dropout: the rate is kept, the mean is preserved, inference is the identity, masks are reproducible."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from finetune.models.dropout import Dropout


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

    from finetune.models.dropout import bits16

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

    from finetune.models.dropout import bits16

    key = jax.random.key(7)
    whole = np.asarray(bits16(key, (4, 6)))
    assert whole.shape == (4, 6) and whole.dtype == np.uint16
    assert np.array_equal(np.asarray(bits16(key, (4, 6))), whole)  # reproducible
    assert np.asarray(bits16(key, ())).shape == () and np.asarray(bits16(key, (5,))).shape == (5,)
