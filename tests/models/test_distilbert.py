"""DistilBERT: parity with transformers' PyTorch models, heads, export and logical axes."""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import transformers

import finetune
from finetune.hf.export import export_weights
from tests.models.reference import assert_close, padded_text_batch, tiny_model, torch_logits

CASES = [
    ("DistilBertModel", "feature-extraction", {}),
    ("DistilBertForSequenceClassification", "text-classification", {"num_labels": 3}),
    ("DistilBertForSequenceClassification", "text-classification", {"num_labels": 1}),  # regression: one output
    ("DistilBertForTokenClassification", "token-classification", {"num_labels": 3}),
    ("DistilBertModel", "feature-extraction", {"sinusoidal_pos_embds": True}),
]


def tiny_config(**overrides) -> transformers.DistilBertConfig:
    """A tiny DistilBERT config: 2 layers, width 64, 4 heads, vocab 256."""
    sizes = {"dim": 64, "n_layers": 2, "n_heads": 4, "hidden_dim": 128, "vocab_size": 256}
    return transformers.DistilBertConfig(**{**sizes, "max_position_embeddings": 40, **overrides})


def batch():
    input_ids, attention_mask = padded_text_batch(256, lengths=(9, 5, 2))
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def group_of(model: finetune.Model, path: str) -> str:
    return next(group for regex, group in model.rules if re.fullmatch(regex, path))


@pytest.mark.parametrize(("cls_name", "task", "overrides"), CASES, ids=lambda c: str(c))
def test_outputs_match_transformers_in_float32_on_a_padded_batch(tmp_path, cls_name, task, overrides):
    torch_model, path = tiny_model(tmp_path, cls_name, tiny_config(**overrides), std=0.2)
    model = finetune.load(path, task=task)
    inputs = batch()
    expected = torch_logits(torch_model, **{k: v.astype(np.int64) for k, v in inputs.items()})
    assert model.new_paths == ()
    assert_close(model(**inputs), expected, atol=1e-5, mask=inputs["attention_mask"] if expected.ndim == 3 else None)


def test_token_type_ids_from_a_bert_style_batch_are_ignored(tmp_path):
    _, path = tiny_model(tmp_path, "DistilBertModel", tiny_config())
    model = finetune.load(path)
    inputs = batch()
    with_types = model(**inputs, token_type_ids=np.ones_like(inputs["input_ids"]))
    np.testing.assert_array_equal(np.asarray(with_types), np.asarray(model(**inputs)))


def test_masked_lm_checkpoint_for_classification_ignores_lm_head_and_starts_a_new_head(tmp_path):
    _, path = tiny_model(tmp_path, "DistilBertForMaskedLM", tiny_config())
    model = finetune.load(path, task="text-classification", num_labels=2)
    fresh = ("classifier/bias", "classifier/kernel", "pre_classifier/bias", "pre_classifier/kernel")
    assert model.new_paths == fresh
    assert group_of(model, "pre_classifier/kernel") == "new"
    assert group_of(model, "encoder/layers/1/attention/query/kernel") == "backbone"
    assert model(**batch()).shape == (3, 2)


@pytest.mark.parametrize(
    ("cls_name", "task"),
    [("DistilBertModel", "feature-extraction"), ("DistilBertForSequenceClassification", "text-classification")],
)
def test_export_writes_back_the_checkpoint_keys_and_values(tmp_path, cls_name, task):
    _, path = tiny_model(tmp_path, cls_name, tiny_config(num_labels=2))
    model = finetune.load(path, task=task)
    arch = model.architecture
    exported = export_weights(model.module, arch.table(arch.config_from_hf(model.hf_config), task))
    original = safetensors.numpy.load_file(f"{path}/model.safetensors")
    assert sorted(exported) == sorted(original)
    for key, value in exported.items():
        np.testing.assert_array_equal(value, original[key], err_msg=key)


def test_params_carry_logical_axes_and_param_dtype(tmp_path):
    _, path = tiny_model(tmp_path, "DistilBertForTokenClassification", tiny_config(num_labels=2))
    model = finetune.load(path, task="token-classification", param_dtype=jnp.bfloat16)
    module = model.module
    assert module.encoder.layers[0].attention.query.kernel.out_sharding == ("embed", "heads")
    assert module.encoder.layers[0].intermediate.kernel.out_sharding == ("embed", "mlp")
    assert module.embeddings.word_embeddings.embedding.out_sharding == ("vocab", "embed")
    assert module.classifier.kernel.out_sharding == ("embed", "classes")
    assert module.classifier.kernel.dtype == jnp.bfloat16
    assert re.fullmatch(model.layer_pattern, "encoder/layers/1/output/kernel").group(1) == "1"
    assert model.num_layers == 2
    assert np.isfinite(np.asarray(model(**batch()), np.float32)).all()
