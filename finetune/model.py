"""`finetune.Model`: an NNX module with its task, groups, tokenizer/processor and label names, Keras-style."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from finetune.errors import ConfigError
from finetune.models.registry import TASKS


class Model:
    """A trainable model: an NNX module plus what fine-tuning it needs.

    Args:
      module: Any `flax.nnx.Module`. It is called with keyword arrays (Hugging Face names for loaded models) and
        returns logits (hidden states for ``feature-extraction``).
      task: One of ``text-classification`` (regression when the head has one output), ``token-classification``,
        ``image-classification``, ``causal-lm``, ``feature-extraction``.
      rules: Default parameter-group rules, an ordered list of ``(regex, group)``; first full match wins. ``None``
        takes ``module.default_rules()`` when the module defines it, else everything in ``backbone``.
      tokenizer: The checkpoint's tokenizer, if any.
      processor: The checkpoint's image processor, if any.
      hf_config: The Hugging Face config (``transformers.PretrainedConfig``) the module was built from, if any.
      architecture: The `finetune.models.registry.Architecture` the module was built from, if any.
      id2label: Label names by class index.
      source: Where the weights came from (Hub id or local directory).
      new_paths: Paths of parameters initialised fresh at load time (the ``new`` group).
      layer_pattern: Full-match regex over paths whose group 1 is the layer index (for layer-wise LR decay).
      num_layers: Number of layers ``layer_pattern`` indexes.

    Example:
      >>> model = finetune.Model(MyModule(rngs=nnx.Rngs(0)), task="text-classification")
      >>> model.compile(optimizer="adamw", learning_rate=1e-3)
    """

    def __init__(
        self,
        module: nnx.Module,
        *,
        task: str,
        rules: Sequence[tuple[str, str]] | None = None,
        tokenizer: Any = None,
        processor: Any = None,
        hf_config: Any = None,
        architecture: Any = None,
        id2label: Mapping[int, str] | None = None,
        source: str | None = None,
        new_paths: Sequence[str] = (),
        layer_pattern: str | None = None,
        num_layers: int | None = None,
    ):
        if task not in TASKS:
            raise ConfigError(f"`task` must be one of {', '.join(TASKS)}; received task={task!r}. Pick one of these.")
        if not isinstance(module, nnx.Module):
            raise ConfigError(
                f"`module` must be a flax.nnx.Module; received {type(module).__name__}. Wrap your network in an "
                "nnx.Module (or load one with finetune.load)."
            )
        self.module = module
        self.task = task
        if rules is None:
            rules = module.default_rules() if hasattr(module, "default_rules") else [(".*", "backbone")]
        self.rules = [tuple(r) for r in rules]
        self.tokenizer = tokenizer
        self.processor = processor
        self.hf_config = hf_config
        self.architecture = architecture
        self.id2label = dict(id2label) if id2label else None
        self.source = source
        self.new_paths = tuple(new_paths)
        self.layer_pattern = layer_pattern
        self.num_layers = num_layers
        self.recipe = None
        self._infer = None

    def __call__(self, **inputs: Any) -> jax.Array:
        """Runs the model in inference mode (no dropout) on one batch of keyword arrays; returns the logits."""
        if self._infer is None:
            graphdef, state = nnx.split(nnx.view(self.module, deterministic=True, raise_if_not_found=False))

            @jax.jit
            def infer(state, inputs):
                return nnx.merge(graphdef, state)(**inputs)

            self._infer = infer
        state = nnx.state(self.module)
        return self._infer(state, {k: jnp.asarray(np.asarray(v)) for k, v in inputs.items() if v is not None})
