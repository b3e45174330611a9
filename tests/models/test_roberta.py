"""RoBERTa / XLM-RoBERTa: parity with transformers' PyTorch models, position ids, heads, export and axes."""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

import finetune
from finetune.hf.export import export_weights
from finetune.models.roberta.modeling import create_position_ids
from tests.models.reference import assert_close, padded_text_batch, tiny_model, torch_logits

PAD = 1
CASES = [
    ("RobertaModel", "feature-extraction", {}),
    ("RobertaForSequenceClassification", "text-classification", {"num_labels": 3}),
    ("RobertaForSequenceClassification", "text-classification", {"num_labels": 1}),  # regression: one output
    ("RobertaForTokenClassification", "token-classification", {"num_labels": 3}),
    ("XLMRobertaForSequenceClassification", "text-classification", {"num_labels": 3}),
]


def tiny_config(family: str = "Roberta", **overrides):
    """A tiny RoBERTa-family config: 2 layers, width 64, 4 heads, vocab 256, one token type, padding id 1."""
    sizes = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}
    extra = {"vocab_size": 256, "max_position_embeddings": 40, "type_vocab_size": 1, "pad_token_id": PAD}
    return getattr(transformers, f"{family}Config")(**{**sizes, **extra, **overrides})


def batch():
    input_ids, attention_mask = padded_text_batch(256, lengths=(9, 5, 2), pad_id=PAD)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def group_of(model: finetune.Model, path: str) -> str:
    return next(group for regex, group in model.rules if re.fullmatch(regex, path))


@pytest.mark.parametrize(("cls_name", "task", "overrides"), CASES, ids=lambda c: str(c))
def test_outputs_match_transformers_in_float32_on_a_padded_batch(tmp_path, cls_name, task, overrides):
    family = cls_name.split("For")[0].removesuffix("Model")
    torch_model, path = tiny_model(tmp_path, cls_name, tiny_config(family, **overrides), std=0.2)
    model = finetune.load(path, task=task)
    inputs = batch()
    expected = torch_logits(torch_model, **{k: v.astype(np.int64) for k, v in inputs.items()})
    assert model.new_paths == ()
    assert_close(model(**inputs), expected, atol=1e-5, mask=inputs["attention_mask"] if expected.ndim == 3 else None)


def test_position_ids_count_real_tokens_from_padding_idx_plus_one():
    input_ids = batch()["input_ids"]
    embeddings = transformers.models.roberta.modeling_roberta.RobertaEmbeddings
    expected = embeddings.create_position_ids_from_input_ids(torch.as_tensor(input_ids.astype(np.int64)), PAD)
    np.testing.assert_array_equal(np.asarray(create_position_ids(jnp.asarray(input_ids), PAD)), expected.numpy())


def test_masked_lm_checkpoint_for_classification_ignores_lm_head_and_starts_a_new_head(tmp_path):
    _, path = tiny_model(tmp_path, "RobertaForMaskedLM", tiny_config())
    model = finetune.load(path, task="text-classification", num_labels=2)
    fresh = (
        "classifier/dense/bias",
        "classifier/dense/kernel",
        "classifier/out_proj/bias",
        "classifier/out_proj/kernel",
    )
    assert model.new_paths == fresh
    assert group_of(model, "classifier/out_proj/kernel") == "new"
    assert group_of(model, "encoder/layers/1/attention/query/kernel") == "backbone"
    assert model(**batch()).shape == (3, 2)


@pytest.mark.parametrize(
    ("cls_name", "task"),
    [("RobertaModel", "feature-extraction"), ("RobertaForSequenceClassification", "text-classification")],
)
def test_export_writes_back_the_checkpoint_keys_and_values(tmp_path, cls_name, task):
    _, path = tiny_model(tmp_path, cls_name, tiny_config(num_labels=2))
    model = finetune.load(path, task=task)
    arch = model.architecture
    exported = export_weights(model.module, arch.table(arch.config_from_hf(model.hf_config), task))
    original = safetensors.numpy.load_file(f"{path}/model.safetensors")
    ignored = [k for k in original if re.fullmatch(r"(roberta\.)?pooler\..*", k)]
    assert sorted(exported) == sorted(set(original) - set(ignored))
    for key, value in exported.items():
        np.testing.assert_array_equal(value, original[key], err_msg=key)


def test_params_carry_logical_axes_and_param_dtype(tmp_path):
    _, path = tiny_model(tmp_path, "RobertaForSequenceClassification", tiny_config(num_labels=2))
    model = finetune.load(path, task="text-classification", param_dtype=jnp.bfloat16)
    module = model.module
    assert module.encoder.layers[0].attention.query.kernel.out_sharding == ("embed", "heads")
    assert module.embeddings.word_embeddings.embedding.out_sharding == ("vocab", "embed")
    assert module.classifier.out_proj.kernel.out_sharding == ("embed", "classes")
    assert module.classifier.dense.kernel.dtype == jnp.bfloat16
    assert re.fullmatch(model.layer_pattern, "encoder/layers/1/output/kernel").group(1) == "1"
    assert model.num_layers == 2
    assert np.isfinite(np.asarray(model(**batch()), np.float32)).all()
