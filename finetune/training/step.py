"""The train and eval steps: free functions compiled once over pure state.

The model is split once into a static graphdef and pure dicts: ``params`` (trainable), ``frozen`` (parameters of
frozen groups: no gradient is computed for them) and ``rest`` (RNG state and other variables). One step is a
`jax.jit` of a pure function of that state and a batch, with the state donated, so no NNX graph traversal happens per
step and the buffers are updated in place. Metrics are sums in the state; the host reads them only at log intervals.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from finetune import metrics as metrics_lib
from finetune import optim
from finetune.params.rules import path_str
from finetune.training.tasks import model_inputs, predictions

State = dict[str, Any]


def split(module: nnx.Module, trainable: set[str]) -> tuple[Any, Any, dict, dict, dict]:
    """``(train graphdef, eval graphdef, params, frozen, rest)``: the module as static structure plus pure dicts."""
    is_trainable = lambda path, x: isinstance(x, nnx.Param) and path_str(path) in trainable  # noqa: E731
    graphdef, params, frozen, rest = nnx.split(module, is_trainable, nnx.Param, ...)  # type: ignore[misc]
    eval_view = nnx.view(module, deterministic=True, raise_if_not_found=False)
    eval_graphdef = nnx.split(eval_view, is_trainable, nnx.Param, ...)[0]
    return graphdef, eval_graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(frozen), nnx.to_pure_dict(rest)


@dataclasses.dataclass
class Program:
    """The compiled steps of one (model structure, optimizer, loss, metrics) combination."""

    graphdef: Any
    eval_graphdef: Any
    tx: optim.SkipNonfinite | optax.GradientTransformation | None
    loss: Callable
    metrics: Sequence[metrics_lib.Metric]
    num_classes: int

    def __post_init__(self):
        self.shardings: State | None = None
        self.train_step = jax.jit(self._train_step, donate_argnums=0)
        self.train_steps = jax.jit(self._train_steps, donate_argnums=0)
        self.eval_step = jax.jit(self._eval_step, donate_argnums=1)
        self._predictors: dict[tuple, Callable] = {}  # predict steps by outputs (`predictor`)
        self._zeros = jax.jit(self._zero_metrics)  # one call, not one per metric sum
        # The optimizer step as a nested jit: traced once, then reused by the train step of every batch shape (it
        # does not depend on the batch); XLA inlines it, so each compiled step is what a flat trace gives.
        self._apply = jax.jit(functools.partial(optim.apply_step, self.tx)) if self.tx is not None else None

    def init_state(self, params: dict, frozen: dict, rest: dict, shardings: State | None = None) -> State:
        """The state before the first step.

        With ``shardings`` (a `State` of shardings, from `finetune.sharding.Layout.state_shardings`; ``params``,
        ``frozen`` and ``rest`` already placed), the optimizer state and the sums are created directly in their
        shardings, and the steps return the state in exactly those shardings, so the layout never drifts.
        """
        if shardings is None:
            return {
                "params": params,
                "frozen": frozen,
                "rest": rest,
                # One compiled program: optax's init run eagerly compiles one per distinct leaf shape (19 for
                # MiniLM's AdamW, 0.7 s at every fit).
                "opt": jax.jit(self.tx.init)(params) if self.tx is not None else None,
                "step": jnp.zeros((), jnp.int32),
                "acc": self.zero_metrics(),
            }
        self.shardings = shardings
        self.train_step = jax.jit(self._train_step, donate_argnums=0, out_shardings=shardings)
        self.eval_step = jax.jit(self._eval_step, donate_argnums=1, out_shardings=shardings["acc"])
        self._predictors = {}  # rebuilt with the shardings: their outputs gathered, host-readable
        opt = jax.jit(self.tx.init, out_shardings=shardings["opt"])(params) if self.tx is not None else None
        step = jax.jit(lambda: jnp.zeros((), jnp.int32), out_shardings=shardings["step"])()
        self._zeros = jax.jit(self._zero_metrics, out_shardings=shardings["acc"])
        return {"params": params, "frozen": frozen, "rest": rest, "opt": opt, "step": step, "acc": self.zero_metrics()}

    def _zero_metrics(self) -> dict:
        return metrics_lib.init(self.metrics, self.num_classes)

    def zero_metrics(self) -> dict:
        return self._zeros()

    def forward(self, graphdef, params, frozen, rest, batch):
        """The logits of ``batch`` and the module's new non-parameter state (dropout RNG counts, ...)."""
        model = nnx.merge(graphdef, params, frozen, rest)
        logits = model(**model_inputs(batch))
        return logits, nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))

    def _train_step(self, state: State, batch: dict) -> State:
        def objective(params):
            logits, rest = self.forward(self.graphdef, params, state["frozen"], state["rest"], batch)
            loss, scored = self.loss(logits, batch)
            return loss, (metrics_lib.update(self.metrics, state["acc"], scored), rest)

        (loss, (acc, rest)), grads = jax.value_and_grad(objective, has_aux=True)(state["params"])
        params, opt = self._apply(grads, state["opt"], state["params"])
        # A skipped (non-finite) step leaves the parameters alone (optim.apply_step) and the metric sums too: a step
        # is measured only if it was applied, so an interval whose steps were all skipped has no example (NaN), even
        # when its losses were finite and only the gradients were not.
        finite = jnp.isfinite(loss)
        if isinstance(opt, optax.ApplyIfFiniteState):
            finite = jnp.logical_and(finite, opt.last_finite)
        acc = jax.tree.map(lambda new, old: jnp.where(finite, new, old), acc, state["acc"])
        return {**state, "params": params, "opt": opt, "rest": rest, "acc": acc, "step": state["step"] + 1}

    def _train_steps(self, state: State, batches: dict) -> State:
        """Several train steps in one call: a scan over batches stacked on a leading axis."""
        return jax.lax.scan(lambda s, batch: (self._train_step(s, batch), None), state, batches)[0]

    def _eval_step(self, state: State, acc: dict, batch: dict) -> dict:
        logits, _ = self.forward(self.eval_graphdef, state["params"], state["frozen"], state["rest"], batch)
        _, scored = self.loss(logits, batch)
        return metrics_lib.update(self.metrics, acc, scored)

    def predictor(self, **options: Any) -> Callable[[State, dict], dict[str, jax.Array]]:
        """The predict step: the forward pass and `finetune.training.tasks.predictions` (``options``: ``family``,
        ``names``, ``pooling``) in one compiled program per batch shape, returning only the requested outputs."""
        key = tuple(sorted(options.items()))
        if key not in self._predictors:

            def step(state: State, batch: dict) -> dict[str, jax.Array]:
                logits, _ = self.forward(self.eval_graphdef, state["params"], state["frozen"], state["rest"], batch)
                return predictions(logits, batch, **options)

            out = None if self.shardings is None else self.shardings["step"]  # replicated: host-readable
            self._predictors[key] = jax.jit(step, out_shardings=out)
        return self._predictors[key]

    def start_read(self, state: State, select: Callable[[State], Any]) -> tuple[jax.Array, dict]:
        """``(select(state) packed on device, zeroed metric sums)``, in one asynchronous call; see `finish_read`.

        ``select`` picks small arrays (metric sums, counters, learning rates) out of the state; they travel packed
        into one float32 vector (every value here is a float32 sum or a count below 2**24), which costs one host
        transfer instead of one per array.
        """
        if getattr(self, "_read_select", None) is not select:
            leaves, treedef = jax.tree.flatten(jax.eval_shape(select, state))

            def read(s):
                values = [jnp.ravel(x).astype(jnp.float32) for x in jax.tree.leaves(select(s))]
                return jnp.concatenate(values) if values else jnp.zeros((0,), jnp.float32), self._zero_metrics()

            out = None if self.shardings is None else (self.shardings["step"], self.shardings["acc"])  # replicated
            self._read_select, self._read_layout = select, (leaves, treedef)
            self._read = jax.jit(read, out_shardings=out)
        return self._read(state)

    def finish_read(self, flat: jax.Array) -> Any:
        """The values `start_read` packed, on the host in their own shapes and dtypes (waits for the device)."""
        host, (leaves, treedef) = np.asarray(flat), self._read_layout
        values, at = [], 0
        for leaf in leaves:
            n = int(np.prod(leaf.shape))
            values.append(host[at : at + n].reshape(leaf.shape).astype(leaf.dtype))
            at += n
        return jax.tree.unflatten(treedef, values)

    def compilations(self) -> int:
        """How many shapes the train step (single, or several per call) has been compiled for."""
        return self.compiled("train_step") + self.compiled("train_steps")

    def compiled(self, step: str) -> int:
        """How many shapes one step (``train_step``, ``train_steps``: several per call, ``eval_step``) has been
        compiled for."""
        return getattr(self, step)._cache_size()


def inference(module: nnx.Module) -> Callable[[Any, dict], jax.Array]:
    """The module's forward pass in inference mode (no dropout), compiled: ``(nnx.state(module), inputs) -> logits``.

    Traced for the module's structure as it is now: a module that changes structure (adapters) needs a new one."""
    graphdef, _ = nnx.split(nnx.view(module, deterministic=True, raise_if_not_found=False))

    @jax.jit
    def infer(state, inputs):
        return nnx.merge(graphdef, state)(**inputs)

    return infer
