"""Rotary position embeddings as transformers computes them, with the scaling variants met in Llama-family configs.

`Rope` holds the settings of a config's ``rope_parameters`` (``rope_scaling`` before transformers 5);
`ROPE_FREQUENCIES` maps each ``rope_type`` to the function giving its inverse frequencies (formulas of
transformers' ``modeling_rope_utils``); `rope_tables` and `apply_rope` apply them in the rotate-half convention.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from finetune.errors import LoadError


@dataclasses.dataclass(frozen=True)
class Rope:
    """Rotary-embedding settings, from transformers' ``rope_parameters`` (``rope_scaling`` in older configs).

    Attributes:
      rope_type: ``default``, ``linear``, ``dynamic``, ``llama3`` or ``yarn``. ``dynamic`` NTK scaling changes the
        base only when a batch reaches beyond ``max_position_embeddings`` (`rope_tables`), so up to that length it
        is ``default``.
      theta: The base wavelength.
      factor: Context-extension factor (``linear``, ``llama3``, ``yarn``).
      low_freq_factor: ``llama3`` only.
      high_freq_factor: ``llama3`` only.
      original_max_position_embeddings: Pre-training context length (``llama3``, ``yarn``).
      attention_factor: ``yarn`` only: scale of cos/sin; None infers it from ``factor`` and ``mscale``.
      beta_fast: ``yarn`` only.
      beta_slow: ``yarn`` only.
      mscale: ``yarn`` only.
      mscale_all_dim: ``yarn`` only.
      truncate: ``yarn`` only: round the correction range to whole dimensions.
      max_positions: The config's ``max_position_embeddings`` (``dynamic``: the length beyond which it scales).
    """

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    max_positions: int = 2048

    @classmethod
    def from_hf(cls, hf: Any) -> Rope:
        """Reads the rotary settings of a transformers config; refuses the variants not implemented here."""
        params = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ROPE_FREQUENCIES:
            raise LoadError(
                f"The checkpoint's config has rope_type={rope_type!r}, which finetune does not implement. "
                f"Supported rope types: {', '.join(ROPE_FREQUENCIES)}. Pick a checkpoint that uses one of these."
            )
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise LoadError(
                f"The checkpoint's config has partial_rotary_factor={params['partial_rotary_factor']}, but "
                "Llama-family models rotate the whole head. Check the checkpoint's config.json."
            )
        max_positions = hf.max_position_embeddings
        original = params.get("original_max_position_embeddings") or max_positions
        factor = params.get("factor")
        if factor is None:  # yarn without a factor: the ratio of the context lengths, as transformers does
            factor = max_positions / original if rope_type == "yarn" else 1.0
        theta = params.get("rope_theta", getattr(hf, "rope_theta", None) or 10000.0)
        return cls(
            rope_type=rope_type,
            theta=float(theta),
            factor=float(factor),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(original),
            attention_factor=params.get("attention_factor"),
            beta_fast=float(params.get("beta_fast") or 32.0),
            beta_slow=float(params.get("beta_slow") or 1.0),
            mscale=params.get("mscale"),
            mscale_all_dim=params.get("mscale_all_dim"),
            truncate=bool(params.get("truncate", True)),
            max_positions=int(max_positions),
        )


def _base_frequencies(rope: Rope, dim: int) -> np.ndarray:
    return 1.0 / rope.theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)


def _default(rope: Rope, dim: int) -> tuple[np.ndarray, float]:
    return _base_frequencies(rope, dim), 1.0


def _linear(rope: Rope, dim: int) -> tuple[np.ndarray, float]:
    return _base_frequencies(rope, dim) / rope.factor, 1.0


def _llama3(rope: Rope, dim: int) -> tuple[np.ndarray, float]:
    """Llama 3.1: long wavelengths divided by ``factor``, short ones kept, the band between interpolated."""
    inv_freq = _base_frequencies(rope, dim)
    context = rope.original_max_position_embeddings
    assert context is not None, "llama3 scaling needs original_max_position_embeddings (Rope.from_hf sets it)"
    low_freq_wavelen, high_freq_wavelen = context / rope.low_freq_factor, context / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (context / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, smoothed, scaled), 1.0


def _yarn(rope: Rope, dim: int) -> tuple[np.ndarray, float]:
    """YaRN: interpolate low frequencies, extrapolate high ones, ramp between; cos/sin scaled by ``mscale``."""

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = mscale(rope.factor, rope.mscale) / mscale(rope.factor, rope.mscale_all_dim)
        else:
            attention_factor = mscale(rope.factor)

    def correction_dim(rotations: float) -> float:
        context = rope.original_max_position_embeddings
        assert context is not None, "yarn scaling needs original_max_position_embeddings (Rope.from_hf sets it)"
        return dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoids a division by zero, as transformers does
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolation = _base_frequencies(rope, dim)
    inv_freq = extrapolation / rope.factor * ramp + extrapolation * (1 - ramp)
    return inv_freq, float(attention_factor)


# rope_type -> (Rope, head_dim) -> (inverse frequencies [head_dim // 2], scale of cos and sin).
ROPE_FREQUENCIES = {
    "default": _default,
    "linear": _linear,
    "dynamic": _default,
    "llama3": _llama3,
    "yarn": _yarn,
}


def _dynamic_ntk(rope: Rope, dim: int, position_ids: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Dynamic NTK scaling: past ``max_positions`` the base grows with the batch's length (its largest position + 1),
    as transformers computes it for a model that has seen no longer batch (its cache of the grown base is state
    kept between calls, which finetune's modules do not keep)."""
    seq_len = (jnp.max(position_ids) + 1).astype(jnp.float32)
    grown = rope.factor * seq_len / rope.max_positions - (rope.factor - 1)
    base = rope.theta * jnp.maximum(grown, 1.0) ** (dim / (dim - 2))
    scaled = 1.0 / base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    return jnp.where(seq_len > rope.max_positions, scaled, inv_freq)


def rope_tables(rope: Rope, head_dim: int, position_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(cos, sin)`` of shape ``[B or 1, T, head_dim]`` in float32 for integer ``position_ids`` ``[B or 1, T]``."""
    frequencies, scale = ROPE_FREQUENCIES[rope.rope_type](rope, head_dim)
    inv_freq = jnp.asarray(frequencies, jnp.float32)
    if rope.rope_type == "dynamic":
        inv_freq = _dynamic_ntk(rope, head_dim, position_ids, inv_freq)
    freqs = position_ids[..., None].astype(jnp.float32) * inv_freq
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates ``x`` ``[B, T, heads, head_dim]`` by position (transformers' rotate-half convention)."""
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin
