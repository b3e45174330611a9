"""ViT / DeiT: parity with transformers' PyTorch models, the image processor, heads, export and logical axes."""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import transformers

import finetune
from finetune.errors import ConfigError
from finetune.hf.export import export_weights
from tests.models.reference import assert_close, tiny_model, torch_logits

CASES = [
    ("ViTModel", "feature-extraction", {}),
    ("ViTForImageClassification", "image-classification", {"num_labels": 3}),
    ("DeiTModel", "feature-extraction", {}),
    ("DeiTForImageClassification", "image-classification", {"num_labels": 3}),
    ("ViTForImageClassification", "image-classification", {"num_labels": 3, "qkv_bias": False}),
    ("DeiTModel", "feature-extraction", {"qkv_bias": False, "layer_norm_eps": 1e-6}),
]


def tiny_config(family: str = "ViT", **overrides):
    """A tiny ViT-family config: 32x32 RGB images in 8x8 patches, 2 layers, width 64, 4 heads."""
    sizes = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}
    image = {"image_size": 32, "patch_size": 8, "num_channels": 3}
    return getattr(transformers, f"{family}Config")(**{**sizes, **image, **overrides})


def pixels(seed: int = 0) -> np.ndarray:
    """A random batch of two images, channels first, as image processors return."""
    return np.random.default_rng(seed).normal(size=(2, 3, 32, 32)).astype(np.float32)


@pytest.mark.parametrize(("cls_name", "task", "overrides"), CASES, ids=lambda c: str(c))
def test_outputs_match_transformers_in_float32(tmp_path, cls_name, task, overrides):
    family = "DeiT" if cls_name.startswith("DeiT") else "ViT"
    torch_model, path = tiny_model(tmp_path, cls_name, tiny_config(family, **overrides), std=0.2)
    model = finetune.load(path, task=task)
    expected = torch_logits(torch_model, pixel_values=pixels())
    assert model.new_paths == ()
    assert_close(model(pixel_values=pixels()), expected, atol=1e-5)


def test_loaded_model_carries_the_image_processor_and_runs_its_output(tmp_path):
    torch_model, path = tiny_model(tmp_path, "ViTForImageClassification", tiny_config(num_labels=3), std=0.2)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    model = finetune.load(path, task="image-classification")
    assert model.processor is not None
    images = list(np.random.default_rng(1).integers(0, 256, (2, 40, 48, 3), dtype=np.uint8))
    inputs = model.processor(images, return_tensors="np")
    assert inputs["pixel_values"].shape == (2, 3, 32, 32)
    assert_close(model(**inputs), torch_logits(torch_model, **inputs), atol=1e-5)


def test_deit_teacher_checkpoint_loads_its_backbone_under_a_new_classifier(tmp_path):
    _, path = tiny_model(tmp_path, "DeiTForImageClassificationWithTeacher", tiny_config("DeiT", num_labels=3))
    model = finetune.load(path, task="image-classification")
    assert model.new_paths == ("classifier/bias", "classifier/kernel")
    assert next(group for regex, group in model.rules if re.fullmatch(regex, "classifier/kernel")) == "new"
    assert model(pixel_values=pixels()).shape == (2, 3)


@pytest.mark.parametrize(
    ("cls_name", "task", "qkv_bias"),
    [
        ("ViTModel", "feature-extraction", True),
        ("ViTForImageClassification", "image-classification", True),
        ("ViTForImageClassification", "image-classification", False),
    ],
)
def test_export_writes_back_the_checkpoint_keys_and_values(tmp_path, cls_name, task, qkv_bias):
    _, path = tiny_model(tmp_path, cls_name, tiny_config(num_labels=2, qkv_bias=qkv_bias))
    model = finetune.load(path, task=task)
    arch = model.architecture
    exported = export_weights(model.module, arch.table(arch.config_from_hf(model.hf_config), task))
    original = safetensors.numpy.load_file(f"{path}/model.safetensors")
    pooler = [k for k in original if re.fullmatch(r"(vit\.)?pooler\..*", k)]
    assert sorted(exported) == sorted(set(original) - set(pooler))
    for key, value in exported.items():
        np.testing.assert_array_equal(value, original[key], err_msg=key)


def test_channels_last_pixels_are_refused_with_the_fix(tmp_path):
    _, path = tiny_model(tmp_path, "ViTModel", tiny_config())
    model = finetune.load(path)
    with pytest.raises(ConfigError, match=r"transpose\(0, 3, 1, 2\)"):
        model.module(pixel_values=jnp.zeros((2, 32, 32, 3)))


def test_params_carry_logical_axes_and_param_dtype(tmp_path):
    _, path = tiny_model(tmp_path, "ViTForImageClassification", tiny_config(num_labels=2))
    model = finetune.load(path, task="image-classification", param_dtype=jnp.bfloat16)
    module = model.module
    assert module.embeddings.patch_embeddings.projection.kernel.shape == (8, 8, 3, 64)
    assert module.embeddings.patch_embeddings.projection.kernel.out_sharding == (None, None, None, "embed")
    assert module.encoder.layers[0].attention.query.kernel.out_sharding == ("embed", "heads")
    assert module.encoder.layers[0].mlp.intermediate.kernel.out_sharding == ("embed", "mlp")
    assert module.classifier.kernel.out_sharding == ("embed", "classes")
    assert module.classifier.kernel.dtype == jnp.bfloat16
    assert re.fullmatch(model.layer_pattern, "encoder/layers/1/mlp/output/kernel").group(1) == "1"
    assert model.num_layers == 2
    assert np.isfinite(np.asarray(model(pixel_values=pixels()), np.float32)).all()
