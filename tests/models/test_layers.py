"""Shared building blocks: the feed-forward activation is recomputed in the backward pass, not stored, and the
results and gradients are those of the plain composition."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

import finetune
from finetune.models.layers import recomputed

TOKENS, WIDTH, INTERMEDIATE, LAYERS = 2 * 7, 32, 48, 2

CONFIGS = {
    "bert": lambda: transformers.BertConfig(
        vocab_size=64,
        hidden_size=WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        intermediate_size=INTERMEDIATE,
    ),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=64, n_embd=WIDTH, n_layer=LAYERS, n_head=4, n_inner=INTERMEDIATE, n_positions=16
    ),
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=INTERMEDIATE,
        attention_dropout=0.1,
    ),
}


def kept_for_backward(module: nnx.Module, input_ids: jax.Array) -> list[jax.Array]:
    """The arrays the backward pass of a training forward pass keeps: the leaves of the vjp closure."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def forward(params, rest):
        return nnx.merge(graphdef, params, rest)(input_ids=input_ids).astype(jnp.float32).sum()

    return jax.tree.leaves(jax.vjp(forward, params, rest)[1])


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_training_keeps_only_the_feed_forward_inputs_and_output(arch):
    # Differentiated as is, the activation keeps its intermediates for the backward pass (GELU's erf or tanh terms,
    # SiLU's sigmoid): 3 more [tokens, intermediate] arrays per layer here. Recomputed, a layer keeps the activation's
    # inputs (Llama: gate and up) and its output, which the next product's gradient needs.
    model = finetune.from_config(CONFIGS[arch](), task="feature-extraction")
    model.module.set_attributes(deterministic=False, raise_if_not_found=False)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 64, (2, 7)), jnp.int32)
    kept = [x for x in kept_for_backward(model.module, ids) if x.size == TOKENS * INTERMEDIATE]
    assert len(kept) == LAYERS * (3 if arch == "llama" else 2)


@pytest.mark.parametrize(
    ("activation", "arity"),
    [(lambda x: jax.nn.gelu(x, approximate=False), 1), (lambda g, u: jax.nn.silu(g) * u, 2)],
    ids=["gelu", "gated"],
)
def test_recomputed_matches_the_plain_activation_with_its_gradients(activation, arity):
    rng = np.random.default_rng(1)
    inputs = [jnp.asarray(rng.normal(size=(5, 6)), jnp.float32) for _ in range(arity)]

    def ours(*xs):
        return (recomputed(activation, *xs) ** 2).sum()

    def plain(*xs):
        return (activation(*xs) ** 2).sum()

    argnums = tuple(range(len(inputs)))
    assert float(ours(*inputs)) == float(plain(*inputs))
    for a, b in zip(jax.grad(ours, argnums)(*inputs), jax.grad(plain, argnums)(*inputs), strict=True):
        np.testing.assert_array_equal(a, b)
