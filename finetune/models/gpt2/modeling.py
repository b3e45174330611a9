"""GPT-2 in Flax NNX: a frozen config, then the modules bottom-up (attention, MLP, block, `GPT2` with its task head).

Checkpoints store the query/key/value projections fused (``attn.c_attn``, a ``Conv1D`` whose weight is already
``(in, out)``); the table splits them into ``q_proj`` / ``k_proj`` / ``v_proj`` at load time and fuses them again at
export. Three projections ran faster than one fused kernel and a split in XLA on CPU (docs/performance.md), and they
give every decoder the same ``q_proj`` / ``v_proj`` paths for rules and adapters. There is no KV cache: these
modules are for training and scoring, not incremental generation.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from finetune.errors import ConfigError, LoadError
from finetune.models import heads
from finetune.models.blocks import (
    ACTIVATIONS,
    Dropout,
    Dtype,
    causal_attention,
    check_activation,
    dense,
    embed,
    head_rows,
    layer_norm,
    recomputed,
)

HEADS = heads.Heads(
    {
        "causal-lm": heads.LM_HEAD,
        "text-classification": heads.SCORE,
        "token-classification": heads.GPT2_TOKENS,
        "feature-extraction": None,
    },
    reads="last",
)


@dataclasses.dataclass(frozen=True)
class Config:
    """The GPT-2 hyper-parameters the modules use (from a `transformers.GPT2Config`)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 1024
    layer_norm_eps: float = 1e-5
    activation: str = "gelu_new"
    embedding_dropout: float = 0.1
    attention_dropout: float = 0.1
    residual_dropout: float = 0.1
    classifier_dropout: float = 0.1
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True
    pad_token_id: int | None = None

    @classmethod
    def from_hf(cls, hf: Any) -> Config:
        """Reads a `transformers.GPT2Config`; refuses settings these modules do not implement."""
        if getattr(hf, "add_cross_attention", False):
            raise LoadError(
                "finetune's GPT-2 is a decoder without cross-attention; the config has add_cross_attention=True. "
                "Pick a plain GPT-2 checkpoint."
            )
        check_activation("GPT-2", "activation_function", hf.activation_function)
        dropout = [getattr(hf, name, None) for name in ("classifier_dropout", "hidden_dropout")]
        return cls(
            vocab_size=hf.vocab_size,
            hidden_size=hf.n_embd,
            num_layers=hf.n_layer,
            num_heads=hf.n_head,
            intermediate_size=hf.n_inner or 4 * hf.n_embd,
            max_position_embeddings=hf.n_positions,
            layer_norm_eps=hf.layer_norm_epsilon,
            activation=hf.activation_function,
            embedding_dropout=hf.embd_pdrop,
            attention_dropout=hf.attn_pdrop,
            residual_dropout=hf.resid_pdrop,
            classifier_dropout=float(next((d for d in dropout if d is not None), 0.1)),
            scale_attn_weights=hf.scale_attn_weights,
            scale_attn_by_inverse_layer_idx=hf.scale_attn_by_inverse_layer_idx,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
            pad_token_id=getattr(hf, "pad_token_id", None),
        )


