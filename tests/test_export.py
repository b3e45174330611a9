"""Export in Hugging Face format, for every architecture: transformers loads it with equal logits, finetune loads it
back bit-identically; the model card carries metadata; a failed export leaves the previous one intact."""

import json

import numpy as np
import pytest
import transformers

import finetune as ft
from finetune.params.rules import flatten
from tests.models.reference import padded_text_batch, tiny_bert_config, tiny_model, torch_logits

SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}
DECODER = {**SMALL, "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 64}

CASES = {
    "bert": (lambda: tiny_bert_config(), "BertModel", "text-classification", "AutoModelForSequenceClassification"),
    "roberta": (
        lambda: transformers.RobertaConfig(**SMALL, vocab_size=256, max_position_embeddings=40, pad_token_id=1),
        "RobertaModel",
        "token-classification",
        "AutoModelForTokenClassification",
    ),
    "distilbert": (
        lambda: transformers.DistilBertConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=128, vocab_size=256),
        "DistilBertModel",
        "text-classification",
        "AutoModelForSequenceClassification",
    ),
    "vit": (
        lambda: transformers.ViTConfig(**SMALL, image_size=32, patch_size=8),
        "ViTModel",
        "image-classification",
        "AutoModelForImageClassification",
    ),
    "gpt2": (
        lambda: transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64),
        "GPT2LMHeadModel",
        "causal-lm",
        "AutoModelForCausalLM",
    ),
    "llama": (
        lambda: transformers.LlamaConfig(**DECODER, tie_word_embeddings=False),
        "LlamaForCausalLM",
        "causal-lm",
        "AutoModelForCausalLM",
    ),
    "qwen2": (
        lambda: transformers.Qwen2Config(**DECODER, pad_token_id=0),
        "Qwen2Model",
        "text-classification",
        "AutoModelForSequenceClassification",
    ),
}


def _inputs(task):
    if task == "image-classification":
        return {"pixel_values": np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)}
    ids, mask = padded_text_batch(256, pad_id=0)
    return {"input_ids": ids, "attention_mask": mask}


def _params(model):
    from flax import nnx

    return {k: np.asarray(v) for k, v in flatten(nnx.to_pure_dict(nnx.state(model.module, nnx.Param))).items()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_export_loads_in_transformers_with_equal_logits_and_back_bit_identically(tmp_path, name):
    make_config, base_class, task, auto_class = CASES[name]
    _, path = tiny_model(tmp_path / "base", base_class, make_config(), jitter=0.02)
    labels = {"text-classification": 3, "token-classification": 4, "image-classification": 5}.get(task)
    model = ft.load(path, task=task, num_labels=labels)
    if labels:
        model.id2label = {i: f"class-{i}" for i in range(labels)}
    out = model.save_pretrained(tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [
        model.architecture.hf_architecture(model.architecture.config_from_hf(model.hf_config), task)
    ]
    inputs = _inputs(task)
    ours = np.asarray(model(**inputs))
    reference = getattr(transformers, auto_class).from_pretrained(out)
    theirs = torch_logits(reference, **inputs)
    mask = inputs.get("attention_mask")
    keep = mask.astype(bool) if mask is not None and ours.ndim == 3 else Ellipsis
    np.testing.assert_allclose(ours[keep], theirs[keep], atol=1e-5)
    if labels:
        assert reference.config.id2label[1] == "class-1"
    again = ft.load(out, task=task)
    mine, back = _params(model), _params(again)
    assert mine.keys() == back.keys() and all(np.array_equal(mine[k], back[k]) for k in mine)
    if task == "causal-lm":
        assert (out / "generation_config.json").exists()


def test_model_card_has_metadata_recipe_and_evaluation(tmp_path):
    _, path = tiny_model(tmp_path / "base", "BertModel", tiny_bert_config())
    model = ft.load(path, task="text-classification", num_labels=2).compile("full", learning_rate=1e-4)
    model.source = "me/tiny-bert"  # as if loaded from the Hub
    ids, mask = padded_text_batch(256, lengths=(5, 3, 4, 2))
    model.evaluate({"input_ids": ids, "attention_mask": mask, "labels": np.array([0, 1, 0, 1])}, batch_size=4)
    card = (
        model.save_pretrained(tmp_path / "export", datasets=["rotten_tomatoes"], license="apache-2.0") / "README.md"
    ).read_text()
    header = card.split("---")[1]
    for line in (
        "base_model: me/tiny-bert",
        "library_name: finetune",
        "license: apache-2.0",
        "- rotten_tomatoes",
        "- accuracy",
        "pipeline_tag: text-classification",
    ):
        assert line in header, line
    assert "| learning_rate | `0.0001` |" in card and "| accuracy |" in card


def test_a_failed_export_leaves_the_previous_export_intact_and_no_partial_dir(tmp_path, monkeypatch):
    _, path = tiny_model(tmp_path / "base", "BertModel", tiny_bert_config())
    model = ft.load(path, task="text-classification", num_labels=2)
    out = model.save_pretrained(tmp_path / "export")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr("safetensors.numpy.save_file", broken)
    with pytest.raises(OSError, match="No space"):
        model.save_pretrained(tmp_path / "export")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "export"]


def test_custom_modules_cannot_be_exported_in_hub_format(tmp_path):
    from tests.tiny import TinyClassifier

    with pytest.raises(ft.ConfigError, match="custom NNX module"):
        ft.Model(TinyClassifier(), task="text-classification").save_pretrained(tmp_path / "x")
