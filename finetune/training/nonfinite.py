"""Skipped (non-finite) steps: the warning for an interval or epoch that measured nothing, and a `NonFiniteError`
that says what is true of the parameters.

A step whose loss or gradients are non-finite is skipped (`finetune.optim.skip_nonfinite`): the parameters, the
optimizer state and the metric sums stay as they were. So an interval or epoch whose steps were all skipped has no
example in its sums, and its metrics are NaN (`finetune.metrics.Metric.result`), never 0.0.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from finetune import optim
from finetune.errors import NonFiniteError
from finetune.params.rules import flatten


def _host_int(x: jax.Array) -> int:
    return int(np.asarray(x.addressable_data(0)))  # replicated: every process holds the value


def skipped_so_far(opt_state: Any) -> int:
    """The optimizer's count of skipped steps (of this phase, or since the start for a resumed one)."""
    return _host_int(optim.nonfinite_counts(opt_state)[1])


def warn_all_skipped(what: str, skipped: int, first: int, last: int) -> bool:
    """Warns when every step of ``first..last`` (an interval or an epoch) was skipped; returns whether it warned."""
    steps = last - first + 1
    if not skipped or skipped < steps:
        return False
    span, every, verb = (
        (f"step {last}", "its one step", "was")
        if steps == 1
        else (f"steps {first}-{last}", f"all {steps} steps", "were")
    )
    warnings.warn(
        f"{what} of {span}: {every} had a non-finite loss or gradients and {verb} skipped, so its loss and metrics "
        "are NaN (nothing was measured) and the parameters did not change. Check the data for NaN/inf, lower the "
        "learning rate or clip harder.",
        RuntimeWarning,
        stacklevel=3,
    )
    return True


def error(state: dict, *, step: int, consecutive: int, limit: int, global_step: int) -> NonFiniteError:
    """The error that stops training after ``consecutive`` skipped steps, stating whether the parameters in
    ``state`` are finite (read from the device: a finite gradient can give a non-finite update, as a NaN learning
    rate does, so the parameters may be NaN though every skipped step left them alone)."""
    finite = flatten(jax.jit(lambda p: jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), p))(state["params"]))
    bad = sorted(path for path, ok in finite.items() if not _host_int(ok))
    applied = global_step - _host_int(optim.nonfinite_counts(state["opt"])[0])  # the skipped ones since changed none
    stopped = (
        f"Training stopped at step {step}: {consecutive} consecutive steps had a non-finite loss or gradients (limit "
        f"`max_nonfinite`={limit}), and were skipped."
    )
    if not bad:
        source = f"after step {applied}, the last step applied" if applied else "the initial ones (no step was applied)"
        return NonFiniteError(
            f"{stopped} The parameters are finite: they are those {source}. Typical causes: NaN/inf in the data or "
            "labels, a `learning_rate` too high for the model (or a group's `lr_mult`), too little clipping "
            "(`clip_norm`), or `precision`='bfloat16' overflowing. Check the data, lower the learning rate or clip "
            "harder (preset 'stable')."
        )
    held = f"{len(bad)} of {len(finite)} tensors hold NaN or inf (e.g. {', '.join(bad[:3])})"
    if not applied:
        return NonFiniteError(
            f"{stopped} The parameters are NOT finite, and were not before training either (no step was applied): "
            f"{held}. Check the checkpoint the model was loaded from (or its initialization)."
        )
    return NonFiniteError(
        f"{stopped} The parameters are NOT finite: {held}, since step {applied} or earlier (the last step applied; "
        "the steps since were skipped). A finite gradient gave a non-finite update, typically from a non-finite or "
        "huge `learning_rate`, `weight_decay`, a group's `lr_mult` or an `optimizer_options` value (or the model "
        "held them before training). Do not use these parameters: fix the recipe and train again, or resume from a "
        "checkpoint written before that step."
    )
