"""Dropout in training: a packed batch gives each example the dropout an unpadded batch gives it.

The masks are observed by wrapping `finetune.models.blocks.dropout.drop` (every dropout of the BERT family goes
through it) and cutting out, per call, each example's real positions: its tokens (packed: its span of its row), its
block of attention probabilities, its first token in the last layer, its pooled vector. Over many draws, packed and
unpadded batches must drop at the places transformers' training forward pass drops (its dropout calls, observed the
same way), at each place's configured rate, with masks uncorrelated between places, heads, examples and steps. For
``n`` independent Bernoulli pairs, a measured rate is off by ``sqrt(p (1 - p) / n)`` and a measured correlation by
``1 / sqrt(n)`` (one standard deviation); the tolerances are 5 of them.
"""

import contextlib
import itertools

import datasets
import jax
import numpy as np
import pytest
import transformers
from flax import nnx

import finetune as ft
import finetune.models.blocks.dropout as dropout_lib
from tests.test_data_tasks import PIECES, TINY, WORDS, reviews
from tests.test_packing import ragged

HIDDEN, ATTENTION, CLASSIFIER = 0.2, 0.3, 0.4  # distinct rates, so each place is seen to use its own


LAYERS = TINY["num_hidden_layers"]
ARCHITECTURES = ("bert", "roberta", "distilbert")


def with_dropout(
    path, architecture: str, hidden: float, attention: float, classifier: float | None, num_labels: int = 3
) -> str:
    """A tiny checkpoint of ``architecture`` for sequence classification, with these dropout rates."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *PIECES]
    size = {"vocab_size": 1000, "max_position_embeddings": 64, "num_labels": num_labels}
    if architecture == "distilbert":
        config = transformers.DistilBertConfig(
            dim=TINY["hidden_size"], n_layers=LAYERS, n_heads=TINY["num_attention_heads"],
            hidden_dim=TINY["intermediate_size"], dropout=hidden, attention_dropout=attention,
            seq_classif_dropout=classifier, **size,
        )  # fmt: skip
        model = transformers.DistilBertForSequenceClassification(config)
    else:
        kind = {"bert": transformers.BertConfig, "roberta": transformers.RobertaConfig}[architecture]
        config = kind(
            **TINY, **size, hidden_dropout_prob=hidden, attention_probs_dropout_prob=attention,
            classifier_dropout=classifier,
        )  # fmt: skip
        heads = {
            "bert": transformers.BertForSequenceClassification,
            "roberta": transformers.RobertaForSequenceClassification,
        }
        model = heads[architecture](config)
    model.save_pretrained(str(path))
    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(str(path))
    return str(path)


def reference_rates(path: str) -> list[float]:
    """The rate of each dropout call in transformers' training forward pass of the checkpoint at ``path`` (eager
    attention, whose probability dropout is a call too), in order: the places where finetune must drop."""
    import torch

    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, attn_implementation="eager")
    model.train()
    rates, original = [], torch.nn.functional.dropout

    def spy(inputs, p=0.5, training=True, inplace=False):
        if training and p > 0:
            rates.append(p)
        return original(inputs, p, training, inplace)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.functional, "dropout", spy)
        model(input_ids=torch.tensor([[2, 10, 11, 12, 3]]))
    return rates


@pytest.fixture(scope="module", params=ARCHITECTURES)
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return request.param, with_dropout(path, request.param, HIDDEN, ATTENTION, CLASSIFIER)


def test_the_reference_drops_at_every_place_with_that_places_rate(checkpoint):
    """What the places test compares with: embeddings, per layer the attention probabilities and each sublayer's
    output (DistilBERT: the feed-forward output only), then the head."""
    layer = [ATTENTION, HIDDEN] if checkpoint[0] == "distilbert" else [ATTENTION, HIDDEN, HIDDEN]
    head = [CLASSIFIER, CLASSIFIER] if checkpoint[0] == "roberta" else [CLASSIFIER]
    assert reference_rates(checkpoint[1]) == pytest.approx([HIDDEN, *layer * LAYERS, *head])


def fresh(path: str):
    """The model at ``path`` loaded the way finetune loads every checkpoint (`finetune.load`), in training mode, its
    dropout streams at their first draw, as at a run's first step."""
    return ft.load(path, task="text-classification", num_labels=3).module


@pytest.fixture
def module(checkpoint):
    return fresh(checkpoint[1])


@pytest.fixture
def bert(tmp_path):
    """The encoder of every packing architecture is BERT's: its heads and examples are measured on BERT."""
    return fresh(with_dropout(tmp_path, "bert", HIDDEN, ATTENTION, CLASSIFIER))


