"""Layers of every architecture: activations, the dense, embedding and norm layers with their logical axes, the
feed-forward activation recomputed in the backward pass, and the layer stack (`run_layers`, `head_rows`).

Parameters carry logical axis names (``out_sharding`` metadata) from this set, shared by every architecture:
``vocab`` (token table rows), ``embed`` (model width), ``mlp`` (feed-forward width), ``heads`` (attention heads x
head size, on fused projections), ``kv`` (head size), ``norm`` (layer-norm vectors), ``classes`` (head outputs),
``layers`` (stacked layers). ``None`` means replicated.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx

from finetune.errors import LoadError

Dtype = Any

ACTIVATIONS: dict[str, Callable[..., jax.Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def check_activation(model: str, field: str, value: Any) -> None:
    """Refuses an activation name of a checkpoint's config that `ACTIVATIONS` lacks (``model`` names the modules)."""
    if value not in ACTIVATIONS:
        raise LoadError(
            f"finetune's {model} does not implement {field}={value!r}; supported: {', '.join(ACTIVATIONS)}. Pick a "
            "checkpoint that uses one of these."
        )


def axes(*names: str | None) -> dict[str, Any]:
    """Variable metadata naming the logical axes (no mesh needed at construction)."""
    return {"out_sharding": names, "eager_sharding": False}


class Linear(nnx.Linear):
    """`nnx.Linear` that runs as a 2-D matrix product: inputs ``[..., in]`` are flattened to ``[N, in]`` and back.

    Same parameters, paths and results as `nnx.Linear`. The difference is the backward pass XLA compiles: for a 3-D
    input the kernel gradient contracts two axes, which XLA:CPU lays out as a transposed copy of the output gradient
    and a general dot; flattened, it is one plain matrix product (docs/performance.md has the measurement).

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


def dense(
    n_in: int,
    n_out: int,
    names: tuple[str | None, str | None],
    *,
    dtype: Dtype,
    param_dtype: Dtype,
    rngs: nnx.Rngs,
    use_bias: bool = True,
) -> Linear:
    """A `Linear` initialised as transformers does (normal, std 0.02), kernel on the logical axes ``names``."""
    return Linear(
        n_in,
        n_out,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.initializers.normal(0.02),
        kernel_metadata=axes(*names),
        bias_metadata=axes(names[1]),
        rngs=rngs,
    )


def layer_norm(n: int, eps: float, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """An ``nnx.LayerNorm`` over the last axis, scale and bias on the ``norm`` axis."""
    return nnx.LayerNorm(
        n,
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_metadata=axes("norm"),
        bias_metadata=axes("norm"),
        rngs=rngs,
    )


def rms_norm(features: int, eps: float, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs) -> nnx.RMSNorm:
    """An ``nnx.RMSNorm`` over the last axis (statistics in float32), scale on the ``norm`` axis."""
    return nnx.RMSNorm(
        features, epsilon=eps, dtype=dtype, param_dtype=param_dtype, scale_metadata=axes("norm"), rngs=rngs
    )


def embed(n: int, width: int, rows: str | None, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs) -> nnx.Embed:
    """An ``nnx.Embed`` of ``n`` rows (on the logical axis ``rows``) initialised as transformers does."""
    return nnx.Embed(
        n,
        width,
        dtype=dtype,
        param_dtype=param_dtype,
        embedding_init=nnx.initializers.normal(0.02),
        embedding_metadata=axes(rows, "embed"),
        rngs=rngs,
    )


def recomputed(activation: Callable[..., Any], *inputs: Any) -> Any:
    """``activation(*inputs)``, recomputed from ``inputs`` in the backward pass instead of stored for it.

    For the elementwise step between a feed-forward block's two matrix products. Differentiated as is, an activation
    keeps its intermediates for the backward pass (GELU's erf or tanh terms, SiLU's sigmoid), each a
    ``[tokens, intermediate]`` array per layer; recomputed, only its inputs are kept (its output is kept either way,
    for the next product's gradient), at the cost of one more elementwise pass (docs/performance.md has the scratch
    memory saved). Results and gradients are unchanged.

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
        x = call_layer(traced, layer, x, *args)
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
    (within float rounding); docs/performance.md has the work and time saved.

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


def call_layer(traced: Callable[..., Any], layer: nnx.Module, x: Any, *args: Any) -> Any:
    """``layer(x, *args)`` through ``traced`` (one layer as a nested jit, see below), with the layer's non-parameter
    state (its RNG counts) written back. `run_layers` calls each layer through this."""
    # flax types a split with two filters as a tuple of any length (GraphDef, State, *States): it gives three here.
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)  # type: ignore[misc]
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


def clear_traces() -> None:
    """Forgets the nested layer calls' traces, so that the next stack of an already-seen structure is traced anew."""
    # jax's JitWrapped protocol omits clear_cache, which the jitted functions have.
    _traced.clear_cache()  # type: ignore[attr-defined]
    _rematerialised.clear_cache()  # type: ignore[attr-defined]
