"""RoBERTa / XLM-RoBERTa checkpoint keys (transformers' PyTorch names) <-> NNX paths, as data.

The embeddings and layers have BERT's key names under a ``roberta.`` prefix (XLM-RoBERTa uses the same prefix), so
their rows are BERT's. Task checkpoints carry the prefix, bare ``RobertaModel`` checkpoints do not; every row accepts
both, and greedy ``(?:roberta\\.)?`` (task models) exports it while lazy ``(?:roberta\\.)??`` (the bare encoder) drops
it.
"""

from __future__ import annotations

from collections.abc import Sequence

from finetune.hf.tables import IDENTITY, TRANSPOSE, Row
from finetune.models.bert.convert import _EMBEDDINGS, _LAYER
from finetune.models.roberta.modeling import Config

_HEADS = {
    "feature-extraction": (),
    "text-classification": (
        Row(r"classifier\.dense\.weight", "classifier/dense/kernel", TRANSPOSE),
        Row(r"classifier\.dense\.bias", "classifier/dense/bias", IDENTITY),
        Row(r"classifier\.out_proj\.weight", "classifier/out_proj/kernel", TRANSPOSE),
        Row(r"classifier\.out_proj\.bias", "classifier/out_proj/bias", IDENTITY),
    ),
    "token-classification": (
        Row(r"classifier\.weight", "classifier/kernel", TRANSPOSE),
        Row(r"classifier\.bias", "classifier/bias", IDENTITY),
    ),
}


def prefix(task: str) -> str:
    """The optional ``roberta.`` prefix: exported for task models, not for the bare encoder."""
    return r"(?:roberta\.)??" if task == "feature-extraction" else r"(?:roberta\.)?"


def table(config: Config, task: str) -> Sequence[Row]:
    """The rows for ``task``; the same rows load and (run backwards) export."""
    p = prefix(task)
    rows = [Row(p + key, path, t) for key, path, t in _EMBEDDINGS]
    rows += [Row(p + r"encoder\.layer\.(\d+)\." + key, r"encoder/layers/\1/" + path, t) for key, path, t in _LAYER]
    return rows + list(_HEADS[task])


def ignore(config: Config, task: str) -> Sequence[str]:
    """Checkpoint keys that may go unused: the masked-LM head, the pooler (no RoBERTa head uses it), buffers, and the
    heads of other tasks."""
    keys = [r"lm_head\..*", r"(?:roberta\.)?pooler\..*", r"(?:roberta\.)?embeddings\.(?:position_ids|token_type_ids)"]
    if task != "text-classification":
        keys.append(r"classifier\.(?:dense|out_proj)\..*")
    if task != "token-classification":
        keys.append(r"classifier\.(?:weight|bias)")
    return keys
