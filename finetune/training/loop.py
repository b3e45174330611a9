"""`Trainer`: fit / evaluate / predict. It orchestrates; the compiled steps in `step.py` compute."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from finetune import data as data_lib
from finetune import optim, runtime
from finetune import sharding as sharding_lib
from finetune.errors import CheckpointError, ConfigError, LoadError
from finetune.params import lora
from finetune.params.rules import DEFAULT_GROUPS, Assignment, LayerDecay, assign, decay_mask, flatten
from finetune.recipe import Recipe
from finetune.training import metrics as metrics_lib
from finetune.training import nonfinite, signals
from finetune.training.callbacks import Callback
from finetune.training.checkpoint import Checkpointer, data_changes, data_record, fingerprint
from finetune.training.history import History
from finetune.training.step import Program, split
from finetune.training.tasks import collect, kind, loss_fn, output_names, predict_family

logger = logging.getLogger(__name__)


def plan(model: Any, recipe: Recipe) -> Assignment:
    """The group of every parameter of ``model`` under ``recipe`` (its rules, else the model's defaults).

    A recipe with ``lora`` first adds the adapters to the model (once); adapters then go to group ``lora`` and the
    pretrained weights default to frozen groups (`finetune.params.lora.plan_defaults`).
    """
    if recipe.lora is not None:
        lora.apply(model, recipe.lora, seed=recipe.seed)
    paths = list(flatten(nnx.to_pure_dict(nnx.state(model.module, nnx.Param))))
    rules = recipe.rules if recipe.rules is not None else model.rules
    if recipe.layer_decay is not None:
        rules = _layer_decay_rules(model, recipe)
    rules, lora_groups = lora.plan_defaults(model.module, rules)
    groups = {**DEFAULT_GROUPS, **lora_groups, **(recipe.groups or {})}
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

    def __init__(self, model: Any, recipe: Recipe, *, layout: Any = None):
        self.model, self.recipe = model, recipe
        self.layout = layout  # a finetune.sharding.Layout, or None: one device
        self.assignment = plan(model, recipe)
        self.program: Program | None = None
        self.state: dict | None = None
        self.schedules: dict = {}
        self.stop_training = False
        self._last_call: tuple = ()  # the program and batch shapes of the last step call (see _before_call)

    # ---------------------------------------------------------------- building
    def build(self, sample: dict, *, total_steps: int | None, train: bool = True, predicting: bool = False) -> None:
        """Splits the model, builds the optimizer over the trainable parameters, and the steps (not yet compiled).

        ``predicting``: for `predict` alone, which models without a loss (feature extraction) may serve too."""
        trainable = {p for p in self.assignment.group_of if self.assignment.trainable(p)}
        if train and not trainable:
            raise ConfigError("Every parameter group is frozen (trainable=False), so there is nothing to train.")
        graphdef, eval_graphdef, params, frozen, rest = split(self.model.module, trainable)
        if self.recipe.precision == "bfloat16":
            graphdef, eval_graphdef = (
                _with_attributes(g, params, frozen, rest, dtype=jnp.bfloat16) for g in (graphdef, eval_graphdef)
            )
        if self.recipe.remat:  # each layer of the stack recomputed in the backward pass (train step only)
            graphdef = _with_attributes(graphdef, params, frozen, rest, remat=True)
        tx, self.schedules = (None, {})
        if train:
            decay = decay_mask(flatten(params), self.recipe.decay_rules)
            tx, self.schedules = optim.build(
                self.assignment, decay, self.recipe.optimizer_spec(), total_steps=total_steps
            )
        logits = jax.eval_shape(lambda: nnx.merge(eval_graphdef, params, frozen, rest)(**_inputs(sample)))
        if predicting and self.model.task == "feature-extraction":  # no loss: a program with no metrics
            family, names = "features", ()
        else:
            family = kind(self.model.task, logits.shape, sample.get("labels"))
            names = self.recipe.metrics or metrics_lib.DEFAULT_METRICS[family]
        if sample.get("labels") is not None:
            _record_problem_type(self.model, family)
        self.program = Program(
            graphdef,
            eval_graphdef,
            tx,
            loss_fn(self.model.task, self.recipe.loss),
            metrics_lib.resolve(names),
            int(logits.shape[-1]),
        )
        shardings = None
        if self.layout is not None:  # sharding: every array placed by its logical axes (finetune/sharding.py)
            self.layout.check_batch(sample)
            shardings = self.layout.state_shardings(
                self.model.module, jax.eval_shape(self.program.init_state, params, frozen, rest)
            )
            params, frozen, rest = (
                sharding_lib.place(t, shardings[k])
                for t, k in zip((params, frozen, rest), ("params", "frozen", "rest"), strict=True)
            )
        self.state = self.program.init_state(params, frozen, rest, shardings)
        if train:  # what each log reads (traced once, into the compiled read)
            self._log_values = lambda s: (s["acc"], optim.nonfinite_counts(s["opt"]), optim.current_lrs(s["opt"]))

    def _before_call(self, kind: str, batch: dict) -> None:
        """Before a step call of another program or batch shape than the last (which may compile, or need scratch
        of another size): the C allocator's defaults, and what it holds free goes back (`finetune.runtime.keep`). Kept
        scratch is for runs of calls of one shape; across shapes it would pile up."""
        call = (kind, *((k, np.shape(v)) for k, v in batch.items()))
        if call != self._last_call:
            self._last_call = call
            runtime.keep(False)

    def _after_call(self) -> None:
        """After a step call: the next call's scratch will be kept (`finetune.runtime.keep`, inside fit, evaluate and
        predict). A compile's freed memory went back to the OS before the program first ran (`runtime.kept_scratch`)."""
        runtime.keep(True)

    def sync_model(self) -> None:
        """Writes the trained state back into the NNX module."""
        if self.state is not None:
            nnx.update(self.model.module, self.state["params"], self.state["frozen"], self.state["rest"])

    def get_weights(self) -> dict:
        return jax.device_get(self.state["params"])

    def set_weights(self, params: dict) -> None:
        shardings = self.program.shardings
        params = sharding_lib.place(params, shardings["params"]) if shardings else jax.device_put(params)
        self.state = {**self.state, "params": params}

    # ---------------------------------------------------------------- loops
    def fit(self, train: Any, *, epochs: int, steps: int | None, batch_size: int, **options: Any) -> History:
        """Trains; see `finetune.Model.fit` for the options."""
        run = self._run = _Run(
            source=self._source(train, stage="fit", argument="train"), batch_size=batch_size, **options
        )
        if run.validation_data is not None:  # checked before the first step, not after the first epoch
            run.validation_data = self._source(run.validation_data, stage="evaluate", argument="validation_data")
        spe = self.recipe.steps_per_execution
        if spe != "auto" and spe > 1:
            if self.layout is not None:
                raise ConfigError(
                    f"`steps_per_execution`={spe} stacks batches for one device, and this run is sharded over a mesh. "
                    "Use steps_per_execution=1 or 'auto' with a mesh."
                )
            run.chunk = min(spe, self.recipe.log_every)  # a call never spans a log interval
        size = getattr(run.source, "size", None)
        if size is not None and batch_size > size:
            raise ConfigError(
                f"`batch_size`={batch_size} is larger than the training data ({size} examples), so every step would "
                f"be mostly padding. Use batch_size <= {size}, or more data."
            )
        if run.resume not in (True, False, None) and run.checkpoint_dir is None:
            run.checkpoint_dir = run.resume  # resume from a path, and keep writing there
        if run.checkpoint_dir is not None:
            _open_checkpoints(run)  # locks the directory: a second run into it is refused here
        try:
            return self._train(run, epochs=epochs, steps=steps)
        finally:
            if run.checkpointer is not None:
                run.checkpointer.release()  # also when fit fails before training (closed by `_finish` otherwise)

    def _train(self, run: _Run, *, epochs: int, steps: int | None) -> History:
        """The phases of `fit`, between opening the checkpoints and releasing them."""
        if run.resume_meta is not None:
            run.history = History.from_dict(run.resume_meta["history"])
        for cb in run.callbacks:
            cb.trainer = self
        for cb in run.callbacks:
            cb.on_train_begin()
        base = self.recipe
        phases = [(p["epochs"], _phase_recipe(base, p)) for p in base.phases] + [(epochs, base)]
        with contextlib.ExitStack() as stack:
            run.interrupts = stack.enter_context(signals.deferred(run.checkpointer is not None))
            stack.enter_context(runtime.kept_scratch())
            stack.callback(self._finish, run)
            for i, (phase_epochs, recipe) in enumerate(phases):
                if run.resume_meta is not None and i < run.resume_meta["phase"]:
                    run.epoch += phase_epochs  # finished before the checkpoint
                    continue
                self.recipe, self.assignment = recipe, plan(self.model, recipe)
                main = i == len(phases) - 1
                self._phase(run, i, epochs=phase_epochs, steps=steps if main else None)
                self.sync_model()
                if self.stop_training:
                    break
            for cb in run.callbacks:
                cb.on_train_end(run.history.history)
        return run.history

    def _finish(self, run: _Run) -> None:
        self.sync_model()
        if run.checkpointer is not None:
            run.checkpointer.close()

    def _phase(self, run: _Run, phase: int, *, epochs: int, steps: int | None) -> None:
        """One phase of training (the whole run unless the recipe has phases)."""
        per_epoch = run.source.steps(run.batch_size)
        accumulate = self.recipe.accumulate
        micro_total = steps * accumulate if steps else (epochs * per_epoch if per_epoch else None)
        if micro_total is None:
            raise ConfigError("The training data has no length; pass `steps` so fit knows when to stop.")
        if per_epoch and not steps and epochs * per_epoch < accumulate:
            raise ConfigError(f"Training is {epochs * per_epoch} micro-batches, fewer than `accumulate`={accumulate}.")
        epochs = epochs if not steps else (-(-micro_total // per_epoch) if per_epoch else 1 << 30)
        run.packed = self._packs(run.source, recorded=run.recorded_packed)
        self.build(
            next(run.source.batches(run.batch_size, seed=self.recipe.seed, pack=run.packed)),
            total_steps=micro_total // accumulate,
        )
        first_epoch, start, done = run.epoch, 0, 0
        if run.resume_meta is not None:
            first_epoch, start, done = self._restore(run)
        # The optimizer counts skipped steps from here (a resumed one, from its checkpoint's count).
        run.skipped_seen = nonfinite.skipped_so_far(self.state["opt"])
        if run.verbose:
            print(self.model.summary(recipe=self.recipe, trainer=self, printed=False))
        bar = tqdm(total=micro_total, initial=done, disable=run.verbose == 0, unit="step", dynamic_ncols=True)
        run.last = (done, time.perf_counter())
        try:
            for epoch in range(first_epoch, run.epoch + epochs):
                for cb in run.callbacks:
                    cb.on_epoch_begin(epoch)
                epoch_acc, run.epoch_skipped, run.epoch_first = self.program.zero_metrics(), 0, run.step + 1
                batches = run.source.batches(
                    run.batch_size,
                    seed=self.recipe.seed,
                    epoch=epoch,
                    start=start,
                    group=self.recipe.group_by_length,
                    pack=run.packed,
                )
                stream = enumerate(self._prefetch(batches), start=start)
                for index, n, batch in self._units(run, stream, done, micro_total):
                    step = self.program.train_step if n == 1 else self.program.train_steps
                    self._before_call("train", batch)
                    self.state = step(self.state, batch)
                    self._after_call()
                    done += n
                    run.step += n
                    epoch_acc = self._flush(run, epoch_acc, bar)  # the last interval's log, read while this runs
                    if done % self.recipe.log_every == 0 or done == micro_total:
                        self._start_log(run, done)
                        if run.chunk == 1 or done == micro_total:  # one step per call: report at once
                            epoch_acc = self._flush(run, epoch_acc, bar)
                    if (
                        run.save_every
                        and run.step % run.save_every == 0
                        and not (run.save_each_epoch and index + 1 == per_epoch)
                        and done < micro_total  # the last step is saved after its epoch, with the epoch's metrics
                    ):
                        epoch_acc = self._flush(run, epoch_acc, bar)
                        self._save(run, phase, epoch, index + 1, done)
                    if run.interrupts.signum is not None:
                        epoch_acc = self._flush(run, epoch_acc, bar)
                        if run.checkpointer is not None:
                            self._save(run, phase, epoch, index + 1, done)
                            run.checkpointer.wait()
                        run.interrupts.raise_now()
                    if done >= micro_total or self.stop_training:
                        break
                start = 0
                epoch_acc = self._flush(run, epoch_acc, bar)
                if done > run.last[0]:
                    self._start_log(run, done)
                    epoch_acc = self._flush(run, epoch_acc, bar)
                logs = {**metrics_lib.results(self.program.metrics, epoch_acc), "skipped_steps": run.epoch_skipped}
                if (run.epoch_first, run.step) != run.warned:  # not when the epoch was one interval, already named
                    nonfinite.warn_all_skipped(f"Epoch {epoch + 1}", run.epoch_skipped, run.epoch_first, run.step)
                if run.validation_data is not None:
                    logs.update(self.evaluate(run.validation_data, batch_size=run.batch_size, prefix="val_"))
                run.history.add_epoch(epoch, logs)
                for cb in run.callbacks:
                    cb.on_epoch_end(epoch, logs)
                finished = done >= micro_total or self.stop_training
                if run.checkpointer is not None and (run.save_each_epoch or finished):
                    self._save(run, phase, epoch + 1, 0, done, logs)
                if finished:
                    break
        finally:
            bar.close()
        run.epoch += epochs
        run.history.compilations.append(self.program.compilations())
        run.history.compiled_shapes = sorted(getattr(run.source, "shapes", ()))  # one per length bucket used

    def _units(self, run: _Run, stream: Any, done: int, micro_total: int) -> Any:
        """``(index of the last batch, steps, batch)``: single batches, or ``run.chunk`` of one shape stacked.

        A stack never crosses a log interval, a save or the end of training, so everything the loop does between
        steps (logs, callbacks, checkpoints, stopping) happens at the same steps as without stacking.
        """
        step, log_every, save_every = run.step, self.recipe.log_every, run.save_every
        for index, batch in stream:
            room = min(micro_total - done, log_every - done % log_every)
            if save_every:
                room = min(room, save_every - step % save_every)
            group = [(index, batch)]
            if run.chunk > 1 and room >= run.chunk:
                group.extend(itertools.islice(stream, run.chunk - 1))
                shapes = {tuple((k, v.shape, v.dtype) for k, v in sorted(b.items())) for _, b in group}
                if len(group) == run.chunk and len(shapes) == 1:
                    yield group[-1][0], len(group), {k: np.stack([b[k] for _, b in group]) for k in batch}
                    done, step = done + len(group), step + len(group)
                    continue
            for i, b in group:  # one at a time (a shape change inside the stack, or the data ran out)
                yield i, 1, b
                done, step = done + 1, step + 1

    def _choose_chunk(self, run: _Run, seconds_per_step: float) -> None:
        """``steps_per_execution='auto'``: stack steps when a step is so short that the per-call cost matters."""
        if self.recipe.steps_per_execution != "auto" or run.chunk_decided or self.layout is not None:
            return
        run.chunk_decided = True
        if seconds_per_step < _AUTO_CHUNK_BELOW_S:
            run.chunk = min(self.recipe.log_every, _AUTO_CHUNK_MAX)

    def _save(self, run: _Run, phase: int, epoch: int, batch: int, done: int, metrics: dict | None = None) -> None:
        if run.checkpointer.latest() == run.step:  # saved already (an interrupt right after a periodic save)
            return
        meta = {
            "phase": phase,
            "epoch": epoch,
            "batch": batch,
            "done": done,
            "step": run.step,
            "recipe": self.recipe.to_dict(),
            "packed": run.packed,  # what `packing=None` meant for this run (the architectures that pack may grow)
            "data": run.data,  # compared on resume: other data or another batch size is another run
            "history": run.history.to_dict(),
            "fingerprint": fingerprint(self.state),
        }
        run.checkpointer.save(run.step, self.state, meta, metrics)

    def _restore(self, run: _Run) -> tuple[int, int, int]:
        """Loads the checkpoint into the freshly built state; returns ``(epoch, batch, micro-steps done)``.

        A recipe's ``packing=None`` means what each run did with it: ``run.packed`` here, the checkpoint's ``packed``
        there."""
        meta = run.resume_meta
        if meta["fingerprint"] != fingerprint(self.state):
            raise ConfigError(
                f"Cannot resume from {str(run.checkpointer.directory)!r}: it holds a checkpoint of a different model "
                "(other parameter names, shapes or frozen groups). Resume with the same model and recipe, or use a "
                "new checkpoint_dir."
            )
        saved = _with_packing(meta["recipe"], meta.get("packed", run.packed))
        current = _with_packing(self.recipe.to_dict(), run.packed)
        changed = _recipe_changes(saved, current)
        if changed:
            raise ConfigError(
                f"Cannot resume from {str(run.checkpointer.directory)!r}: the recipe differs in {', '.join(changed)}. "
                "Resume with the recipe of the checkpointed run, or start a new checkpoint_dir."
            )
        changes = data_changes(meta.get("data"), run.data)
        if changes and not run.allow_changed_data:
            raise CheckpointError(
                f"Cannot resume from `checkpoint_dir`={str(run.checkpointer.directory)!r}: the checkpointed run "
                f"trained on other data ({'; '.join(changes)}), so this would not continue that run. Pass the data and "
                "batch_size of that run; or fit(..., allow_changed_data=True) to continue from the checkpoint on this "
                "data; or start a new checkpoint_dir."
            )
        self.state, meta = run.checkpointer.restore_intact(
            meta, self.state, accept=lambda m: m["phase"] == run.resume_meta["phase"]
        )
        if meta["step"] != run.resume_meta["step"]:  # the newest step was damaged: an older one's history
            run.history = History.from_dict(meta["history"])
        run.step, run.resume_meta = meta["step"], None
        epoch, batch = meta["epoch"], meta["batch"]
        if changes:  # allowed: continue after the examples the checkpointed run had seen in its epoch
            logger.warning("Resuming on changed data (%s), as allow_changed_data=True asks.", "; ".join(changes))
            batch = batch * meta["data"]["batch_size"] // run.batch_size
            if batch >= (run.source.steps(run.batch_size) or batch + 1):
                epoch, batch = epoch + 1, 0
        return epoch, batch, meta["done"]

    def _start_log(self, run: _Run, step: int) -> None:
        """Starts the read of one log interval (metric sums, skipped steps, learning rates); `_flush` reports it.

        With several steps per call the report waits until the next call is on its way, so the device never idles
        while the host handles a log; with one step per call (big models) it is reported at once.
        """
        run.pending = (self.program.start_read(self.state, self._log_values), step, run.step)
        self.state = {**self.state, "acc": run.pending[0][1]}

    def _flush(self, run: _Run, epoch_acc: dict, bar: Any) -> dict:
        """Reports the pending log interval, if any: history, progress bar, callbacks."""
        if run.pending is None:
            return epoch_acc
        ((flat, _), step, global_step), run.pending = run.pending, None
        # Only scalars and metric sums come to the host (the moments may span hosts), in one transfer.
        acc, (consecutive, total), lrs = self.program.finish_read(flat)
        epoch_acc = jax.tree.map(lambda a, b: np.asarray(a) + b, epoch_acc, acc)
        if int(consecutive) >= self.recipe.max_nonfinite:
            limit = self.recipe.max_nonfinite
            raise nonfinite.error(
                self.state, step=step, consecutive=int(consecutive), limit=limit, global_step=run.step
            )
        skipped, run.skipped_seen = int(total) - run.skipped_seen, int(total)
        run.epoch_skipped += skipped
        first = global_step - (step - run.last[0]) + 1  # the interval's first step
        if nonfinite.warn_all_skipped("The log interval", skipped, first, global_step):
            run.warned = (first, global_step)
        logs = metrics_lib.results(self.program.metrics, acc)
        logs.update({f"lr/{g}": float(v) for g, v in lrs.items()})
        now = time.perf_counter()
        logs["examples_per_s"] = (step - run.last[0]) * run.batch_size / max(now - run.last[1], 1e-9)
        logs["skipped"], logs["skipped_steps"] = int(total), skipped  # so far in this phase; in this interval
        run.history.add_step(global_step, logs)
        bar.update(step - bar.n)
        hidden = ("skipped", "examples_per_s") + (("skipped_steps",) if not skipped else ())
        shown = {k: v for k, v in logs.items() if not k.startswith("lr/") and k not in hidden}
        lrs = {k[3:]: v for k, v in logs.items() if k.startswith("lr/")}
        if lrs:  # one LR when the groups share it, else each group's
            shown.update(
                {"lr": max(lrs.values())} if len(set(lrs.values())) == 1 else {f"lr_{g}": v for g, v in lrs.items()}
            )
        shown["ex/s"] = logs["examples_per_s"]
        bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()})
        for cb in run.callbacks:
            cb.on_step_end(global_step, logs)
        run.logs += 1
        if run.logs == 2:  # the first interval holds the compilation
            self._choose_chunk(run, (now - run.last[1]) / max(step - run.last[0], 1))
        run.last = (step, now)
        return epoch_acc

    def _prefetch(self, batches: Any) -> Any:
        """Batches for the steps; with a mesh, put on device split over its data axis (each process its own rows).

        On one device the host arrays go straight into the compiled step, whose argument handling moves them (in
        compiled code: cheaper than a separate `jax.device_put`, which costs more than a small model's whole step).
        Where steps run on the calling thread (CPU, `finetune.runtime`), batches are made on a background thread, and
        there too their big arrays are put on the device and waited for (`_ready`).
        """
        if self.layout is not None:
            return data_lib.prefetch(map(self.layout.put_batch, batches), sharding=self.layout.batch)
        if runtime.runs_inline():  # steps run on this thread: the next batch is made meanwhile on another
            return data_lib.prefetch_on_thread(batches, put=_ready)
        return batches

    def _packs(self, source: Any, *, recorded: bool | None = None) -> bool:
        """Whether training batches are packed (`finetune.Recipe.packing`; causal LM packs its rows beforehand).

        ``packing=None`` packs where it can, which differs between one device and a mesh; a resumed run keeps the
        layout its checkpoint ``recorded``, so a checkpoint resumes on any mesh or device count (a packed run cannot
        continue packed on a mesh, and is refused there)."""
        wanted, task = self.recipe.packing, self.model.task
        if wanted is False or task != "text-classification":
            return False
        module = self.model.module
        reasons = [
            (not getattr(module, "supports_packing", False), f"the {type(module).__name__} architecture lacks it"),
            (not getattr(source, "sequences", None), "the training data are not token sequences tokenized by finetune"),
            (self.layout is not None or jax.process_count() > 1, "training is sharded over a mesh or several hosts"),
        ]
        reason = next((why for failed, why in reasons if failed), None)
        if wanted is None and recorded is not None:
            if recorded and reason is not None:
                raise ConfigError(
                    f"Cannot resume here: the checkpointed run packed its batches (packing=None), and {reason}, so "
                    "this run cannot continue its data order. Resume where it can pack (on one device), or start a "
                    "new checkpoint_dir (with packing=False to train the same way on every mesh)."
                )
            return recorded
        if reason is not None and wanted is True:
            raise ConfigError(
                f"packing=True cannot be used here: {reason}. Pass packing=None (the default: packed where supported) "
                "or packing=False (batches padded to length buckets)."
            )
        return reason is None

    def _source(self, data: Any, *, max_length: int | None = None, **options: Any) -> Any:
        """The data as a source of batches; ``max_length``: the truncation when the recipe sets none."""
        if options.get("stage") == "fit" and self.recipe.packing and self.model.task != "text-classification":
            options["packing"] = True
        return data_lib.as_source(
            data,
            task=self.model.task,
            model=self.model,
            max_length=self.recipe.max_length or max_length,
            columns=self.recipe.columns,
            **options,
        )

    def evaluate(self, data: Any, *, batch_size: int, prefix: str = "") -> dict[str, float]:
        source = self._source(data, stage="evaluate")
        if self.program is None:
            self.build(next(source.batches(batch_size, seed=None)), total_steps=None, train=False)
        acc = self.program.zero_metrics()
        with runtime.kept_scratch():
            for batch in self._prefetch(source.batches(batch_size, seed=None)):
                self._before_call("eval", batch)
                acc = self.program.eval_step(self.state, acc, batch)
                self._after_call()
        return metrics_lib.results(self.program.metrics, jax.device_get(acc), prefix)

    def predict(
        self, data: Any, *, batch_size: int, outputs: Sequence[str] | None = None, pooling: Any = None
    ) -> dict[str, Any]:
        """The task's outputs (`finetune.training.tasks.predictions`) for every real example, computed on the device
        batch by batch, padding rows dropped, gathered on the host."""
        token_level = self.model.task in ("token-classification", "causal-lm", "feature-extraction")
        padding = "longest" if token_level else "buckets"
        source = self._source(data, stage="predict", padding=padding, max_length=getattr(pooling, "max_length", None))
        first = next(source.batches(batch_size, seed=None))
        if self.program is None:
            self.build(first, total_steps=None, train=False, predicting=True)
        family = predict_family(self.model.task, self.program.num_classes, self.model.family)
        names = output_names(family, outputs)
        step, parts = self.program.predictor(family=family, names=names, pooling=pooling), []
        with runtime.kept_scratch():
            for batch in self._prefetch(source.batches(batch_size, seed=None)):
                self._before_call("predict", batch)
                values = step(self.state, batch)
                self._after_call()
                parts.append((values, batch["example_mask"]))
        return collect([(jax.device_get(values), np.asarray(mask)) for values, mask in parts])


