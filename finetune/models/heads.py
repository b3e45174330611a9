r"""Every task head and the pooling of sentence embeddings: the one place where a model's task switches.

An architecture says what its backbone returns and where its heads sit (`Heads`: one `Head` per task, and whether a
sequence head reads the first token or each row's last); `build` puts the task's head on the model and `apply` runs
it on the backbone's hidden states. A head is a few `Part`\ s at fixed paths (``classifier``, ``pooler/dense``,
``score``...), so checkpoints, rules and adapters name the same parameters for every architecture that shares it;
`head_pattern` is the rule that finds them (group ``head`` or ``new``).

Feature extraction has no head: `pool` turns its token states into one vector per example, as sentence-transformers
pools them. A sentence-transformers checkpoint says how: ``modules.json`` lists a ``Pooling`` module whose
``config.json`` (usually ``1_Pooling/config.json``) turns pooling modes on (``pooling_mode_mean_tokens``...), and may
list a ``Normalize`` module (unit-length embeddings). Without them, embeddings are the mean over the real (unpadded)
tokens, sentence-transformers' default. Several modes are concatenated in sentence-transformers' order.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from finetune.errors import ConfigError, LoadError
from finetune.models.blocks import Dropout, Dtype, dense

TASKS = ("text-classification", "token-classification", "image-classification", "causal-lm", "feature-extraction")
SEQUENCE_TASKS = ("text-classification", "image-classification")  # one output per example, read from one token


def check_task(task: str, tasks: Sequence[str] = TASKS, where: str = "") -> None:
    """Refuses a task outside ``tasks``; ``where`` (e.g. " for bert checkpoints") says whose tasks these are."""
    if task not in tasks:
        raise ConfigError(
            f"`task` must be one of {', '.join(tasks)}{where}; received task={task!r}. Pick one of these."
        )


@dataclasses.dataclass(frozen=True)
class Part:
    """One module of a head.

    Attributes:
      path: Where it sits on the model, which is its parameter path (``classifier``, ``pooler/dense``).
      kind: ``dropout``; ``pool`` (width -> width, then ``activation``); ``labels`` (width -> ``num_labels``);
        ``vocab`` (width -> vocabulary, left out when the config ties it to the token embedding).
      bias: Whether a dense part has a bias.
      activation: After a ``pool`` part: ``tanh`` or ``relu``.
    """

    path: str
    kind: str
    bias: bool = True
    activation: str | None = None


@dataclasses.dataclass(frozen=True)
class Head:
    """A task head: its parts in the order they are built (the order fixes fresh weights and dropout streams) and the
    paths in the order they apply (default: as built; a dropout may apply twice)."""

    parts: tuple[Part, ...]
    order: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, eq=False)
class Heads:
    """An architecture's heads: ``tasks`` maps each task it supports to its `Head` (None: the hidden states are the
    output); ``reads`` is the token a sequence head reads: ``first`` (class token) or ``last`` (each row's last)."""

    tasks: Mapping[str, Head | None]
    reads: str = "first"


_DROPOUT = Part("dropout", "dropout")
# Sequence heads, on one token: BERT's pooler (dense + tanh) then a classifier; RoBERTa's dense + tanh + out_proj, all
# under ``classifier``, with dropout before each; DistilBERT's pre_classifier + ReLU; a classifier alone (ViT); a
# decoder's ``score``, without a bias as in transformers.
POOLED = Head((Part("pooler/dense", "pool", activation="tanh"), _DROPOUT, Part("classifier", "labels")))
DENSE_OUT_PROJ = Head(
    (Part("classifier/dense", "pool", activation="tanh"), Part("classifier/out_proj", "labels"))
    + (Part("classifier/dropout", "dropout"),),
    order=("classifier/dropout", "classifier/dense", "classifier/dropout", "classifier/out_proj"),
)
PRE_CLASSIFIER = Head((Part("pre_classifier", "pool", activation="relu"), _DROPOUT, Part("classifier", "labels")))
CLASSIFIER = Head((Part("classifier", "labels"),))
SCORE = Head((Part("score", "labels", bias=False),))
# Token heads, on every token: dropout then a classifier (GPT-2 and the Llama family build the classifier first).
TOKENS = Head((_DROPOUT, Part("classifier", "labels")))
GPT2_TOKENS = Head(
    (Part("classifier", "labels"), Part("head_dropout", "dropout")), order=("head_dropout", "classifier")
)
SCORE_TOKENS = Head((Part("score", "labels"), _DROPOUT), order=("dropout", "score"))
# The causal LM's head; with tied embeddings the token table's transpose instead.
LM_HEAD = Head((Part("lm_head", "vocab", bias=False),))
_ACTIVATIONS = {"tanh": jnp.tanh, "relu": jax.nn.relu}


def head_pattern(heads: Heads) -> str:
    """The full-match regex over parameter paths of every head of ``heads`` (their top-level modules)."""
    names: list[str] = []
    for head in heads.tasks.values():
        for part in head.parts if head else ():
            name = part.path.split("/")[0]
            if part.kind != "dropout" and name not in names:
                names.append(name)
    return f"{names[0]}/.*" if len(names) == 1 else f"(?:{'|'.join(names)})/.*"


def first_rows(heads: Heads, task: str) -> int | None:
    """1 when the task's head reads only the first token (the last layer then computes only it), else None."""
    return 1 if task in SEQUENCE_TASKS and heads.reads == "first" else None


class _Slot(nnx.Module):
    """Holds the parts of a head below one name (``pooler`` for ``pooler/dense``)."""


def build(
    model: nnx.Module,
    heads: Heads,
    task: str,
    *,
    width: int,
    num_labels: int | None,
    dropout: float | Mapping[str, float] = 0.0,
    vocab_size: int | None = None,
    tied: bool = False,
    dtype: Dtype,
    param_dtype: Dtype,
    rngs: nnx.Rngs,
) -> None:
    """Puts ``task``'s head on ``model`` at its parts' paths; refuses an unsupported task, or a classifier without
    ``num_labels``. ``dropout``: the head's rate (or a rate per task); ``tied``: the LM head is
    the token table."""
    check_task(task, tuple(heads.tasks), f" for {type(model).__name__}")
    head = heads.tasks[task]
    if head is None:
        return
    if any(part.kind == "labels" for part in head.parts) and not num_labels:
        raise ConfigError(
            f"`num_labels` must be a positive integer for task={task!r}; received num_labels={num_labels!r}. "
            "Pass the number of classes (1 for regression)."
        )
    kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
    rate = dropout.get(task, 0.0) if isinstance(dropout, Mapping) else dropout
    for part in head.parts:
        if part.kind == "dropout":
            module: nnx.Module = Dropout(rate, rngs=rngs)
        elif part.kind == "pool":
            module = dense(width, width, ("embed", None), **kw, use_bias=part.bias)
        elif part.kind == "labels":
            module = dense(width, int(num_labels or 0), ("embed", "classes"), **kw, use_bias=part.bias)
        elif tied:
            continue
        else:
            module = dense(width, int(vocab_size or 0), ("embed", "vocab"), **kw, use_bias=part.bias)
        *parents, name = part.path.split("/")
        owner = model
        for parent in parents:
            if not hasattr(owner, parent):
                setattr(owner, parent, _Slot())
            owner = getattr(owner, parent)
        setattr(owner, name, module)


def apply(
    model: nnx.Module, heads: Heads, task: str, hidden: jax.Array, embedding: nnx.Embed | None = None
) -> jax.Array:
    """``task``'s head (put on ``model`` by `build`) on the backbone's ``hidden`` states (``[B, T, H]``; ``[B, 1, H]``
    when it computed only the row a sequence head reads); ``embedding``: the token table of a tied LM head."""
    head = heads.tasks[task]
    if head is None:
        return hidden
    activations = {part.path: part.activation for part in head.parts}
    x = hidden[:, 0] if task in SEQUENCE_TASKS else hidden
    for path in head.order or tuple(activations):
        module: Any = model
        for name in path.split("/"):
            module = getattr(module, name, None)
        if module is None:  # a tied LM head: the token table's transpose
            assert embedding is not None, "a tied LM head needs the token embedding"
            x = embedding.attend(x)
            continue
        x = module(x)
        activation = activations[path]
        if activation:
            x = _ACTIVATIONS[activation](x)
    return x


def last_token(input_ids: jax.Array, attention_mask: jax.Array | None, pad_token_id: int | None) -> jax.Array:
    """The position of each row's last token, ``[B]``, found as transformers does: the row a ``last`` head reads.

    With a ``pad_token_id``: the rightmost token that is not padding (``argmax(index * (ids != pad))``), exactly
    transformers' rule. Without one, transformers only accepts batches of one and takes the last position; here the
    last position the attention mask keeps is taken instead, which agrees with it and also handles padded batches.
    """
    if pad_token_id is not None:
        keep = input_ids != pad_token_id
    elif attention_mask is not None:
        keep = attention_mask.astype(bool)
    else:
        return jnp.full(input_ids.shape[:1], input_ids.shape[1] - 1)
    return jnp.argmax(jnp.arange(input_ids.shape[1]) * keep, axis=-1)


def last_rows(
    heads: Heads, task: str, input_ids: jax.Array, attention_mask: jax.Array | None, pad_token_id: int | None
) -> jax.Array | None:
    """Each row's last token (`last_token`) when ``task``'s head reads only it (the last layer then computes only
    it), else None."""
    if task not in SEQUENCE_TASKS or heads.reads != "last":
        return None
    return last_token(input_ids, attention_mask, pad_token_id)


def check_packed(task: str, rows: Any, cols: Any) -> None:
    """Packed batches (``segment_ids``) feed a first-token sequence head only, with each example's row and column."""
    if task != "text-classification" or rows is None or cols is None:
        raise ConfigError(
            f"Packed batches (segment_ids) need task 'text-classification' and example_rows / example_cols; "
            f"received task={task!r}. Train other tasks with packing=False."
        )


# Modes in the order sentence-transformers concatenates them, with the key that turns each on in its config.json.
MODES = {
    "cls": "pooling_mode_cls_token",
    "max": "pooling_mode_max_tokens",
    "mean": "pooling_mode_mean_tokens",
    "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens",
    "weightedmean": "pooling_mode_weightedmean_tokens",
    "lasttoken": "pooling_mode_lasttoken",
}


@dataclasses.dataclass(frozen=True)
class Pooling:
    """How `finetune.Model.predict` turns a feature-extraction model's token states into one vector per example.

    Args:
      modes: Pooling modes, concatenated in this order: any of ``cls``, ``max``, ``mean``, ``mean_sqrt_len``,
        ``weightedmean``, ``lasttoken``.
      normalize: Scale every embedding to unit L2 norm (sentence-transformers' ``Normalize`` module).
      max_length: Longer texts are truncated to this many tokens before pooling (sentence-transformers'
        ``max_seq_length``), unless the recipe sets ``max_length``; None: the recipe's default.

    Example:
      >>> model.pooling = finetune.models.heads.Pooling(modes=("cls",), normalize=True)
    """

    modes: tuple[str, ...] = ("mean",)
    normalize: bool = False
    max_length: int | None = None

    def __post_init__(self):
        modes = tuple(self.modes) if isinstance(self.modes, list | tuple) else None
        if not modes or any(m not in MODES for m in modes):
            raise ConfigError(
                f"`modes` must be a non-empty tuple of pooling modes from {', '.join(MODES)}; received "
                f"modes={self.modes!r}. Pass e.g. modes=('mean',)."
            )
        if not isinstance(self.normalize, bool):
            raise ConfigError(f"`normalize` must be a bool; received normalize={self.normalize!r}. Pass True or False.")
        if not (self.max_length is None or (type(self.max_length) is int and self.max_length >= 1)):
            raise ConfigError(
                f"`max_length` must be an int >= 1 or None; received max_length={self.max_length!r}. Pass a token "
                "count, or None for the recipe's."
            )
        object.__setattr__(self, "modes", modes)


def read(directory: str | os.PathLike) -> Pooling:
    """The pooling a sentence-transformers checkpoint directory declares (``modules.json``, its Pooling module's
    ``config.json``, ``max_seq_length`` of ``sentence_bert_config.json``), or mean pooling when it declares none.

    Raises:
      LoadError: ``modules.json`` or the pooling config is not valid JSON, or names no known pooling mode.
    """
    directory = pathlib.Path(directory)
    modules = _json(directory / "modules.json")
    if not isinstance(modules, list):
        return Pooling()
    settings = _json(directory / "sentence_bert_config.json")
    max_length = settings.get("max_seq_length") if isinstance(settings, dict) else None
    max_length = max_length if isinstance(max_length, int) and not isinstance(max_length, bool) else None
    types = {str(m.get("type", "")).rsplit(".", 1)[-1]: m for m in modules if isinstance(m, dict)}
    normalize = "Normalize" in types
    config = _json(directory / str(types["Pooling"].get("path", "")) / "config.json") if "Pooling" in types else None
    if not isinstance(config, dict):
        return Pooling(normalize=normalize, max_length=max_length)
    modes = tuple(mode for mode, key in MODES.items() if config.get(key) is True)
    if not modes:
        raise LoadError(
            f"The pooling config of {directory} ({types['Pooling'].get('path')}/config.json) turns on no pooling mode "
            f"(keys {', '.join(MODES.values())}). Set one of them to true, or delete the file for mean pooling."
        )
    return Pooling(modes=modes, normalize=normalize, max_length=max_length)


def _json(path: pathlib.Path):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(
            f"{path} is not valid JSON ({e}). Restore it from the checkpoint's source, or delete it to pool by the "
            "mean of the tokens."
        ) from None


def pool(hidden: jax.Array, mask: jax.Array, pooling: Pooling) -> jax.Array:
    """``[B, T, H]`` token states and a ``[B, T]`` mask (1 on real tokens) -> ``[B, H * len(modes)]`` embeddings."""
    hidden = hidden.astype(jnp.float32)
    weights = mask.astype(jnp.float32)[..., None]
    count = weights.sum(1)
    position = jnp.arange(1, hidden.shape[1] + 1, dtype=jnp.float32)[None, :, None] * weights
    last = hidden.shape[1] - 1 - jnp.argmax(jnp.flip(mask, 1), axis=1)  # the last real token, whatever the padding side
    by_mode = {
        "cls": lambda: hidden[:, 0],
        "max": lambda: jnp.where(weights > 0, hidden, -1e9).max(1),
        "mean": lambda: (hidden * weights).sum(1) / jnp.maximum(count, 1e-9),
        "mean_sqrt_len": lambda: (hidden * weights).sum(1) / jnp.sqrt(jnp.maximum(count, 1e-9)),
        "weightedmean": lambda: (hidden * position).sum(1) / jnp.maximum(position.sum(1), 1e-9),
        "lasttoken": lambda: jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0],
    }
    out = jnp.concatenate([by_mode[m]() for m in pooling.modes], axis=-1)
    if pooling.normalize:
        out = out / jnp.maximum(jnp.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
    return out
