"""RoBERTa and XLM-RoBERTa in Flax NNX: the BERT-family encoder (`finetune.models.blocks.encoder`), RoBERTa's position
ids and heads.

The backbone is the shared BERT-family encoder, unchanged: same parameters, same numerics. What differs is read
here: position ids start at ``pad_token_id + 1`` and skip padding (transformers'
``create_position_ids_from_input_ids``), no pooler, and a sequence head of ``dense`` + tanh + ``out_proj`` on the
first token (`finetune.models.heads`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from finetune.models import heads
from finetune.models.blocks import Dtype, Embeddings, Encoder, EncoderConfig

HEADS = heads.Heads(
    {"feature-extraction": None, "text-classification": heads.DENSE_OUT_PROJ, "token-classification": heads.TOKENS}
)


@dataclasses.dataclass(frozen=True)
class Config:
    """RoBERTa's hyper-parameters: BERT's, plus the padding id that position ids are counted from.

    Attributes:
      bert: The encoder's hyper-parameters (a `finetune.models.blocks.EncoderConfig`).
      pad_token_id: The padding token id; real tokens get positions ``pad_token_id + 1, pad_token_id + 2, ...``.
      model_type: ``"roberta"`` or ``"xlm-roberta"`` (same modules; it names the transformers class on export).
    """

    bert: EncoderConfig
    pad_token_id: int = 1
    model_type: str = "roberta"

    @property
    def num_layers(self) -> int:
        """Encoder layers."""
        return self.bert.num_layers

    @classmethod
    def from_hf(cls, hf_config: Any) -> Config:
        """Reads a ``transformers.RobertaConfig`` or ``XLMRobertaConfig``."""
        return cls(
            bert=EncoderConfig.from_hf(hf_config), pad_token_id=hf_config.pad_token_id, model_type=hf_config.model_type
        )


def create_position_ids(input_ids: jax.Array, pad_token_id: int) -> jax.Array:
    """Positions counted from ``pad_token_id + 1`` over real tokens; padding tokens get ``pad_token_id``.

    Example:
      >>> create_position_ids(jnp.array([[0, 5, 6, 1, 1]]), pad_token_id=1)
      Array([[2, 3, 4, 1, 1]], dtype=int32)
    """
    real = (input_ids != pad_token_id).astype(jnp.int32)
    return jnp.cumsum(real, axis=1) * real + pad_token_id


def classifier_dropout(config: EncoderConfig) -> float:
    """The heads' dropout rate: ``classifier_dropout`` when set, else the hidden dropout."""
    return config.hidden_dropout if config.classifier_dropout is None else config.classifier_dropout


class Roberta(nnx.Module):
    """RoBERTa (or XLM-RoBERTa) with the head of its task.

    ``feature-extraction`` returns the last hidden state ``[B, T, H]``; ``text-classification`` returns
    ``[B, num_labels]`` from `finetune.models.heads.DENSE_OUT_PROJ` (regression when ``num_labels == 1``);
    ``token-classification`` returns ``[B, T, num_labels]``.

    Args:
      config: The model's `Config`.
      task: One of ``feature-extraction``, ``text-classification``, ``token-classification``.
      num_labels: Output size of the classifier (ignored for ``feature-extraction``).
      dtype: Compute dtype.
      param_dtype: Storage dtype of the parameters.
      rngs: Initialisation and dropout randomness.

    Example:
      >>> config = Config(EncoderConfig(256, 64, 2, 4, 128, type_vocab_size=1), pad_token_id=1)
      >>> model = Roberta(config, task="text-classification", num_labels=3, rngs=nnx.Rngs(0))
      >>> model(input_ids=jnp.full((2, 5), 7, jnp.int32)).shape
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
        self.pad_token_id = config.pad_token_id
        self.embeddings = Embeddings(config.bert, **kw)
        self.encoder = Encoder(config.bert, **kw)
        rate = classifier_dropout(config.bert)
        heads.build(self, HEADS, task, width=config.bert.hidden_size, num_labels=num_labels, dropout=rate, **kw)

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
        """``[B, T]`` integer inputs under Hugging Face names; position ids default to `create_position_ids`'s.

        A packed batch (``segment_ids``, ``example_rows``, ``example_cols``: `finetune.models.bert.modeling.Bert`)
        counts its ``position_ids`` from 0 in each example; RoBERTa's start after the padding id, as
        `create_position_ids`'s.
        """
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        if segment_ids is not None:
            heads.check_packed(self.task, example_rows, example_cols)
            assert position_ids is not None, "packed batches carry position_ids, from 0 in each example"
            x = self.embeddings(input_ids, token_type_ids, position_ids + self.pad_token_id + 1)
            return heads.apply(
                self, HEADS, self.task, self.encoder(x, None, packed=(segment_ids, example_rows, example_cols))
            )
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if position_ids is None:
            position_ids = create_position_ids(input_ids, self.pad_token_id)
        mask = attention_mask.astype(bool)[:, None, None, :]  # [B, 1, 1, T]: broadcast over heads and queries
        x = self.embeddings(input_ids, token_type_ids, position_ids)
        return heads.apply(self, HEADS, self.task, self.encoder(x, mask, heads.first_rows(HEADS, self.task)))
