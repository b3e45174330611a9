"""`Recipe`: every hyperparameter of a fine-tuning run, as one frozen dataclass checked by `finetune.schema`.

A recipe comes from `Model.compile` (a preset by name plus overrides) and is saved with checkpoints and exports.
Every field has a type from the schema, so a bad value (``learning_rate=nan``, ``group_by_length="no"``,
``groups.backbone.trainable="no"``) is a `ConfigError` naming its dotted path when the recipe is made.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import pydantic

from finetune import schema, violations
from finetune.errors import RulesError
from finetune.optim import Optimizer, OptimizerSpec, option_names
from finetune.params.lora import LoRAConfig
from finetune.params.rules import DecayRules, Group, Rules
from finetune.schedules import Schedule, Steps
from finetune.schema import Count, Flag, Index, NonNegative, Positive, Text, Unit


def _metrics(value: Any) -> tuple:
    from finetune import metrics as metrics_lib

    items = (value,) if isinstance(value, str) else value  # "accuracy" means ["accuracy"], in Python and --set
    if not isinstance(items, list | tuple) or not all(isinstance(m, str | metrics_lib.Metric) for m in items):
        raise schema.violation(
            f"a metric name or a list of them ({', '.join(metrics_lib.METRICS)})",
            "Write e.g. ['accuracy', 'f1_macro'].",
        )
    metrics_lib.resolve(items)  # an unknown name: its ConfigError, with the closest names
    return tuple(items)


def _role(value: str) -> str:
    from finetune.data.columns import ROLES

    if value in ROLES:
        return value
    raise schema.violation(f"a column role: one of {', '.join(ROLES)}{violations.close_names(value, ROLES)}")


Columns = Annotated[
    dict[Annotated[str, pydantic.Strict(), pydantic.AfterValidator(_role)], Text],
    schema.allowed(
        "a dict {role: column name}, e.g. {'text': 'review', 'label': 'sentiment'}",
        "Name the column of each role that detection does not find.",
    ),
]


def _phase(value: Any) -> dict:
    what = "a dict of recipe overrides with `epochs` (an int >= 1), e.g. {'epochs': 1, 'learning_rate': 1e-3}"
    if not isinstance(value, Mapping) or "epochs" not in value or "phases" in value:
        raise schema.violation(what, "A phase takes recipe fields (no `phases` of its own) and must set `epochs`.")
    # Every override checked as the recipe field it is, at its path; options of an optimizer the phase inherits are
    # checked by the recipe holding it (`_options_of_the_optimizer`), so here it stands in as a factory of the user's.
    schema.validate(Recipe, {"optimizer": _inherited, **value})
    return dict(value)


def _inherited(learning_rate: float, **options: Any) -> Any:
    raise AssertionError("a stand-in for the optimizer a phase inherits; never called")


def _lora(value: Any) -> Any:
    if isinstance(value, LoRAConfig):
        return value
    if not isinstance(value, Mapping):
        raise schema.violation(
            "a dict with keys targets, rank, alpha, dropout", "Write e.g. {'targets': '.*attention/(query|value)'}."
        )
    schema.validate(LoRAConfig, value)
    return dict(value)


Groups = Annotated[
    dict[Text, Group],
    schema.allowed(
        "a dict {group name: finetune.Group or a dict of its fields}", "Write e.g. {'backbone': {'lr_mult': 0.1}}."
    ),
]
Metrics = Annotated[Any, pydantic.AfterValidator(_metrics)]
Phases = Annotated[
    tuple[Annotated[Any, pydantic.AfterValidator(_phase)], ...],
    schema.allowed("a list of phases, each a dict of recipe overrides with `epochs`", "Write e.g. [{'epochs': 1}]."),
]
Lora = Annotated[Any, pydantic.AfterValidator(_lora)]
Packing = Annotated[
    Annotated[bool, pydantic.Strict()] | None,
    schema.allowed("None (pack where supported), True or False", "A string such as 'no' is not a bool."),
]
Precision = Annotated[Literal["float32", "bfloat16"], schema.allowed("'float32' or 'bfloat16'")]


def _steps_per_execution(value: Any) -> Any:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise schema.violation("an int >= 1 or 'auto'", "Use 1 for one step per call, or 'auto' to let fit choose.")


StepsPerExecution = Annotated[Any, pydantic.AfterValidator(_steps_per_execution)]


@schema.checked(what="the recipe", errors={"rules": RulesError, "groups": RulesError, "decay_rules": RulesError})
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
      metrics: Metric names (see `finetune.metrics.METRICS`); empty takes the task's defaults.
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
        module paths), ``rank``, ``alpha`` and ``dropout`` (see `finetune.params.lora.LoRAConfig`); overrides merge
        into it.
    """

    name: Text | None = None
    description: Text = ""
    provenance: Text = ""
    optimizer: Optimizer = "adamw"
    learning_rate: Positive = 5e-5
    schedule: Schedule = "constant"
    warmup: Steps = 0
    weight_decay: NonNegative = 0.0
    clip_norm: Positive | None = None
    accumulate: Count = 1
    rules: Rules | None = None
    groups: Groups | None = None
    decay_rules: DecayRules = None
    optimizer_options: dict[Text, Any] = dataclasses.field(default_factory=dict)
    loss: schema.Function | None = None
    metrics: Metrics = ()
    epochs: Count = 1
    steps: Count | None = None
    batch_size: Count = 32
    max_length: Count | None = None
    columns: Columns | None = None
    packing: Packing = None
    group_by_length: Flag = True
    precision: Precision = "float32"
    remat: Flag = False
    max_nonfinite: Count = 10
    seed: Index = 0
    log_every: Count = 10
    steps_per_execution: StepsPerExecution = "auto"
    layer_decay: Unit | None = None
    phases: Phases = ()
    lora: Lora | None = None

    @pydantic.model_validator(mode="after")
    def _options_of_the_optimizer(self) -> Recipe:
        # A phase that keeps the run's optimizer is checked here, against it (its own check could not know it).
        runs = [("", self.optimizer, self.optimizer_options)] + [
            (f"phases[{i}].", self.optimizer, p.get("optimizer_options") or {})
            for i, p in enumerate(self.phases)
            if "optimizer" not in p
        ]
        for where, optimizer, options in runs:
            names = option_names(optimizer)
            for key, value in options.items():
                if names is not None and key not in names:
                    takes = ", ".join(names) or "no options"
                    close = violations.close_names(key, names)
                    raise schema.violation(
                        f"an option that the optimizer {optimizer!r} takes ({takes}){close}",
                        "Drop it, or pick an optimizer that takes it.",
                        path=f"{where}optimizer_options.{key}",
                        value=value,
                    )
        return self

    def replace(self, **overrides: Any) -> Recipe:
        """A copy with fields replaced (and checked); unknown field names get an error with the closest names.

        A ``lora`` dict merges into the current one (``--set lora.rank=4`` keeps the targets).
        """
        fields = [f.name for f in dataclasses.fields(self)]
        unknown = [k for k in overrides if k not in fields]
        if unknown:
            raise violations.unknown(unknown, fields, owner="the recipe", values=overrides)
        if isinstance(overrides.get("lora"), Mapping) and isinstance(self.lora, Mapping):
            overrides["lora"] = {**self.lora, **overrides["lora"]}
        return dataclasses.replace(self, **overrides)

    def stages(self, epochs: int) -> list[tuple[int, Recipe]]:
        """``[(epochs, recipe)]`` of each phase in order, the main one (``epochs`` long, this recipe) last.

        An early phase's recipe is this one with the phase's overrides (its groups merged over these).
        """
        early = []
        for phase in self.phases:
            overrides = {k: v for k, v in phase.items() if k != "epochs"}
            if "groups" in overrides:
                overrides["groups"] = {**(self.groups or {}), **overrides["groups"]}
            early.append((phase["epochs"], self.replace(**overrides, phases=())))
        return [*early, (epochs, self)]

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


violations.nested("groups", tuple(f.name for f in dataclasses.fields(Group)))
violations.nested("lora", tuple(f.name for f in dataclasses.fields(LoRAConfig)))
violations.nested("phases", tuple(f.name for f in dataclasses.fields(Recipe)))


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
