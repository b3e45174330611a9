"""Every task end to end on small generated data: tiny random checkpoints saved to disk, loaded with finetune.load,
fed raw text / words / images / prompts through the data pipeline, trained, evaluated and predicted."""

import logging

import datasets
import numpy as np
import pytest
import sklearn.metrics
import transformers

import finetune as ft
from finetune import data as data_lib

WORDS = "good great fine bad awful poor movie film plot actor the a is was and very not it this really".split()
PIECES = (
    ["##s", "##ly", "##ing"] + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"] + list("abcdefghijklmnopqrstuvwxyz")
)
CHAT_TEMPLATE = (
    "{% for m in messages %}< {{ m['role'] }} > {{ m['content'] }} < end > {% endfor %}"
    "{% if add_generation_prompt %}< assistant > {% endif %}"
)
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}


def bert_dir(path, cls_name="BertForSequenceClassification", num_labels=2, positions=64):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *PIECES]
    config = transformers.BertConfig(
        **TINY, vocab_size=len(vocab), max_position_embeddings=positions, num_labels=num_labels
    )
    getattr(transformers, cls_name)(config).save_pretrained(str(path))
    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(str(path))
    return str(path)


def gpt2_dir(path):
    import tokenizers

    vocab = ["<pad>", "<unk>", "<eos>", "<", ">", "user", "assistant", "end", "Q", "A", ":", *WORDS]
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    tok.chat_template = CHAT_TEMPLATE
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=len(vocab), n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return str(path)


def vit_dir(path, num_labels=3, channels=3):
    config = transformers.ViTConfig(**TINY, image_size=16, patch_size=4, num_channels=channels, num_labels=num_labels)
    transformers.ViTForImageClassification(config).save_pretrained(str(path))
    mean = [0.5] * channels
    processor = transformers.ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=mean, image_std=mean)
    processor.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {
        "seq": bert_dir(root / "seq"),
        "tok": bert_dir(root / "tok", "BertForTokenClassification", num_labels=3),
        "gpt2": gpt2_dir(root / "gpt2"),
        "vit": vit_dir(root / "vit"),
    }


def reviews(n, seed=0, *, pair=False, max_words=20):
    """Sentences whose label is whether they hold a positive word: learnable by a tiny model in a few steps."""
    rng = np.random.default_rng(seed)
    neutral = [w for w in WORDS if w not in ("good", "great", "fine", "bad", "awful", "poor")]
    texts, labels = [], []
    for _ in range(n):
        positive = bool(rng.integers(2))
        words = list(rng.choice(neutral, rng.integers(2, max_words)))
        words.insert(
            int(rng.integers(len(words))), str(rng.choice(["good", "great"] if positive else ["bad", "awful"]))
        )
        texts.append(" ".join(words))
        labels.append("pos" if positive else "neg")
    if pair:
        return {"sentence1": texts, "sentence2": [t[::-1] for t in texts], "label": labels}
    return {"sentence": texts, "label": labels}


def _compiled(model, batch_size=16, **kw):
    return model.compile(optimizer="adamw", learning_rate=kw.pop("learning_rate", 2e-3), batch_size=batch_size, **kw)


def test_text_classification_learns_sets_label_names_and_compiles_one_shape_per_bucket(dirs):
    train, test = datasets.Dataset.from_dict(reviews(256)), datasets.Dataset.from_dict(reviews(64, seed=1))
    model = _compiled(ft.load(dirs["seq"], task="text-classification", num_labels=2), max_length=32, packing=False)
    history = model.fit(train, test, epochs=4, verbose=0)
    assert model.id2label == {0: "neg", 1: "pos"} and model.hf_config.label2id == {"neg": 0, "pos": 1}
    assert history.history["val_accuracy"][-1] >= 0.9
    widths = {shape[1] for shape in history.compiled_shapes}
    assert len(widths) <= 2 and max(widths) <= 32  # fitted buckets, no more than the powers of two up to 32
    assert sum(history.compilations) == len(history.compiled_shapes)
    out = model.predict(test)
    assert out["labels"].shape == (64,) and out["probabilities"].shape == (64, 2)
    truth = [model.hf_config.label2id[v] for v in test["label"]]
    assert model.evaluate(test)["accuracy"] == pytest.approx(sklearn.metrics.accuracy_score(truth, out["labels"]))