@pytest.fixture(scope="module")
def layouts():
    """The same 24 examples unpadded (``rows`` = example ``e``'s own row, from column 0) and packed."""
    data, _, _ = ragged(24, seed=5, longest=20)
    index = np.arange(24)
    plain, packed = data.take(index), data.take_packed(index, data.packed_rows(24, 0), 24)
    assert packed["input_ids"].shape[0] < 24 and plain["input_ids"].shape[1] > 1  # rows shared; widths above 1
    lengths = data.lengths[index]
    plain_inputs = {"input_ids": plain["input_ids"], "attention_mask": plain["attention_mask"]}
    names = ("input_ids", "position_ids", "segment_ids", "example_rows", "example_cols")
    packed_inputs = {k: packed[k] for k in names}
    return {
        "plain": (plain_inputs, index, np.zeros(24, int), lengths),
        "packed": (packed_inputs, packed["example_rows"], packed["example_cols"], lengths),
    }


_MASKS: list[tuple[float, np.ndarray]] = []  # one list for every call: a trace `jax.checkpoint` cached appends here
_DROP = dropout_lib.drop


def _spy(inputs, key, rate, broadcast_dims=()):
    kept = _DROP(jax.numpy.ones(inputs.shape, bool), key, rate, broadcast_dims)  # traced in `attend`'s checkpoint
    jax.debug.callback(lambda kept: _MASKS.append((rate, np.asarray(kept))), kept)
    return _DROP(inputs, key, rate, broadcast_dims)


@contextlib.contextmanager
def recorded_masks():
    """Each `drop` call's keep mask (True: kept), in call order. Eager, so no call is hidden in a compiled trace."""
    _MASKS.clear()
    with pytest.MonkeyPatch.context() as patch, jax.disable_jit():
        patch.setattr(dropout_lib, "drop", _spy)
        yield _MASKS
        jax.effects_barrier()


def per_example(mask: np.ndarray, rows, cols, lengths) -> list[np.ndarray]:
    """Each example's real positions of one call's mask, as a flat array (see the module docstring)."""
    out = []
    for e, (r, c, n) in enumerate(zip(rows, cols, lengths, strict=True)):
        if mask.ndim == 2:  # [E, H]: the pooled vector
            part = mask[e]
        elif mask.ndim == 3 and mask.shape[1] == 1:  # [E, 1, H]: the last layer's first token
            part = mask[e, 0]
        elif mask.ndim == 3:  # [R, T, H]: every token
            part = mask[r, c : c + n]
        elif mask.shape[2] == 1:  # [E, heads, 1, T]: the first token's attention over its own keys
            part = mask[e, :, 0, c : c + n]
        else:  # [R, heads, T, T]: attention within the example
            part = mask[r, :, c : c + n, c : c + n]
        out.append(part.reshape(-1))
    return out


def draws(module, layouts, layout: str, n: int) -> list[list[tuple[float, list[np.ndarray]]]]:
    """``n`` forward passes (the RNG advancing as in training steps): per pass, per call, (rate, per-example masks)."""
    inputs, rows, cols, lengths = layouts[layout]
    out = []
    for _ in range(n):
        with recorded_masks() as masks:
            module(**inputs)
        out.append([(rate, per_example(mask, rows, cols, lengths)) for rate, mask in list(masks)])
    return out


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.astype(np.float64), b.astype(np.float64))[0, 1])


def test_packed_and_unpadded_batches_drop_at_the_same_places_at_each_places_rate(checkpoint, module, layouts):
    plain, packed = draws(module, layouts, "plain", 4), draws(module, layouts, "packed", 4)
    expected = reference_rates(checkpoint[1])  # transformers' places, in its order
    for run in (plain, packed):
        for calls in run:
            assert [rate for rate, _ in calls] == pytest.approx(expected)
    for place, ((rate, a), (_, b)) in enumerate(zip(plain[0], packed[0], strict=True)):
        assert [m.size for m in a] == [m.size for m in b], f"call {place}: other positions dropped when packed"
        for name, run in (("unpadded", plain), ("packed", packed)):
            kept = np.concatenate([m for calls in run for m in calls[place][1]])
            tolerance = 5 * np.sqrt(rate * (1 - rate) / kept.size)
            assert abs((1 - kept.mean()) - rate) < tolerance, f"{name} call {place}: drop rate {1 - kept.mean():.4f}"


def _pairs_tolerance(n: int) -> float:
    return 5 / np.sqrt(n)


