"""Llama-family decoders in Flax NNX (``model_type`` llama, mistral, qwen2, qwen3).

The four families share one set of modules; they differ only in configuration:

- **qwen2** has biases on the query/key/value projections (not on the output projection);
- **qwen3** normalises queries and keys per head (RMSNorm over ``head_dim``) before the rotary embedding;
- **mistral** (and qwen2/qwen3 layers typed ``sliding_attention``) attends within a sliding window, applied exactly
  (a token sees itself and the ``sliding_window - 1`` tokens before it, as transformers does);
- every family may use grouped-query attention (``num_key_value_heads < num_attention_heads``), an explicit
  ``head_dim``, tied input/output embeddings, and a scaled rotary embedding (``rope_parameters``).

The modules are written bottom-up: attention, MLP, decoder layer, then `Llama` with its task head; the rotary
embedding lives in `finetune.models.blocks.rotary`. There is no KV cache: these modules are for training and scoring,
not incremental generation.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from finetune.errors import LoadError
from finetune.models import heads
from finetune.models.blocks import (
    ACTIVATIONS,
    Dropout,
    Dtype,
    Rope,
    apply_rope,
    causal_attention,
    check_activation,
    dense,
    embed,
    head_rows,
    recomputed,
    rms_norm,
    rope_tables,
)

HEADS = heads.Heads(
    {
        "causal-lm": heads.LM_HEAD,
        "text-classification": heads.SCORE,
        "token-classification": heads.SCORE_TOKENS,
        "feature-extraction": None,
    },
    reads="last",
)


# model_type -> the transformers class-name prefix and the architectural choices its config does not spell out.
# ``options``: the bias options its transformers class reads; the others it ignores (a Mistral config.json that
# says ``attention_bias: true`` still has no biases), and so does finetune.
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {"hf_prefix": "Llama", "options": ("attention_bias", "mlp_bias")},
    "mistral": {"hf_prefix": "Mistral", "options": ()},
    "qwen2": {"hf_prefix": "Qwen2", "qkv_bias": True, "o_bias": False, "options": ()},
    "qwen3": {"hf_prefix": "Qwen3", "qk_norm": True, "options": ("attention_bias",)},
}


# --------------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    """The hyper-parameters the modules use (from a transformers Llama/Mistral/Qwen2/Qwen3 config).

    ``sliding_windows`` holds one entry per layer: the window size, or None for full causal attention.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope: Rope = Rope()
    max_position_embeddings: int = 2048
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_windows: tuple[int | None, ...] = ()
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    attention_dropout: float = 0.0
    classifier_dropout: float = 0.1

    @classmethod
    def from_hf(cls, hf: Any) -> Config:
        """Reads a transformers config of model_type llama, mistral, qwen2 or qwen3."""
        if hf.model_type not in FAMILIES:
            raise LoadError(
                f"The Llama-family modules read model_type {', '.join(FAMILIES)}; received model_type="
                f"{hf.model_type!r}. Load it through `finetune.load`, which picks the right architecture."
            )
        check_activation("Llama family", "hidden_act", hf.hidden_act)
        num_heads = hf.num_attention_heads
        num_kv_heads = getattr(hf, "num_key_value_heads", None) or num_heads
        options = FAMILIES[hf.model_type]["options"]

        def option(name: str) -> bool:
            return name in options and bool(getattr(hf, name, False))

        bias = option("attention_bias")
        family = {"qkv_bias": bias, "o_bias": bias, "qk_norm": False}
        family.update({k: v for k, v in FAMILIES[hf.model_type].items() if k not in ("hf_prefix", "options")})
        dropout = [getattr(hf, name, None) for name in ("classifier_dropout", "hidden_dropout")]
        return cls(
            model_type=hf.model_type,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // num_heads,
            hidden_act=hf.hidden_act,
            rms_norm_eps=hf.rms_norm_eps,
            rope=Rope.from_hf(hf),
            max_position_embeddings=hf.max_position_embeddings,
            mlp_bias=option("mlp_bias"),
            sliding_windows=sliding_windows(hf),
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            pad_token_id=getattr(hf, "pad_token_id", None),
            attention_dropout=float(getattr(hf, "attention_dropout", 0.0) or 0.0),
            classifier_dropout=float(next((d for d in dropout if d is not None), 0.1)),
            **family,
        )


