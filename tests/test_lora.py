"""LoRA: adapters by module-path regex, frozen-and-free base weights, merged export, and PEFT-format adapters that
the ``peft`` library loads onto the transformers base model with equal logits."""

import json

import numpy as np
import pytest
import transformers
from flax import nnx

import finetune as ft
from finetune.params import lora
from finetune.params.rules import flatten
from tests.models.reference import padded_text_batch, tiny_bert_config, tiny_model, torch_logits

DECODER = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}
IDS, MASK = padded_text_batch(256, lengths=(7, 4, 1, 5))
BATCH = {"input_ids": IDS, "attention_mask": MASK}


def _params(model) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in flatten(nnx.to_pure_dict(nnx.state(model.module, nnx.Param))).items()}


def _nbytes(tree) -> int:
    import jax

    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A tiny BERT encoder (no classifier in the checkpoint), adapted with preset ``lora`` and trained 3 steps."""
    _, path = tiny_model(tmp_path_factory.mktemp("bert"), "BertModel", tiny_bert_config(), jitter=0.02)
    model = ft.load(path, task="text-classification", num_labels=2)
    before = {"params": _params(model), "logits": np.asarray(model(**BATCH))}
    model.compile("lora", learning_rate=1e-2, lora={"rank": 4, "alpha": 8}, log_every=1)
    before["adapted_logits"] = np.asarray(model(**BATCH))
    model.fit({**BATCH, "labels": np.array([0, 1, 0, 1])}, steps=3, batch_size=4, verbose=0)
    return path, model, before


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama causal LM with a tokenizer, SFT-trained 3 steps with preset ``lora-sft`` on prompt/completion."""
    import datasets

    config = transformers.LlamaConfig(**DECODER, pad_token_id=0)
    _, path = tiny_model(tmp_path_factory.mktemp("llama"), "LlamaForCausalLM", config, jitter=0.02)
    _tiny_tokenizer(path)
    model = ft.load(path, task="causal-lm")
    data = datasets.Dataset.from_list(_sft_rows(24))
    before = {"params": _params(model)}
    model.compile("lora-sft", learning_rate=1e-2, lora={"rank": 4, "alpha": 16}, batch_size=8, max_length=16)
    before["loss"] = model.evaluate(data)["loss"]
    model.fit(data, steps=3, verbose=0)
    before["trained_loss"] = model.evaluate(data)["loss"]
    return path, model, before


def test_adapters_are_lora_params_beside_the_kernel_and_leave_the_model_unchanged_at_init(bert):
    _, model, before = bert
    paths = sorted(lora.adapted(model.module))
    assert paths == [f"encoder/layers/{i}/attention/{p}" for i in (0, 1) for p in ("query", "value")]
    state = nnx.to_flat_state(nnx.state(model.module, nnx.LoRAParam))
    assert {"/".join(map(str, p)) for p, _ in state} == {f"{m}/lora/lora_{x}" for m in paths for x in "ab"}
    assert "encoder/layers/0/attention/query/kernel" in _params(model)  # the table's paths are untouched
    np.testing.assert_array_equal(before["adapted_logits"], before["logits"])  # lora_b starts at zero


def test_only_adapters_and_the_new_head_train_and_optimizer_state_scales_with_adapter_size(bert):
    _, model, before = bert
    trainer = model.trainer
    trained = set(flatten(trainer.state["params"]))
    assert trained == {p for p in _params(model) if "/lora/" in p or p.startswith("classifier/")}
    trainable_bytes = _nbytes(trainer.state["params"])
    opt_bytes = _nbytes(trainer.state["opt"])
    model_bytes = sum(v.nbytes for v in _params(model).values())
    assert 2 * trainable_bytes <= opt_bytes <= 2 * trainable_bytes + 1024  # AdamW: mu + nu, plus a few counters
    assert opt_bytes < model_bytes / 10
    by_group = ft.optim.state_bytes(trainer.state["opt"])
    assert set(by_group) == {"lora", "new"}
    after = _params(model)
    frozen = [p for p in before["params"] if not p.startswith("classifier/")]
    assert all(np.array_equal(before["params"][p], after[p]) for p in frozen)  # the base weights never move
    assert all(np.abs(after[f"{m}/lora/lora_b"]).max() > 0 for m in lora.adapted(model.module))


