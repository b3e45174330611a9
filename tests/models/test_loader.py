"""The shared loader: file formats, coverage errors, the inverse table, and Hub name resolution (offline)."""

from __future__ import annotations

import json
import pathlib

import flax.serialization
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

import finetune
from finetune.errors import LoadError
from finetune.hf import files, hub, tables, weights
from finetune.hf.export import export_weights
from finetune.hf.tables import Row, Split
from finetune.models import registry
from tests.models.reference import assert_close, padded_text_batch, tiny_bert, torch_logits


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A tiny BertForSequenceClassification (3 labels) saved as safetensors: ``(torch_model, dir)``."""
    return tiny_bert(tmp_path_factory.mktemp("cls"), "BertForSequenceClassification", num_labels=3)


def tensors_of(path) -> dict[str, np.ndarray]:
    return safetensors.numpy.load_file(f"{path}/model.safetensors")


def checkpoint_with(tmp_path, source, tensors: dict[str, np.ndarray]) -> str:
    """A copy of ``source``'s config with ``tensors`` as its weights."""
    (tmp_path / "config.json").write_text((source / "config.json").read_text())
    safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
    return str(tmp_path)


def assert_matches_torch(model, torch_model):
    input_ids, attention_mask = padded_text_batch(256)
    expected = torch_logits(torch_model, input_ids=input_ids.astype(np.int64), attention_mask=attention_mask)
    assert_close(model(input_ids=input_ids, attention_mask=attention_mask), expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------- file formats


def test_sharded_safetensors_load_through_their_index(tmp_path, classifier):
    torch_model, path = classifier
    tensors = tensors_of(path)
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, shard_keys in shards.items():
        safetensors.numpy.save_file({k: tensors[k] for k in shard_keys}, str(tmp_path / name))
    weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text(torch_model.config.to_json_string())
    assert files.find_checkpoint(tmp_path).files == tuple(tmp_path / name for name in shards)
    assert_matches_torch(finetune.load(tmp_path, task="text-classification"), torch_model)


def to_hf_flax(tensors: dict[str, np.ndarray]) -> dict:
    """PyTorch-named tensors -> the nested tree Hugging Face's Flax models store in ``flax_model.msgpack``."""
    tree: dict = {}
    for key, value in tensors.items():
        *parents, leaf = key.split(".")
        if leaf == "weight" and parents[-1] == "LayerNorm":
            leaf = "scale"
        elif leaf == "weight" and parents[-1].endswith("embeddings"):
            leaf = "embedding"
        elif leaf == "weight" and value.ndim == 2:
            leaf, value = "kernel", value.T
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def test_flax_msgpack_is_read_when_it_is_all_a_repo_has(tmp_path, classifier):
    torch_model, path = classifier
    (tmp_path / "config.json").write_text(torch_model.config.to_json_string())
    (tmp_path / "flax_model.msgpack").write_bytes(flax.serialization.msgpack_serialize(to_hf_flax(tensors_of(path))))
    assert files.find_checkpoint(tmp_path).format == "msgpack"
    assert_matches_torch(finetune.load(tmp_path, task="text-classification"), torch_model)


def test_pickle_is_refused_without_opt_in_and_read_with_it(tmp_path, classifier):
    import torch

    torch_model, _ = classifier
    (tmp_path / "config.json").write_text(torch_model.config.to_json_string())
    torch.save(torch_model.state_dict(), str(tmp_path / "pytorch_model.bin"))
    with pytest.raises(LoadError, match=r"`allow_pickle` is False.*execute arbitrary code.*allow_pickle=True"):
        finetune.load(tmp_path, task="text-classification")
    assert_matches_torch(finetune.load(tmp_path, task="text-classification", allow_pickle=True), torch_model)


def test_bfloat16_checkpoints_are_cast_to_param_dtype(tmp_path, classifier):
    import ml_dtypes

    _, path = classifier
    tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors_of(path).items()}
    model = finetune.load(checkpoint_with(tmp_path, pathlib.Path(path), tensors), task="text-classification")
    kernel = model.module.classifier.kernel[...]
    assert kernel.dtype == np.float32
    assert np.array_equal(kernel, tensors["classifier.weight"].astype(np.float32).T)


# ---------------------------------------------------------------------------------------------- errors


def test_missing_weights_file_lists_the_directory(tmp_path, classifier):
    (tmp_path / "config.json").write_text(classifier[0].config.to_json_string())
    (tmp_path / "notes.txt").write_text("no weights here")
    with pytest.raises(LoadError, match=r"No weights file in .*contains: config.json, notes.txt"):
        finetune.load(tmp_path)


