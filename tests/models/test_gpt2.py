"""GPT-2: parity with transformers' PyTorch models, the split ``c_attn``, bare checkpoints, export, dtypes."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import transformers
from flax import nnx

import finetune
from finetune.errors import ConfigError
from finetune.hf.export import export_weights
from finetune.models import registry
from finetune.models.gpt2 import modeling
from tests.models.reference import assert_close, padded_text_batch, save_torch_model, tiny_model, torch_logits

SIZES = {"vocab_size": 256, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 32, "pad_token_id": 0}

# (transformers class, task, config overrides)
CASES = [
    ("GPT2LMHeadModel", "causal-lm", {}),
    ("GPT2LMHeadModel", "causal-lm", {"tie_word_embeddings": False, "scale_attn_by_inverse_layer_idx": True}),
    ("GPT2ForSequenceClassification", "text-classification", {"num_labels": 3, "activation_function": "gelu"}),
    ("GPT2ForTokenClassification", "token-classification", {"num_labels": 5, "n_inner": 96}),
    ("GPT2Model", "feature-extraction", {}),
    ("GPT2LMHeadModel", "causal-lm", {"scale_attn_weights": False, "reorder_and_upcast_attn": True}),
    ("GPT2ForSequenceClassification", "text-classification", {"num_labels": 2, "layer_norm_epsilon": 1e-3}),
]


def hf_config(**overrides) -> transformers.GPT2Config:
    return transformers.GPT2Config(**{**SIZES, **overrides})


def batch():
    input_ids, attention_mask = padded_text_batch(SIZES["vocab_size"], lengths=(7, 4, 1))
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def reference(torch_model, inputs) -> np.ndarray:
    return torch_logits(torch_model, **{k: v.astype(np.int64) for k, v in inputs.items()})


@pytest.mark.parametrize(("cls_name", "task", "overrides"), CASES, ids=lambda c: str(c))
def test_logits_match_transformers_in_float32_and_export_inverts_the_table(tmp_path, cls_name, task, overrides):
    torch_model, path = tiny_model(tmp_path, cls_name, hf_config(**overrides), jitter=0.05)
    model = finetune.load(path, task=task)
    inputs = batch()
    if task == "feature-extraction":  # transformers embeds GPT-2's token types with the token table
        inputs["token_type_ids"] = (np.arange(7)[None] >= 3).astype(np.int32) * inputs["attention_mask"]
    expected = reference(torch_model, inputs)
    assert model.new_paths == ()
    assert_close(model(**inputs), expected, atol=1e-5, mask=inputs["attention_mask"] if expected.ndim == 3 else None)

    arch = registry.get("gpt2")
    config = arch.config_from_hf(model.hf_config)
    exported = export_weights(model.module, arch.table(config, task))  # c_attn fused again from q/k/v
    saved = safetensors.numpy.load_file(f"{path}/model.safetensors")
    assert sorted(exported) == sorted(saved)
    for key, value in saved.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    assert arch.hf_architecture(config, task) == cls_name


def test_bare_checkpoint_with_mask_buffers_loads_as_a_tied_language_model(tmp_path):
    # The original `gpt2` repository: no `transformer.` prefix, causal-mask buffers, no lm_head (tied to wte).
    torch_model, _ = tiny_model(tmp_path / "lm", "GPT2LMHeadModel", hf_config(), jitter=0.05)
    path = save_torch_model(torch_model.transformer, tmp_path / "bare")
    tensors = safetensors.numpy.load_file(f"{path}/model.safetensors")
    for i in range(SIZES["n_layer"]):
        tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.float32))
        tensors[f"h.{i}.attn.masked_bias"] = np.asarray(-1e4, np.float32)
    safetensors.numpy.save_file(tensors, f"{path}/model.safetensors", metadata={"format": "pt"})
    model = finetune.load(path, task="causal-lm")
    assert model.new_paths == ()
    inputs = batch()
    assert_close(model(**inputs), reference(torch_model, inputs), atol=1e-5, mask=inputs["attention_mask"])


def test_language_model_checkpoint_for_classification_gets_a_new_score_head(tmp_path):
    _, path = tiny_model(tmp_path, "GPT2LMHeadModel", hf_config(), jitter=0.05)
    model = finetune.load(path, task="text-classification", num_labels=2)
    assert model.new_paths == ("score/kernel",)
    assert dict(model.rules)["(?:score/kernel)"] == "new"
    attention = model.module.layers[0].attention
    assert attention.q_proj.kernel.get_metadata()["out_sharding"] == ("embed", "heads")
    assert attention.o_proj.kernel.get_metadata()["out_sharding"] == ("heads", "embed")
    assert model.module.score.kernel.get_metadata()["out_sharding"] == ("embed", "classes")


def test_bfloat16_compute_keeps_float32_params(tmp_path):
    torch_model, path = tiny_model(tmp_path, "GPT2LMHeadModel", hf_config(), jitter=0.05)
    model = finetune.load(path, task="causal-lm", dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert {p.dtype for p in jax.tree.leaves(nnx.state(model.module, nnx.Param))} == {jnp.dtype(jnp.float32)}
    inputs = batch()
    logits = model(**inputs)
    assert logits.dtype == jnp.bfloat16
    assert_close(logits, reference(torch_model, inputs), atol=0.1, mask=inputs["attention_mask"])


def test_inputs_longer_than_the_position_table_are_refused(tmp_path):
    _, path = tiny_model(tmp_path, "GPT2Model", hf_config(), jitter=0.05)
    model = finetune.load(path, task="feature-extraction")
    with pytest.raises(ConfigError, match="received input_ids of length 40"):
        model(input_ids=np.ones((1, 40), np.int32))


def test_spelled_out_attention_matches_the_fused_one():
    # The training path (attention dropout on) must compute the same attention as jax.nn.dot_product_attention.
    rng = np.random.default_rng(0)
    q, k, v = rng.normal(size=(3, 2, 6, 4, 8)).astype(np.float32)
    mask = np.asarray([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], bool)[:, None, None, :]

    @functools.partial(jax.jit, static_argnames="scale")
    def both(q, k, v, mask, scale):
        off = nnx.Dropout(0.1, deterministic=True)
        # An "rbg" key: the default threefry generator alone takes seconds to compile on CPU.
        almost_off = nnx.Dropout(1e-9, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
        fused = modeling.causal_attention(q, k, v, mask, scale=scale, dropout=off)
        return fused, modeling.causal_attention(q, k, v, mask, scale=scale, dropout=almost_off)

    fused, spelled = both(q, k, v, mask, 0.25)
    np.testing.assert_allclose(spelled, fused, atol=1e-5)
