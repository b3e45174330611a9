"""Packed text-classification batches: several examples to a row, each attending only to itself, one shape per epoch."""

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import finetune as ft
from finetune import data as data_lib
from finetune.data.batches import first_fit
from finetune.models.blocks.dropout import Dropout
from tests.test_data_tasks import PIECES, WORDS, bert_dir, reviews


@pytest.fixture(scope="module")
def seq_dir(tmp_path_factory):
    return bert_dir(tmp_path_factory.mktemp("packing") / "seq")


def ragged(n, seed=0, longest=40):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, longest + 1, n)
    values = rng.integers(5, 1000, lengths.sum()).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    columns = {"labels": rng.integers(0, 3, n).astype(np.int32)}
    return data_lib.ArrayData(columns, sequences={"input_ids": (values, offsets)}), values, offsets


def test_every_token_is_placed_once_with_its_own_positions_and_a_segment_of_its_own():
    data, values, offsets = ragged(300)
    width = data.buckets[-1]
    rows = data.packed_rows(32, 0)
    batches = list(data.batches(32, seed=0, pack=True))
    assert {b["input_ids"].shape for b in batches} == {(rows, width)}  # one shape for the whole epoch
    seen = []
    for index, b in zip(data._slices(32, 0, 0, False), batches, strict=True):
        n = len(index)
        assert b["example_mask"].tolist() == [1.0] * n + [0.0] * (32 - n)
        assert b["labels"][:n].tolist() == data.columns["labels"][index].tolist()
        claimed = np.zeros(b["input_ids"].shape, bool)
        for i, example in enumerate(index):
            r, c, length = b["example_rows"][i], b["example_cols"][i], data.lengths[example]
            span = np.s_[r, c : c + length]
            assert b["input_ids"][span].tolist() == values[offsets[example] : offsets[example] + length].tolist()
            assert b["position_ids"][span].tolist() == list(range(length))
            assert len(set(b["segment_ids"][span].tolist())) == 1 and b["segment_ids"][r, c] > 0
            assert not claimed[span].any()
            claimed[span] = True
            seen.append(example)
        assert (b["segment_ids"][~claimed] == 0).all() and (b["input_ids"][~claimed] == 0).all()
        for r in range(b["input_ids"].shape[0]):  # the segments of a row are distinct examples
            starts = b["segment_ids"][r][claimed[r]]
            assert len(set(starts.tolist())) == (b["example_rows"][:n] == r).sum()
    assert sorted(seen) == list(range(300))


def test_packing_pads_about_as_little_as_length_grouping_with_a_single_shape():
    data, _, _ = ragged(2000, seed=1, longest=64)
    packed = list(data.batches(32, seed=0, pack=True))
    grouped = list(data.batches(32, seed=0, group=True))
    real = int(data.lengths.sum())
    packed_tokens = sum(b["input_ids"].size for b in packed)
    grouped_tokens = sum(b["input_ids"].size for b in grouped)
    assert len({b["input_ids"].shape for b in packed}) == 1 < len({b["input_ids"].shape for b in grouped})
    assert real < packed_tokens < 1.15 * grouped_tokens


def test_a_later_batch_that_needs_more_rows_gets_them():
    data, _, _ = ragged(64, seed=2)
    index = np.arange(32)
    needed = len(first_fit(data.lengths[index], data.buckets[-1])[0])
    batch = data.take_packed(index, needed - 1, 32)
    assert batch["input_ids"].shape[0] >= needed and batch["input_ids"].shape[0] % 4 == 0


def _bert():
    from finetune.models.bert.modeling import Bert, Config

    return Bert(Config(1000, 32, 2, 4, 128), task="text-classification", num_labels=3, rngs=nnx.Rngs(0))


def _roberta():
    from finetune.models.bert.modeling import Config
    from finetune.models.roberta.modeling import Config as RobertaConfig
    from finetune.models.roberta.modeling import Roberta

    config = RobertaConfig(Config(1000, 32, 2, 4, 128, type_vocab_size=1), pad_token_id=1)
    return Roberta(config, task="text-classification", num_labels=3, rngs=nnx.Rngs(0))


def _distilbert():
    from finetune.models.distilbert.modeling import Config, DistilBert

    config = Config(vocab_size=1000, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=128)
    return DistilBert(config, task="text-classification", num_labels=3, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("build", [_bert, _roberta, _distilbert], ids=["bert", "roberta", "distilbert"])
def test_each_packing_architecture_gives_every_example_its_unpacked_logits(build):
    module = nnx.view(build(), deterministic=True, raise_if_not_found=False)
    data, _, _ = ragged(40, seed=3, longest=30)
    index = np.arange(40)
    plain, packed = data.take(index), data.take_packed(index, data.packed_rows(40, 0), 40)
    assert packed["input_ids"].shape[0] < 40
    expected = module(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"])
    names = ("input_ids", "position_ids", "segment_ids", "example_rows", "example_cols")
    np.testing.assert_allclose(module(**{k: packed[k] for k in names}), expected, atol=2e-5)


def _loss(module, batch):
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "example_mask")}
    logits = module(**inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean(), logits


def test_packed_bert_computes_what_unpacked_bert_computes(seq_dir):
    model = ft.load(seq_dir, task="text-classification", num_labels=2)
    source = data_lib.as_source(
        datasets.Dataset.from_dict(reviews(24, max_words=30)), task=model.task, model=model, max_length=64
    )
    for _, module in model.module.iter_modules():  # no dropout: the two layouts would draw different masks
        if isinstance(module, Dropout):
            module.rate = 0.0
    index = np.arange(24)
    plain = source.take(index)
    packed = source.take_packed(index, source.packed_rows(24, 0), 24)
    assert packed["input_ids"].shape[0] < 24  # several examples share a row
    plain["labels"], packed["labels"] = source.columns["labels"][index], packed["labels"]
    del packed["example_mask"]
    (loss_a, logits_a), grads_a = nnx.value_and_grad(_loss, has_aux=True)(model.module, plain)
    (loss_b, logits_b), grads_b = nnx.value_and_grad(_loss, has_aux=True)(model.module, packed)
    np.testing.assert_allclose(logits_b, logits_a, atol=2e-5)
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-5)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads_a))
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b), strict=True):
        np.testing.assert_allclose(b, a, atol=1e-4 * scale)


