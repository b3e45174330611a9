"""The data pipeline without models: sources, buckets, shuffling and resuming, labels, columns, files, errors, and
metrics over masked batches against scikit-learn."""

import itertools

import datasets
import jax.numpy as jnp
import numpy as np
import pytest
import sklearn.metrics

import finetune as ft
from finetune import data as data_lib
from finetune import metrics as metrics_lib
from finetune.data import labels as labels_lib
from finetune.data.columns import find_columns
from finetune.data.text import align, pack
from finetune.metrics import Scored


def ragged_source(n=50, seed=0, max_length=128):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_length + 20, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    values = rng.integers(1, 100, offsets[-1]).astype(np.int32)
    labels = rng.integers(0, 2, n).astype(np.int32)
    buckets = data_lib.length_buckets(max_length)
    return data_lib.ArrayData({"labels": labels}, sequences={"input_ids": (values, offsets)}, buckets=buckets)


def test_length_buckets_are_powers_of_two_up_to_max_length():
    assert data_lib.length_buckets(128) == (16, 32, 64, 128)
    assert data_lib.length_buckets(100) == (16, 32, 64, 100)
    assert data_lib.length_buckets(8) == (8,)


@pytest.mark.parametrize("seed", range(6))
def test_fitted_buckets_leave_the_least_padding_with_no_more_shapes_than_powers_of_two(seed):
    rng = np.random.default_rng(seed)
    limit = int(rng.choice([40, 64, 100]))
    lengths = np.minimum(rng.gamma(shape=rng.uniform(1, 6), scale=rng.uniform(3, 12), size=300).astype(int) + 1, limit)
    buckets = data_lib.fitted_buckets(lengths, limit)

    def padded(widths):  # every example padded to its bucket
        widths = np.asarray(widths)
        return int(widths[np.searchsorted(widths, lengths)].sum())

    powers = data_lib.length_buckets(limit)
    used_powers = sorted({min(b for b in powers if b >= n) for n in lengths})
    top = min(limit, -(-int(lengths.max()) // 8) * 8)
    candidates = sorted({*range(8, top, 8), top})
    brute = min(  # every choice of at most that many multiples of 8, ending at the longest example
        padded((*rest, top)) for k in range(len(used_powers)) for rest in itertools.combinations(candidates[:-1], k)
    )
    assert buckets[-1] == top and all(b % 8 == 0 or b == limit for b in buckets)
    assert len(buckets) <= len(used_powers)
    assert padded(buckets) == brute <= padded(used_powers)


def test_batches_pad_to_the_smallest_bucket_and_mask_padding():
    source = ragged_source()
    for batch in source.batches(16, seed=0):
        real = batch["example_mask"] > 0
        longest = batch["attention_mask"][real].sum(1).max()
        width = batch["input_ids"].shape[1]
        assert width == min(b for b in source.buckets if b >= longest)
        assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()
    assert batch["example_mask"].tolist() == [1.0] * 2 + [0.0] * 14  # 50 = 3 * 16 + 2
    assert (batch["labels"][2:] == -100).all()
    assert {shape[1] for shape in source.shapes} <= set(source.buckets)


def test_sequences_longer_than_the_last_bucket_keep_their_first_tokens():
    source = ragged_source(max_length=32)
    batch = source.take(np.arange(50))
    values, offsets = source.sequences["input_ids"]
    longest = int(np.argmax(np.diff(offsets)))
    assert batch["input_ids"].shape[1] == 32
    np.testing.assert_array_equal(batch["input_ids"][longest], values[offsets[longest] : offsets[longest] + 32])


def test_shuffling_is_seeded_per_epoch_and_resumes_exactly_from_a_step():
    source = ragged_source()
    first = [b["labels"].tolist() for b in source.batches(8, seed=3, epoch=1)]
    again = [b["labels"].tolist() for b in source.batches(8, seed=3, epoch=1)]
    other = [b["labels"].tolist() for b in source.batches(8, seed=3, epoch=2)]
    resumed = [b["labels"].tolist() for b in source.batches(8, seed=3, epoch=1, start=4)]
    assert first == again and first != other and resumed == first[4:]
    ids = [b["input_ids"] for b in source.batches(8, seed=3, epoch=1, start=4)]
    np.testing.assert_array_equal(ids[0], list(source.batches(8, seed=3, epoch=1))[4]["input_ids"])


def test_grouping_by_length_pads_less_covers_every_example_once_and_resumes():
    source = ragged_source(n=2000, max_length=64)
    lengths = source.lengths

    def tokens(batches):  # padded width x real rows, summed: the compute a step pays for
        return sum(b["input_ids"].shape[1] * int(b["example_mask"].sum()) for b in batches)

    grouped = list(source.batches(16, seed=1, epoch=2, group=True))
    plain = list(source.batches(16, seed=1, epoch=2))
    assert tokens(grouped) < 0.8 * tokens(plain)
    seen = np.concatenate([b["attention_mask"][b["example_mask"] > 0].sum(1) for b in grouped])
    assert sorted(seen.tolist()) == sorted(lengths.tolist())  # every example once (by its length profile)
    assert sum(int(b["example_mask"].sum()) for b in grouped) == 2000
    assert len(grouped) == source.steps(16)
    again = list(source.batches(16, seed=1, epoch=2, group=True, start=7))
    np.testing.assert_array_equal(again[0]["input_ids"], grouped[7]["input_ids"])
    other = list(source.batches(16, seed=1, epoch=3, group=True))
    assert not all(np.array_equal(a["labels"], b["labels"]) for a, b in zip(grouped, other, strict=True))
    spread = [np.ptp(b["attention_mask"][b["example_mask"] > 0].sum(1)) for b in grouped]
    assert np.median(spread) < 0.25 * np.ptp(lengths)  # a batch holds similar lengths


def test_prefetch_yields_device_arrays_in_order():
    source = ragged_source()
    host = [b["labels"] for b in source.batches(8, seed=None)]
    device = [b["labels"] for b in data_lib.prefetch(source.batches(8, seed=None))]
    assert all(isinstance(d, jnp.ndarray) for d in device)
    np.testing.assert_array_equal(np.concatenate(host), np.concatenate([np.asarray(d) for d in device]))


def test_string_labels_get_a_sorted_vocabulary_and_class_labels_their_names():
    assert labels_lib.encode(["pos", "neg", "pos"], model=None, column="label").tolist() == [1, 0, 1]
    ds = datasets.Dataset.from_dict(
        {"text": ["a", "b"], "label": [1, 0]},
        features=datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["x", "y"])}),
    )
    model = ft.Model(_module(), task="text-classification")
    from finetune.data.labels import encode_label_column

    assert encode_label_column(ds, "label", model=model, stage="fit").tolist() == [1, 0]
    assert model.id2label == {0: "x", 1: "y"}
    with pytest.raises(ft.DataError, match=r"labels the model was not trained on: \['z'\]"):
        labels_lib.encode(["x", "z"], model=model, column="label", stage="evaluate")


