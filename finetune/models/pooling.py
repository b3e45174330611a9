"""Sentence embeddings from per-token hidden states, pooled as sentence-transformers pools them.

A sentence-transformers checkpoint says how: ``modules.json`` lists a ``Pooling`` module whose ``config.json``
(usually ``1_Pooling/config.json``) turns pooling modes on (``pooling_mode_mean_tokens``...), and may list a
``Normalize`` module (unit-length embeddings). Without them, embeddings are the mean over the real (unpadded)
tokens, sentence-transformers' default. Several modes are concatenated in sentence-transformers' order.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import jax
import jax.numpy as jnp

from finetune.errors import ConfigError, LoadError

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
      >>> model.pooling = finetune.models.pooling.Pooling(modes=("cls",), normalize=True)
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
