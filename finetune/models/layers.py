"""Building blocks of every architecture: the dense layer, the feed-forward activation recomputed in the backward pass,
the layer stack with optional rematerialisation (`finetune.Recipe.remat`), and the stack whose last layer computes
only the row a one-token head reads (`head_rows`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx


class Linear(nnx.Linear):
    """`nnx.Linear` that runs as a 2-D matrix product: inputs ``[..., in]`` are flattened to ``[N, in]`` and back.

    Same parameters, paths and results as `nnx.Linear`. The difference is the backward pass XLA compiles: for a 3-D
    input the kernel gradient contracts two axes, which XLA:CPU lays out as a transposed copy of the output gradient
    and a general dot; flattened, it is one plain matrix product. On MiniLM's train step that removes 100 ms of
    copies per step at batch 32 x 64 tokens (measured); elsewhere the reshapes are free.

    Example:
      >>> import jax.numpy as jnp
      >>> layer = Linear(4, 3, rngs=nnx.Rngs(0))
      >>> layer(jnp.ones((2, 5, 4))).shape
      (2, 5, 3)
    """

    def __call__(self, inputs: Any, out_sharding: Any = None) -> Any:
        if inputs.ndim <= 2 or out_sharding is not None:
            return self.project(inputs, out_sharding)
        flat = self.project(inputs.reshape(-1, inputs.shape[-1]))
        return flat.reshape(*inputs.shape[:-1], flat.shape[-1])

    def project(self, inputs: Any, out_sharding: Any = None) -> Any:
        """The layer on inputs as given (2-D from `__call__`); subclasses change this, not the flattening."""
        return super().__call__(inputs, out_sharding=out_sharding)


def recomputed(activation: Callable[..., Any], *inputs: Any) -> Any:
    """``activation(*inputs)``, recomputed from ``inputs`` in the backward pass instead of stored for it.

    For the elementwise step between a feed-forward block's two matrix products. Differentiated as is, an activation
    keeps its intermediates for the backward pass (GELU's erf or tanh terms, SiLU's sigmoid), each a
    ``[tokens, intermediate]`` array per layer; recomputed, only its inputs are kept (its output is kept either way,
    for the next product's gradient), at the cost of one more elementwise pass. On MiniLM's train step at batch 32 x
    128 tokens: 258 MB less scratch memory (1,268 to 1,010 MB), and no measurable change in time
    (docs/performance.md). Results and gradients are unchanged.

    Example:
      >>> import jax.numpy as jnp
      >>> float(recomputed(jax.nn.gelu, jnp.float32(0.0)))
      0.0
    """
    return jax.checkpoint(activation)(*inputs)


def run_layers(layers: Sequence[nnx.Module], x: Any, *args: Any, remat: bool = False) -> Any:
    """``x`` through each layer in turn (``layer(x, *args)``).

    With ``remat``, each layer is rematerialised on its own: the backward pass keeps only the layer's inputs and
    recomputes its forward one layer at a time, so at most one layer's activations are alive at once (one
    checkpoint around the whole model would recompute them all together, saving nothing).
    """
    traced = _rematerialised if remat else _traced
    for layer in layers:
        x = _call(traced, layer, x, *args)
    return x


def head_rows(
    layers: Sequence[nnx.Module],
    x: Any,
    *args: Any,
    first: int | None = None,
    rows: Any = None,
    remat: bool = False,
) -> Any:
    """``x`` through each layer in turn; with ``first`` or ``rows``, the last layer computes only the rows a head reads.

    For a head that reads one token: the first (BERT's pooler, RoBERTa's and DistilBERT's classifiers, ViT's class
    token: ``first=1``) or each row's last (the decoders' sequence classifiers: ``rows``, ``[B]`` positions). The
    last layer still takes its keys and values from every position, but its query projection, attention output,
    feed-forward block and norms run on those rows alone, forward and backward. The head's input is the same
    (within float rounding). For all-MiniLM-L6-v2 (6 layers) with a classifier that is about a seventh less
    matrix-product work per step; docs/performance.md has the measured step times.

    Each layer takes ``(x, *args, queries)`` with ``first``, ``(x, *args, queries, positions)`` with ``rows``:
    ``queries`` (``[B, Q, H]``) are the rows of ``x`` to compute, ``positions`` (``[B, Q]``) where they sit.

    Returns:
      ``[B, T, H]`` with neither, ``[B, first, H]`` with ``first``, ``[B, 1, H]`` with ``rows``.
    """
    if (first is None and rows is None) or not len(layers):
        return run_layers(layers, x, *args, remat=remat)
    x = run_layers(list(layers)[:-1], x, *args, remat=remat)
    if rows is None:
        return run_layers(list(layers)[-1:], x, *args, x[:, :first], remat=remat)
    queries = jax.numpy.take_along_axis(x, rows[:, None, None], axis=1)
    return run_layers(list(layers)[-1:], x, *args, queries, rows[:, None], remat=remat)


def _call(traced: Callable[..., Any], layer: nnx.Module, x: Any, *args: Any) -> Any:
    """``layer(x, *args)`` through ``traced``, with the layer's non-parameter state (its RNG counts) written back."""
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    y, rest = traced(graphdef, params, rest, x, *args)
    nnx.update(layer, rest)
    return y


def _layer(graphdef: Any, params: Any, rest: Any, x: Any, *args: Any) -> tuple[Any, Any]:
    layer = nnx.merge(graphdef, params, rest)
    y = layer(x, *args)
    return y, nnx.state(layer, nnx.Not(nnx.Param))


# One layer as a nested `jax.jit`: layers of the same structure and input shapes share one trace. JAX caches a jitted
# function's trace by its static arguments and input shapes, so in a stack of identical layers only the first is
# traced from Python; the rest reuse its jaxpr, and so do the derivative rules, which JAX caches per jaxpr. XLA
# inlines the calls, so the compiled program is the one a flat trace gives.
_traced = jax.jit(_layer, static_argnums=0)
# The same with the layer rematerialised: the backward pass keeps its inputs and recomputes the rest.
_rematerialised = jax.jit(jax.checkpoint(_layer, static_argnums=(0,)), static_argnums=0)