# XLA:CPU copies a host array of this many bytes or more into a step's arguments on a worker thread, and a step
# whose argument is not ready yet runs on that thread too, where its scratch memory cannot be kept (`finetune.runtime`).
_INLINE_COPY_BYTES = 100 * 1024


def _ready(batch: dict) -> dict:
    """``batch`` with its arrays of `_INLINE_COPY_BYTES` or more on the device, copied (smaller ones are copied at
    once when the step is called)."""
    big = {k: v for k, v in batch.items() if getattr(v, "nbytes", 0) >= _INLINE_COPY_BYTES}
    return {**batch, **jax.block_until_ready(jax.device_put(big))} if big else batch


@dataclasses.dataclass
class _Run:
    """The state of one `fit` call that outlives a phase: data, callbacks, progress, checkpointing."""

    source: Any
    batch_size: int
    validation_data: Any = None
    callbacks: Sequence[Callback] = ()
    verbose: int = 1
    checkpoint_dir: Any = None
    save_every: int | None = None
    save_each_epoch: bool = True
    keep: int = 3
    monitor: str | None = None
    resume: Any = False
    allow_changed_data: bool = False  # resume although the data or batch size differ from the checkpoint's
    data: dict | None = None  # what identifies the training data (`finetune.training.checkpoint.data_record`)
    checkpointer: Checkpointer | None = None
    resume_meta: dict | None = None
    history: History = dataclasses.field(default_factory=History)
    epoch: int = 0
    step: int = 0
    last: tuple = (0, 0.0)
    logs: int = 0  # host reads so far
    chunk: int = 1  # steps per call of the compiled program
    chunk_decided: bool = False
    packed: bool = False  # whether this run packs its training batches (`Trainer._packs`)
    skipped_seen: int = 0  # the optimizer's count of skipped steps at the last log read
    epoch_skipped: int = 0  # steps skipped in the current epoch
    epoch_first: int = 1  # the current epoch's first step
    warned: tuple = ()  # the steps of the last interval warned about as all skipped
    recorded_packed: bool | None = None  # whether the checkpointed run packed (a resumed run keeps its layout)
    pending: Any = None  # a log interval being read: ((flat values, zeroed sums), step in phase, global step)
    interrupts: signals.Interrupts = dataclasses.field(default_factory=signals.Interrupts)