def test_save_adapter_loads_in_peft_with_equal_logits_for_an_encoder_with_a_new_head(bert, tmp_path):
    peft = pytest.importorskip("peft")
    path, model, _ = bert
    out = model.save_adapter(tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.1)
    assert config["target_modules"] == ["query", "value"] and config["modules_to_save"] == ["classifier"]
    base = transformers.BertForSequenceClassification.from_pretrained(path, num_labels=2)
    theirs = torch_logits(peft.PeftModel.from_pretrained(base, out), **BATCH)
    np.testing.assert_allclose(np.asarray(model(**BATCH)), theirs, atol=1e-5)


def test_causal_lm_sft_trains_only_the_adapters_and_lowers_the_completion_loss(llama):
    _, model, before = llama
    assert before["trained_loss"] < before["loss"]
    trainer = model.trainer
    assert set(flatten(trainer.state["params"])) == {p for p in _params(model) if "/lora/" in p}
    assert (
        2 * _nbytes(trainer.state["params"])
        <= _nbytes(trainer.state["opt"])
        <= 2 * _nbytes(trainer.state["params"]) + 1024
    )
    after = _params(model)
    assert all(np.array_equal(v, after[k]) for k, v in before["params"].items())


def test_save_adapter_loads_in_peft_with_equal_logits_for_a_decoder(llama, tmp_path):
    peft = pytest.importorskip("peft")
    path, model, _ = llama
    out = model.save_adapter(tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["modules_to_save"] is None
    assert config["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    base = transformers.LlamaForCausalLM.from_pretrained(path)
    theirs = torch_logits(peft.PeftModel.from_pretrained(base, out), **BATCH)
    keep = MASK.astype(bool)
    np.testing.assert_allclose(np.asarray(model(**BATCH))[keep], theirs[keep], atol=1e-5)


ENCODER = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}
# family -> (transformers classifier class, its config, LoRA targets: the preset's attention ones for encoders)
CLASSIFIERS = {
    "bert": ("BertForSequenceClassification", lambda: tiny_bert_config(num_labels=2), None),
    "roberta": (
        "RobertaForSequenceClassification",
        lambda: transformers.RobertaConfig(**ENCODER, vocab_size=256, num_labels=2),
        None,
    ),
    "distilbert": (
        "DistilBertForSequenceClassification",
        lambda: transformers.DistilBertConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=128, vocab_size=256),
        None,
    ),
    "llama": (
        "LlamaForSequenceClassification",
        lambda: transformers.LlamaConfig(**{**DECODER, "pad_token_id": 0, "num_labels": 2}),
        ".*(q_proj|v_proj)",
    ),
}


@pytest.mark.parametrize("head", ["trained", "frozen"])
@pytest.mark.parametrize("family", sorted(CLASSIFIERS))
def test_save_adapter_loads_in_peft_with_equal_logits_for_a_pretrained_head_trained_or_frozen(family, head, tmp_path):
    """PEFT wraps a classifier's head itself (``classifier``/``score`` and every module whose name ends so) and reads
    its weights from the adapter: they are saved whether the head trained or stayed frozen."""
    peft = pytest.importorskip("peft")
    cls_name, config, targets = CLASSIFIERS[family]
    _, path = tiny_model(tmp_path / "base", cls_name, config(), jitter=0.02)
    model = ft.load(path, task="text-classification", num_labels=2)
    assert model.new_paths == ()
    head_before = {k: v for k, v in _params(model).items() if k.startswith(("classifier", "pre_classifier", "score"))}
    groups = {"head": {"trainable": True}} if head == "trained" else None
    lora_options = {"rank": 4, "alpha": 8, **({"targets": targets} if targets else {})}
    model.compile("lora", learning_rate=1e-2, lora=lora_options, groups=groups, log_every=1)
    model.fit({**BATCH, "labels": np.array([0, 1, 0, 1])}, steps=3, batch_size=4, verbose=0)
    head_after = {k: _params(model)[k] for k in head_before}
    moved = any(not np.array_equal(head_before[k], head_after[k]) for k in head_before)
    assert moved == (head == "trained")
    out = model.save_adapter(tmp_path / "adapter")
    base = getattr(transformers, cls_name).from_pretrained(path, num_labels=2)
    theirs = torch_logits(peft.PeftModel.from_pretrained(base, out), **BATCH)
    np.testing.assert_allclose(np.asarray(model(**BATCH)), theirs, atol=1e-5)