def test_multi_label_names_become_multi_hot():
    out = labels_lib.encode([["b"], ["a", "c"], []], model=None, column="labels")
    np.testing.assert_array_equal(out, [[0, 1, 0], [1, 0, 1], [0, 0, 0]])


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["text", "label"], {"text": "text", "label": "label"}),
        (["sentence", "labels", "idx"], {"text": "sentence", "label": "labels"}),
        (["sentence1", "sentence2", "label"], {"text": "sentence1", "text_pair": "sentence2", "label": "label"}),
        (["premise", "hypothesis", "label"], {"text": "premise", "text_pair": "hypothesis", "label": "label"}),
    ],
)
def test_common_text_layouts_are_found(names, expected):
    assert find_columns(names, "text-classification") == expected


def test_other_tasks_find_their_columns_and_explicit_names_win():
    assert find_columns(["tokens", "ner_tags"], "token-classification") == {"tokens": "tokens", "tags": "ner_tags"}
    assert find_columns(["img", "label"], "image-classification") == {"image": "img", "label": "label"}
    assert find_columns(["prompt", "completion"], "causal-lm") == {"prompt": "prompt", "completion": "completion"}
    assert find_columns(["messages", "text"], "causal-lm") == {"messages": "messages"}
    cols = find_columns(["review", "stars"], "text-classification", {"text": "review", "label": "stars"})
    assert cols == {"text": "review", "label": "stars"}


def test_a_missing_label_column_lists_the_columns_that_exist():
    with pytest.raises(ft.DataError, match=r"no label column.*\['text', 'stars'\].*columns=\{'label'"):
        find_columns(["text", "stars"], "text-classification")
    assert find_columns(["text"], "text-classification", need_labels=False) == {"text": "text"}
    with pytest.raises(ft.DataError, match="no such column"):
        find_columns(["text"], "text-classification", {"label": "stars"})


def test_word_labels_go_to_the_first_piece_only():
    assert align([None, 0, 0, 1, 2, 2, None], [5, 6, 7]) == [-100, 5, -100, 6, 7, -100, -100]


def test_packing_groups_consecutive_examples_up_to_max_length():
    offsets = np.array([0, 3, 5, 9, 10, 16])
    packed = pack({"input_ids": (np.arange(16), offsets)}, 6)["input_ids"][1]
    assert packed.tolist() == [0, 5, 10, 16] and np.diff(packed).max() <= 6