# steps_per_execution='auto' stacks steps when one takes less than this, up to this many per call.
_AUTO_CHUNK_BELOW_S = 0.005
_AUTO_CHUNK_MAX = 64

# Fields that may change between a run and its resumption without changing what the next step computes.
_RESUMABLE_CHANGES = {"epochs", "steps", "log_every", "steps_per_execution", "description", "provenance", "name"}


# Recipe fields added after checkpoints were first written, with the behaviour of runs from before them.
_FIELDS_BEFORE_THEY_EXISTED = {"remat": False, "group_by_length": False}


def _with_packing(recipe: dict, pack: bool) -> dict:
    """``recipe`` with ``packing`` as the run applies it: ``None`` (the default) packs or not as the run did
    (``pack``: the checkpoint's ``packed``, or for checkpoints from before that record, as this run does). So a
    checkpoint written before the default (``False``) resumes wherever nothing is packed, and a resumed run with
    ``packing=None`` keeps the layout its checkpoint recorded (`Trainer._packs`); an explicit ``packing`` that differs
    from that layout is refused, naming ``packing``."""
    packing = recipe.get("packing", False)
    return {**recipe, "packing": pack if packing is None else bool(packing)}


def _recipe_changes(saved: dict, current: dict) -> list[str]:
    saved = {**_FIELDS_BEFORE_THEY_EXISTED, **saved}
    return sorted(
        k for k in set(saved) | set(current) if k not in _RESUMABLE_CHANGES and saved.get(k) != current.get(k)
    )


