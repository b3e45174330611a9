"""ViT / DeiT checkpoint keys <-> NNX paths, as data.

Keys are those of transformers' ``ViTModel`` / ``ViTForImageClassification`` (and the ``DeiT`` equivalents). The
backbone keys carry an optional model prefix (``vit.`` or ``deit.``): task models save it, bare ``ViTModel``s do not.
"""

from __future__ import annotations

from collections.abc import Sequence

from finetune.hf.tables import IDENTITY, TRANSPOSE, Row, Transpose
from finetune.models.vit.modeling import Config

# PyTorch Conv2d weight (out, in, h, w) <-> NNX Conv kernel (h, w, in, out).
CONV = Transpose(axes=(2, 3, 1, 0))

# (checkpoint key after ``encoder.layer.N.``, NNX path after ``encoder/layers/N/``, transform).
_LAYER = (
    (r"attention\.attention\.query\.weight", "attention/query/kernel", TRANSPOSE),
    (r"attention\.attention\.query\.bias", "attention/query/bias", IDENTITY),
    (r"attention\.attention\.key\.weight", "attention/key/kernel", TRANSPOSE),
    (r"attention\.attention\.key\.bias", "attention/key/bias", IDENTITY),
    (r"attention\.attention\.value\.weight", "attention/value/kernel", TRANSPOSE),
    (r"attention\.attention\.value\.bias", "attention/value/bias", IDENTITY),
    (r"attention\.output\.dense\.weight", "attention/output/kernel", TRANSPOSE),
    (r"attention\.output\.dense\.bias", "attention/output/bias", IDENTITY),
    (r"layernorm_before\.weight", "layernorm_before/scale", IDENTITY),
    (r"layernorm_before\.bias", "layernorm_before/bias", IDENTITY),
    (r"layernorm_after\.weight", "layernorm_after/scale", IDENTITY),
    (r"layernorm_after\.bias", "layernorm_after/bias", IDENTITY),
    (r"intermediate\.dense\.weight", "mlp/intermediate/kernel", TRANSPOSE),
    (r"intermediate\.dense\.bias", "mlp/intermediate/bias", IDENTITY),
    (r"output\.dense\.weight", "mlp/output/kernel", TRANSPOSE),
    (r"output\.dense\.bias", "mlp/output/bias", IDENTITY),
)


def prefix(config: Config, task: str) -> str:
    """The optional ``vit.`` / ``deit.`` prefix: exported for the classifier model, not for the bare encoder.

    Greedy ``(?:vit\\.)?`` renders the prefix on export, lazy ``(?:vit\\.)??`` drops it; both load either layout.
    """
    return rf"(?:{config.model_type}\.)" + ("??" if task == "feature-extraction" else "?")


def table(config: Config, task: str) -> Sequence[Row]:
    """The checkpoint key <-> NNX path rows for ``task`` (``feature-extraction`` or ``image-classification``)."""
    p = prefix(config, task)
    rows = [
        Row(rf"{p}embeddings\.cls_token", "embeddings/cls_token"),
        Row(rf"{p}embeddings\.position_embeddings", "embeddings/position_embeddings"),
        Row(
            rf"{p}embeddings\.patch_embeddings\.projection\.weight",
            "embeddings/patch_embeddings/projection/kernel",
            CONV,
        ),
        Row(rf"{p}embeddings\.patch_embeddings\.projection\.bias", "embeddings/patch_embeddings/projection/bias"),
    ]
    if config.num_prefix_tokens == 2:
        rows.append(Row(rf"{p}embeddings\.distillation_token", "embeddings/distillation_token"))
    rows += [Row(rf"{p}encoder\.layer\.(\d+)\.{key}", rf"encoder/layers/\1/{path}", t) for key, path, t in _LAYER]
    rows += [
        Row(rf"{p}layernorm\.weight", "layernorm/scale"),
        Row(rf"{p}layernorm\.bias", "layernorm/bias"),
    ]
    if task == "image-classification":
        rows += [
            Row(r"classifier\.weight", "classifier/kernel", TRANSPOSE),
            Row(r"classifier\.bias", "classifier/bias"),
        ]
    return rows


def ignore(config: Config, task: str) -> Sequence[str]:
    """Checkpoint keys that may go unused: the pooler (no task here uses it), heads of other tasks."""
    p = prefix(config, task)
    keys = [
        rf"{p}pooler\.dense\.(weight|bias)",
        # ViTForMaskedImageModeling's decoder and mask token.
        r"decoder\..*",
        rf"{p}embeddings\.mask_token",
        # DeiTForImageClassificationWithTeacher's two heads (not the single-classifier model built here).
        r"(cls|distillation)_classifier\.(weight|bias)",
    ]
    if task != "image-classification":
        keys.append(r"classifier\.(weight|bias)")
    return keys