class Attention(nnx.Module):
    """Causal self-attention with separate query/key/value projections (split from ``c_attn`` at load time)."""

    def __init__(self, cfg: Config, index: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        width = cfg.hidden_size
        self.q_proj = dense(width, width, ("embed", "heads"), **kw)
        self.k_proj = dense(width, width, ("embed", "heads"), **kw)
        self.v_proj = dense(width, width, ("embed", "heads"), **kw)
        self.o_proj = dense(width, width, ("heads", "embed"), **kw)
        self.attention_dropout = Dropout(cfg.attention_dropout, rngs=rngs)
        self.dropout = Dropout(cfg.residual_dropout, rngs=rngs)
        self.num_heads = cfg.num_heads
        scale = (width // cfg.num_heads) ** -0.5 if cfg.scale_attn_weights else 1.0
        self.scale = scale / (index + 1) if cfg.scale_attn_by_inverse_layer_idx else scale

    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None,
        queries: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """``queries`` (``[B, Q, H]``, at ``positions`` ``[B, Q]``): the rows whose outputs are computed (all of
        ``x`` by default); keys and values always come from all of ``x``."""
        b, t, width = x.shape
        queries = x if queries is None else queries
        q = self.q_proj(queries).reshape(b, queries.shape[1], self.num_heads, -1)
        k, v = (proj(x).reshape(b, t, self.num_heads, -1) for proj in (self.k_proj, self.v_proj))
        out = causal_attention(q, k, v, mask, scale=self.scale, dropout=self.attention_dropout, positions=positions)
        return self.dropout(self.o_proj(out.reshape(b, queries.shape[1], width)))


class MLP(nnx.Module):
    """``dropout(c_proj(act(c_fc(x))))``."""

    def __init__(self, cfg: Config, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.c_fc = dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.c_proj = dense(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)
        self.activation = ACTIVATIONS[cfg.activation]
        self.dropout = Dropout(cfg.residual_dropout, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.dropout(self.c_proj(recomputed(self.activation, self.c_fc(x))))


class Block(nnx.Module):
    """Pre-norm block: ``x + attention(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, cfg: Config, index: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.ln_1 = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
        self.attention = Attention(cfg, index, **kw)
        self.ln_2 = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
        self.mlp = MLP(cfg, **kw)

    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None,
        queries: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """``x`` through the block; with ``queries`` (rows of ``x`` at ``positions``) only their outputs."""
        if queries is None:
            x = x + self.attention(self.ln_1(x), mask)
        else:
            x = queries + self.attention(self.ln_1(x), mask, self.ln_1(queries), positions)
        return x + self.mlp(self.ln_2(x))


class GPT2(nnx.Module):
    """GPT-2 with the head of its task.

    ``causal-lm`` returns next-token logits ``[B, T, vocab]`` (through ``wte`` when ``tie_word_embeddings``, else
    ``lm_head``); ``text-classification`` scores the last non-padding token, ``[B, num_labels]``;
    ``token-classification`` returns ``[B, T, num_labels]``; ``feature-extraction`` the final hidden states
    (after ``ln_f``), ``[B, T, hidden]``.

    Args:
      cfg: The model's `Config`.
      task: One of the tasks of `HEADS`.
      num_labels: Outputs of the classification head (classification tasks only).
      dtype: Computation dtype.
      param_dtype: Storage dtype of the parameters.
      rngs: Initialisation and dropout randomness.

    Example:
      >>> model = GPT2(Config(256, 64, 2, 4, 256), task="causal-lm", rngs=nnx.Rngs(0))
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
        self.pad_token_id, self.max_positions = cfg.pad_token_id, cfg.max_position_embeddings
        self.wte = embed(cfg.vocab_size, cfg.hidden_size, "vocab", **kw)
        self.wpe = embed(cfg.max_position_embeddings, cfg.hidden_size, None, **kw)
        self.dropout = Dropout(cfg.embedding_dropout, rngs=rngs)
        self.layers = nnx.List([Block(cfg, i, **kw) for i in range(cfg.num_layers)])
        self.remat = False  # per-layer rematerialisation, set for training by `finetune.Recipe.remat`
        self.ln_f = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
        heads.build(
            self, HEADS, task, width=cfg.hidden_size, num_labels=num_labels, dropout=cfg.classifier_dropout,
            vocab_size=cfg.vocab_size, tied=cfg.tie_word_embeddings, **kw,
        )  # fmt: skip

    def hidden_states(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        rows: jax.Array | None = None,
    ) -> jax.Array:
        """The final hidden states ``[B, T, hidden]`` (after ``ln_f``); with ``rows`` (``[B]`` positions) only
        theirs, ``[B, 1, hidden]`` (see `head_rows`).

        ``token_type_ids``, as in transformers, are embedded with the token table ``wte`` and added.
        """
        if input_ids.shape[1] > self.max_positions:
            raise ConfigError(
                f"GPT-2 has {self.max_positions} positions; received input_ids of length {input_ids.shape[1]}. "
                f"Truncate the inputs to at most {self.max_positions} tokens."
            )
        if position_ids is None:
            position_ids = jnp.arange(input_ids.shape[1])[None, :]
        mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
        x = self.wte(input_ids) + self.wpe(position_ids)
        if token_type_ids is not None:
            x = x + self.wte(token_type_ids)
        x = self.dropout(x)
        return self.ln_f(head_rows(self.layers, x, mask, rows=rows, remat=self.remat))

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Logits of the task head (hidden states for ``feature-extraction``); arguments as in transformers."""
        rows = heads.last_rows(HEADS, self.task, input_ids, attention_mask, self.pad_token_id)
        x = self.hidden_states(input_ids, attention_mask, position_ids, token_type_ids, rows)
        return heads.apply(self, HEADS, self.task, x, embedding=self.wte)
