"""`Trainer`: fit / evaluate / predict. It orchestrates; the compiled steps in `step.py` compute.

`fit` runs the recipe's phases; each phase is one loop over its steps, where after every call of the compiled step
small triggers decide what else happens at that step: a log read every ``log_every`` steps (`logs.Intervals`), a
checkpoint every ``save_every`` steps (`resume.Checkpoints`), an interrupt's checkpoint and exit; epochs end with
their metrics, evaluation and checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from finetune import metrics as metrics_lib
from finetune import runtime
from finetune import sharding as sharding_lib
from finetune.errors import ConfigError
from finetune.params import plan
from finetune.params.rules import Assignment
from finetune.recipe import Recipe
from finetune.training import build, feed, nonfinite, signals
from finetune.training import run as run_lib
from finetune.training.callbacks import Callback
from finetune.training.history import History
from finetune.training.logs import Intervals, log_values
from finetune.training.resume import CheckpointOptions, Checkpoints, Position
from finetune.training.run import Fit, FitOptions, Progress, Span
from finetune.training.stacking import Stacking
from finetune.training.step import Program
from finetune.training.tasks import collect, output_names, predict_family


class Trainer:
    """Runs one model under one recipe: builds the optimizer and the compiled steps, then loops."""

    def __init__(self, model: Any, recipe: Recipe, *, layout: Any = None):
        self.model, self.recipe = model, recipe
        self.layout = layout  # a finetune.sharding.Layout, or None: one device
        self.assignment = self._plan(recipe)
        self.program: Program | None = None
        self.state: dict | None = None
        self.schedules: dict = {}
        self.stop_training = False
        self._last_call: tuple = ()  # the program and batch shapes of the last step call (see _call)
        self._fit: Fit | None = None

    def _plan(self, recipe: Recipe) -> Assignment:
        """The groups under ``recipe``; its LoRA adapters are added to the model first, a step of their own."""
        if recipe.lora is not None:
            self.model.add_adapters(recipe.lora, seed=recipe.seed)
        return plan.of_model(self.model, recipe)

    # ---------------------------------------------------------------- what tests and callbacks observe
    @property
    def step(self) -> int:
        """The global step of the current (or last) `fit`."""
        return self._fit.progress.step if self._fit is not None else 0

    @property
    def train_source(self) -> Any:
        """The training data of the current (or last) `fit`, as a source of batches."""
        return self._fit.options.source if self._fit is not None else None

    @property
    def checkpoints(self) -> Checkpoints | None:
        """The checkpoints of the current `fit` (None without ``checkpoint_dir``)."""
        return self._fit.checkpoints if self._fit is not None else None

    @property
    def checkpoint_dir(self) -> Any:
        """Where the current (or last) `fit` writes its checkpoints (None: nowhere)."""
        return self._fit.options.checkpoints.directory if self._fit is not None else None

    def save_checkpoint(self, *, phase: int = 0, epoch: int = 0, batch: int = 0, done: int = 0) -> None:
        """Checkpoints the state at the current step, as at batch ``batch`` of ``epoch`` in ``phase``."""
        run = self._fit
        assert run is not None, "save_checkpoint is for the trainer of a running fit"
        self._save(run, Position(phase, epoch, batch, done, run.progress.step))

    # ---------------------------------------------------------------- building
    def build(self, sample: dict, *, total_steps: int | None, train: bool = True, predicting: bool = False) -> None:
        """Builds the program of ``sample``'s shapes and its state (`finetune.training.build.program`).

        ``predicting``: for `predict` alone, which models without a loss (feature extraction) may serve too."""
        self.program, self.state, self.schedules, family = build.program(
            self.model,
            self.recipe,
            self.assignment,
            sample,
            layout=self.layout,
            total_steps=total_steps,
            train=train,
            predicting=predicting,
        )
        if sample.get("labels") is not None:
            self.model.record_family(family)

    def _call(self, kind: str, step: Any, *args: Any) -> Any:
        """One call of a compiled step. Before a call of another program or batch shape than the last (which may
        compile, or need scratch of another size): the C allocator's defaults, and what it holds free goes back
        (`finetune.runtime.keep`); kept scratch is for runs of calls of one shape, across shapes it would pile up.
        After it, the next call's scratch is kept (a compile's freed memory went back to the OS before the program
        first ran: `runtime.kept_scratch`)."""
        batch = args[-1]
        call = (kind, *((k, np.shape(v)) for k, v in batch.items()))
        if call != self._last_call:
            self._last_call = call
            runtime.keep(False)
        out = step(*args)
        runtime.keep(True)
        return out

    def sync_model(self) -> None:
        """Writes the trained state back into the NNX module."""
        if self.state is not None:
            nnx.update(self.model.module, self.state["params"], self.state["frozen"], self.state["rest"])

    def get_weights(self) -> dict:
        assert self.state is not None  # built
        return jax.device_get(self.state["params"])

    def set_weights(self, params: dict) -> None:
        assert self.program is not None and self.state is not None  # built
        shardings = self.program.shardings
        params = sharding_lib.place(params, shardings["params"]) if shardings else jax.device_put(params)
        self.state = {**self.state, "params": params}

    def source(self, data: Any, **options: Any) -> Any:
        """``data`` as a source of batches for this model and recipe (`finetune.training.feed.source`)."""
        return feed.source(self.model, self.recipe, data, **options)

    # ---------------------------------------------------------------- fit
    def fit(
        self,
        train: Any,
        *,
        epochs: int | None = None,
        steps: int | None = None,
        batch_size: int | None = None,
        validation_data: Any = None,
        callbacks: Sequence[Callback] = (),
        verbose: int = 1,
        checkpoints: CheckpointOptions | None = None,
    ) -> History:
        """Trains; see `finetune.Model.fit` for the options (``epochs``, ``steps``, ``batch_size``: the recipe's by
        default)."""
        epochs, batch_size = epochs or self.recipe.epochs, batch_size or self.recipe.batch_size
        steps = steps if steps is not None else self.recipe.steps
        source = self.source(train, stage="fit", argument="train")
        if validation_data is not None:  # checked before the first step, not after the first epoch
            validation_data = self.source(validation_data, stage="evaluate", argument="validation_data")
        spe = self.recipe.steps_per_execution
        if spe != "auto" and spe > 1 and self.layout is not None:
            raise ConfigError(
                f"`steps_per_execution`={spe} stacks batches for one device, and this run is sharded over a mesh. "
                "Use steps_per_execution=1 or 'auto' with a mesh."
            )
        size = getattr(source, "size", None)
        if size is not None and batch_size > size:
            raise ConfigError(
                f"`batch_size`={batch_size} is larger than the training data ({size} examples), so every step would "
                f"be mostly padding. Use batch_size <= {size}, or more data."
            )
        saving = checkpoints or CheckpointOptions()
        if saving.resume not in (True, False, None) and saving.directory is None:
            saving = dataclasses.replace(saving, directory=saving.resume)  # resume from a path, and keep writing there
        options = FitOptions(source, batch_size, validation_data, callbacks, verbose, saving)
        # Opening the checkpoints locks the directory: a second run into it is refused here.
        opened = Checkpoints(saving, source, batch_size) if saving.directory is not None else None
        stacking = Stacking(self.recipe, sharded=self.layout is not None)
        self._fit = run = Fit(options, Progress(), opened, stacking)
        try:
            return self._train(run, epochs=epochs, steps=steps)
        finally:
            if opened is not None:
                opened.release()  # also when fit fails before training (closed by `_finish` else)

    def _train(self, run: Fit, *, epochs: int, steps: int | None) -> History:
        """The phases of `fit`, between opening the checkpoints and releasing them."""
        resuming = run.checkpoints.meta if run.checkpoints is not None else None
        if resuming is not None:
            run.progress.history = History.from_dict(resuming["history"])
        for cb in run.options.callbacks:
            cb.trainer = self
        for cb in run.options.callbacks:
            cb.on_train_begin()
        phases = self.recipe.stages(epochs)
        with contextlib.ExitStack() as stack:
            run.interrupts = stack.enter_context(signals.deferred(run.checkpoints is not None))
            stack.enter_context(runtime.kept_scratch())
            stack.callback(self._finish, run)
            for i, (phase_epochs, recipe) in enumerate(phases):
                if resuming is not None and i < resuming["phase"]:
                    run.progress.epoch += phase_epochs  # finished before the checkpoint
                    continue
                self.recipe, self.assignment = recipe, self._plan(recipe)
                main = i == len(phases) - 1
                self._phase(run, i, epochs=phase_epochs, steps=steps if main else None)
                self.sync_model()
                if self.stop_training:
                    break
            for cb in run.options.callbacks:
                cb.on_train_end(run.progress.history.history)
        return run.progress.history

    def _finish(self, run: Fit) -> None:
        self.sync_model()
        if run.checkpoints is not None:
            run.checkpoints.close()

    def _phase(self, run: Fit, phase: int, *, epochs: int, steps: int | None) -> None:
        """One phase of training (the whole run unless the recipe has phases): its epochs, one after another."""
        opts, progress = run.options, run.progress
        span = run_lib.span(opts.source.steps(opts.batch_size), self.recipe.accumulate, epochs, steps)
        first_epoch, start, done = self._begin_phase(run, span)
        assert self.program is not None and self.state is not None  # built by _begin_phase
        bar = tqdm(total=span.total, initial=done, disable=opts.verbose == 0, unit="step", dynamic_ncols=True)
        skipped = nonfinite.skipped_so_far(self.state["opt"])  # counted from here (a resumed run: its checkpoint's)
        log = Intervals(
            self.program,
            log_values,
            done=done,
            skipped=skipped,
            batch_size=opts.batch_size,
            history=progress.history,
            callbacks=opts.callbacks,
            bar=bar,
            stacking=run.stacking,
        )
        try:
            for epoch in range(first_epoch, progress.epoch + span.epochs):
                done, epoch_acc = self._epoch(run, log, span, at=Position(phase, epoch, start, done, progress.step))
                start = 0
                if self._end_epoch(run, log, span, epoch_acc, at=Position(phase, epoch, 0, done, progress.step)):
                    break
        finally:
            bar.close()
        progress.epoch += span.epochs
        progress.history.compilations.append(self.program.compilations())
        progress.history.compiled_shapes = sorted(getattr(opts.source, "shapes", ()))  # one per length bucket used

    def _begin_phase(self, run: Fit, span: Span) -> tuple[int, int, int]:
        """Builds the phase's program on its first batch and restores a checkpoint to resume from; returns the
        ``(epoch, batch, micro-steps done)`` it starts at."""
        opts, progress, checkpoints = run.options, run.progress, run.checkpoints
        recorded = checkpoints.recorded_packed if checkpoints is not None else None
        progress.packed = feed.packs(self.model, self.recipe, opts.source, layout=self.layout, recorded=recorded)
        first = next(opts.source.batches(opts.batch_size, seed=self.recipe.seed, pack=progress.packed))
        self.build(first, total_steps=span.total // self.recipe.accumulate)
        start = (progress.epoch, 0, 0)
        if checkpoints is not None and checkpoints.meta is not None:
            self.state, at, history = checkpoints.restore(
                self.state,
                recipe=self.recipe,
                packed=progress.packed,
                batch_size=opts.batch_size,
                steps_per_epoch=span.per_epoch,
            )
            if history is not None:  # the newest step was damaged: an older one's history
                progress.history = history
            progress.step, start = at.step, (at.epoch, at.batch, at.done)
        if opts.verbose:
            print(self.model.summary(recipe=self.recipe, trainer=self, printed=False))
        return start

    def _epoch(self, run: Fit, log: Intervals, span: Span, *, at: Position) -> tuple[int, dict]:
        """The steps of one epoch from batch ``at.batch``, each followed by its triggers; returns the micro-steps
        done in the phase and the epoch's metric sums."""
        opts, progress, recipe = run.options, run.progress, self.recipe
        for cb in opts.callbacks:
            cb.on_epoch_begin(at.epoch)
        assert self.program is not None  # built by _begin_phase
        epoch_acc, done = self.program.zero_metrics(), at.done
        log.begin_epoch(progress.step + 1)
        batches = opts.source.batches(
            opts.batch_size,
            seed=recipe.seed,
            epoch=at.epoch,
            start=at.batch,
            group=recipe.group_by_length,
            pack=progress.packed,
        )
        stream = enumerate(feed.prefetch(batches, self.layout), start=at.batch)
        save_every = opts.checkpoints.save_every
        units = run.stacking.units(
            stream, step=progress.step, done=done, total=span.total, log_every=recipe.log_every, save_every=save_every
        )
        for index, n, batch in units:
            step = self.program.train_step if n == 1 else self.program.train_steps
            self.state = self._call("train", step, self.state, batch)
            done += n
            progress.step += n
            epoch_acc = self._flush(run, log, epoch_acc)  # the last interval's log, read while this runs
            epoch_acc = self._triggers(run, log, span, epoch_acc, at, batch=index + 1, done=done)
            if done >= span.total or self.stop_training:
                break
        return done, epoch_acc

    def _triggers(self, run: Fit, log: Intervals, span: Span, epoch_acc: dict, at: Position, *, batch: int, done: int):
        """What happens after the call that ended at batch ``batch`` of the epoch ``at`` started, micro-step ``done``
        of the phase: every ``log_every`` steps a log read, every ``save_every`` steps a checkpoint, and on an
        interrupt a checkpoint and the exit. Returns the epoch's metric sums."""
        step, saving = run.progress.step, run.options.checkpoints
        if done % self.recipe.log_every == 0 or done == span.total:
            assert self.state is not None  # built by _begin_phase
            self.state = log.start(self.state, done, step)
            if run.stacking.chunk == 1 or done == span.total:  # one step per call: report at once
                epoch_acc = self._flush(run, log, epoch_acc)
        if (
            saving.save_every
            and step % saving.save_every == 0
            and not (saving.save_each_epoch and batch == span.per_epoch)
            and done < span.total  # the last step is saved after its epoch, with the epoch's metrics
        ):
            epoch_acc = self._flush(run, log, epoch_acc)
            self._save(run, dataclasses.replace(at, batch=batch, done=done, step=step))
        if run.interrupts.signum is not None:
            epoch_acc = self._flush(run, log, epoch_acc)
            if run.checkpoints is not None:
                self._save(run, dataclasses.replace(at, batch=batch, done=done, step=step))
                run.checkpoints.wait()
            run.interrupts.raise_now()
        return epoch_acc

    def _end_epoch(self, run: Fit, log: Intervals, span: Span, epoch_acc: dict, *, at: Position) -> bool:
        """The epoch's last log, metrics, evaluation, callbacks and checkpoint; True when training is done."""
        opts, progress = run.options, run.progress
        assert self.state is not None  # built by _begin_phase
        self.state, epoch_acc = log.finish_epoch(
            epoch_acc, state=self.state, done=at.done, global_step=progress.step, recipe=self.recipe
        )
        logs = log.epoch_logs(at.epoch, epoch_acc, progress.step)
        if opts.validation_data is not None:
            logs.update(self.evaluate(opts.validation_data, batch_size=opts.batch_size, prefix="val_"))
        progress.history.add_epoch(at.epoch, logs)
        for cb in opts.callbacks:
            cb.on_epoch_end(at.epoch, logs)
        finished = at.done >= span.total or self.stop_training
        if run.checkpoints is not None and (opts.checkpoints.save_each_epoch or finished):
            self._save(run, dataclasses.replace(at, epoch=at.epoch + 1, step=progress.step), logs)
        return finished

    def _flush(self, run: Fit, log: Intervals, epoch_acc: dict) -> dict:
        assert self.state is not None  # built by _begin_phase
        return log.flush(epoch_acc, state=self.state, global_step=run.progress.step, recipe=self.recipe)

    def _save(self, run: Fit, at: Position, metrics: dict | None = None) -> None:
        progress = run.progress
        assert run.checkpoints is not None  # saving needs a checkpoint_dir
        run.checkpoints.save(
            at, self.state, recipe=self.recipe, packed=progress.packed, history=progress.history, metrics=metrics
        )

    # ---------------------------------------------------------------- evaluate, predict
    def evaluate(self, data: Any, *, batch_size: int, prefix: str = "") -> dict[str, float]:
        source = self.source(data, stage="evaluate")
        if self.program is None:
            self.build(next(source.batches(batch_size, seed=None)), total_steps=None, train=False)
        assert self.program is not None
        acc = self.program.zero_metrics()
        with runtime.kept_scratch():
            for batch in feed.prefetch(source.batches(batch_size, seed=None), self.layout):
                acc = self._call("eval", self.program.eval_step, self.state, acc, batch)
        return metrics_lib.results(self.program.metrics, jax.device_get(acc), prefix)

    def predict(
        self, data: Any, *, batch_size: int, outputs: Sequence[str] | None = None, pooling: Any = None
    ) -> dict[str, Any]:
        """The task's outputs (`finetune.training.tasks.predictions`) for every real example, computed on the device
        batch by batch, padding rows dropped, gathered on the host."""
        token_level = self.model.task in ("token-classification", "causal-lm", "feature-extraction")
        padding = "longest" if token_level else "buckets"
        source = self.source(data, stage="predict", padding=padding, max_length=getattr(pooling, "max_length", None))
        first = next(source.batches(batch_size, seed=None))
        if self.program is None:
            self.build(first, total_steps=None, train=False, predicting=True)
        assert self.program is not None
        family = predict_family(self.model.task, self.program.num_classes, self.model.family)
        names = output_names(family, outputs)
        step, parts = self.program.predictor(family=family, names=names, pooling=pooling), []
        with runtime.kept_scratch():
            for batch in feed.prefetch(source.batches(batch_size, seed=None), self.layout):
                values = self._call("predict", step, self.state, batch)
                parts.append((values, batch["example_mask"]))
        return collect([(jax.device_get(values), np.asarray(mask)) for values, mask in parts])
