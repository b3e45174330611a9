"""ViT / DeiT checkpoint keys <-> NNX paths, as plain data.

Keys are those of transformers' ``ViTModel`` / ``ViTForImageClassification`` (and the ``DeiT`` equivalents), in the
grammar of `finetune.hf.tables`. The backbone keys carry an optional model prefix (``vit.`` or ``deit.``): task
models save it, bare ``ViTModel``s do not. The patch projection is a PyTorch ``Conv2d`` (transform ``conv``).
"""

from __future__ import annotations

from collections.abc import Sequence

from finetune.models.vit.modeling import Config

Rows = tuple[tuple, ...]  # (key template, path template(s)[, transform name]) each

# (checkpoint key after ``encoder.layer.{i}.``, NNX path after ``encoder/layers/{i}/``, transform).
_LAYER: Rows = (
    ("attention.attention.query.weight", "attention/query/kernel", "transpose"),
    ("attention.attention.query.bias", "attention/query/bias"),
    ("attention.attention.key.weight", "attention/key/kernel", "transpose"),
    ("attention.attention.key.bias", "attention/key/bias"),
    ("attention.attention.value.weight", "attention/value/kernel", "transpose"),
    ("attention.attention.value.bias", "attention/value/bias"),
    ("attention.output.dense.weight", "attention/output/kernel", "transpose"),
    ("attention.output.dense.bias", "attention/output/bias"),
    ("layernorm_before.weight", "layernorm_before/scale"),
    ("layernorm_before.bias", "layernorm_before/bias"),
    ("layernorm_after.weight", "layernorm_after/scale"),
    ("layernorm_after.bias", "layernorm_after/bias"),
    ("intermediate.dense.weight", "mlp/intermediate/kernel", "transpose"),
    ("intermediate.dense.bias", "mlp/intermediate/bias"),
    ("output.dense.weight", "mlp/output/kernel", "transpose"),
    ("output.dense.bias", "mlp/output/bias"),
)


def prefix(config: Config, task: str) -> str:
    """The optional ``vit.`` / ``deit.`` prefix: exported for the classifier model, not for the bare encoder.

    Both forms load either layout; the first alternative is what export writes.
    """
    return f"[|{config.model_type}.]" if task == "feature-extraction" else f"[{config.model_type}.|]"


def table(config: Config, task: str) -> Sequence[tuple]:
    """The checkpoint key <-> NNX path rows for ``task`` (``feature-extraction`` or ``image-classification``)."""
    p = prefix(config, task)
    rows = [
        (f"{p}embeddings.cls_token", "embeddings/cls_token"),
        (f"{p}embeddings.position_embeddings", "embeddings/position_embeddings"),
        (f"{p}embeddings.patch_embeddings.projection.weight", "embeddings/patch_embeddings/projection/kernel", "conv"),
        (f"{p}embeddings.patch_embeddings.projection.bias", "embeddings/patch_embeddings/projection/bias"),
    ]
    if config.num_prefix_tokens == 2:
        rows.append((f"{p}embeddings.distillation_token", "embeddings/distillation_token"))
    rows += [(f"{p}encoder.layer.{{i}}.{key}", f"encoder/layers/{{i}}/{path}", *t) for key, path, *t in _LAYER]
    rows += [(f"{p}layernorm.weight", "layernorm/scale"), (f"{p}layernorm.bias", "layernorm/bias")]
    if task == "image-classification":
        rows += [("classifier.weight", "classifier/kernel", "transpose"), ("classifier.bias", "classifier/bias")]
    return rows


def ignore(config: Config, task: str) -> Sequence[str]:
    """Checkpoint keys that may go unused: the pooler (no task here uses it), heads of other tasks."""
    p = prefix(config, task)
    keys = [
        f"{p}pooler.dense.[weight|bias]",
        # ViTForMaskedImageModeling's decoder and mask token.
        "decoder.*",
        f"{p}embeddings.mask_token",
        # DeiTForImageClassificationWithTeacher's two heads (not the single-classifier model built here).
        "[cls|distillation]_classifier.[weight|bias]",
    ]
    if task != "image-classification":
        keys.append("classifier.[weight|bias]")
    return keys
