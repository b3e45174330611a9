"""BERT checkpoint keys (transformers' PyTorch names) <-> NNX paths, as data.

Task checkpoints prefix the encoder with ``bert.``; bare ``BertModel`` checkpoints do not. Every row accepts both.
The quantifier decides what `finetune.hf.tables.export_weights` writes: greedy ``(?:bert\\.)?`` (task models) keeps the
prefix, lazy ``(?:bert\\.)??`` (the bare encoder) drops it, as transformers' classes expect.
"""

from __future__ import annotations

from collections.abc import Sequence

from finetune.hf.tables import IDENTITY, TRANSPOSE, Row
from finetune.models.bert.modeling import Config

# (checkpoint key after the prefix, NNX path, transform); "\1" is the layer index.
_EMBEDDINGS = (
    (r"embeddings\.word_embeddings\.weight", "embeddings/word_embeddings/embedding", IDENTITY),
    (r"embeddings\.position_embeddings\.weight", "embeddings/position_embeddings/embedding", IDENTITY),
    (r"embeddings\.token_type_embeddings\.weight", "embeddings/token_type_embeddings/embedding", IDENTITY),
    (r"embeddings\.LayerNorm\.(?:weight|gamma)", "embeddings/norm/scale", IDENTITY),
    (r"embeddings\.LayerNorm\.(?:bias|beta)", "embeddings/norm/bias", IDENTITY),
)
_LAYER = (
    (r"attention\.self\.query\.weight", "attention/query/kernel", TRANSPOSE),
    (r"attention\.self\.query\.bias", "attention/query/bias", IDENTITY),
    (r"attention\.self\.key\.weight", "attention/key/kernel", TRANSPOSE),
    (r"attention\.self\.key\.bias", "attention/key/bias", IDENTITY),
    (r"attention\.self\.value\.weight", "attention/value/kernel", TRANSPOSE),
    (r"attention\.self\.value\.bias", "attention/value/bias", IDENTITY),
    (r"attention\.output\.dense\.weight", "attention/output/kernel", TRANSPOSE),
    (r"attention\.output\.dense\.bias", "attention/output/bias", IDENTITY),
    (r"attention\.output\.LayerNorm\.(?:weight|gamma)", "attention_norm/scale", IDENTITY),
    (r"attention\.output\.LayerNorm\.(?:bias|beta)", "attention_norm/bias", IDENTITY),
    (r"intermediate\.dense\.weight", "intermediate/kernel", TRANSPOSE),
    (r"intermediate\.dense\.bias", "intermediate/bias", IDENTITY),
    (r"output\.dense\.weight", "output/kernel", TRANSPOSE),
    (r"output\.dense\.bias", "output/bias", IDENTITY),
    (r"output\.LayerNorm\.(?:weight|gamma)", "output_norm/scale", IDENTITY),
    (r"output\.LayerNorm\.(?:bias|beta)", "output_norm/bias", IDENTITY),
)
_POOLER = (
    (r"pooler\.dense\.weight", "pooler/dense/kernel", TRANSPOSE),
    (r"pooler\.dense\.bias", "pooler/dense/bias", IDENTITY),
)
_CLASSIFIER = (
    Row(r"classifier\.weight", "classifier/kernel", TRANSPOSE),
    Row(r"classifier\.bias", "classifier/bias", IDENTITY),
)


def prefix(task: str) -> str:
    """The optional ``bert.`` prefix: exported for task models, not for the bare encoder."""
    return r"(?:bert\.)??" if task == "feature-extraction" else r"(?:bert\.)?"


def table(config: Config, task: str) -> Sequence[Row]:
    """The rows for ``task``; the same rows load and (run backwards) export."""
    p = prefix(task)
    rows = [Row(p + key, path, t) for key, path, t in _EMBEDDINGS]
    rows += [Row(p + r"encoder\.layer\.(\d+)\." + key, r"encoder/layers/\1/" + path, t) for key, path, t in _LAYER]
    rows += [Row(p + key, path, t) for key, path, t in _POOLER]
    return rows + list(_CLASSIFIER)


def ignore(config: Config, task: str) -> Sequence[str]:
    """Checkpoint keys that may go unused: pretraining heads, buffers, and heads this task does not build."""
    keys = [r"cls\..*", r"(?:bert\.)?embeddings\.position_ids"]
    if task != "text-classification":
        keys.append(r"(?:bert\.)?pooler\..*")
    if task == "feature-extraction":
        keys.append(r"classifier\..*")
    return keys
