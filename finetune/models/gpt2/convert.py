"""GPT-2 checkpoint keys (transformers' PyTorch names) <-> NNX paths, as plain data.

GPT-2's projections are ``Conv1D`` modules whose weights are already ``(in, out)``, so they load untransposed. The
fused ``attn.c_attn`` (query, key and value side by side on the output axis) is split into three projections.

Rows are in the grammar of `finetune.hf.tables`. Task checkpoints prefix the decoder with ``transformer.``; bare
``GPT2Model`` checkpoints (the original ``gpt2`` repository among them) do not. Every row accepts both; task models
export the prefix (``[transformer.|]``), the bare decoder drops it (``[|transformer.]``).
"""

from __future__ import annotations

from collections.abc import Sequence

from finetune.models.gpt2.modeling import Config

Rows = tuple[tuple, ...]  # (key template, path template(s)[, transform name]) each

_QKV = ("attention/q_proj", "attention/k_proj", "attention/v_proj")

# (checkpoint key after the prefix, NNX path(s), transform).
_DECODER: Rows = (
    ("wte.weight", "wte/embedding"),
    ("wpe.weight", "wpe/embedding"),
    ("ln_f.weight", "ln_f/scale"),
    ("ln_f.bias", "ln_f/bias"),
)
# (key after ``h.{i}.``, path(s) after ``layers/{i}/``, transform).
_LAYER: Rows = (
    *((f"{norm}.weight", f"{norm}/scale") for norm in ("ln_1", "ln_2")),
    *((f"{norm}.bias", f"{norm}/bias") for norm in ("ln_1", "ln_2")),
    ("attn.c_attn.weight", tuple(f"{p}/kernel" for p in _QKV), "split"),
    ("attn.c_attn.bias", tuple(f"{p}/bias" for p in _QKV), "split"),
    ("attn.c_proj.weight", "attention/o_proj/kernel"),
    ("attn.c_proj.bias", "attention/o_proj/bias"),
    *((f"mlp.{proj}.weight", f"mlp/{proj}/kernel") for proj in ("c_fc", "c_proj")),
    *((f"mlp.{proj}.bias", f"mlp/{proj}/bias") for proj in ("c_fc", "c_proj")),
)
# The task heads, outside the prefix: transformers' ``nn.Linear`` modules, so their weights are transposed.
_HEADS = {
    "causal-lm": (("lm_head.weight", "lm_head/kernel", "transpose"),),
    "text-classification": (("score.weight", "score/kernel", "transpose"),),
    "token-classification": (
        ("classifier.weight", "classifier/kernel", "transpose"),
        ("classifier.bias", "classifier/bias"),
    ),
    "feature-extraction": (),
}
# Causal-mask buffers older checkpoints carry; the modules build the mask themselves.
_BUFFERS = ("[transformer.|]h.{i}.attn.[bias|masked_bias]",)
_HEAD_KEYS = {"lm_head": "lm_head.*", "score": "score.*", "classifier": "classifier.*"}


def prefix(task: str) -> str:
    """The optional ``transformer.`` prefix: exported for task models, not for the bare decoder."""
    return "[|transformer.]" if task == "feature-extraction" else "[transformer.|]"


def table(config: Config, task: str) -> Sequence[tuple]:
    """The rows for ``task``; the same rows load and (run backwards) export."""
    p = prefix(task)
    rows = [(p + key, path, *t) for key, path, *t in _DECODER]
    rows += [(f"{p}h.{{i}}.{key}", _in_layer(path), *t) for key, path, *t in _LAYER]
    return rows + list(_HEADS[task])


def _in_layer(path: str | tuple[str, ...]) -> str | tuple[str, ...]:
    if isinstance(path, tuple):
        return tuple("layers/{i}/" + p for p in path)
    return "layers/{i}/" + path


def ignore(config: Config, task: str) -> Sequence[str]:
    """Checkpoint keys that may go unused: buffers, and the heads of other tasks (or a tied LM head's copy)."""
    used = {"causal-lm": "lm_head", "text-classification": "score", "token-classification": "classifier"}.get(task)
    if task == "causal-lm" and config.tie_word_embeddings:
        used = None
    return [*_BUFFERS, *(key for name, key in _HEAD_KEYS.items() if name != used)]
