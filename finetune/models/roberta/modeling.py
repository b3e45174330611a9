"""RoBERTa and XLM-RoBERTa in Flax NNX: BERT's embeddings and encoder, RoBERTa's position ids and heads.

The backbone is BERT's (`finetune.models.bert.modeling`), unchanged: same parameters, same numerics. What differs is
read here: position ids start at ``pad_token_id + 1`` and skip padding (transformers'
``create_position_ids_from_input_ids``), no pooler, and a sequence head of ``dense`` + tanh + ``out_proj`` on the first
token.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from finetune.errors import ConfigError
from finetune.models.bert import modeling as bert
from finetune.models.dropout import Dropout

Dtype = Any
TASKS = ("feature-extraction", "text-classification", "token-classification")


@dataclasses.dataclass(frozen=True)
class Config:
    """RoBERTa's hyper-parameters: BERT's, plus the padding id that position ids are counted from.

    Attributes:
      bert: The encoder's hyper-parameters (a `finetune.models.bert.modeling.Config`).
      pad_token_id: The padding token id; real tokens get positions ``pad_token_id + 1, pad_token_id + 2, ...``.
      model_type: ``"roberta"`` or ``"xlm-roberta"`` (same modules; it names the transformers class on export).
    """

    bert: bert.Config
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
            bert=bert.Config.from_hf(hf_config), pad_token_id=hf_config.pad_token_id, model_type=hf_config.model_type
        )


def create_position_ids(input_ids: jax.Array, pad_token_id: int) -> jax.Array:
    """Positions counted from ``pad_token_id + 1`` over real tokens; padding tokens get ``pad_token_id``.

    Example:
      >>> create_position_ids(jnp.array([[0, 5, 6, 1, 1]]), pad_token_id=1)
      Array([[2, 3, 4, 1, 1]], dtype=int32)
    """
    real = (input_ids != pad_token_id).astype(jnp.int32)
    return jnp.cumsum(real, axis=1) * real + pad_token_id


def classifier_dropout(config: bert.Config) -> float:
    """The heads' dropout rate: ``classifier_dropout`` when set, else the hidden dropout."""
    return config.hidden_dropout if config.classifier_dropout is None else config.classifier_dropout


class ClassificationHead(nnx.Module):
    """RoBERTa's sequence head: dropout, ``dense``, tanh, dropout, ``out_proj`` on the first token."""

    def __init__(self, config: bert.Config, num_labels: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.dense = bert.dense(config.hidden_size, config.hidden_size, ("embed", None), **kw)
        self.out_proj = bert.dense(config.hidden_size, num_labels, ("embed", "classes"), **kw)
        self.dropout = Dropout(classifier_dropout(config), rngs=rngs)

    def __call__(self, hidden: jax.Array) -> jax.Array:
        x = jnp.tanh(self.dense(self.dropout(hidden[:, 0])))
        return self.out_proj(self.dropout(x))


class Roberta(nnx.Module):
    """RoBERTa (or XLM-RoBERTa) with the head of its task.

    ``feature-extraction`` returns the last hidden state ``[B, T, H]``; ``text-classification`` returns
    ``[B, num_labels]`` from `ClassificationHead` (regression when ``num_labels == 1``); ``token-classification``
    returns ``[B, T, num_labels]``.

    Args:
      config: The model's `Config`.
      task: One of ``feature-extraction``, ``text-classification``, ``token-classification``.
      num_labels: Output size of the classifier (ignored for ``feature-extraction``).
      dtype: Compute dtype.
      param_dtype: Storage dtype of the parameters.
      rngs: Initialisation and dropout randomness.

    Example:
      >>> config = Config(bert.Config(256, 64, 2, 4, 128, type_vocab_size=1), pad_token_id=1)
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
        if task not in TASKS:
            raise ConfigError(
                f"RoBERTa supports the tasks {', '.join(TASKS)}; received task={task!r}. Pick one of these."
            )
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.task = task
        self.pad_token_id = config.pad_token_id
        self.embeddings = bert.Embeddings(config.bert, **kw)
        self.encoder = bert.Encoder(config.bert, **kw)
        if task == "text-classification":
            self.classifier = ClassificationHead(config.bert, num_labels, **kw)
        elif task == "token-classification":
            self.dropout = Dropout(classifier_dropout(config.bert), rngs=rngs)
            self.classifier = bert.dense(config.bert.hidden_size, num_labels, ("embed", "classes"), **kw)

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

        A packed batch (``segment_ids``, ``example_rows``, ``example_cols``: `bert.Bert`) counts its
        ``position_ids`` from 0 in each example; RoBERTa's start after the padding id, as `create_position_ids`'s.
        """
        if segment_ids is not None:
            types = jnp.zeros_like(input_ids) if token_type_ids is None else token_type_ids
            x = self.embeddings(input_ids, types, position_ids + self.pad_token_id + 1)
            return self.classifier(bert.packed_encoding(self, x, segment_ids, example_rows, example_cols))
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        if position_ids is None:
            position_ids = create_position_ids(input_ids, self.pad_token_id)
        mask = attention_mask.astype(bool)[:, None, None, :]  # [B, 1, 1, T]: broadcast over heads and queries
        first = 1 if self.task == "text-classification" else None  # the head reads the first token only
        x = self.encoder(self.embeddings(input_ids, token_type_ids, position_ids), mask, first)
        if self.task == "text-classification":
            return self.classifier(x)
        if self.task == "token-classification":
            return self.classifier(self.dropout(x))
        return x