def _open_checkpoints(run: _Run) -> None:
    """Locks ``run.checkpoint_dir`` (`finetune.training.checkpoint.Checkpointer`), records what identifies the run's
    data, and reads the metadata of the checkpoint to resume from (None: start fresh)."""
    run.checkpointer = Checkpointer(run.checkpoint_dir, keep=run.keep, monitor=run.monitor, lock=True)
    try:
        run.data = data_record(run.source, run.batch_size)
        run.resume_meta = _resume_meta(run)
        if run.resume_meta is not None:
            run.recorded_packed = run.resume_meta.get("packed")
    except BaseException:
        run.checkpointer.release()
        raise


def _resume_meta(run: _Run) -> dict | None:
    """The metadata of the checkpoint to resume from, or None to start fresh."""
    if not run.resume:
        return None
    if run.resume is not True:
        if os.path.abspath(run.resume) != os.path.abspath(run.checkpoint_dir):
            run.checkpointer.release()  # the run writes where it resumes from
            run.checkpointer = Checkpointer(run.resume, keep=run.keep, monitor=run.monitor, lock=True)
        if run.checkpointer.latest() is None:
            raise LoadError(
                f"`resume`={str(run.resume)!r} holds no complete checkpoint to resume from. Pass the checkpoint_dir "
                "of an earlier run, or resume=True to continue only when a checkpoint exists."
            )
    return run.checkpointer.newest_meta()


def _record_problem_type(model: Any, family: str) -> None:
    """Remembers single- / multi-label / regression for `predict`, and for exported configs (transformers reads it)."""
    model.family = family
    types = {"single": "single_label_classification", "multi": "multi_label_classification", "regression": "regression"}
    if model.hf_config is not None and family in types and model.task != "token-classification":
        model.hf_config.problem_type = types[family]


def _inputs(batch: dict) -> dict:
    from finetune.training.tasks import model_inputs

    return {k: jnp.asarray(v) for k, v in model_inputs(batch).items()}


def _with_attributes(graphdef: Any, params: dict, frozen: dict, rest: dict, **attributes: Any) -> Any:
    """The same graph with ``attributes`` set on every module that has them (e.g. ``dtype``: the compute dtype;
    parameters keep their storage dtype)."""
    module = nnx.merge(graphdef, params, frozen, rest)
    module.set_attributes(**attributes, raise_if_not_found=False)
    return nnx.graphdef(module)