@pytest.mark.parametrize("case", ["bert", "llama"])
def test_save_pretrained_merges_adapters_and_loads_in_transformers_without_changing_the_model(case, request, tmp_path):
    model = request.getfixturevalue(case)[1]
    state = _params(model)
    out = model.save_pretrained(tmp_path / "merged")
    auto = {"bert": "AutoModelForSequenceClassification", "llama": "AutoModelForCausalLM"}[case]
    theirs = torch_logits(getattr(transformers, auto).from_pretrained(out), **BATCH)
    ours = np.asarray(model(**BATCH))
    keep = MASK.astype(bool) if ours.ndim == 3 else Ellipsis
    np.testing.assert_allclose(ours[keep], theirs[keep], atol=1e-5)
    after = _params(model)
    assert after.keys() == state.keys() and all(np.array_equal(state[k], after[k]) for k in state)
    assert not any("lora" in k for k in _params(ft.load(out, task=model.task)))


def test_a_target_that_matches_no_linear_module_is_an_error_naming_near_misses(tmp_path):
    _, path = tiny_model(tmp_path / "base", "BertModel", tiny_bert_config())
    model = ft.load(path, task="text-classification", num_labels=2)
    with pytest.raises(ft.ConfigError, match=r"match no nnx.Linear.*attention/query"):
        model.compile("lora", lora={"targets": [".*attention/(query|value)", ".*attention/querry"]})
    with pytest.raises(ft.ConfigError, match=r"`lora.rank` must be an int >= 1"):
        model.compile("lora", lora={"rank": 0})
    with pytest.raises(ft.ConfigError, match="already has LoRA adapters"):
        model.compile("lora", lora={"rank": 4}).compile("lora", lora={"rank": 2})


def test_lora_overrides_merge_into_the_preset_and_both_presets_exist():
    assert {"lora", "lora-sft"} <= set(ft.presets.list())
    recipe = ft.presets.get("lora").replace(lora={"rank": 4})
    assert recipe.lora["rank"] == 4 and recipe.lora["targets"] == ft.presets.get("lora").lora["targets"]


def _tiny_tokenizer(directory) -> None:
    """A word-level tokenizer over the words ``w0 .. w250``, saved next to the model (fully offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(252)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.save_pretrained(directory)


def _sft_rows(n: int) -> list[dict[str, str]]:
    rng = np.random.default_rng(0)
    return [
        {"prompt": " ".join(f"w{i}" for i in rng.integers(4, 250, 5)), "completion": f" w{k} w{k + 1}"}
        for k in rng.integers(4, 200, n)
    ]


def test_cli_fit_with_preset_lora_sft_runs_end_to_end_on_a_tiny_decoder(tmp_path):
    from finetune.cli import main

    _, path = tiny_model(tmp_path / "base", "LlamaForCausalLM", transformers.LlamaConfig(**DECODER, pad_token_id=0))
    _tiny_tokenizer(path)
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _sft_rows(24)))
    sets = ["--set", "epochs=1", "--set", "batch_size=8", "--set", "max_length=16"]
    args = ["fit", "--model", path, "--data", str(data), "--task", "causal-lm", "--preset", "lora-sft", *sets]
    assert main([*args, "--output", str(tmp_path / "run"), "--quiet"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["recipe"]["lora"]["rank"] == 16
    exported = ft.load(tmp_path / "run" / "model", task="causal-lm")
    assert not any("lora" in k for k in _params(exported))
