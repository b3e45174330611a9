"""DistilBERT in Flax NNX: a frozen config read from the Hugging Face config, its embeddings, and the BERT-family
layers (`finetune.models.blocks.encoder`) with its task head.

DistilBERT is BERT without token-type embeddings or pooler, with six post-norm layers. The layers are the shared
BERT-family ones: same projections, norms and numerics. Unlike BERT's, DistilBERT's layer applies no dropout to the
attention output before the residual (``attention_output_dropout=False``), as transformers' DistilBERT: in training,
dropout applies at the same places as there.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from finetune.models import heads
from finetune.models.blocks import Dropout, Dtype, Encoder, check_activation, embed, layer_norm

HEADS = heads.Heads(
    {"feature-extraction": None, "text-classification": heads.PRE_CLASSIFIER, "token-classification": heads.TOKENS}
)


@dataclasses.dataclass(frozen=True)
class Config:
    """The DistilBERT hyper-parameters the modules use, under the field names BERT's layers read.

    Attributes:
      vocab_size: Rows of the token table.
      hidden_size: Model width (``dim``).
      num_layers: Encoder layers (``n_layers``).
      num_heads: Attention heads (``n_heads``).
      intermediate_size: Feed-forward width (``hidden_dim``).
      max_position_embeddings: Rows of the position table.
      hidden_act: Hugging Face activation name (``activation``).
      layer_norm_eps: LayerNorm epsilon (fixed at 1e-12 in DistilBERT).
      hidden_dropout: Dropout on hidden states (``dropout``).
      attention_dropout: Dropout on attention probabilities.
      seq_classif_dropout: Dropout before the sequence classifier.
      attention_output_dropout: Always false: no dropout on the attention sublayer's output.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    seq_classif_dropout: float = 0.2
    attention_output_dropout: bool = False

    @classmethod
    def from_hf(cls, hf_config: Any) -> Config:
        """Reads a ``transformers.DistilBertConfig``; refuses settings these modules do not implement."""
        check_activation("DistilBERT", "activation", hf_config.activation)
        return cls(
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.dim,
            num_layers=hf_config.n_layers,
            num_heads=hf_config.n_heads,
            intermediate_size=hf_config.hidden_dim,
            max_position_embeddings=hf_config.max_position_embeddings,
            hidden_act=hf_config.activation,
            hidden_dropout=hf_config.dropout,
            attention_dropout=hf_config.attention_dropout,
            seq_classif_dropout=hf_config.seq_classif_dropout,
        )


class Embeddings(nnx.Module):
    """Word + position embeddings (no token types), then LayerNorm and dropout."""

    def __init__(self, config: Config, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.word_embeddings = embed(config.vocab_size, config.hidden_size, "vocab", **kw)
        self.position_embeddings = embed(config.max_position_embeddings, config.hidden_size, None, **kw)
        self.norm = layer_norm(config.hidden_size, config.layer_norm_eps, **kw)
        self.dropout = Dropout(config.hidden_dropout, rngs=rngs)

    def __call__(self, input_ids: jax.Array, position_ids: jax.Array | None = None) -> jax.Array:
        positions = jnp.arange(input_ids.shape[1])[None, :] if position_ids is None else position_ids
        return self.dropout(self.norm(self.word_embeddings(input_ids) + self.position_embeddings(positions)))


class DistilBert(nnx.Module):
    """DistilBERT with the head of its task.

    ``feature-extraction`` returns the last hidden state ``[B, T, H]``; ``text-classification`` applies
    ``pre_classifier`` + ReLU + ``classifier`` to the first token and returns ``[B, num_labels]`` (regression when
    ``num_labels == 1``); ``token-classification`` returns ``[B, T, num_labels]``.

    Args:
      config: The model's `Config`.
      task: One of ``feature-extraction``, ``text-classification``, ``token-classification``.
      num_labels: Output size of the classifier (ignored for ``feature-extraction``).
      dtype: Compute dtype.
      param_dtype: Storage dtype of the parameters.
      rngs: Initialisation and dropout randomness.

    Example:
      >>> config = Config(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128)
      >>> model = DistilBert(config, task="text-classification", num_labels=3, rngs=nnx.Rngs(0))
      >>> model(input_ids=jnp.ones((2, 5), jnp.int32)).shape
      (2, 3)
    """

    def __init__(
        self,
        config: Config,
        *,
        task: str = "feature-extraction",
        num_labels: int | None = None,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.task = task
        self.embeddings = Embeddings(config, **kw)
        self.encoder = Encoder(config, **kw)
        rates = {"text-classification": config.seq_classif_dropout, "token-classification": config.hidden_dropout}
        heads.build(self, HEADS, task, width=config.hidden_size, num_labels=num_labels, dropout=rates, **kw)

    supports_packing = True  # text classification on packed batches (`finetune.data.batches.ArrayData.take_packed`)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        example_rows: jax.Array | None = None,
        example_cols: jax.Array | None = None,
    ) -> jax.Array:
        """``input_ids`` and ``attention_mask``: ``[B, T]``. ``token_type_ids`` is accepted and ignored (DistilBERT
        has no segment embeddings), so batches built for BERT run unchanged. A packed batch (``segment_ids``,
        ``example_rows``, ``example_cols``, with ``position_ids`` from 0 in each example) gives ``[E, num_labels]``,
        as `finetune.models.bert.modeling.Bert`."""
        del token_type_ids
        if segment_ids is not None:
            x = self.embeddings(input_ids, position_ids)
            heads.check_packed(self.task, example_rows, example_cols)
            return heads.apply(
                self, HEADS, self.task, self.encoder(x, None, packed=(segment_ids, example_rows, example_cols))
            )
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        mask = attention_mask.astype(bool)[:, None, None, :]  # [B, 1, 1, T]: broadcast over heads and queries
        x = self.encoder(self.embeddings(input_ids, position_ids), mask, heads.first_rows(HEADS, self.task))
        return heads.apply(self, HEADS, self.task, x)