def test_shape_mismatch_names_the_key_the_path_and_both_shapes(tmp_path, classifier):
    _, path = classifier
    tensors = tensors_of(path)
    tensors["bert.encoder.layer.1.intermediate.dense.weight"] = np.zeros((100, 64), np.float32)
    with pytest.raises(LoadError) as info:
        finetune.load(checkpoint_with(tmp_path, pathlib.Path(path), tensors), task="text-classification")
    message = str(info.value)
    assert "`bert.encoder.layer.1.intermediate.dense.weight` has shape (100, 64)" in message
    assert "`encoder/layers/1/intermediate/kernel` has shape (64, 128)" in message


def test_unused_keys_and_unfilled_params_are_reported_together(tmp_path, classifier):
    _, path = classifier
    tensors = tensors_of(path)
    tensors["bert.encoder.layer.0.extra.weight"] = np.zeros(3, np.float32)
    tensors["something.else"] = np.zeros(3, np.float32)
    del tensors["bert.embeddings.LayerNorm.bias"]
    with pytest.raises(LoadError) as info:
        finetune.load(checkpoint_with(tmp_path, pathlib.Path(path), tensors), task="text-classification")
    message = str(info.value)
    assert "Checkpoint keys that no table row used (2)" in message
    assert "bert.encoder.layer.0.extra.weight" in message and "something.else" in message
    assert "Model parameters that nothing in the checkpoint filled (1)" in message
    assert "embeddings/norm/bias" in message


def test_pretraining_heads_and_buffers_are_ignored(tmp_path, classifier):
    torch_model, path = classifier
    tensors = tensors_of(path)
    tensors["cls.predictions.bias"] = np.zeros(256, np.float32)
    tensors["bert.embeddings.position_ids"] = np.arange(512, dtype=np.int64)[None]
    model = finetune.load(checkpoint_with(tmp_path, pathlib.Path(path), tensors), task="text-classification")
    assert_matches_torch(model, torch_model)


def test_unknown_model_type_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(LoadError, match=r"`model_type` is 't5'.*Supported model types: bert, .*roberta"):
        finetune.load(tmp_path)


def test_custom_code_configs_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "auto_map": {"AutoModel": "m.M"}}))
    with pytest.raises(LoadError, match="custom modelling code"):
        finetune.load(tmp_path)


def test_unsupported_task_is_a_config_error(classifier):
    with pytest.raises(finetune.ConfigError, match="received task='causal-lm'"):
        finetune.load(classifier[1], task="causal-lm")


def test_supported_architectures_resolve_in_the_registry():
    assert registry.get("bert").name == "bert"


# ---------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("cls_name", ["BertForSequenceClassification", "BertForTokenClassification"])
def test_export_inverts_loading_exactly(tmp_path, cls_name):
    _, path = tiny_bert(tmp_path, cls_name, num_labels=3)
    task = "text-classification" if "Sequence" in cls_name else "token-classification"
    model = finetune.load(path, task=task)
    exported = export_weights(model.module, model.architecture.table(_cfg(model), task))
    original = tensors_of(path)
    assert sorted(exported) == sorted(original)
    for key, value in original.items():
        assert exported[key].dtype == value.dtype and np.array_equal(exported[key], value), key


def test_bare_encoder_exports_without_the_prefix(tmp_path):
    _, path = tiny_bert(tmp_path, "BertModel")
    model = finetune.load(path)
    exported = export_weights(model.module, model.architecture.table(_cfg(model), "feature-extraction"))
    original = {k: v for k, v in tensors_of(path).items() if not k.startswith("pooler.")}  # no pooler is built
    assert sorted(exported) == sorted(original)
    assert all(np.array_equal(exported[k], v) for k, v in original.items())


def _cfg(model):
    return model.architecture.config_from_hf(model.hf_config)


def test_render_writes_the_first_alternative():
    assert tables.render("[bert.|]encoder.layer.{i}.x", {"i": "3"}) == "bert.encoder.layer.3.x"
    assert tables.render("[|bert.]encoder.layer.{i}.x", {"i": "3"}) == "encoder.layer.3.x"
    assert tables.render("a.[weight|gamma]", {}) == "a.weight"