def test_texts_and_rows_are_examples_and_anything_else_iterable_must_be_batches(dirs):
    data = reviews(20, seed=3)
    model = _compiled(ft.load(dirs["seq"], task="text-classification", num_labels=2))
    model.fit(data, epochs=1, verbose=0)
    columns = model.predict({"text": data["sentence"]})
    texts = model.predict(data["sentence"])  # a list of texts, as KerasHub's predict takes it
    np.testing.assert_array_equal(texts["logits"], columns["logits"])
    rows = [{"sentence": t, "label": y} for t, y in zip(data["sentence"], data["label"], strict=True)]
    rows[-1]["source"] = np.str_("a column only the last row has")  # numpy scalars are scalars too
    assert model.evaluate(rows) == model.evaluate(data)
    columns = data_lib.rows_to_columns(rows)
    assert list(columns) == ["sentence", "label", "source"] and columns["source"] == [None] * 19 + [
        "a column only the last row has"
    ]
    with pytest.raises(ft.DataError, match=r"labels|label column"):  # fitting on texts alone: nothing to learn
        model.fit(data["sentence"], epochs=1, verbose=0)
    with pytest.raises(ft.DataError, match=r"Item 0 of the iterable .* is a str \('.*'\), not a batch"):
        model.predict(t for t in data["sentence"])


def test_padding_tokens_and_rows_never_count_in_the_metrics(dirs):
    test = datasets.Dataset.from_dict(reviews(50, seed=2))
    model = _compiled(ft.load(dirs["seq"], task="text-classification", num_labels=2))
    one = model.evaluate(test, batch_size=50)  # one bucket, no padding rows
    many = model.evaluate(test, batch_size=8)  # several buckets, 6 padding rows in the last batch
    assert many["loss"] == pytest.approx(one["loss"], rel=1e-4) and many["accuracy"] == one["accuracy"]


def test_sentence_pairs_are_tokenized_as_pairs(dirs):
    model = ft.load(dirs["seq"], task="text-classification", num_labels=2)
    source = data_lib.as_source(reviews(8, pair=True), task=model.task, model=model)
    batch = next(source.batches(8, seed=None))
    assert batch["token_type_ids"].max() == 1 and (batch["token_type_ids"] * batch["attention_mask"]).sum() > 0


def test_regression_from_float_labels_matches_scikit_learn(dirs):
    rng = np.random.default_rng(0)
    raw = reviews(64)
    raw["label"] = [float(v == "pos") + rng.normal(0, 0.1) for v in raw["label"]]
    model = ft.load(dirs["seq"], task="text-classification", num_labels=1)
    model = _compiled(model, metrics=["mse", "mae"], max_length=16)
    model.fit(raw, epochs=1, verbose=0)
    got, pred = model.evaluate(raw), model.predict(raw)["predictions"]
    assert got["mse"] == pytest.approx(sklearn.metrics.mean_squared_error(raw["label"], pred), rel=1e-4)
    assert got["mae"] == pytest.approx(sklearn.metrics.mean_absolute_error(raw["label"], pred), rel=1e-4)


def test_multi_label_lists_become_multi_hot_targets_with_names(dirs):
    raw = reviews(64, max_words=12)
    raw["label"] = [["pos", "long"] if len(t) > 40 else ["neg"] if v == "neg" else ["pos"] for t, v in zip(
        raw["sentence"], raw["label"], strict=True)]  # fmt: skip
    model = ft.load(dirs["seq"], task="text-classification", num_labels=3)
    source = data_lib.as_source(raw, task=model.task, model=model)
    labels = next(source.batches(64, seed=None))["labels"]
    assert model.id2label == {0: "long", 1: "neg", 2: "pos"} and labels.shape == (64, 3)
    assert labels[0].tolist() == [float("pos" in raw["label"][0] and len(raw["sentence"][0]) > 40), *[
        float(n in raw["label"][0]) for n in ("neg", "pos")]]  # fmt: skip
    history = _compiled(model, max_length=16).fit(source, epochs=1, verbose=0)
    assert "f1_micro" in history.history
    out = model.predict(source)  # sigmoid per label, not a softmax over labels
    np.testing.assert_allclose(out["probabilities"], 1 / (1 + np.exp(-out["logits"])), rtol=1e-5)
    assert out["labels"].shape == (64, 3) and model.hf_config.problem_type == "multi_label_classification"


def test_token_classification_labels_only_the_first_word_piece(dirs):
    tags = datasets.Sequence(datasets.ClassLabel(names=["O", "B-POS", "B-NEG"]))
    words = [["the", "goodly", "film"], ["awful", "plots", "x"], ["a", "movie"]]
    ner = [[0, 1, 0], [2, 0, 0], [0, 0]]
    ds = datasets.Dataset.from_dict({"tokens": words, "ner_tags": ner}, features=datasets.Features(
        {"tokens": datasets.Sequence(datasets.Value("string")), "ner_tags": tags}))  # fmt: skip
    model = _compiled(ft.load(dirs["tok"], task="token-classification", num_labels=3))
    batch = next(data_lib.as_source(ds, task=model.task, model=model).batches(3, seed=None))
    # [CLS] the good ##ly film [SEP]: "goodly" is two pieces, only the first carries B-POS
    assert batch["labels"][0, :6].tolist() == [-100, 0, 1, -100, 0, -100]
    assert model.id2label == {0: "O", 1: "B-POS", 2: "B-NEG"}
    model.fit(ds, epochs=2, batch_size=3, verbose=0)
    got = model.evaluate(ds)
    pred = model.predict(ds)["labels"]
    truth = batch["labels"][:, : pred.shape[1]]  # predict pads to the longest example, not to a bucket
    flat_pred, flat_true = pred[truth != -100], truth[truth != -100]
    assert got["accuracy"] == pytest.approx(sklearn.metrics.accuracy_score(flat_true, flat_pred))


