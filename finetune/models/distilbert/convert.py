"""DistilBERT checkpoint keys (transformers' PyTorch names) <-> NNX paths, as data.

Task checkpoints prefix the encoder with ``distilbert.``; bare ``DistilBertModel`` checkpoints do not. Every row
accepts both; greedy ``(?:distilbert\\.)?`` (task models) exports the prefix, lazy ``(?:distilbert\\.)??`` (the bare
encoder) drops it.
"""

from __future__ import annotations

from collections.abc import Sequence

from finetune.hf.tables import IDENTITY, TRANSPOSE, Row
from finetune.models.distilbert.modeling import Config

_EMBEDDINGS = (
    (r"embeddings\.word_embeddings\.weight", "embeddings/word_embeddings/embedding", IDENTITY),
    (r"embeddings\.position_embeddings\.weight", "embeddings/position_embeddings/embedding", IDENTITY),
    (r"embeddings\.LayerNorm\.weight", "embeddings/norm/scale", IDENTITY),
    (r"embeddings\.LayerNorm\.bias", "embeddings/norm/bias", IDENTITY),
)
# (key after ``transformer.layer.N.``, path after ``encoder/layers/N/``, transform): BERT's layer under DistilBERT's
# names.
_LAYER = (
    (r"attention\.q_lin\.weight", "attention/query/kernel", TRANSPOSE),
    (r"attention\.q_lin\.bias", "attention/query/bias", IDENTITY),
    (r"attention\.k_lin\.weight", "attention/key/kernel", TRANSPOSE),
    (r"attention\.k_lin\.bias", "attention/key/bias", IDENTITY),
    (r"attention\.v_lin\.weight", "attention/value/kernel", TRANSPOSE),
    (r"attention\.v_lin\.bias", "attention/value/bias", IDENTITY),
    (r"attention\.out_lin\.weight", "attention/output/kernel", TRANSPOSE),
    (r"attention\.out_lin\.bias", "attention/output/bias", IDENTITY),
    (r"sa_layer_norm\.weight", "attention_norm/scale", IDENTITY),
    (r"sa_layer_norm\.bias", "attention_norm/bias", IDENTITY),
    (r"ffn\.lin1\.weight", "intermediate/kernel", TRANSPOSE),
    (r"ffn\.lin1\.bias", "intermediate/bias", IDENTITY),
    (r"ffn\.lin2\.weight", "output/kernel", TRANSPOSE),
    (r"ffn\.lin2\.bias", "output/bias", IDENTITY),
    (r"output_layer_norm\.weight", "output_norm/scale", IDENTITY),
    (r"output_layer_norm\.bias", "output_norm/bias", IDENTITY),
)
_CLASSIFIER = (
    Row(r"classifier\.weight", "classifier/kernel", TRANSPOSE),
    Row(r"classifier\.bias", "classifier/bias", IDENTITY),
)
_HEADS = {
    "feature-extraction": (),
    "text-classification": (
        Row(r"pre_classifier\.weight", "pre_classifier/kernel", TRANSPOSE),
        Row(r"pre_classifier\.bias", "pre_classifier/bias", IDENTITY),
        *_CLASSIFIER,
    ),
    "token-classification": _CLASSIFIER,
}


def prefix(task: str) -> str:
    """The optional ``distilbert.`` prefix: exported for task models, not for the bare encoder."""
    return r"(?:distilbert\.)??" if task == "feature-extraction" else r"(?:distilbert\.)?"


def table(config: Config, task: str) -> Sequence[Row]:
    """The rows for ``task``; the same rows load and (run backwards) export."""
    p = prefix(task)
    rows = [Row(p + key, path, t) for key, path, t in _EMBEDDINGS]
    layer = p + r"transformer\.layer\.(\d+)\."
    rows += [Row(layer + key, r"encoder/layers/\1/" + path, t) for key, path, t in _LAYER]
    return rows + list(_HEADS[task])


def ignore(config: Config, task: str) -> Sequence[str]:
    """Checkpoint keys that may go unused: the masked-LM head, buffers, and heads this task does not build."""
    keys = [
        r"vocab_(?:transform|layer_norm|projector)\..*",
        r"qa_outputs\..*",
        r"(?:distilbert\.)?embeddings\.position_ids",
    ]
    if task != "text-classification":
        keys.append(r"pre_classifier\..*")
    if task == "feature-extraction":
        keys.append(r"classifier\..*")
    return keys
