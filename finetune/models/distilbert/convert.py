"""DistilBERT checkpoint keys (transformers' PyTorch names) <-> NNX paths, as plain data.

Rows are in the grammar of `finetune.hf.tables`. Task checkpoints prefix the encoder with ``distilbert.``, bare
``DistilBertModel`` checkpoints do not: every row accepts both, task models export the prefix (``[distilbert.|]``)
and the bare encoder drops it (``[|distilbert.]``).
"""

from __future__ import annotations

from collections.abc import Sequence

from finetune.models.distilbert.modeling import Config

Rows = tuple[tuple, ...]  # (key template, path template(s)[, transform name]) each

_EMBEDDINGS: Rows = (
    ("embeddings.word_embeddings.weight", "embeddings/word_embeddings/embedding"),
    ("embeddings.position_embeddings.weight", "embeddings/position_embeddings/embedding"),
    ("embeddings.LayerNorm.weight", "embeddings/norm/scale"),
    ("embeddings.LayerNorm.bias", "embeddings/norm/bias"),
)
# (key after ``transformer.layer.{i}.``, path after ``encoder/layers/{i}/``, transform): BERT's layer under
# DistilBERT's names.
_LAYER: Rows = (
    ("attention.q_lin.weight", "attention/query/kernel", "transpose"),
    ("attention.q_lin.bias", "attention/query/bias"),
    ("attention.k_lin.weight", "attention/key/kernel", "transpose"),
    ("attention.k_lin.bias", "attention/key/bias"),
    ("attention.v_lin.weight", "attention/value/kernel", "transpose"),
    ("attention.v_lin.bias", "attention/value/bias"),
    ("attention.out_lin.weight", "attention/output/kernel", "transpose"),
    ("attention.out_lin.bias", "attention/output/bias"),
    ("sa_layer_norm.weight", "attention_norm/scale"),
    ("sa_layer_norm.bias", "attention_norm/bias"),
    ("ffn.lin1.weight", "intermediate/kernel", "transpose"),
    ("ffn.lin1.bias", "intermediate/bias"),
    ("ffn.lin2.weight", "output/kernel", "transpose"),
    ("ffn.lin2.bias", "output/bias"),
    ("output_layer_norm.weight", "output_norm/scale"),
    ("output_layer_norm.bias", "output_norm/bias"),
)
_CLASSIFIER: Rows = (
    ("classifier.weight", "classifier/kernel", "transpose"),
    ("classifier.bias", "classifier/bias"),
)
_HEADS = {
    "feature-extraction": (),
    "text-classification": (
        ("pre_classifier.weight", "pre_classifier/kernel", "transpose"),
        ("pre_classifier.bias", "pre_classifier/bias"),
        *_CLASSIFIER,
    ),
    "token-classification": _CLASSIFIER,
}


def prefix(task: str) -> str:
    """The optional ``distilbert.`` prefix: exported for task models, not for the bare encoder."""
    return "[|distilbert.]" if task == "feature-extraction" else "[distilbert.|]"


def table(config: Config, task: str) -> Sequence[tuple]:
    """The rows for ``task``; the same rows load and (run backwards) export."""
    p = prefix(task)
    rows = [(p + key, path, *t) for key, path, *t in _EMBEDDINGS]
    rows += [(f"{p}transformer.layer.{{i}}.{key}", f"encoder/layers/{{i}}/{path}", *t) for key, path, *t in _LAYER]
    return rows + list(_HEADS[task])


def ignore(config: Config, task: str) -> Sequence[str]:
    """Checkpoint keys that may go unused: the masked-LM head, buffers, and heads this task does not build."""
    keys = ["vocab_[transform|layer_norm|projector].*", "qa_outputs.*", "[distilbert.|]embeddings.position_ids"]
    if task != "text-classification":
        keys.append("pre_classifier.*")
    if task == "feature-extraction":
        keys.append("classifier.*")
    return keys
