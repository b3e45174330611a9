"""BERT in Flax NNX: a frozen config, then the modules bottom-up (embeddings, attention, layer, encoder, task model).

Parameters carry logical axis names (``out_sharding`` metadata) from this set, shared by every architecture:
``vocab`` (token table rows), ``embed`` (model width), ``mlp`` (feed-forward width), ``heads`` (attention heads x
head size, on fused projections), ``kv`` (head size), ``norm`` (layer-norm vectors), ``classes`` (head outputs),
``layers`` (stacked layers). ``None`` means replicated.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from finetune.errors import ConfigError, LoadError
from finetune.models.dropout import Dropout, attend
from finetune.models.layers import Linear, head_rows, recomputed, run_layers

ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def axes(*names: str | None) -> dict[str, Any]:
    """Variable metadata naming the logical axes (no mesh needed at construction)."""
    return {"out_sharding": names, "eager_sharding": False}


@dataclasses.dataclass(frozen=True)
class Config:
    """The BERT hyper-parameters the modules use (from a `transformers.BertConfig`).

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
    def from_hf(cls, hf: Any) -> Config:
        """Reads a `transformers.BertConfig`; refuses settings these modules do not implement."""
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
        if hf.hidden_act not in ACTIVATIONS:
            raise LoadError(
                f"finetune's BERT does not implement hidden_act={hf.hidden_act!r}; supported: "
                f"{', '.join(ACTIVATIONS)}. Pick a checkpoint that uses one of these."
            )
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


def dense(
    n_in: int, n_out: int, names: tuple[str | None, str | None], *, dtype, param_dtype, rngs, use_bias: bool = True
) -> Linear:
    return Linear(
        n_in,
        n_out,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.initializers.normal(0.02),
        kernel_metadata=axes(*names),
        bias_metadata=axes(names[1]),
        rngs=rngs,
    )


def layer_norm(n: int, eps: float, *, dtype, param_dtype, rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        n,
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_metadata=axes("norm"),
        bias_metadata=axes("norm"),
        rngs=rngs,
    )


def embed(n: int, width: int, rows: str | None, *, dtype, param_dtype, rngs) -> nnx.Embed:
    return nnx.Embed(
        n,
        width,
        dtype=dtype,
        param_dtype=param_dtype,
        embedding_init=nnx.initializers.normal(0.02),
        embedding_metadata=axes(rows, "embed"),
        rngs=rngs,
    )


class Embeddings(nnx.Module):
    """Word + position + token-type embeddings, then LayerNorm and dropout."""

    def __init__(self, cfg: Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.word_embeddings = embed(cfg.vocab_size, cfg.hidden_size, "vocab", **kw)
        self.position_embeddings = embed(cfg.max_position_embeddings, cfg.hidden_size, None, **kw)
        self.token_type_embeddings = embed(cfg.type_vocab_size, cfg.hidden_size, None, **kw)
        self.norm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
        self.dropout = Dropout(cfg.hidden_dropout, rngs=rngs)

    def __call__(self, input_ids, token_type_ids, position_ids):
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.norm(x))


class Attention(nnx.Module):
    """Multi-head self-attention; the padding mask hides keys. Attention-probability dropout only in training.

    ``qkv_bias=False`` builds the query/key/value projections without biases (ViT's ``qkv_bias``)."""

    def __init__(self, cfg: Any, *, dtype, param_dtype, rngs: nnx.Rngs, qkv_bias: bool = True):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        width, self.num_heads = cfg.hidden_size, cfg.num_heads
        self.query = dense(width, width, ("embed", "heads"), **kw, use_bias=qkv_bias)
        self.key = dense(width, width, ("embed", "heads"), **kw, use_bias=qkv_bias)
        self.value = dense(width, width, ("embed", "heads"), **kw, use_bias=qkv_bias)
        self.output = dense(width, width, ("heads", "embed"), **kw)
        self.dropout = Dropout(cfg.attention_dropout, rngs=rngs)

    def __call__(self, x, mask, queries=None, rows=None):
        """``x``: ``[B, T, H]``; ``mask`` hides keys. ``queries`` (``[B, Q, H]``, default ``x``) are the positions
        whose outputs are computed: keys and values always come from all of ``x``. With ``rows`` (``[E]``), query
        ``e`` (``queries`` then ``[E, Q, H]``) takes its keys and values from row ``rows[e]`` of ``x`` (packed
        examples: `finetune.data.batches.ArrayData.take_packed`)."""
        r, t, width = x.shape
        queries = x if queries is None else queries
        b = queries.shape[0]
        q = self.query(queries).reshape(b, queries.shape[1], self.num_heads, -1)
        k, v = (proj(x).reshape(r, t, self.num_heads, -1) for proj in (self.key, self.value))
        if rows is not None:
            k, v = k[rows], v[rows]
        if self.dropout.deterministic or self.dropout.rate == 0:
            out = jax.nn.dot_product_attention(q, k, v, mask=mask)
        else:  # the fused kernel has no dropout; spell the attention out when training
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
            logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
            out = attend(jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype), v, self.dropout)
        return self.output(out.reshape(b, queries.shape[1], width))


