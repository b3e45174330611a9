"""`Recipe`: every hyperparameter of a fine-tuning run, as one frozen dataclass.

A recipe comes from `Model.compile` (a preset by name plus overrides) and is saved with checkpoints and exports.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any

from finetune.errors import ConfigError
from finetune.optim import OPTIMIZERS, OptimizerSpec
from finetune.rules import Group


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Every hyperparameter of a run.

    Attributes:
      name: The preset it came from, if any.
      description: What it is for.
      optimizer: A name (``adamw``, ``adam``, ``sgd``, ``lion``, ``lamb``, ``adafactor``, ...), an optax factory
        ``(learning_rate, **options) -> GradientTransformation``, or a transformation without learning rate.
      learning_rate: Peak learning rate (groups multiply it by their ``lr_mult``).
      schedule: A schedule name (``constant``, ``cosine``, ``linear``, ``exponential``, ``piecewise``, ``joined``), a
        dict of schedule arguments, or an optax schedule (see `finetune.optim.make_schedule`).
      warmup: Linear warmup, in optimizer steps or as a fraction of training.
      weight_decay: Decoupled weight decay (groups multiply it by their ``wd_mult``).
      clip_norm: Global-norm gradient clipping over all trainable gradients; None turns it off.
      accumulate: Micro-batches accumulated into one optimizer step.
      rules: Ordered ``(regex, group)`` rules; None takes the model's defaults (backbone / head / new).
      groups: ``{name: Group}`` overriding or adding to the default groups.
      decay_rules: ``(regex, bool)`` rules (or a callable) overriding the weight-decay mask (default: ``ndim >= 2``).
      optimizer_options: Extra keyword arguments of the optimizer (e.g. ``{"b2": 0.98}``, ``{"momentum": 0.9}``).
      loss: None for the task's loss, or ``(logits, labels) -> per-item losses``.
      metrics: Metric names (see `finetune.training.metrics.METRICS`); empty takes the task's defaults.
      epochs: Passes over the training data (unless ``steps`` is set).
      steps: Optimizer steps to train for; overrides ``epochs``.
      batch_size: Examples per micro-batch.
      max_length: Longest token sequence (longer texts are truncated).
      columns: ``{role: column}`` naming data columns when detection is not enough, e.g. ``{"text": "review"}``.
      packing: Causal LM: join short examples into rows of up to ``max_length`` tokens (True; default off).
        Text classification: pack each batch's examples several to a row, each attending only to itself, so the
        whole epoch runs one compiled shape with little padding; results are those of unpacked batches (within
        float rounding). None (the default) packs where the architecture supports it (BERT, RoBERTa, DistilBERT)
        on one host without a mesh; False pads batches to length buckets instead.
      group_by_length: Training batches of token sequences that are not packed group examples of similar length
        (shuffled data sorted in runs of 50 batches, then the batches shuffled, as the Trainer's
        ``group_by_length``), so batches pad to smaller length buckets. False: batches of uniformly shuffled examples.
      precision: ``float32`` or ``bfloat16`` compute (parameters stay float32).
      remat: Rematerialisation, trading compute for memory: the backward pass keeps only each layer's input and
        recomputes the layer's forward, one layer at a time. (Policies that keep the matmul outputs saved nothing
        over no remat on XLA:CPU, so only the full form is offered.) Without it, every architecture already
        recomputes its feed-forward activation and its attention dropout mask; on XLA:CPU that leaves remat little
        to save (docs/performance.md).
      max_nonfinite: Consecutive non-finite steps (skipped) after which training stops with an error.
      seed: Data order and dropout seed.
      log_every: Steps between host reads of the metrics (progress bar, callbacks, step history).
      steps_per_execution: Steps run by one call of the compiled program (a scan over that many batches; like
        Keras's option of that name), so small models are not bound by the per-call cost of the host. ``"auto"``
        switches to ``log_every`` steps per call (at most 64) after timing the second log interval, when a step takes
        under 5 ms; 1 turns it off. A call never spans a log interval (so at most ``log_every`` steps). The results
        are those of single steps; callbacks still run every ``log_every`` steps, reported one call late.
      layer_decay: When set, layer-wise LR decay: layer i of L gets ``layer_decay ** (L - i)`` (needs a model that
        declares its layers, as every loaded architecture does).
      phases: Phases run before the main one inside one `fit` (e.g. fastai's head-only first epoch): each a dict of
        recipe overrides with its own ``epochs``. Each phase gets a fresh optimizer and schedule.
      lora: When set, LoRA adapters train instead of the pretrained weights: a dict with ``targets`` (regex(es) over
        module paths), ``rank``, ``alpha`` and ``dropout`` (see `finetune.lora.LoRAConfig`); overrides merge into it.
    """

    name: str | None = None
    description: str = ""
    provenance: str = ""
    optimizer: Any = "adamw"
    learning_rate: float = 5e-5
    schedule: Any = "constant"
    warmup: float | int = 0
    weight_decay: float = 0.0
    clip_norm: float | None = None
    accumulate: int = 1
    rules: tuple | None = None
    groups: Mapping[str, Group] | None = None
    decay_rules: Any = None
    optimizer_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    loss: Any = None
    metrics: tuple = ()
    epochs: int = 1
    steps: int | None = None
    batch_size: int = 32
    max_length: int | None = None
    columns: Mapping[str, str] | None = None
    packing: bool | None = None
    group_by_length: bool = True
    precision: str = "float32"
    remat: bool = False
    max_nonfinite: int = 10
    seed: int = 0
    log_every: int = 10
    steps_per_execution: int | str = "auto"
    layer_decay: float | None = None
    phases: tuple = ()
    lora: Mapping[str, Any] | None = None

    def __post_init__(self):
        for name in ("epochs", "batch_size", "max_nonfinite", "log_every", "accumulate"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"`{name}` must be an int >= 1; received {name}={value!r}.")
        spe = self.steps_per_execution
        if spe != "auto" and (not isinstance(spe, int) or isinstance(spe, bool) or spe < 1):
            raise ConfigError(
                f"`steps_per_execution` must be an int >= 1 or 'auto'; received steps_per_execution={spe!r}. Use 1 "
                "for one step per call, or 'auto' to let fit choose."
            )
        if self.packing not in (None, True, False):
            raise ConfigError(
                f"`packing` must be None (pack where supported), True or False; received packing={self.packing!r}."
            )
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ConfigError(
                f"`steps` must be an int >= 1 or None (train for `epochs`); received steps={self.steps!r}."
            )
        if (
            isinstance(self.learning_rate, bool)
            or not isinstance(self.learning_rate, int | float)
            or (self.learning_rate <= 0)
        ):
            raise ConfigError(f"`learning_rate` must be a number > 0; received learning_rate={self.learning_rate!r}.")
        if not isinstance(self.weight_decay, int | float) or self.weight_decay < 0:
            raise ConfigError(
                f"`weight_decay` must be a number >= 0; received weight_decay={self.weight_decay!r}. Use 0 for none."
            )
        if self.clip_norm is not None and (not isinstance(self.clip_norm, int | float) or self.clip_norm <= 0):
            raise ConfigError(f"`clip_norm` must be > 0 or None (no clipping); received clip_norm={self.clip_norm!r}.")
        if isinstance(self.optimizer, str) and self.optimizer not in OPTIMIZERS:
            close = difflib.get_close_matches(self.optimizer, OPTIMIZERS, n=2)
            hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise ConfigError(f"Unknown optimizer {self.optimizer!r}.{hint} Allowed: {', '.join(OPTIMIZERS)}.")
        if self.layer_decay is not None and not (
            isinstance(self.layer_decay, int | float) and 0 < self.layer_decay <= 1
        ):
            raise ConfigError(f"`layer_decay` must be in (0, 1] or None; received layer_decay={self.layer_decay!r}.")
        if not isinstance(self.remat, bool):
            raise ConfigError(f"`remat` must be True or False; received remat={self.remat!r}.")
        if self.precision not in ("float32", "bfloat16"):
            raise ConfigError(f"`precision` must be 'float32' or 'bfloat16'; received precision={self.precision!r}.")
        if self.lora is not None:
            from finetune.lora import LoRAConfig

            LoRAConfig.from_mapping(self.lora)  # a bad `lora` field fails here, not after data loading

    def replace(self, **overrides: Any) -> Recipe:
        """A copy with fields replaced; unknown field names get an error with the closest names."""
        fields = [f.name for f in dataclasses.fields(self)]
        unknown = [k for k in overrides if k not in fields]
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, fields, n=2)
                hints.append(f"{key!r}" + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""))
            raise ConfigError(f"Unknown recipe field(s): {', '.join(hints)}. Recipe fields: {', '.join(fields)}.")
        if "rules" in overrides and overrides["rules"] is not None:
            overrides["rules"] = tuple(tuple(r) for r in overrides["rules"])
        if "metrics" in overrides and overrides["metrics"] is not None:
            overrides["metrics"] = tuple(overrides["metrics"])
        if overrides.get("groups") is not None:
            overrides["groups"] = {k: _group(k, v) for k, v in overrides["groups"].items()}
        if isinstance(overrides.get("lora"), Mapping) and self.lora is not None:  # `--set lora.rank=4` keeps targets
            overrides["lora"] = {**self.lora, **overrides["lora"]}
        if overrides.get("phases") is not None:
            overrides["phases"] = tuple(_phase(i, p) for i, p in enumerate(overrides["phases"]))
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict of every field (callables and optax objects as their repr), for checkpoints and cards."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def optimizer_spec(self) -> OptimizerSpec:
        return OptimizerSpec(
            optimizer=self.optimizer,
            learning_rate=self.learning_rate,
            schedule=self.schedule,
            warmup=self.warmup,
            weight_decay=self.weight_decay,
            clip_norm=self.clip_norm,
            accumulate=self.accumulate,
            options=dict(self.optimizer_options),
        )


def _group(name: str, value: Any) -> Group:
    if isinstance(value, Group):
        return value
    if isinstance(value, Mapping):
        allowed = {f.name for f in dataclasses.fields(Group)}
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise ConfigError(
                f"Group {name!r} has unknown field(s) {unknown}; a group takes {', '.join(sorted(allowed))}."
            )
        return Group(**value)
    raise ConfigError(f"`groups[{name!r}]` must be a finetune.Group or a dict of its fields; received {value!r}.")


def _phase(index: int, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping) or not isinstance(value.get("epochs"), int) or value["epochs"] < 1:
        raise ConfigError(
            f"`phases[{index}]` must be a dict of recipe overrides with `epochs` (an int >= 1); received {value!r}."
        )
    Recipe().replace(**{k: v for k, v in value.items() if k != "phases"})  # validates the field names early
    return dict(value)


def _plain(value: Any) -> Any:
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return repr(value)