def test_image_classification_processes_images_and_refuses_wrong_channels(dirs):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 24)
    images = (rng.random((24, 20, 20, 3)) * 60 + labels[:, None, None, None] * 80).astype(np.uint8)
    model = _compiled(ft.load(dirs["vit"], task="image-classification", num_labels=3), learning_rate=3e-3)
    history = model.fit((images, labels), epochs=6, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert model.predict((images, labels))["probabilities"].shape == (24, 3)
    with pytest.raises(ft.DataError, match=r"shape \(20, 20, 4\).*3 channels"):
        data_lib.as_source((np.zeros((4, 20, 20, 4), np.uint8), labels[:4]), task=model.task, model=model)


def test_prompt_completion_puts_the_loss_on_the_completion_and_eos_only(dirs):
    model = ft.load(dirs["gpt2"], task="causal-lm")
    raw = {"prompt": ["Q : good movie", "Q : bad film"], "completion": [" A : good", " A : very bad"]}
    batch = next(data_lib.as_source(raw, task=model.task, model=model).batches(2, seed=None))
    tokens = model.tokenizer.convert_ids_to_tokens(batch["input_ids"][1].tolist())
    trained = [t for t, m in zip(tokens, batch["loss_mask"][1], strict=True) if m]
    assert trained == ["A", ":", "very", "bad", "<eos>"]


def test_chat_messages_train_only_the_assistant_turns(dirs):
    model = ft.load(dirs["gpt2"], task="causal-lm")
    chat = [
        {"role": "user", "content": "good movie"},
        {"role": "assistant", "content": "very good"},
        {"role": "user", "content": "bad film"},
        {"role": "assistant", "content": "awful"},
    ]
    batch = next(data_lib.as_source({"messages": [chat]}, task=model.task, model=model).batches(1, seed=None))
    tokens = model.tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    trained = " ".join(t for t, m in zip(tokens, batch["loss_mask"][0], strict=True) if m)
    assert trained == "very good < end > awful < end >"


def test_causal_lm_fits_with_packing_and_reports_perplexity(dirs):
    model = _compiled(ft.load(dirs["gpt2"], task="causal-lm"), learning_rate=3e-3)
    rng = np.random.default_rng(0)
    raw = {"text": [" ".join(rng.choice(WORDS, rng.integers(3, 8))) for _ in range(64)]}
    packed = data_lib.as_source(raw, task=model.task, model=model, packing=True, max_length=32)
    assert len(packed) < 64 / 3 and packed.lengths.max() <= 32
    history = model.fit(packed, epochs=3, batch_size=8, verbose=0)
    assert history.history["perplexity"][-1] < history.history["perplexity"][0]
    assert history.history["perplexity"][-1] == pytest.approx(np.exp(history.history["loss"][-1]), rel=1e-3)


def test_long_texts_are_truncated_and_counted_in_the_log(dirs, caplog):
    model = ft.load(dirs["seq"], task="text-classification", num_labels=2)
    raw = {"text": ["good " * 100, "bad film"], "label": [1, 0]}
    with caplog.at_level(logging.WARNING, logger="finetune"):
        source = data_lib.as_source(raw, task=model.task, model=model, max_length=32)
    assert "Truncated 1 of 2 examples" in caplog.text and source.lengths.max() == 32
    with pytest.raises(ft.DataError, match="more than the model's 64 positions"):
        data_lib.as_source(raw, task=model.task, model=model, max_length=100)


def test_text_without_a_tokenizer_says_what_to_pass(dirs):
    model = ft.load(dirs["seq"], task="text-classification", num_labels=2)
    model.tokenizer = None
    with pytest.raises(ft.DataError, match=r"no tokenizer.*AutoTokenizer\.from_pretrained"):
        data_lib.as_source(reviews(4), task=model.task, model=model)


def test_labels_that_disagree_with_num_labels_name_both(dirs):
    model = ft.load(dirs["seq"], task="text-classification", num_labels=2)
    raw = reviews(6, max_words=4)
    raw["label"] = [0, 1, 2, 0, 1, 2]
    with pytest.raises(ft.DataError, match=r"outside \[0, num_labels\) = \[0, 2\).*num_labels=3"):
        data_lib.as_source(raw, task=model.task, model=model)
    raw["label"] = ["a", "b", "c", "a", "b", "c"]
    with pytest.raises(ft.DataError, match=r"3 labels.*num_labels=2"):
        data_lib.as_source(raw, task=model.task, model=model)