@pytest.mark.parametrize("layout", ["plain", "packed"])
def test_dropout_masks_are_uncorrelated_between_places_and_steps(module, layouts, layout):
    """Every pair of (call, step) masks over the same examples: each example's first positions of both."""
    run = draws(module, layouts, layout, 3)
    places = [(step, place, masks) for step, calls in enumerate(run) for place, (_, masks) in enumerate(calls)]
    worst = []
    for (s1, p1, a), (s2, p2, b) in itertools.combinations(places, 2):
        size = [min(x.size, y.size) for x, y in zip(a, b, strict=True)]
        x = np.concatenate([m[:k] for m, k in zip(a, size, strict=True)])
        y = np.concatenate([m[:k] for m, k in zip(b, size, strict=True)])
        worst.append((abs(correlation(x, y)), _pairs_tolerance(x.size), (s1, p1), (s2, p2)))
    failing = [w for w in worst if w[0] > w[1]]
    assert not failing, f"correlated masks (|r|, tolerance, (step, call) pairs): {failing[:5]}"


@pytest.mark.parametrize("layout", ["plain", "packed"])
def test_attention_dropout_is_uncorrelated_between_heads_and_between_examples(bert, layouts, layout):
    run = draws(bert, layouts, layout, 3)
    rows = layouts[layout][1]
    heads = TINY["num_attention_heads"]
    attention = [masks for calls in run for rate, masks in calls if rate == ATTENTION]
    for masks in attention:
        per_head = np.concatenate([m.reshape(heads, -1) for m in masks], axis=1)
        for h1, h2 in itertools.combinations(range(heads), 2):
            r = correlation(per_head[h1], per_head[h2])
            assert abs(r) < _pairs_tolerance(per_head.shape[1]), f"heads {h1}, {h2}: r = {r:.3f}"
    # examples sharing a row (packed) or neighbours (unpadded): their masks at the same relative positions
    pairs = [(i, j) for i, j in itertools.combinations(range(len(rows)), 2) if rows[i] == rows[j]]
    pairs = pairs or [(i, i + 1) for i in range(len(rows) - 1)]
    for calls in run:
        for _, masks in calls:
            size = [min(masks[i].size, masks[j].size) for i, j in pairs]
            x = np.concatenate([masks[i][:k] for (i, _), k in zip(pairs, size, strict=True)])
            y = np.concatenate([masks[j][:k] for (_, j), k in zip(pairs, size, strict=True)])
            assert abs(correlation(x, y)) < _pairs_tolerance(x.size)


def test_packed_and_unpadded_training_without_dropout_end_with_the_same_parameters(tmp_path):
    path = with_dropout(tmp_path / "bert", "bert", 0.0, 0.0, None, num_labels=2)
    train = datasets.Dataset.from_dict(reviews(48, max_words=30))
    params = {}
    for packing in ("start", None, False):
        model = ft.load(path, task="text-classification", num_labels=2)
        if packing == "start":
            params[packing] = [np.asarray(p) for p in jax.tree.leaves(nnx.state(model.module, nnx.Param))]
            continue
        model.compile(
            optimizer="adamw", learning_rate=1e-3, batch_size=12, max_length=32, packing=packing, group_by_length=False
        )
        history = model.fit(train, epochs=2, verbose=0)
        assert (history.compiled_shapes[0][0] < 12) == (packing is None)  # packed rows, or one row per example
        params[packing] = [np.asarray(p) for p in jax.tree.leaves(nnx.state(model.module, nnx.Param))]
    moved = max(float(np.abs(a - b).max()) for a, b in zip(params["start"], params[False], strict=True))
    assert moved > 100 * 5e-6  # 8 steps of AdamW moved the parameters far more than the tolerance
    for a, b in zip(params[None], params[False], strict=True):
        np.testing.assert_allclose(a, b, atol=5e-6)


def _dropout_keys(module) -> dict:
    from finetune.models.blocks.dropout import Dropout

    return {
        path: tuple(np.asarray(jax.random.key_data(m.rngs.key.get_value())).tolist())
        for path, m in nnx.iter_modules(module)
        if isinstance(m, Dropout)
    }


def test_each_dropout_of_a_loaded_model_has_a_stream_of_its_own(checkpoint):
    keys = _dropout_keys(ft.load(checkpoint[1], task="text-classification", num_labels=3).module)
    assert len(keys) >= 1 + 2 * LAYERS and len(set(keys.values())) == len(keys), keys


def test_modules_built_under_tracing_from_build_rngs_get_the_keys_an_eager_build_gets():
    """`finetune.loading.build_rngs` is how loading builds a model (traced); it must draw what `nnx.Rngs` draws."""
    from finetune.loading import build_rngs
    from finetune.models.bert.modeling import Bert, Config

    def build(rngs):
        return Bert(Config(100, 16, 2, 2, 32), task="text-classification", num_labels=3, rngs=rngs)

    eager = build(nnx.Rngs(0))
    traced = nnx.merge(*jax.jit(lambda: nnx.split(build(build_rngs(0))))())
    assert _dropout_keys(traced) == _dropout_keys(eager)
    # the same draws (compiled and eager arithmetic differ in the last bit)
    np.testing.assert_allclose(traced.classifier.kernel.get_value(), eager.classifier.kernel.get_value(), rtol=1e-6)
