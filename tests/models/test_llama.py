"""Llama family (llama, mistral, qwen2, qwen3): parity with transformers' PyTorch models, heads, export, dtypes."""

from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import transformers
from flax import nnx

import finetune
from finetune.errors import LoadError
from finetune.hf.export import export_weights
from finetune.models import registry
from finetune.models.blocks import rotary as rope
from finetune.models.llama import modeling
from tests.models.reference import assert_close, padded_text_batch, tiny_model, torch_logits

SIZES = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # grouped-query attention everywhere unless a case overrides it
    "max_position_embeddings": 64,
    "pad_token_id": 0,
}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
LLAMA3 |= {"original_max_position_embeddings": 16, "rope_theta": 10000.0}
LINEAR = {"rope_type": "linear", "factor": 4.0, "rope_theta": 500.0}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0}

# (model_type, transformers class, task, config overrides). Family differences live in the config, so each family
# runs every head once and the variants (tying, rope scaling, biases, windows, head_dim) are spread over the cases.
CASES = [
    ("llama", "LlamaForCausalLM", "causal-lm", {"rope_parameters": LLAMA3}),
    (
        "llama",
        "LlamaForCausalLM",
        "causal-lm",
        {"tie_word_embeddings": True, "num_key_value_heads": 4, "rope_parameters": LINEAR},
    ),
    (
        "llama",
        "LlamaForSequenceClassification",
        "text-classification",
        {"rope_parameters": YARN, "attention_bias": True, "mlp_bias": True},
    ),
    ("llama", "LlamaForTokenClassification", "token-classification", {"num_labels": 5}),
    ("llama", "LlamaModel", "feature-extraction", {}),
    ("mistral", "MistralForCausalLM", "causal-lm", {"sliding_window": 3, "head_dim": 32}),
    ("mistral", "MistralForSequenceClassification", "text-classification", {"sliding_window": 3, "num_labels": 1}),
    ("mistral", "MistralModel", "feature-extraction", {"sliding_window": 3}),
    ("qwen2", "Qwen2ForCausalLM", "causal-lm", {}),
    ("qwen2", "Qwen2ForSequenceClassification", "text-classification", {"num_labels": 3}),
    ("qwen2", "Qwen2Model", "feature-extraction", {"use_sliding_window": True, "sliding_window": 2}),
    ("qwen3", "Qwen3ForCausalLM", "causal-lm", {"head_dim": 8, "tie_word_embeddings": True}),
    ("qwen3", "Qwen3ForSequenceClassification", "text-classification", {"head_dim": 8}),
    ("qwen3", "Qwen3ForTokenClassification", "token-classification", {"head_dim": 32}),
    ("qwen3", "Qwen3Model", "feature-extraction", {"head_dim": 16}),
    ("qwen3", "Qwen3ForCausalLM", "causal-lm", {"attention_bias": True}),
    (
        "qwen2",
        "Qwen2ForCausalLM",
        "causal-lm",
        {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1},
    ),
    # transformers' Mistral and Qwen2 read no bias options: a config.json that has them still means no biases
    ("mistral", "MistralForCausalLM", "causal-lm", {"attention_bias": True, "mlp_bias": True}),
    ("qwen2", "Qwen2Model", "feature-extraction", {"attention_bias": True, "mlp_bias": True}),
    ("llama", "LlamaForCausalLM", "causal-lm", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}),
    ("qwen2", "Qwen2ForCausalLM", "causal-lm", {"rope_parameters": YARN, "tie_word_embeddings": True}),
    ("mistral", "MistralModel", "feature-extraction", {"rope_parameters": LLAMA3, "rms_norm_eps": 1e-3}),
]


def hf_config(model_type: str, **overrides):
    return transformers.AutoConfig.for_model(model_type, **{**SIZES, **overrides})


def batch():
    input_ids, attention_mask = padded_text_batch(SIZES["vocab_size"], lengths=(7, 4, 1))
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def reference(torch_model, inputs) -> np.ndarray:
    return torch_logits(torch_model, **{k: v.astype(np.int64) for k, v in inputs.items()})


@pytest.mark.parametrize(("model_type", "cls_name", "task", "overrides"), CASES, ids=lambda c: str(c))
def test_logits_match_transformers_in_float32_and_export_inverts_the_table(
    tmp_path, model_type, cls_name, task, overrides
):
    torch_model, path = tiny_model(tmp_path, cls_name, hf_config(model_type, **overrides), jitter=0.05)
    model = finetune.load(path, task=task)
    inputs = batch()
    expected = reference(torch_model, inputs)
    assert model.new_paths == ()
    assert_close(model(**inputs), expected, atol=1e-5, mask=inputs["attention_mask"] if expected.ndim == 3 else None)

    arch = registry.get(model_type)
    config = arch.config_from_hf(model.hf_config)
    exported = export_weights(model.module, arch.table(config, task))
    saved = safetensors.numpy.load_file(f"{path}/model.safetensors")
    assert sorted(exported) == sorted(saved)
    for key, value in saved.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    assert arch.hf_architecture(config, task) == cls_name


def test_sequence_classifier_without_pad_token_scores_the_last_kept_token(tmp_path):
    # transformers refuses padded batches without `pad_token_id`; row by row (no padding) it takes the last token.
    config = hf_config("llama", pad_token_id=None, num_labels=2)
    torch_model, path = tiny_model(tmp_path, "LlamaForSequenceClassification", config, jitter=0.05)
    inputs = batch()
    segments = np.zeros_like(inputs["input_ids"])  # what generic fast tokenizers add; ignored
    actual = finetune.load(path, task="text-classification")(**inputs, token_type_ids=segments)
    for row, length in enumerate(inputs["attention_mask"].sum(1)):
        expected = reference(torch_model, {"input_ids": inputs["input_ids"][row : row + 1, :length]})
        assert_close(actual[row : row + 1], expected, atol=1e-5)


