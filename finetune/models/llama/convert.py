"""Llama-family checkpoint keys (transformers' PyTorch names) <-> NNX paths, as data.

Task checkpoints (``*ForCausalLM``, ``*ForSequenceClassification``...) prefix the decoder with ``model.``; bare
``*Model`` checkpoints do not. Every row accepts both. The quantifier decides what
`finetune.hf.tables.export_weights` writes: greedy ``(?:model\\.)?`` keeps the prefix (task models), lazy
``(?:model\\.)??`` drops it (the bare decoder), as transformers' classes expect.
"""

from __future__ import annotations

from collections.abc import Sequence

from finetune.hf.tables import IDENTITY, TRANSPOSE, Row
from finetune.models.llama.modeling import Config

# (checkpoint key after the prefix, NNX path, transform); "\1" is the layer index.
_DECODER = (
    (r"embed_tokens\.weight", "embed_tokens/embedding", IDENTITY),
    (r"norm\.weight", "norm/scale", IDENTITY),
)
_LAYER = (
    (r"input_layernorm\.weight", "input_layernorm/scale", IDENTITY),
    (r"self_attn\.(q_proj|k_proj|v_proj|o_proj)\.weight", r"attention/\2/kernel", TRANSPOSE),
    (r"self_attn\.(q_proj|k_proj|v_proj|o_proj)\.bias", r"attention/\2/bias", IDENTITY),
    (r"self_attn\.(q_norm|k_norm)\.weight", r"attention/\2/scale", IDENTITY),
    (r"post_attention_layernorm\.weight", "post_attention_layernorm/scale", IDENTITY),
    (r"mlp\.(gate_proj|up_proj|down_proj)\.weight", r"mlp/\2/kernel", TRANSPOSE),
    (r"mlp\.(gate_proj|up_proj|down_proj)\.bias", r"mlp/\2/bias", IDENTITY),
)
# The task heads, which sit outside the prefix. ``score`` is the classification head of both classification tasks.
_HEADS = {
    "causal-lm": (Row(r"lm_head\.weight", "lm_head/kernel", TRANSPOSE),),
    "text-classification": (Row(r"score\.weight", "score/kernel", TRANSPOSE),),
    "token-classification": (
        Row(r"score\.weight", "score/kernel", TRANSPOSE),
        Row(r"score\.bias", "score/bias", IDENTITY),
    ),
    "feature-extraction": (),
}
# Buffers some checkpoints carry (rotary inverse frequencies), which the modules recompute.
_BUFFERS = (r"(?:model\.)?(?:layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq",)


def prefix(task: str) -> str:
    """The optional ``model.`` prefix: exported for task models, not for the bare decoder."""
    return r"(?:model\.)??" if task == "feature-extraction" else r"(?:model\.)?"


def table(config: Config, task: str) -> Sequence[Row]:
    """The rows for ``task``; the same rows load and (run backwards) export."""
    p = prefix(task)
    rows = [Row(p + key, path, t) for key, path, t in _DECODER]
    rows += [Row(p + r"layers\.(\d+)\." + key, r"layers/\1/" + path, t) for key, path, t in _LAYER]
    return rows + list(_HEADS[task])


def ignore(config: Config, task: str) -> Sequence[str]:
    """Checkpoint keys that may go unused: buffers, and the heads of other tasks (or a tied LM head's copy)."""
    keys = list(_BUFFERS)
    if task != "causal-lm" or config.tie_word_embeddings:
        keys.append(r"lm_head\.weight")
    if task not in ("text-classification", "token-classification"):
        keys.append(r"score\..*")
    elif task == "text-classification":
        keys.append(r"score\.bias")
    return keys