class Layer(nnx.Module):
    """Post-norm transformer layer: attention, add & norm, feed-forward, add & norm."""

    def __init__(self, cfg: Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.attention = Attention(cfg, **kw)
        self.attention_norm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
        self.intermediate = dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.output = dense(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)
        self.output_norm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
        self.dropout = Dropout(cfg.hidden_dropout, rngs=rngs)
        self.drop_attention_output = cfg.attention_output_dropout
        self.activation = ACTIVATIONS[cfg.hidden_act]

    def __call__(self, x, mask, queries=None, rows=None):
        """``x`` through the layer; with ``queries`` (``[B, Q, H]`` rows of ``x``) only their outputs are computed
        (with ``rows``, query ``e`` attends within row ``rows[e]`` of ``x``: see `Attention`)."""
        queries = x if queries is None else queries
        attended = self.attention(x, mask, queries, rows)
        x = self.attention_norm(queries + (self.dropout(attended) if self.drop_attention_output else attended))
        h = self.output(recomputed(self.activation, self.intermediate(x)))
        return self.output_norm(x + self.dropout(h))


class Encoder(nnx.Module):
    def __init__(self, cfg: Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [Layer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for _ in range(cfg.num_layers)]
        )
        self.remat = False  # per-layer rematerialisation, set for training by `finetune.Recipe.remat`

    def __call__(self, x, mask, first: int | None = None, packed: tuple | None = None):
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


class Pooler(nnx.Module):
    """tanh(dense(first token)), the input of BERT's sequence classifier."""

    def __init__(self, cfg: Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.dense = dense(
            cfg.hidden_size, cfg.hidden_size, ("embed", None), dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, x):
        return jnp.tanh(self.dense(x[:, 0]))


class Bert(nnx.Module):
    """BERT with the head of its task.

    ``feature-extraction`` returns the last hidden state ``[B, T, H]``; ``text-classification`` pools the first token
    and returns ``[B, num_labels]`` (regression when ``num_labels == 1``); ``token-classification`` returns
    ``[B, T, num_labels]``.

    Args:
      cfg: The model's `Config`.
      task: One of ``feature-extraction``, ``text-classification``, ``token-classification``.
      num_labels: Output size of the classifier (ignored for ``feature-extraction``).
      dtype: Computation dtype.
      param_dtype: Storage dtype of the parameters.
      rngs: Initialisation and dropout randomness.

    Example:
      >>> model = Bert(Config(256, 64, 2, 4, 128), task="text-classification", num_labels=3, rngs=nnx.Rngs(0))
      >>> model(input_ids=jnp.ones((2, 5), jnp.int32)).shape
      (2, 3)
    """

    def __init__(
        self,
        cfg: Config,
        *,
        task: str = "feature-extraction",
        num_labels: int | None = None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.task = task
        self.embeddings = Embeddings(cfg, **kw)
        self.encoder = Encoder(cfg, **kw)
        if task == "text-classification":
            self.pooler = Pooler(cfg, **kw)
        if task in ("text-classification", "token-classification"):
            rate = cfg.hidden_dropout if cfg.classifier_dropout is None else cfg.classifier_dropout
            self.dropout = Dropout(rate, rngs=rngs)
            self.classifier = dense(cfg.hidden_size, num_labels, ("embed", "classes"), **kw)

    supports_packing = True  # text classification on packed batches (`finetune.data.batches.ArrayData.take_packed`)

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        segment_ids=None,
        example_rows=None,
        example_cols=None,
    ):
        if segment_ids is not None:
            return self._packed(input_ids, token_type_ids, position_ids, segment_ids, example_rows, example_cols)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        if position_ids is None:
            position_ids = jnp.arange(input_ids.shape[1])[None, :]
        mask = attention_mask.astype(bool)[:, None, None, :]  # [B, 1, 1, T]: broadcast over heads and queries
        first = 1 if self.task == "text-classification" else None  # the pooler reads the first token only
        x = self.encoder(self.embeddings(input_ids, token_type_ids, position_ids), mask, first)
        if self.task == "text-classification":
            return self.classifier(self.dropout(self.pooler(x)))
        if self.task == "token-classification":
            return self.classifier(self.dropout(x))
        return x

    def _packed(self, input_ids, token_type_ids, position_ids, segment_ids, rows, cols):
        """Text classification of examples packed several to a row: ``[E, num_labels]``, one row per example."""
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids, position_ids)
        return self.classifier(self.dropout(self.pooler(packed_encoding(self, x, segment_ids, rows, cols))))


def packed_encoding(model, x, segment_ids, rows, cols):
    """``model``'s encoder on the embeddings ``x`` (``[R, T, H]``) of a packed batch: ``[E, 1, H]``, each example's
    first token. For the architectures that reuse BERT's `Encoder` (RoBERTa, DistilBERT)."""
    if model.task != "text-classification" or rows is None or cols is None:
        raise ConfigError(
            f"Packed batches (segment_ids) need task 'text-classification' and example_rows / example_cols; "
            f"received task={model.task!r}. Train other tasks with packing=False."
        )
    return model.encoder(x, None, packed=(segment_ids, rows, cols))