def test_causal_lm_checkpoint_for_classification_gets_a_new_score_head(tmp_path):
    _, path = tiny_model(tmp_path, "Qwen2ForCausalLM", hf_config("qwen2"), jitter=0.05)
    model = finetune.load(path, task="text-classification", num_labels=3)
    assert model.new_paths == ("score/kernel",)
    assert model.module.score.kernel.shape == (64, 3)
    assert dict(model.rules)["(?:score/kernel)"] == "new"


def test_bfloat16_compute_keeps_float32_params(tmp_path):
    torch_model, path = tiny_model(tmp_path, "LlamaForCausalLM", hf_config("llama"), jitter=0.05)
    model = finetune.load(path, task="causal-lm", dtype=jnp.bfloat16, param_dtype=jnp.float32)
    params = jax.tree.leaves(nnx.state(model.module, nnx.Param))
    assert {p.dtype for p in params} == {jnp.dtype(jnp.float32)}
    inputs = batch()
    logits = model(**inputs)
    assert logits.dtype == jnp.bfloat16
    assert_close(logits, reference(torch_model, inputs), atol=0.1, mask=inputs["attention_mask"])


def test_params_carry_logical_axes(tmp_path):
    _, path = tiny_model(tmp_path, "Qwen3ForSequenceClassification", hf_config("qwen3", head_dim=8), jitter=0.05)
    module = finetune.load(path, task="text-classification").module
    layer = module.layers[1]
    assert layer.attention.k_proj.kernel.get_metadata()["out_sharding"] == ("embed", "heads")
    assert layer.attention.q_norm.scale.get_metadata()["out_sharding"] == ("norm",)
    assert layer.mlp.down_proj.kernel.get_metadata()["out_sharding"] == ("mlp", "embed")
    assert module.embed_tokens.embedding.get_metadata()["out_sharding"] == ("vocab", "embed")
    assert module.score.kernel.get_metadata()["out_sharding"] == ("embed", "classes")
    assert layer.attention.k_proj.kernel.get_metadata()["eager_sharding"] is False


def test_spelled_out_attention_matches_the_fused_one_with_window_and_groups():
    # The training path (attention dropout on) must compute the same attention as jax.nn.dot_product_attention.
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 6, 4, 8)).astype(np.float32)
    k, v = rng.normal(size=(2, 2, 6, 2, 8)).astype(np.float32)
    mask = np.asarray([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], bool)[:, None, None, :]

    @functools.partial(jax.jit, static_argnames="window")
    def both(q, k, v, mask, window):
        off = nnx.Dropout(0.1, deterministic=True)
        # An "rbg" key: the default threefry generator alone takes seconds to compile on CPU.
        almost_off = nnx.Dropout(1e-9, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
        fused = modeling.causal_attention(q, k, v, mask, window=window, dropout=off)
        return fused, modeling.causal_attention(q, k, v, mask, window=window, dropout=almost_off)

    for window in (None, 3):
        fused, spelled = both(q, k, v, mask, window)
        np.testing.assert_allclose(spelled, fused, atol=1e-5)


YARN_MSCALE = {**YARN, "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 16.0, "truncate": False}


@pytest.mark.parametrize(
    "params",
    [{"rope_type": "default"}, {"rope_type": "dynamic", "factor": 2.0}, LINEAR, LLAMA3, YARN, YARN_MSCALE],
    ids=lambda p: p["rope_type"] + ("+mscale" if "mscale" in p else ""),
)
def test_rope_frequencies_match_transformers(params):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama import modeling_llama as llama_modeling

    config = hf_config("llama", rope_parameters=dict(params))
    default = llama_modeling.LlamaRotaryEmbedding.compute_default_rope_parameters
    init = ROPE_INIT_FUNCTIONS.get(params["rope_type"], default)
    expected, expected_scale = init(config)
    actual, scale = rope.ROPE_FREQUENCIES[params["rope_type"]](rope.Rope.from_hf(config), 16)
    np.testing.assert_allclose(actual, expected.numpy(), rtol=1e-6)
    assert scale == pytest.approx(expected_scale)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_dynamic_rope_beyond_the_context_matches_transformers(tmp_path, family):
    """Dynamic NTK scaling grows the rotary base once a batch reaches past ``max_position_embeddings`` (here 4)."""
    params = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    config = hf_config(family, max_position_embeddings=4, rope_parameters=params)
    cls_name = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[family]
    torch_model, path = tiny_model(tmp_path, cls_name, config, jitter=0.05)
    model = finetune.load(path, task="causal-lm")
    inputs = batch()  # 7 tokens, past the 4 positions
    expected = reference(torch_model, inputs)
    assert_close(model(**inputs), expected, atol=1e-5, mask=inputs["attention_mask"])
    default = {**params, "rope_type": "default"}
    plain = finetune.load(_with_rope(path, tmp_path / "plain", default), task="causal-lm")
    assert not np.allclose(np.asarray(plain(**inputs)), expected, atol=1e-3)  # the scaling is what matches


def _with_rope(path, target, params):
    import json
    import shutil

    shutil.copytree(path, target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "rope_parameters": params}))
    return target


def test_unsupported_rope_types_are_refused():
    config = types.SimpleNamespace(max_position_embeddings=64, rope_parameters={"rope_type": "longrope"})
    with pytest.raises(LoadError, match="rope_type='longrope'"):
        rope.Rope.from_hf(config)
