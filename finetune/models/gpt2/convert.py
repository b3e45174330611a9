"""GPT-2 checkpoint keys (transformers' PyTorch names) <-> NNX paths, as data.

GPT-2's projections are ``Conv1D`` modules whose weights are already ``(in, out)``, so they load untransposed. The
fused ``attn.c_attn`` (query, key and value side by side on the output axis) is split into three projections.

Task checkpoints prefix the decoder with ``transformer.``; bare ``GPT2Model`` checkpoints (the original ``gpt2``
repository among them) do not. Every row accepts both. The quantifier decides what `finetune.hf.tables.export_weights`
writes: greedy ``(?:transformer\\.)?`` keeps the prefix (task models), lazy ``(?:transformer\\.)??`` drops it.
"""

from __future__ import annotations

from collections.abc import Sequence

from finetune.hf.tables import IDENTITY, TRANSPOSE, Row, Split
from finetune.models.gpt2.modeling import Config

_QKV = ("attention/q_proj", "attention/k_proj", "attention/v_proj")

# (checkpoint key after the prefix, NNX path(s), transform); "\1" is the layer index.
_DECODER = (
    (r"wte\.weight", "wte/embedding", IDENTITY),
    (r"wpe\.weight", "wpe/embedding", IDENTITY),
    (r"ln_f\.weight", "ln_f/scale", IDENTITY),
    (r"ln_f\.bias", "ln_f/bias", IDENTITY),
)
_LAYER = (
    (r"(ln_1|ln_2)\.weight", r"\2/scale", IDENTITY),
    (r"(ln_1|ln_2)\.bias", r"\2/bias", IDENTITY),
    (r"attn\.c_attn\.weight", tuple(f"{p}/kernel" for p in _QKV), Split(3, axis=-1)),
    (r"attn\.c_attn\.bias", tuple(f"{p}/bias" for p in _QKV), Split(3, axis=-1)),
    (r"attn\.c_proj\.weight", "attention/o_proj/kernel", IDENTITY),
    (r"attn\.c_proj\.bias", "attention/o_proj/bias", IDENTITY),
    (r"mlp\.(c_fc|c_proj)\.weight", r"mlp/\2/kernel", IDENTITY),
    (r"mlp\.(c_fc|c_proj)\.bias", r"mlp/\2/bias", IDENTITY),
)
# The task heads, outside the prefix: transformers' ``nn.Linear`` modules, so their weights are transposed.
_HEADS = {
    "causal-lm": (Row(r"lm_head\.weight", "lm_head/kernel", TRANSPOSE),),
    "text-classification": (Row(r"score\.weight", "score/kernel", TRANSPOSE),),
    "token-classification": (
        Row(r"classifier\.weight", "classifier/kernel", TRANSPOSE),
        Row(r"classifier\.bias", "classifier/bias", IDENTITY),
    ),
    "feature-extraction": (),
}
# Causal-mask buffers older checkpoints carry; the modules build the mask themselves.
_BUFFERS = (r"(?:transformer\.)?h\.\d+\.attn\.(?:bias|masked_bias)",)
_HEAD_KEYS = {"lm_head": r"lm_head\..*", "score": r"score\..*", "classifier": r"classifier\..*"}


def prefix(task: str) -> str:
    """The optional ``transformer.`` prefix: exported for task models, not for the bare decoder."""
    return r"(?:transformer\.)??" if task == "feature-extraction" else r"(?:transformer\.)?"


def table(config: Config, task: str) -> Sequence[Row]:
    """The rows for ``task``; the same rows load and (run backwards) export."""
    p = prefix(task)
    rows = [Row(p + key, path, t) for key, path, t in _DECODER]
    rows += [Row(p + r"h\.(\d+)\." + key, _in_layer(path), t) for key, path, t in _LAYER]
    return rows + list(_HEADS[task])


def _in_layer(path: str | tuple[str, ...]) -> str | tuple[str, ...]:
    if isinstance(path, tuple):
        return tuple(_in_layer(p) for p in path)
    return r"layers/\1/" + path


def ignore(config: Config, task: str) -> Sequence[str]:
    """Checkpoint keys that may go unused: buffers, and the heads of other tasks (or a tied LM head's copy)."""
    used = {"causal-lm": "lm_head", "text-classification": "score", "token-classification": "classifier"}.get(task)
    if task == "causal-lm" and config.tie_word_embeddings:
        used = None
    return [*_BUFFERS, *(key for name, key in _HEAD_KEYS.items() if name != used)]
