"""BERT in Flax NNX: the shared BERT-family encoder (`finetune.models.blocks.encoder`) with its task head.

The config, embeddings and layers are the blocks' own; BERT adds only the wiring: default token types and
positions, and a pooler (dense + tanh on the first token) before its sequence classifier (`finetune.models.heads`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from finetune.models import heads
from finetune.models.blocks import Dtype, Embeddings, Encoder
from finetune.models.blocks import EncoderConfig as Config

HEADS = heads.Heads(
    {"feature-extraction": None, "text-classification": heads.POOLED, "token-classification": heads.TOKENS}
)


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
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.task = task
        self.embeddings = Embeddings(cfg, **kw)
        self.encoder = Encoder(cfg, **kw)
        rate = cfg.hidden_dropout if cfg.classifier_dropout is None else cfg.classifier_dropout
        heads.build(self, HEADS, task, width=cfg.hidden_size, num_labels=num_labels, dropout=rate, **kw)

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
        """``[B, T]`` integer inputs under Hugging Face names. A packed batch (``segment_ids``, ``example_rows``,
        ``example_cols``, with ``position_ids`` from 0 in each example) gives ``[E, num_labels]``: one row per
        example."""
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        if segment_ids is not None:
            heads.check_packed(self.task, example_rows, example_cols)
            assert position_ids is not None, "packed batches carry position_ids, from 0 in each example"
            x = self.embeddings(input_ids, token_type_ids, position_ids)
            return heads.apply(
                self, HEADS, self.task, self.encoder(x, None, packed=(segment_ids, example_rows, example_cols))
            )
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if position_ids is None:
            position_ids = jnp.arange(input_ids.shape[1])[None, :]
        mask = attention_mask.astype(bool)[:, None, None, :]  # [B, 1, 1, T]: broadcast over heads and queries
        x = self.encoder(
            self.embeddings(input_ids, token_type_ids, position_ids), mask, heads.first_rows(HEADS, self.task)
        )
        return heads.apply(self, HEADS, self.task, x)