def test_fit_packs_text_classification_by_default_and_learns(seq_dir):
    train, test = datasets.Dataset.from_dict(reviews(256)), datasets.Dataset.from_dict(reviews(64, seed=1))
    model = ft.load(seq_dir, task="text-classification", num_labels=2)
    model.compile(optimizer="adamw", learning_rate=2e-3, batch_size=16, max_length=32)
    (shape,) = model.fit(train, epochs=1, verbose=0).compiled_shapes  # the first epoch: one shape
    assert shape[0] < 16 and shape[1] <= 32  # rows of the longest bucket, fewer rows than examples
    history = model.fit(train, test, epochs=3, verbose=0)
    assert history.history["val_accuracy"][-1] >= 0.9
    assert all(s == shape or (s[0] % 4 == 0 and s[0] > shape[0]) for s in history.compiled_shapes)
    unpacked = ft.load(seq_dir, task="text-classification", num_labels=2)
    unpacked.compile(optimizer="adamw", learning_rate=2e-3, batch_size=16, max_length=32, packing=False)
    shapes = unpacked.fit(train, epochs=1, verbose=0).compiled_shapes
    assert all(s[0] == 16 for s in shapes)


def test_fit_packs_distilbert_too(tmp_path):
    import transformers

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *PIECES]
    config = transformers.DistilBertConfig(
        dim=64, n_layers=2, n_heads=4, hidden_dim=128, vocab_size=len(vocab), max_position_embeddings=64
    )
    transformers.DistilBertForSequenceClassification(config).save_pretrained(str(tmp_path))
    transformers.DistilBertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(str(tmp_path))
    train, test = datasets.Dataset.from_dict(reviews(256)), datasets.Dataset.from_dict(reviews(64, seed=1))
    model = ft.load(str(tmp_path), task="text-classification", num_labels=2)
    model.compile(optimizer="adamw", learning_rate=2e-3, batch_size=16, max_length=32)
    history = model.fit(train, test, epochs=3, verbose=0)
    assert history.compiled_shapes[0][0] < 16  # packed: fewer rows than examples
    assert history.history["val_accuracy"][-1] >= 0.9


def test_packing_where_it_cannot_apply_says_why(seq_dir):
    model = ft.load(seq_dir, task="text-classification", num_labels=2)
    model.compile(optimizer="adamw", batch_size=4, packing=True)
    ready = {"input_ids": np.ones((8, 6), np.int32), "labels": np.zeros(8, np.int32)}
    with pytest.raises(ft.ConfigError, match="packing=True cannot be used here: the training data are not token"):
        model.fit(ready, epochs=1, verbose=0)
    model.compile(optimizer="adamw", batch_size=4)  # the default falls back to padded batches
    assert model.fit(ready, epochs=1, verbose=0).compiled_shapes == [(4, 6)]
    with pytest.raises(ft.ConfigError, match="`packing` must be None .* received packing='yes'"):
        ft.Recipe(packing="yes")


def test_a_checkpoint_of_a_run_that_did_not_pack_resumes_unpacked_once_its_architecture_packs(
    seq_dir, tmp_path, monkeypatch
):
    from finetune.models.bert.modeling import Bert

    train = datasets.Dataset.from_dict(reviews(64))
    recipe = {"optimizer": "adamw", "batch_size": 16, "max_length": 32}
    model = ft.load(seq_dir, task="text-classification", num_labels=2)
    model.compile(**recipe)
    monkeypatch.setattr(Bert, "supports_packing", False)  # as a release before BERT packed (or a mesh)
    shapes = model.fit(train, epochs=1, verbose=0, checkpoint_dir=tmp_path / "c").compiled_shapes
    assert all(s[0] == 16 for s in shapes)  # not packed; the recipe says packing=None all the same
    monkeypatch.undo()
    resumed = ft.load(seq_dir, task="text-classification", num_labels=2)
    resumed.compile(**recipe, packing=True)  # another layout asked for explicitly: the rest would see other batches
    with pytest.raises(ft.ConfigError, match="the recipe differs in packing"):
        resumed.fit(train, epochs=2, verbose=0, checkpoint_dir=tmp_path / "c", resume=True)
    resumed.compile(**recipe)  # packing=None: the resumed run keeps the layout the checkpoint recorded
    history = resumed.fit(train, epochs=2, verbose=0, checkpoint_dir=tmp_path / "c", resume=True)
    assert len(history.history["loss"]) == 2 and all(s[0] == 16 for s in history.compiled_shapes)
    fresh = resumed.fit(train, epochs=1, verbose=0, checkpoint_dir=tmp_path / "fresh").compiled_shapes
    assert all(s[0] < 16 for s in fresh)  # a new run packs now
