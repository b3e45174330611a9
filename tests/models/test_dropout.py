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
