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
from finetune.models.blocks import encoder as encoder_lib
from finetune.models.blocks import layers as layers_lib
from finetune.models.blocks.layers import recomputed
from finetune.models.gpt2 import modeling as gpt2_modeling
from finetune.models.llama import modeling as llama_modeling

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


LAYER_CLASSES = {"bert": encoder_lib.Layer, "gpt2": gpt2_modeling.Block, "llama": llama_modeling.DecoderLayer}


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_a_stack_of_identical_layers_is_traced_once_and_computes_what_a_flat_trace_does(arch, monkeypatch):
    layer_class = LAYER_CLASSES[arch]
    traced = []
    plain_call = layer_class.__call__

    def counting_call(self, *args, **kwargs):
        traced.append(args[0].shape)
        return plain_call(self, *args, **kwargs)

    monkeypatch.setattr(layer_class, "__call__", counting_call)
    config = CONFIGS[arch]()
    config.num_hidden_layers = config.n_layer = 3
    model = finetune.from_config(config, task="feature-extraction")
    model.module.set_attributes(deterministic=False, raise_if_not_found=False)
    graphdef, params, rest = nnx.split(model.module, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)  # as the train step holds them

    def fresh_step():  # a new function each time: JAX caches traces by the function
        def loss_and_grads(params, rest, input_ids):
            def loss(params):
                module = nnx.merge(graphdef, params, rest)
                out = module(input_ids=input_ids).astype(jnp.float32)
                return (out**2).mean(), nnx.to_pure_dict(nnx.state(module, nnx.Not(nnx.Param)))

            return jax.value_and_grad(loss, has_aux=True)(params)

        return jax.jit(loss_and_grads)

    rng = np.random.default_rng(2)
    runs = {}
    layers_lib.clear_traces()  # traces of earlier tests' layers of the same structure would be reused
    for label, call in (("nested", layers_lib.call_layer), ("flat", lambda traced, layer, x, *args: layer(x, *args))):
        monkeypatch.setattr(layers_lib, "call_layer", call)
        loss_and_grads = fresh_step()
        traced.clear()
        for length in (5, 7):  # a second batch shape traces the layer once more, not three times
            ids = jnp.asarray(rng.integers(1, 64, (2, length)), jnp.int32)
            runs[label, length] = loss_and_grads(params, rest, ids)
        runs[label] = list(traced)
        rng = np.random.default_rng(2)
    assert runs["nested"] == [(2, 5, WIDTH), (2, 7, WIDTH)]
    assert runs["flat"] == [(2, 5, WIDTH)] * 3 + [(2, 7, WIDTH)] * 3  # the count tells the two paths apart
    for length in (5, 7):
        (loss_a, rest_a), grads_a = runs["nested", length]
        (loss_b, rest_b), grads_b = runs["flat", length]
        assert float(loss_a) == float(loss_b)
        for a, b in zip(jax.tree.leaves((grads_a, rest_a)), jax.tree.leaves((grads_b, rest_b)), strict=True):
            np.testing.assert_array_equal(
                jax.random.key_data(a) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key) else a,
                jax.random.key_data(b) if jnp.issubdtype(b.dtype, jax.dtypes.prng_key) else b,
            )
    # The RNG counts come back out of the nested calls: the streams of all three layers advanced (their equality
    # with the flat trace's counts is checked above).
    counts = [x for x in jax.tree.leaves(runs["nested", 5][0][1]) if x.dtype == jnp.uint32 and x.ndim == 0]
    before = [x for x in jax.tree.leaves(rest) if x.dtype == jnp.uint32 and x.ndim == 0]
    assert len(counts) == len(before) and sum(int(a) > int(b) for a, b in zip(counts, before, strict=True)) >= 3


SIZES = {"hidden_size": WIDTH, "num_hidden_layers": LAYERS, "num_attention_heads": 4, "intermediate_size": INTERMEDIATE}
DECODER = {"vocab_size": 64, "num_key_value_heads": 2, "pad_token_id": 0, **SIZES}
HEADS = {  # sequence classifiers that read one token: the first, or (decoders) each row's last
    "bert": (CONFIGS["bert"], "text-classification", encoder_lib),
    "roberta": (
        lambda: transformers.RobertaConfig(vocab_size=64, max_position_embeddings=24, pad_token_id=1, **SIZES),
        "text-classification",
        encoder_lib,
    ),
    "distilbert": (
        lambda: transformers.DistilBertConfig(
            vocab_size=64, dim=WIDTH, n_layers=LAYERS, n_heads=4, hidden_dim=INTERMEDIATE, max_position_embeddings=24
        ),
        "text-classification",
        encoder_lib,
    ),
    "vit": (
        lambda: transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, **SIZES),
        "image-classification",
        encoder_lib,
    ),
    "gpt2": (
        lambda: transformers.GPT2Config(
            vocab_size=64, n_embd=WIDTH, n_layer=LAYERS, n_head=4, n_inner=INTERMEDIATE, n_positions=16, pad_token_id=0
        ),
        "text-classification",
        gpt2_modeling,
    ),
    "llama": (lambda: transformers.LlamaConfig(**DECODER), "text-classification", llama_modeling),
    "mistral": (lambda: transformers.MistralConfig(sliding_window=3, **DECODER), "text-classification", llama_modeling),
}


def every_row(layers, x, *args, first=None, rows=None, remat=False):
    """The whole last layer, then the rows the head reads: what the models computed before `head_rows`."""
    out = layers_lib.run_layers(layers, x, *args, remat=remat)
    if rows is not None:
        return jnp.take_along_axis(out, rows[:, None, None], axis=1)
    return out if first is None else out[:, :first]


@pytest.mark.parametrize("arch", sorted(HEADS))
def test_a_one_token_head_gets_the_full_models_outputs_and_gradients_for_less_work(arch, monkeypatch):
    config, task, module = HEADS[arch]
    model = finetune.from_config(config(), task=task, num_labels=3)
    model.module.set_attributes(deterministic=True, raise_if_not_found=False)
    rng = np.random.default_rng(3)
    if arch == "vit":
        inputs = {"pixel_values": jnp.asarray(rng.normal(size=(3, 3, 16, 16)), jnp.float32)}
    else:  # right padding (id 0 or 1) after 9, 4 and 6 tokens: the decoders read positions 8, 3 and 5
        real = np.arange(9)[None] < np.array([9, 4, 6])[:, None]
        inputs = {
            "input_ids": jnp.asarray(np.where(real, rng.integers(3, 64, (3, 9)), 1 if arch == "roberta" else 0)),
            "attention_mask": jnp.asarray(real, jnp.int32),
        }
    graphdef, params, rest = nnx.split(model.module, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)

    def run():
        def loss(params):  # a new function each run: JAX caches traces by the function
            return (nnx.merge(graphdef, params, rest)(**inputs) ** 2).sum()

        logits = nnx.merge(graphdef, params, rest)(**inputs)
        return logits, jax.grad(loss)(params), jax.jit(loss).lower(params).cost_analysis()["flops"]

    ours = run()
    monkeypatch.setattr(module, "head_rows", every_row)
    full = run()
    np.testing.assert_allclose(ours[0], full[0], rtol=0, atol=1e-6)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(full[1]))
    for a, b in zip(jax.tree.leaves(ours[1]), jax.tree.leaves(full[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * scale)
    # The last of the 2 layers runs its query, output, feed-forward and norms on 1 row instead of 9 (ViT: 17).
    assert ours[2] < 0.75 * full[2]
