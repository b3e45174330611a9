"""`finetune.Model`: an NNX module with its task, groups, tokenizer/processor and label names, Keras-style."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Unpack

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from finetune import schema
from finetune.errors import ConfigError
from finetune.models.heads import Pooling, check_task
from finetune.schema import Card, Count, Flag, Path, Resume, Text, Verbose
from finetune.training.callbacks import Callbacks

if TYPE_CHECKING:
    from finetune.recipe import Recipe
    from finetune.training.loop import Trainer


class Model:
    """A trainable model: an NNX module plus what fine-tuning it needs.

    Args:
      module: Any `flax.nnx.Module`. It is called with keyword arrays (Hugging Face names for loaded models) and
        returns logits (hidden states for ``feature-extraction``).
      task: One of ``text-classification`` (regression when the head has one output), ``token-classification``,
        ``image-classification``, ``causal-lm``, ``feature-extraction``.
      rules: Default parameter-group rules, an ordered list of ``(regex, group)``; first full match wins. ``None``
        takes ``module.default_rules()`` when the module defines it, else everything in ``backbone``.
      tokenizer, processor: The checkpoint's tokenizer and image processor, if any.
      hf_config: The Hugging Face config (``transformers.PretrainedConfig``) the module was built from, if any.
      architecture: The `finetune.models.registry.Architecture` the module was built from, if any.
      id2label: Label names by class index.
      source: Where the weights came from (Hub id or local directory).
      new_paths: Paths of parameters initialised fresh at load time (the ``new`` group).
      layer_pattern: Full-match regex over paths whose group 1 is the layer index (for layer-wise LR decay).
      num_layers: Number of layers ``layer_pattern`` indexes.
      layout: Where its arrays live (`finetune.sharding.Layout`): a runtime option, never part of the recipe.
      pooling: How ``feature-extraction`` pools its embeddings (`predict`); None: the mean over the tokens.

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
        layout: Any = None,
        pooling: Pooling | None = None,
    ):
        check_task(task)
        if not isinstance(module, nnx.Module):
            raise ConfigError(
                f"`module` must be a flax.nnx.Module; received {type(module).__name__}. Wrap your network in an "
                "nnx.Module (or load one with finetune.load)."
            )
        self.module, self.task = module, task
        if rules is None:
            rules = module.default_rules() if hasattr(module, "default_rules") else [(".*", "backbone")]
        self.rules = [tuple(r) for r in rules]
        self.tokenizer, self.processor = tokenizer, processor
        self.hf_config, self.architecture = hf_config, architecture
        self.id2label = dict(id2label) if id2label else None
        self.source, self.new_paths = source, tuple(new_paths)
        self.layer_pattern, self.num_layers = layer_pattern, num_layers
        self.layout, self.pooling = layout, pooling
        self.recipe: Recipe | None = None
        # the compiled inference function of `__call__`
        self._infer: Callable[[Any, dict[str, Any]], jax.Array] | None = None
        self._trainer: Trainer | None = None
        self.last_metrics: dict[str, float] | None = None
        self.family: str | None = None  # single / multi / regression / token / lm, known once data was seen

    def __call__(self, **inputs: Any) -> jax.Array:
        """Runs the model in inference mode (no dropout) on one batch of keyword arrays; returns the logits."""
        if self._infer is None:
            from finetune.training.step import inference

            self._infer = inference(self.module)
        state = nnx.state(self.module)
        return self._infer(state, {k: jnp.asarray(np.asarray(v)) for k, v in inputs.items() if v is not None})

    # ------------------------------------------------------------------ Keras-style API
    def compile(
        self,
        preset: str | None = None,
        *,
        optimizer: Any = None,
        learning_rate: float | None = None,
        rules: Sequence[tuple[str, Any]] | None = None,
        schedule: Any = None,
        loss: Any = None,
        metrics: Sequence[str] | None = None,
        sharding: Any = None,
        **overrides: Any,
    ) -> Model:
        """Sets the recipe: a preset by name (or the defaults), with any field overridden.

        Args:
          preset: A recipe name from `finetune.presets.list()`; None starts from `finetune.Recipe` defaults.
          optimizer, learning_rate, rules, schedule, loss, metrics: Those `finetune.Recipe` fields (an optimizer
            name or optax optimizer; the peak LR; ``(regex, group)`` rules, None: the model's defaults; ...).
          sharding: Spread training over devices: ``"data"``, ``"fsdp"``, ``"tensor"``, ``"fsdp+tensor"`` or a mesh
            shape like ``{"data": 4, "model": 2}`` (see `finetune.sharding`). A runtime option, not a recipe field,
            so checkpoints restore on any mesh.
          **overrides: Any other `finetune.Recipe` field (``weight_decay``, ``warmup``, ``clip_norm``, ``groups``,
            ``accumulate``, ``epochs``, ``batch_size``...).

        Returns:
          The model itself.

        Example:
          >>> model.compile(optimizer="adamw", learning_rate=3e-5, weight_decay=0.01, clip_norm=1.0)
        """
        from finetune import presets
        from finetune import sharding as sharding_lib
        from finetune.recipe import Recipe

        base = presets.get(preset) if preset is not None else Recipe()
        given = dict(
            optimizer=optimizer, learning_rate=learning_rate, rules=rules, schedule=schedule, loss=loss, metrics=metrics
        )
        self.recipe = base.replace(**{k: v for k, v in given.items() if v is not None}, **overrides)
        self._trainer = None
        if sharding is not None:
            self.layout = sharding_lib.resolve(self.layout, sharding)
        if self.recipe.rules is not None or self.recipe.groups:
            self.plan()  # rule errors surface at compile time, not after data loading
        return self

    def plan(self, recipe: Any = None) -> Any:
        """The group of every parameter under ``recipe`` (default: the current one), a
        `finetune.params.rules.Assignment`. A recipe with ``lora`` first adds its adapters (`add_adapters`)."""
        from finetune.params import plan

        recipe = recipe if recipe is not None else self.recipe
        if recipe is not None and recipe.lora is not None:
            self.add_adapters(recipe.lora, seed=recipe.seed)
        return plan.of_model(self, recipe)

    def add_adapters(self, config: Any, *, seed: int = 0) -> list[str]:
        """Adds LoRA adapters to the module (`finetune.params.lora.apply`: once; the same config again does
        nothing); returns the adapted module paths."""
        from finetune.params import lora

        fresh = not lora.adapted(self.module)
        paths = lora.apply(self.module, config, seed=seed)
        if fresh and paths:
            self._infer = None  # the cached inference function was traced for the old structure
        return paths

    def record_family(self, family: str) -> None:
        """Remembers single- / multi-label / regression (once training data was seen) for `predict`, and for
        exported configs (transformers reads ``problem_type``)."""
        self.family = family
        if self.hf_config is not None and family in _PROBLEM_TYPES and self.task != "token-classification":
            self.hf_config.problem_type = _PROBLEM_TYPES[family]

    def with_module(self, module: nnx.Module) -> Model:
        """A shallow copy over another module (host copies of the parameters, for an export), with no trainer and
        nothing traced: those belong to this model's module."""
        copy = object.__new__(Model)
        copy.__dict__.update(self.__dict__, module=module, _trainer=None, _infer=None)
        return copy

    def _synced(self) -> Model:
        """This model, with what its trainer trained written back into the module."""
        if self._trainer is not None:
            self._trainer.sync_model()
        return self

    @property
    def trainer(self) -> Any:
        """The `finetune.training.loop.Trainer` of the last `fit` / `evaluate` / `predict` (None before)."""
        return self._trainer

    @schema.arguments
    def fit(
        self,
        train: Any,
        validation_data: Any = None,
        *,
        epochs: Count | None = None,
        steps: Count | None = None,
        batch_size: Count | None = None,
        callbacks: Callbacks = (),
        verbose: Verbose = 1,
        checkpoint_dir: Path | None = None,
        save_every: Count | None = None,
        save_each_epoch: Flag = True,
        keep: Count = 3,
        monitor: Text | None = None,
        resume: Resume = False,
        allow_changed_data: Flag = False,
        mesh: Any = None,
        sharding_rules: dict[Text, Any] | None = None,
    ):
        """Trains the model; returns a `finetune.History`.

        Args:
          train: A dict of numpy arrays (model inputs and ``labels``), an ``(x, y)`` pair, or an iterable of ready
            batches.
          validation_data: Evaluated at the end of every epoch (``val_`` metrics).
          epochs: Passes over ``train`` (default: the recipe's).
          steps: Optimizer steps instead of epochs.
          batch_size: Examples per micro-batch (default: the recipe's).
          callbacks: `finetune.callbacks.Callback` instances (or one).
          verbose: 0 is silent; 1 prints the group report and a progress bar.
          checkpoint_dir, save_every, save_each_epoch, keep, monitor, resume, allow_changed_data: Orbax checkpoints
            in ``checkpoint_dir`` (locked by the run), each epoch and every ``save_every`` steps; the last ``keep``
            and the best by ``monitor`` (e.g. ``"val_accuracy"``) kept; ``resume=True`` (or a path) continues exactly
            as an uninterrupted run. In full: `finetune.training.resume.CheckpointOptions`.
          mesh: Spread training over devices: ``"data"``, ``"fsdp"``, ``"tensor"``, ``"fsdp+tensor"``, a mesh shape
            like ``{"data": 4, "model": 2}``, or a `jax.sharding.Mesh` (see `finetune.sharding`). Default:
            ``compile(sharding=...)``'s, else one device. ``batch_size`` is the global batch.
          sharding_rules: Logical axis -> mesh axis overrides of `finetune.sharding.DEFAULT_RULES`, e.g.
            ``{"vocab": "model"}``.

        Example:
          >>> history = model.fit({"x": x, "labels": y}, epochs=3, batch_size=32)
          >>> history.history["loss"]
        """
        from finetune import sharding as sharding_lib
        from finetune.metrics import check_monitor
        from finetune.recipe import Recipe
        from finetune.training.loop import Trainer
        from finetune.training.resume import CheckpointOptions

        if self.recipe is None:
            self.recipe = Recipe()
        if monitor is not None:
            check_monitor(monitor, self.task, self.recipe.metrics, validation=validation_data is not None)
        layout = sharding_lib.resolve(self.layout, mesh, rules=sharding_rules)
        trainer = self._trainer = Trainer(self, self.recipe, layout=layout)
        ckpt = CheckpointOptions(checkpoint_dir, save_every, save_each_epoch, keep, monitor, resume, allow_changed_data)
        return trainer.fit(
            train,
            epochs=epochs,
            steps=steps,
            batch_size=batch_size,
            validation_data=validation_data,
            callbacks=callbacks,
            verbose=verbose,
            checkpoints=ckpt,
        )

    def _eval_trainer(self):
        from finetune.recipe import Recipe
        from finetune.training.loop import Trainer

        if self._trainer is None:
            self._trainer = Trainer(self, self.recipe or Recipe(), layout=self.layout)
        return self._synced()._trainer

    @schema.arguments
    def evaluate(self, data: Any, *, batch_size: Count | None = None) -> dict[str, float]:
        """Loss and metrics over ``data`` (inference mode, padding ignored)."""
        trainer = self._eval_trainer()
        self.last_metrics = trainer.evaluate(data, batch_size=batch_size or trainer.recipe.batch_size)
        return self.last_metrics

    @schema.arguments
    def predict(
        self, data: Any, *, batch_size: Count | None = None, outputs: list[Text] | None = None
    ) -> dict[str, Any]:
        """Predictions for every example (inference mode, padding ignored), as numpy arrays with one row per example.

        By default: ``logits``, ``labels`` and ``probabilities`` for classification (``predictions`` for
        regression; per token for token classification); ``log_likelihood``, ``num_tokens``, ``perplexity`` and
        ``next_token_ids`` for ``causal-lm``; ``embeddings`` for ``feature-extraction``. Each in full:
        `finetune.training.tasks` ("What predict returns").

        Args:
          data: What `evaluate` takes; labels, when present, are ignored.
          batch_size: Examples per batch (default: the recipe's).
          outputs: Names of the outputs to return instead of the task's defaults (above).

        Returns:
          ``{name: array}`` (``token_embeddings``: a list of arrays).

        Example:
          >>> model = finetune.load("sentence-transformers/all-MiniLM-L6-v2")
          >>> model.predict(["a sentence", "another one"])["embeddings"].shape
          (2, 384)
        """
        trainer = self._eval_trainer()
        batch_size = batch_size or trainer.recipe.batch_size
        return trainer.predict(data, batch_size=batch_size, outputs=outputs, pooling=self.pooling or Pooling())

    def summary(self, *, paths: bool = False, recipe: Any = None, trainer: Any = None, printed: bool = True) -> str:
        """The parameter-group report: per group the parameter count, bytes, LR, weight decay and trainable.

        Args:
          paths: Also list every parameter path with its group and the rule that caught it.
          printed: Print the report (it is returned either way).
        """
        from finetune.report import group_report

        text = group_report(self, recipe=recipe or self.recipe, trainer=trainer or self._trainer, paths=paths)
        if printed:
            print(text)
        return text

    @schema.arguments
    def save_pretrained(self, directory: Path, **card: Unpack[Card]):
        """Writes Hugging Face format (safetensors, config.json, tokenizer/processor, model card) atomically.

        Args:
          directory: Target directory: new, empty, or an earlier finetune export, which is replaced in one atomic step
            once the new one is complete (`finetune.writer`). A directory holding files finetune did not write, a
            checkpoint directory, ``""`` and the working directory are refused (`ConfigError`); a full or read-only
            disk is an `ExportError`, with the directory as it was.
          **card: ``datasets=[...]``, ``license=...``, ``metrics={...}`` for the model card.

        Returns:
          The directory, as a `pathlib.Path`.

        Example:
          >>> model.save_pretrained("out/minilm-reviews")
          >>> transformers.AutoModelForSequenceClassification.from_pretrained("out/minilm-reviews")
        """
        from finetune.hf.export import write

        return write(self._synced(), directory, **card)  # type: ignore[misc]  # (Card's pydantic config as a key)

    @schema.arguments
    def push_to_hub(
        self,
        repo_id: Text,
        *,
        private: Flag | None = None,
        revision: Text | None = None,
        commit_message: Text | None = None,
        token: Any = None,
        **card: Unpack[Card],
    ) -> str:
        """Exports the model (as `save_pretrained`) and uploads it to a Hub repository in one commit.

        Args:
          repo_id: ``"namespace/name"``; the repository is created when missing.
          private: Visibility of a newly created repository (an existing one is left as it is).
          revision: A branch to push to, created from ``main`` when missing (default: ``main``).
          commit_message: The commit title.
          token: A write token; default: huggingface_hub's usual sources (``HF_TOKEN``, ``hf auth login``).
          **card: ``datasets=[...]``, ``license=...``, ``metrics={...}`` for the model card.

        Returns the URL of the commit; raises `HubError` with no token, or the Hub unreachable or refusing the push
        (the message never holds the token).

        Example:
          >>> model.push_to_hub("me/minilm-reviews", private=True)
          'https://huggingface.co/me/minilm-reviews/commit/...'
        """
        from finetune.hf.push import push_model

        return push_model(
            self, repo_id, private=private, revision=revision, commit_message=commit_message, token=token, **card
        )

    @schema.arguments
    def save_adapter(self, directory: Path):
        """Writes only the LoRA adapters (and a trained new head) in the format of the ``peft`` library.

        Args:
          directory: Receives ``adapter_config.json`` and ``adapter_model.safetensors`` (and ``finetune.json``); new,
            empty, or an earlier adapter export, written as `save_pretrained` writes (`finetune.writer`).

        Returns:
          The directory, as a `pathlib.Path`.

        Example:
          >>> model.compile("lora").fit(train)
          >>> model.save_adapter("out/adapter")
          >>> peft.PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base), "out/adapter")
        """
        from finetune.params.peft import save_adapter

        return save_adapter(self._synced(), directory)


# What transformers' configs call each kind of labels (``problem_type``).
_PROBLEM_TYPES = dict(single="single_label_classification", multi="multi_label_classification", regression="regression")
