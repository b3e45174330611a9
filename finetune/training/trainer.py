"""`Trainer`: fit / evaluate / predict. It orchestrates; the compiled steps in `step.py` compute."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from finetune import data as data_lib
from finetune import optim
from finetune.errors import ConfigError, NonFiniteError
from finetune.recipe import Recipe
from finetune.rules import DEFAULT_GROUPS, Assignment, LayerDecay, assign, decay_mask, flatten
from finetune.training import metrics as metrics_lib
from finetune.training.callbacks import Callback
from finetune.training.history import History
from finetune.training.step import Program, split
from finetune.training.tasks import kind, loss_fn


def plan(model: Any, recipe: Recipe) -> Assignment:
    """The group of every parameter of ``model`` under ``recipe`` (its rules, else the model's defaults)."""
    paths = list(flatten(nnx.to_pure_dict(nnx.state(model.module, nnx.Param))))
    groups = {**DEFAULT_GROUPS, **(recipe.groups or {})}
    rules = recipe.rules if recipe.rules is not None else model.rules
    if recipe.layer_decay is not None:
        rules = _layer_decay_rules(model, recipe)
    return assign(paths, rules, groups)


def _layer_decay_rules(model: Any, recipe: Recipe) -> list:
    """The model's ``new`` / ``head`` rules, then layer i of L at ``decay ** (L - i)``, the rest (embeddings) lowest."""
    if recipe.rules is not None:
        raise ConfigError(
            "`layer_decay` applies to the model's default rules, and custom `rules` were given too. Put "
            "finetune.LayerDecay(decay, num_layers) targets in your rules instead of setting `layer_decay`."
        )
    if not model.layer_pattern or not model.num_layers:
        raise ConfigError(
            f"`layer_decay`={recipe.layer_decay} needs to know the model's layers, and this model declares none. "
            "Pass Model(..., layer_pattern=r'encoder/layers/(\\d+)/.*', num_layers=L), or write LayerDecay rules."
        )
    decay, layers = recipe.layer_decay, model.num_layers
    kept = [r for r in model.rules if r[1] in ("new", "head")]
    return [*kept, (model.layer_pattern, LayerDecay(decay, layers)), (".*", LayerDecay(decay, layers, layer=-1))]


def _phase_recipe(base: Recipe, phase: dict) -> Recipe:
    """The recipe of an early phase: the base with the phase's overrides (its groups merged over the base's)."""
    overrides = {k: v for k, v in phase.items() if k != "epochs"}
    if "groups" in overrides:
        overrides["groups"] = {**(base.groups or {}), **overrides["groups"]}
    return base.replace(**overrides, phases=())


class Trainer:
    """Runs one model under one recipe: builds the optimizer and the compiled steps, then loops."""

    def __init__(self, model: Any, recipe: Recipe):
        self.model, self.recipe = model, recipe
        self.assignment = plan(model, recipe)
        self.program: Program | None = None
        self.state: dict | None = None
        self.schedules: dict = {}
        self.stop_training = False

    # ---------------------------------------------------------------- building
    def build(self, sample: dict, *, total_steps: int | None, train: bool = True) -> None:
        """Splits the model, builds the optimizer over the trainable parameters, and the steps (not yet compiled)."""
        trainable = {p for p in self.assignment.group_of if self.assignment.trainable(p)}
        if train and not trainable:
            raise ConfigError("Every parameter group is frozen (trainable=False), so there is nothing to train.")
        graphdef, eval_graphdef, params, frozen, rest = split(self.model.module, trainable)
        if self.recipe.precision == "bfloat16":
            graphdef, eval_graphdef = (_with_dtype(g, params, frozen, rest) for g in (graphdef, eval_graphdef))
        tx, self.schedules = (None, {})
        if train:
            decay = decay_mask(flatten(params), self.recipe.decay_rules)
            tx, self.schedules = optim.build(
                self.assignment, decay, self.recipe.optimizer_spec(), total_steps=total_steps
            )
        logits = jax.eval_shape(lambda: nnx.merge(eval_graphdef, params, frozen, rest)(**_inputs(sample)))
        family = kind(self.model.task, logits.shape, sample.get("labels"))
        names = self.recipe.metrics or metrics_lib.DEFAULT_METRICS[family]
        self.program = Program(
            graphdef,
            eval_graphdef,
            tx,
            loss_fn(self.model.task, self.recipe.loss),
            metrics_lib.resolve(names),
            int(logits.shape[-1]),
        )
        self.state = self.program.init_state(params, frozen, rest)

    def sync_model(self) -> None:
        """Writes the trained state back into the NNX module."""
        if self.state is not None:
            nnx.update(self.model.module, self.state["params"], self.state["frozen"], self.state["rest"])

    def get_weights(self) -> dict:
        return jax.device_get(self.state["params"])

    def set_weights(self, params: dict) -> None:
        self.state = {**self.state, "params": jax.device_put(params)}

    # ---------------------------------------------------------------- loops
    def fit(
        self,
        train: Any,
        *,
        validation_data: Any = None,
        epochs: int,
        steps: int | None,
        batch_size: int,
        callbacks: Sequence[Callback] = (),
        verbose: int = 1,
    ) -> History:
        source = data_lib.as_source(train, task=self.model.task)
        history = History()
        for cb in callbacks:
            cb.trainer = self
        for cb in callbacks:
            cb.on_train_begin()
        base, epoch0 = self.recipe, 0
        phases = [(p["epochs"], _phase_recipe(base, p)) for p in base.phases] + [(epochs, base)]
        try:
            for i, (phase_epochs, recipe) in enumerate(phases):
                self.recipe, self.assignment = recipe, plan(self.model, recipe)
                main = i == len(phases) - 1
                epoch0 = self._phase(
                    source, validation_data, history, callbacks, epochs=phase_epochs, steps=steps if main else None,
                    batch_size=batch_size, verbose=verbose, epoch0=epoch0,
                )
                self.sync_model()
                if self.stop_training:
                    break
            for cb in callbacks:
                cb.on_train_end(history.history)
        finally:
            self.sync_model()
        return history

    def _phase(self, source, validation_data, history, callbacks, *, epochs, steps, batch_size, verbose, epoch0):
        """One phase of training (the whole run unless the recipe has phases); returns the next epoch number."""
        per_epoch = source.steps(batch_size)
        accumulate = self.recipe.accumulate
        micro_total = steps * accumulate if steps else (epochs * per_epoch if per_epoch else None)
        if micro_total is None:
            raise ConfigError("The training data has no length; pass `steps` so fit knows when to stop.")
        if per_epoch and not steps and epochs * per_epoch < accumulate:
            raise ConfigError(f"Training is {epochs * per_epoch} micro-batches, fewer than `accumulate`={accumulate}.")
        epochs = epochs if not steps else (-(-micro_total // per_epoch) if per_epoch else 1 << 30)
        sample = next(source.batches(batch_size, seed=self.recipe.seed))
        self.build(sample, total_steps=micro_total // accumulate)
        if verbose:
            print(self.model.summary(recipe=self.recipe, trainer=self, printed=False))
        bar = tqdm(total=micro_total, disable=verbose == 0, unit="step", dynamic_ncols=True)
        done, last = 0, (0, time.perf_counter())
        step0 = history.steps[-1]["step"] if history.steps else 0
        try:
            for epoch in range(epoch0, epoch0 + epochs):
                for cb in callbacks:
                    cb.on_epoch_begin(epoch)
                epoch_acc = self.program.zero_metrics()
                batches = source.batches(batch_size, seed=self.recipe.seed, epoch=epoch)
                for batch in data_lib.prefetch(batches):
                    self.state = self.program.train_step(self.state, batch)
                    done += 1
                    if done % self.recipe.log_every == 0 or done == micro_total:
                        epoch_acc, last = self._log(done, step0, batch_size, epoch_acc, last, history, bar, callbacks)
                    if done >= micro_total or self.stop_training:
                        break
                if done > last[0]:
                    epoch_acc, last = self._log(done, step0, batch_size, epoch_acc, last, history, bar, callbacks)
                logs = metrics_lib.results(self.program.metrics, epoch_acc)
                if validation_data is not None:
                    logs.update(self.evaluate(validation_data, batch_size=batch_size, prefix="val_"))
                history.add_epoch(epoch, logs)
                for cb in callbacks:
                    cb.on_epoch_end(epoch, logs)
                if done >= micro_total or self.stop_training:
                    break
        finally:
            bar.close()
        history.compilations.append(self.program.compilations())
        return epoch + 1

    def _log(self, step, step0, batch_size, epoch_acc, last, history, bar, callbacks):
        """One host read: interval metrics, learning rates, skipped steps; progress bar and callbacks."""
        acc, opt = jax.device_get((self.state["acc"], self.state["opt"]))
        self.state = {**self.state, "acc": self.program.zero_metrics()}
        epoch_acc = jax.tree.map(lambda a, b: np.asarray(a) + b, epoch_acc, acc)
        consecutive, total = optim.nonfinite_counts(opt)
        if int(consecutive) >= self.recipe.max_nonfinite:
            raise NonFiniteError(
                f"Training stopped at step {step}: {int(consecutive)} consecutive steps had a non-finite loss or "
                f"gradients (limit `max_nonfinite`={self.recipe.max_nonfinite}); they were skipped and the parameters "
                "are those of the last finite step. Lower the learning rate, clip harder (preset 'stable'), or check "
                "the data for NaN/inf."
            )
        logs = metrics_lib.results(self.program.metrics, acc)
        logs.update({f"lr/{g}": float(v) for g, v in optim.current_lrs(opt).items()})
        now = time.perf_counter()
        logs["examples_per_s"] = (step - last[0]) * batch_size / max(now - last[1], 1e-9)
        logs["skipped"] = int(total)
        history.add_step(step0 + step, logs)
        bar.update(step - bar.n)
        bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "accuracy", "examples_per_s")})
        for cb in callbacks:
            cb.on_step_end(step0 + step, logs)
        return epoch_acc, (step, now)

    def evaluate(self, data: Any, *, batch_size: int, prefix: str = "") -> dict[str, float]:
        source = data_lib.as_source(data, task=self.model.task)
        if self.program is None:
            self.build(next(source.batches(batch_size, seed=None)), total_steps=None, train=False)
        acc = self.program.zero_metrics()
        for batch in data_lib.prefetch(source.batches(batch_size, seed=None)):
            acc = self.program.eval_step(self.state, acc, batch)
        return metrics_lib.results(self.program.metrics, jax.device_get(acc), prefix)

    def predict(self, data: Any, *, batch_size: int) -> np.ndarray:
        """Logits of every real example (padding rows dropped), concatenated on the host."""
        source = data_lib.as_source(data, task=self.model.task)
        first = next(source.batches(batch_size, seed=None))
        if self.program is None:
            self.build(first, total_steps=None, train=False)
        outs = []
        for batch in data_lib.prefetch(source.batches(batch_size, seed=None)):
            logits = self.program.predict_step(self.state, batch)
            outs.append((logits, batch["example_mask"]))
        return np.concatenate([np.asarray(lg)[np.asarray(m) > 0] for lg, m in outs])


def _inputs(batch: dict) -> dict:
    from finetune.training.tasks import model_inputs

    return {k: jnp.asarray(v) for k, v in model_inputs(batch).items()}


def _with_dtype(graphdef: Any, params: dict, frozen: dict, rest: dict) -> Any:
    """The same graph with every layer computing in bfloat16 (parameters keep their storage dtype)."""
    module = nnx.merge(graphdef, params, frozen, rest)
    module.set_attributes(dtype=jnp.bfloat16, raise_if_not_found=False)
    return nnx.graphdef(module)