def test_empty_data_and_dataset_dicts_and_unknown_types_are_refused():
    with pytest.raises(ft.DataError, match="empty"):
        data_lib.as_source({"x": np.zeros((0, 3)), "labels": np.zeros(0)}, task="text-classification")
    with pytest.raises(ft.DataError, match="empty"):
        data_lib.as_source(datasets.Dataset.from_dict({"text": [], "label": []}), task="text-classification")
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]})})
    with pytest.raises(ft.DataError, match=r"splits \['train'\].*data\['train'\]"):
        data_lib.as_source(dd, task="text-classification")
    with pytest.raises(ft.DataError, match="suffix '.xlsx'"):
        data_lib.as_source("reviews.xlsx", task="text-classification")


@pytest.mark.parametrize("fmt", ["csv", "json", "parquet"])
def test_local_files_are_read_with_datasets(tmp_path, fmt):
    frame = datasets.Dataset.from_dict({"x": [1.0, 2.0, 3.0], "labels": [0, 1, 0]})
    path = tmp_path / f"data.{fmt}"
    getattr(frame, f"to_{fmt}")(str(path))
    loaded = data_lib.load_file(path)
    assert loaded.column_names == ["x", "labels"] and len(loaded) == 3


def test_numeric_arrays_with_out_of_range_labels_name_both_sides():
    model = ft.Model(_module(), task="text-classification", id2label={0: "a", 1: "b"})
    with pytest.raises(ft.DataError, match=r"outside \[0, num_labels\) = \[0, 2\)"):
        data_lib.as_source((np.zeros((3, 4), np.float32), np.array([0, 1, 5])), task=model.task, model=model)


# ---------------------------------------------------------------- metrics over masked batches = scikit-learn
def _scored(family, logits, labels, weights):
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    return Scored(family, logits, labels, jnp.asarray(weights, jnp.float32), jnp.zeros(len(weights)))


def _metric(name, scored, classes):
    (metric,) = [m for m in metrics_lib.resolve([name]) if m.name == name]
    return metric.result(metric.update(metric.init(classes), scored))


def test_classification_metrics_over_padded_batches_equal_scikit_learn():
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(40, 6)), rng.integers(0, 6, 40)
    weights = np.r_[np.ones(33), np.zeros(7)]  # 7 padding rows
    s = _scored("single", logits, np.where(weights > 0, labels, -100), weights)
    y, pred = labels[:33], logits[:33].argmax(-1)
    assert _metric("accuracy", s, 6) == pytest.approx(sklearn.metrics.accuracy_score(y, pred))
    assert _metric("top3_accuracy", s, 6) == pytest.approx(
        sklearn.metrics.top_k_accuracy_score(y, logits[:33], k=3, labels=range(6))
    )
    for name, avg in (("f1_macro", "macro"), ("f1_micro", "micro"), ("precision", "macro"), ("recall", "macro")):
        fn = {"f1": sklearn.metrics.f1_score, "precision": sklearn.metrics.precision_score}.get(
            name.split("_")[0], sklearn.metrics.recall_score
        )
        assert _metric(name, s, 6) == pytest.approx(fn(y, pred, average=avg, zero_division=0)), name


def test_multi_label_and_regression_metrics_equal_scikit_learn():
    rng = np.random.default_rng(1)
    logits, labels = rng.normal(size=(30, 4)), (rng.random((30, 4)) > 0.5).astype(np.float32)
    weights = np.r_[np.ones(25), np.zeros(5)]
    s = _scored("multi", logits, labels, weights)
    pred = (logits[:25] > 0).astype(int)
    assert _metric("f1_micro", s, 4) == pytest.approx(sklearn.metrics.f1_score(labels[:25], pred, average="micro"))
    assert _metric("f1_macro", s, 4) == pytest.approx(sklearn.metrics.f1_score(labels[:25], pred, average="macro"))
    assert _metric("accuracy", s, 4) == pytest.approx(sklearn.metrics.accuracy_score(labels[:25], pred))
    out, target = rng.normal(size=(30, 1)), rng.normal(size=30)
    r = _scored("regression", out, target, weights)
    assert _metric("mse", r, 1) == pytest.approx(sklearn.metrics.mean_squared_error(target[:25], out[:25, 0]))
    assert _metric("mae", r, 1) == pytest.approx(sklearn.metrics.mean_absolute_error(target[:25], out[:25, 0]))


def _module():
    from flax import nnx

    return nnx.Linear(4, 2, rngs=nnx.Rngs(0))
