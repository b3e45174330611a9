"""The bidirectional encoder of the BERT family (BERT, RoBERTa, XLM-RoBERTa, DistilBERT): its config, its
word + position + token-type embeddings, its post-norm layer, and the layer stack that ViT's pre-norm layers use too.

Packed batches (several examples to a row, `finetune.data.batches.ArrayData.take_packed`) run here: attention stays
within each example's segment, and the last layer computes only each example's first token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from finetune.errors import LoadError
from finetune.models.blocks.attention import Attention
from finetune.models.blocks.dropout import Dropout
from finetune.models.blocks.layers import (
    ACTIVATIONS,
    Dtype,
    check_activation,
    dense,
    embed,
    head_rows,
    layer_norm,
    recomputed,
    run_layers,
)


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """The BERT-family hyper-parameters the modules use (from a `transformers.BertConfig` or one of its kind).

    ``attention_output_dropout``: whether hidden dropout also applies to the attention sublayer's output before its
    residual (BERT and RoBERTa: yes; DistilBERT, whose layers these are too: no).
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    classifier_dropout: float | None = None
    attention_output_dropout: bool = True

    @classmethod
    def from_hf(cls, hf: Any) -> EncoderConfig:
        """Reads a `transformers.BertConfig` (or RoBERTa's); refuses settings these modules do not implement."""
        position = getattr(hf, "position_embedding_type", "absolute") or "absolute"
        if position != "absolute":
            raise LoadError(
                f"finetune's BERT supports absolute position embeddings only; the config has "
                f"position_embedding_type={position!r}. Pick a checkpoint with absolute positions."
            )
        if getattr(hf, "is_decoder", False) or getattr(hf, "add_cross_attention", False):
            raise LoadError(
                f"finetune's BERT-family models are bidirectional encoders; the config has is_decoder="
                f"{getattr(hf, 'is_decoder', False)}, add_cross_attention={getattr(hf, 'add_cross_attention', False)} "
                "(a causal decoder, with cross-attention when it is part of an encoder-decoder), which finetune does "
                "not implement. Pick an encoder checkpoint (is_decoder false), or a decoder architecture such as "
                "GPT-2 or Llama."
            )
        check_activation("BERT", "hidden_act", hf.hidden_act)
        return cls(
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            intermediate_size=hf.intermediate_size,
            max_position_embeddings=hf.max_position_embeddings,
            type_vocab_size=hf.type_vocab_size,
            layer_norm_eps=hf.layer_norm_eps,
            hidden_act=hf.hidden_act,
            hidden_dropout=hf.hidden_dropout_prob,
            attention_dropout=hf.attention_probs_dropout_prob,
            classifier_dropout=getattr(hf, "classifier_dropout", None),
        )


class Embeddings(nnx.Module):
    """Word + position + token-type embeddings, then LayerNorm and dropout."""

    def __init__(self, cfg: EncoderConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.word_embeddings = embed(cfg.vocab_size, cfg.hidden_size, "vocab", **kw)
        self.position_embeddings = embed(cfg.max_position_embeddings, cfg.hidden_size, None, **kw)
        self.token_type_embeddings = embed(cfg.type_vocab_size, cfg.hidden_size, None, **kw)
        self.norm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
        self.dropout = Dropout(cfg.hidden_dropout, rngs=rngs)

    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array, position_ids: jax.Array) -> jax.Array:
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.norm(x))


class Layer(nnx.Module):
    """Post-norm transformer layer: attention, add & norm, feed-forward, add & norm."""

    def __init__(self, cfg: Any, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.attention = Attention(cfg, **kw)
        self.attention_norm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
        self.intermediate = dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.output = dense(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)
        self.output_norm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
        self.dropout = Dropout(cfg.hidden_dropout, rngs=rngs)
        self.drop_attention_output = cfg.attention_output_dropout
        self.activation = ACTIVATIONS[cfg.hidden_act]

    def __call__(self, x: jax.Array, mask: Any, queries: Any = None, rows: Any = None) -> jax.Array:
        """``x`` through the layer; with ``queries`` (``[B, Q, H]`` rows of ``x``) only their outputs are computed
        (with ``rows``, query ``e`` attends within row ``rows[e]`` of ``x``: see `Attention`)."""
        queries = x if queries is None else queries
        attended = self.attention(x, mask, queries, rows)
        x = self.attention_norm(queries + (self.dropout(attended) if self.drop_attention_output else attended))
        h = self.output(recomputed(self.activation, self.intermediate(x)))
        return self.output_norm(x + self.dropout(h))


class Encoder(nnx.Module):
    """The stack of ``cfg.num_layers`` layers (``layers/0``, ``layers/1``...), built by ``layer`` (default `Layer`)."""

    def __init__(
        self, cfg: Any, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs, layer: Callable[..., nnx.Module] = Layer
    ):
        self.layers = nnx.List(
            [layer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for _ in range(cfg.num_layers)]
        )
        self.remat = False  # per-layer rematerialisation, set for training by `finetune.Recipe.remat`

    def __call__(self, x: jax.Array, mask: Any, first: int | None = None, packed: tuple | None = None) -> jax.Array:
        """The last hidden state; with ``first``, only that of the first ``first`` positions (see `head_rows`).

        ``packed``: ``(segment_ids, rows, cols)`` of a packed batch (`finetune.data.batches.ArrayData.take_packed`);
        ``mask`` is then ignored, attention stays within each segment, and the result is ``[E, 1, H]``: the last layer
        computes only each example's first token (at ``rows[e], cols[e]``), from the keys of its own segment.
        """
        if packed is None:
            return head_rows(self.layers, x, mask, first=first, remat=self.remat)
        segments, rows, cols = packed
        same = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] > 0)  # [R, T, T]
        x = run_layers(list(self.layers)[:-1], x, same[:, None], remat=self.remat)
        queries = x[rows, cols][:, None]  # [E, 1, H]
        keys = same[rows, cols][:, None, None]  # [E, 1, 1, T]: the keys of each example's own segment
        return run_layers(list(self.layers)[-1:], x, keys, queries, rows, remat=self.remat)