def sliding_windows(hf: Any) -> tuple[int | None, ...]:
    """Per layer, the attention window transformers applies: ``layer_types`` (qwen2/qwen3), else every layer."""
    window = getattr(hf, "sliding_window", None)
    layer_types = getattr(hf, "layer_types", None)
    if layer_types is None:
        return (window,) * hf.num_hidden_layers
    return tuple(window if kind == "sliding_attention" else None for kind in layer_types)


# --------------------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------------------


class Attention(nnx.Module):
    """Grouped-query self-attention with rotary positions and, for qwen3, per-head RMSNorm of queries and keys."""

    def __init__(self, cfg: Config, window: int | None, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        q_width, kv_width = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_proj = dense(cfg.hidden_size, q_width, ("embed", "heads"), use_bias=cfg.qkv_bias, **kw)
        self.k_proj = dense(cfg.hidden_size, kv_width, ("embed", "heads"), use_bias=cfg.qkv_bias, **kw)
        self.v_proj = dense(cfg.hidden_size, kv_width, ("embed", "heads"), use_bias=cfg.qkv_bias, **kw)
        self.o_proj = dense(q_width, cfg.hidden_size, ("heads", "embed"), use_bias=cfg.o_bias, **kw)
        self.q_norm = rms_norm(cfg.head_dim, cfg.rms_norm_eps, **kw) if cfg.qk_norm else None
        self.k_norm = rms_norm(cfg.head_dim, cfg.rms_norm_eps, **kw) if cfg.qk_norm else None
        self.dropout = Dropout(cfg.attention_dropout, rngs=rngs)
        self.head_dim = cfg.head_dim
        self.window = window

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: jax.Array | None,
        queries: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """``x`` ``[B, T, H]`` with its rotary tables ``cos``/``sin`` and padding ``mask``. ``queries`` (``[B, Q, H]``,
        at ``positions`` ``[B, Q]``): the rows whose outputs are computed (all of ``x`` by default); keys and values
        always come from all of ``x``."""
        b, t, _ = x.shape
        queries = x if queries is None else queries
        q = self.q_proj(queries).reshape(b, queries.shape[1], -1, self.head_dim)
        k = self.k_proj(x).reshape(b, t, -1, self.head_dim)
        v = self.v_proj(x).reshape(b, t, -1, self.head_dim)
        if self.q_norm is not None:
            assert self.k_norm is not None  # built together (cfg.qk_norm)
            q, k = self.q_norm(q), self.k_norm(k)
        q_cos, q_sin = cos, sin
        if positions is not None:  # the queries' own rows of the tables
            q_cos, q_sin = (
                jnp.take_along_axis(jnp.broadcast_to(c, (b, *c.shape[1:])), positions[..., None], axis=1)
                for c in (cos, sin)
            )
        q, k = apply_rope(q, q_cos, q_sin), apply_rope(k, cos, sin)
        out = causal_attention(q, k, v, mask, window=self.window, dropout=self.dropout, positions=positions)
        return self.o_proj(out.reshape(b, queries.shape[1], -1))


class MLP(nnx.Module):
    """The gated feed-forward block: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, cfg: Config, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs, "use_bias": cfg.mlp_bias}
        self.gate_proj = dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.up_proj = dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.down_proj = dense(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)
        self.activation = ACTIVATIONS[cfg.hidden_act]

    def __call__(self, x: jax.Array) -> jax.Array:
        act = self.activation
        return self.down_proj(recomputed(lambda gate, up: act(gate) * up, self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nnx.Module):
    """Pre-norm decoder layer: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: Config, index: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        window = cfg.sliding_windows[index] if cfg.sliding_windows else None
        self.input_layernorm = rms_norm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.attention = Attention(cfg, window, **kw)
        self.post_attention_layernorm = rms_norm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.mlp = MLP(cfg, **kw)

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: jax.Array | None,
        queries: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """``x`` through the layer; with ``queries`` (rows of ``x`` at ``positions``) only their outputs."""
        if queries is None:
            x = x + self.attention(self.input_layernorm(x), cos, sin, mask)
        else:
            normed = self.input_layernorm(x)
            x = queries + self.attention(normed, cos, sin, mask, self.input_layernorm(queries), positions)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nnx.Module):
    """A Llama-family decoder with the head of its task.

    ``causal-lm`` returns next-token logits ``[B, T, vocab]`` (through the token embedding when
    ``tie_word_embeddings``, else ``lm_head``); ``text-classification`` scores the last non-padding token,
    ``[B, num_labels]``; ``token-classification`` returns ``[B, T, num_labels]``; ``feature-extraction`` the final
    normalised hidden states ``[B, T, hidden]``.

    Args:
      cfg: The model's `Config`.
      task: One of the tasks of `HEADS`.
      num_labels: Outputs of the classification head (classification tasks only).
      dtype: Computation dtype.
      param_dtype: Storage dtype of the parameters.
      rngs: Initialisation and dropout randomness.

    Example:
      >>> cfg = Config("llama", 256, 64, 128, 2, 4, 2, 16)
      >>> model = Llama(cfg, task="causal-lm", rngs=nnx.Rngs(0))
      >>> model(input_ids=jnp.ones((2, 5), jnp.int32)).shape
      (2, 5, 256)
    """

    def __init__(
        self,
        cfg: Config,
        *,
        task: str = "causal-lm",
        num_labels: int | None = None,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.task = task
        self.rope, self.head_dim, self.pad_token_id = cfg.rope, cfg.head_dim, cfg.pad_token_id
        self.embed_tokens = embed(cfg.vocab_size, cfg.hidden_size, "vocab", **kw)
        self.layers = nnx.List([DecoderLayer(cfg, i, **kw) for i in range(cfg.num_layers)])
        self.remat = False  # per-layer rematerialisation, set for training by `finetune.Recipe.remat`
        self.norm = rms_norm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        heads.build(
            self, HEADS, task, width=cfg.hidden_size, num_labels=num_labels, dropout=cfg.classifier_dropout,
            vocab_size=cfg.vocab_size, tied=cfg.tie_word_embeddings, **kw,
        )  # fmt: skip

    def hidden_states(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        rows: jax.Array | None = None,
    ) -> jax.Array:
        """The final normalised hidden states ``[B, T, hidden]``; with ``rows`` (``[B]`` positions) only theirs,
        ``[B, 1, hidden]`` (see `head_rows`)."""
        if position_ids is None:
            position_ids = jnp.arange(input_ids.shape[1])[None, :]
        cos, sin = rope_tables(self.rope, self.head_dim, position_ids)
        mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
        x = self.embed_tokens(input_ids)
        return self.norm(head_rows(self.layers, x, cos, sin, mask, rows=rows, remat=self.remat))

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Logits of the task head (hidden states for ``feature-extraction``); arguments as in transformers.

        ``token_type_ids`` are accepted and ignored: these models have no segment embedding, but tokenizers loaded
        as a generic ``PreTrainedTokenizerFast`` (many Llama 3 repositories) still return them.
        """
        rows = heads.last_rows(HEADS, self.task, input_ids, attention_mask, self.pad_token_id)
        x = self.hidden_states(input_ids, attention_mask, position_ids, rows)
        return heads.apply(self, HEADS, self.task, x, embedding=self.embed_tokens)
