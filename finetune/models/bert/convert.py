"""BERT checkpoint keys (transformers' PyTorch names) <-> NNX paths, as plain data.

Rows are ``(key template, path template[, transform name])`` in the grammar of `finetune.hf.tables`: ``{i}`` is the
layer index, ``[a|b]`` accepts both and exports the first. Task checkpoints prefix the encoder with ``bert.``, bare
``BertModel`` checkpoints do not: every row accepts both, and task models export the prefix (``[bert.|]``) while the
bare encoder drops it (``[|bert.]``), as transformers' classes expect.
"""

from __future__ import annotations

from collections.abc import Sequence

from finetune.models.bert.modeling import Config

Rows = tuple[tuple, ...]  # (key template, path template(s)[, transform name]) each

# (checkpoint key after the prefix, NNX path, transform).
_EMBEDDINGS: Rows = (
    ("embeddings.word_embeddings.weight", "embeddings/word_embeddings/embedding"),
    ("embeddings.position_embeddings.weight", "embeddings/position_embeddings/embedding"),
    ("embeddings.token_type_embeddings.weight", "embeddings/token_type_embeddings/embedding"),
    ("embeddings.LayerNorm.[weight|gamma]", "embeddings/norm/scale"),
    ("embeddings.LayerNorm.[bias|beta]", "embeddings/norm/bias"),
)
# (key after ``encoder.layer.{i}.``, path after ``encoder/layers/{i}/``, transform).
_LAYER: Rows = (
    ("attention.self.query.weight", "attention/query/kernel", "transpose"),
    ("attention.self.query.bias", "attention/query/bias"),
    ("attention.self.key.weight", "attention/key/kernel", "transpose"),
    ("attention.self.key.bias", "attention/key/bias"),
    ("attention.self.value.weight", "attention/value/kernel", "transpose"),
    ("attention.self.value.bias", "attention/value/bias"),
    ("attention.output.dense.weight", "attention/output/kernel", "transpose"),
    ("attention.output.dense.bias", "attention/output/bias"),
    ("attention.output.LayerNorm.[weight|gamma]", "attention_norm/scale"),
    ("attention.output.LayerNorm.[bias|beta]", "attention_norm/bias"),
    ("intermediate.dense.weight", "intermediate/kernel", "transpose"),
    ("intermediate.dense.bias", "intermediate/bias"),
    ("output.dense.weight", "output/kernel", "transpose"),
    ("output.dense.bias", "output/bias"),
    ("output.LayerNorm.[weight|gamma]", "output_norm/scale"),
    ("output.LayerNorm.[bias|beta]", "output_norm/bias"),
)
_POOLER: Rows = (
    ("pooler.dense.weight", "pooler/dense/kernel", "transpose"),
    ("pooler.dense.bias", "pooler/dense/bias"),
)
_CLASSIFIER: Rows = (
    ("classifier.weight", "classifier/kernel", "transpose"),
    ("classifier.bias", "classifier/bias"),
)


def prefix(task: str) -> str:
    """The optional ``bert.`` prefix: exported for task models, not for the bare encoder."""
    return "[|bert.]" if task == "feature-extraction" else "[bert.|]"


def table(config: Config, task: str) -> Sequence[tuple]:
    """The rows for ``task``; the same rows load and (run backwards) export."""
    p = prefix(task)
    rows = [(p + key, path, *t) for key, path, *t in _EMBEDDINGS]
    rows += [(f"{p}encoder.layer.{{i}}.{key}", f"encoder/layers/{{i}}/{path}", *t) for key, path, *t in _LAYER]
    rows += [(p + key, path, *t) for key, path, *t in _POOLER]
    return rows + list(_CLASSIFIER)


def ignore(config: Config, task: str) -> Sequence[str]:
    """Checkpoint keys that may go unused: pretraining heads, buffers, and heads this task does not build."""
    keys = ["cls.*", "[bert.|]embeddings.position_ids"]
    if task != "text-classification":
        keys.append("[bert.|]pooler.*")
    if task == "feature-extraction":
        keys.append("classifier.*")
    return keys
