"""RoBERTa / XLM-RoBERTa checkpoint keys (transformers' PyTorch names) <-> NNX paths, as plain data.

The embeddings and layers carry BERT's key names under a ``roberta.`` prefix (XLM-RoBERTa uses the same prefix);
they are spelled out here so that the architecture stands on its own. Rows are in the grammar of
`finetune.hf.tables`: task checkpoints carry the prefix, bare ``RobertaModel`` checkpoints do not; every row accepts
both, task models export it (``[roberta.|]``) and the bare encoder drops it (``[|roberta.]``).
"""

from __future__ import annotations

from collections.abc import Sequence

from finetune.models.roberta.modeling import Config

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
_HEADS = {
    "feature-extraction": (),
    "text-classification": (
        ("classifier.dense.weight", "classifier/dense/kernel", "transpose"),
        ("classifier.dense.bias", "classifier/dense/bias"),
        ("classifier.out_proj.weight", "classifier/out_proj/kernel", "transpose"),
        ("classifier.out_proj.bias", "classifier/out_proj/bias"),
    ),
    "token-classification": (
        ("classifier.weight", "classifier/kernel", "transpose"),
        ("classifier.bias", "classifier/bias"),
    ),
}


def prefix(task: str) -> str:
    """The optional ``roberta.`` prefix: exported for task models, not for the bare encoder."""
    return "[|roberta.]" if task == "feature-extraction" else "[roberta.|]"


def table(config: Config, task: str) -> Sequence[tuple]:
    """The rows for ``task``; the same rows load and (run backwards) export."""
    p = prefix(task)
    rows = [(p + key, path, *t) for key, path, *t in _EMBEDDINGS]
    rows += [(f"{p}encoder.layer.{{i}}.{key}", f"encoder/layers/{{i}}/{path}", *t) for key, path, *t in _LAYER]
    return rows + list(_HEADS[task])


def ignore(config: Config, task: str) -> Sequence[str]:
    """Checkpoint keys that may go unused: the masked-LM head, the pooler (no RoBERTa head uses it), buffers, and the
    heads of other tasks."""
    keys = ["lm_head.*", "[roberta.|]pooler.*", "[roberta.|]embeddings.[position_ids|token_type_ids]"]
    if task != "text-classification":
        keys.append("classifier.[dense|out_proj].*")
    if task != "token-classification":
        keys.append("classifier.[weight|bias]")
    return keys