def test_templates_accept_every_alternative_and_render_the_first():
    template = "[bert.|]encoder.layer.{i}.output.LayerNorm.[weight|gamma]"
    for key in ("bert.encoder.layer.11.output.LayerNorm.weight", "encoder.layer.11.output.LayerNorm.gamma"):
        assert tables.parse(template, key) == {"i": "11"}
    assert tables.parse(template, "encoder.layer.x.output.LayerNorm.weight") is None  # a layer index is digits
    assert tables.render(template, {"i": "11"}) == "bert.encoder.layer.11.output.LayerNorm.weight"
    assert tables.parse("cls.*", "cls.predictions.bias") == {}


def test_templates_outside_the_grammar_are_load_errors():
    with pytest.raises(LoadError, match=r"'a\.\[b' is not in the key grammar"):
        tables.parse("a.[b", "a.b")
    with pytest.raises(LoadError, match="cannot be turned back into a checkpoint key"):
        tables.render("cls.*", {})


def test_key_tables_are_data_that_imports_nothing_from_finetune_hf():
    import ast

    root = pathlib.Path(finetune.__file__).parent / "models"
    for path in sorted(root.glob("*/convert.py")):
        tree = ast.parse(path.read_text())
        imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        own = f"finetune.models.{path.parent.name}"
        assert all(m == "__future__" or m.startswith("collections") or m.startswith(own) for m in imported), path


class Fused(nnx.Module):
    def __init__(self, rngs):
        self.query = nnx.Linear(4, 3, use_bias=False, rngs=rngs)
        self.key = nnx.Linear(4, 3, use_bias=False, rngs=rngs)


def test_fused_tensors_split_on_load_and_join_on_export(tmp_path):
    fused = np.arange(24, dtype=np.float32).reshape(6, 4)  # PyTorch (2 * out, in)
    safetensors.numpy.save_file({"h.0.qk.weight": fused}, str(tmp_path / "model.safetensors"))
    table = [Row("h.0.qk.weight", ("query/kernel", "key/kernel"), Split(2, axis=-1, transpose=True))]
    module, new = weights.load_weights(lambda: Fused(nnx.Rngs(0)), table, files.find_checkpoint(tmp_path))
    assert new == ()
    assert np.array_equal(module.query.kernel[...], fused[:3].T)
    assert np.array_equal(export_weights(module, table)["h.0.qk.weight"], fused)


def test_transforms_given_as_records_load_and_export_both_ways(tmp_path):
    fused = np.arange(24, dtype=np.float32).reshape(6, 4)
    safetensors.numpy.save_file({"h.0.qk.weight": fused}, str(tmp_path / "model.safetensors"))
    table = [("h.[0|zero].qk.weight", ("query/kernel", "key/kernel"), ("split", 2, -1, True))]
    module, _ = weights.load_weights(lambda: Fused(nnx.Rngs(0)), table, files.find_checkpoint(tmp_path))
    assert np.array_equal(module.key.kernel[...], fused[3:].T)
    assert np.array_equal(export_weights(module, table)["h.0.qk.weight"], fused)
    reshape = tables.rows([("w", "p", ("reshape", (4, 2, 3), (4, 6), (1, 0)))])[0].transform
    (kernel,) = reshape.forward(fused)
    assert kernel.shape == (4, 2, 3) and np.array_equal(reshape.inverse([kernel]), fused)
    with pytest.raises(LoadError, match="the transform 'flip'"):
        tables.rows([("w", "p", "flip")])


# ---------------------------------------------------------------------------------------------- Hub names


def test_hub_id_offline_and_not_cached_is_a_load_error():
    with pytest.raises(LoadError, match=r"offline .*'nobody-here/no-such-model' is not in the local cache"):
        finetune.load("nobody-here/no-such-model")


def test_hf_scheme_resolves_from_the_cache_offline(tmp_path, monkeypatch, classifier):
    from huggingface_hub import constants

    _, path = classifier
    repo = tmp_path / "models--org--tiny-bert"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_bytes((pathlib.Path(path) / name).read_bytes())
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert hub.resolve("hf://org/tiny-bert") == snapshot
    model = finetune.load("hf://org/tiny-bert", task="text-classification")
    assert model.source == "hf://org/tiny-bert"
    with pytest.raises(LoadError, match="revision='v2'"):
        hub.resolve("org/tiny-bert", revision="v2")


def test_names_that_are_neither_a_directory_nor_a_hub_id_are_refused():
    with pytest.raises(LoadError, match="neither"):
        hub.resolve("./no/such/dir/here")
