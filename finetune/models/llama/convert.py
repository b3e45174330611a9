"""Llama-family checkpoint keys (transformers' PyTorch names) <-> NNX paths, as plain data.

Rows are in the grammar of `finetune.hf.tables`. Task checkpoints (``*ForCausalLM``, ``*ForSequenceClassification``...)
prefix the decoder with ``model.``; bare ``*Model`` checkpoints do not. Every row accepts both; task models export the
prefix (``[model.|]``), the bare decoder drops it (``[|model.]``), as transformers' classes expect.
"""

from __future__ import annotations

from collections.abc import Sequence

from finetune.models.llama.modeling import Config

Rows = tuple[tuple, ...]  # (key template, path template(s)[, transform name]) each

# (checkpoint key after the prefix, NNX path, transform).
_DECODER: Rows = (
    ("embed_tokens.weight", "embed_tokens/embedding"),
    ("norm.weight", "norm/scale"),
)
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
# (key after ``layers.{i}.``, path after ``layers/{i}/``, transform).
_LAYER: Rows = (
    ("input_layernorm.weight", "input_layernorm/scale"),
    *((f"self_attn.{proj}.weight", f"attention/{proj}/kernel", "transpose") for proj in _ATTENTION),
    *((f"self_attn.{proj}.bias", f"attention/{proj}/bias") for proj in _ATTENTION),
    *((f"self_attn.{norm}.weight", f"attention/{norm}/scale") for norm in ("q_norm", "k_norm")),
    ("post_attention_layernorm.weight", "post_attention_layernorm/scale"),
    *((f"mlp.{proj}.weight", f"mlp/{proj}/kernel", "transpose") for proj in _MLP),
    *((f"mlp.{proj}.bias", f"mlp/{proj}/bias") for proj in _MLP),
)
# The task heads, which sit outside the prefix. ``score`` is the classification head of both classification tasks.
_HEADS = {
    "causal-lm": (("lm_head.weight", "lm_head/kernel", "transpose"),),
    "text-classification": (("score.weight", "score/kernel", "transpose"),),
    "token-classification": (
        ("score.weight", "score/kernel", "transpose"),
        ("score.bias", "score/bias"),
    ),
    "feature-extraction": (),
}
# Buffers some checkpoints carry (rotary inverse frequencies), which the modules recompute.
_BUFFERS = ("[model.|][layers.{i}.self_attn.|]rotary_emb.inv_freq",)


def prefix(task: str) -> str:
    """The optional ``model.`` prefix: exported for task models, not for the bare decoder."""
    return "[|model.]" if task == "feature-extraction" else "[model.|]"


def table(config: Config, task: str) -> Sequence[tuple]:
    """The rows for ``task``; the same rows load and (run backwards) export."""
    p = prefix(task)
    rows = [(p + key, path, *t) for key, path, *t in _DECODER]
    rows += [(f"{p}layers.{{i}}.{key}", f"layers/{{i}}/{path}", *t) for key, path, *t in _LAYER]
    return rows + list(_HEADS[task])


def ignore(config: Config, task: str) -> Sequence[str]:
    """Checkpoint keys that may go unused: buffers, and the heads of other tasks (or a tied LM head's copy)."""
    keys = list(_BUFFERS)
    if task != "causal-lm" or config.tie_word_embeddings:
        keys.append("lm_head.weight")
    if task not in ("text-classification", "token-classification"):
        keys.append("score.*")
    elif task == "text-classification":
        keys.append("score.bias")
    return keys
