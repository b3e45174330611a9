"""What the trainer feeds its steps: the data as a source of batches (`source`), whether training batches are
packed (`packs`), and the batches on their way to the device (`prefetch`)."""

from __future__ import annotations

from typing import Any

import jax

from finetune import data as data_lib
from finetune import runtime
from finetune.errors import ConfigError


def source(model: Any, recipe: Any, data: Any, *, max_length: int | None = None, **options: Any) -> Any:
    """The data as a source of batches; ``max_length``: the truncation when the recipe sets none."""
    if options.get("stage") == "fit" and recipe.packing and model.task != "text-classification":
        options["packing"] = True
    return data_lib.as_source(
        data,
        task=model.task,
        model=model,
        max_length=recipe.max_length or max_length,
        columns=recipe.columns,
        **options,
    )


def packs(model: Any, recipe: Any, data: Any, *, layout: Any, recorded: bool | None = None) -> bool:
    """Whether training batches are packed (`finetune.Recipe.packing`; causal LM packs its rows beforehand).

    ``packing=None`` packs where it can, which differs between one device and a mesh; a resumed run keeps the
    layout its checkpoint ``recorded``, so a checkpoint resumes on any mesh or device count (a packed run cannot
    continue packed on a mesh, and is refused there)."""
    wanted, task = recipe.packing, model.task
    if wanted is False or task != "text-classification":
        return False
    module = model.module
    reasons = [
        (not getattr(module, "supports_packing", False), f"the {type(module).__name__} architecture lacks it"),
        (not getattr(data, "sequences", None), "the training data are not token sequences tokenized by finetune"),
        (layout is not None or jax.process_count() > 1, "training is sharded over a mesh or several hosts"),
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


def prefetch(batches: Any, layout: Any) -> Any:
    """Batches for the steps; with a mesh, put on device split over its data axis (each process its own rows).

    On one device the host arrays go straight into the compiled step, whose argument handling moves them (in
    compiled code: cheaper than a separate `jax.device_put`, which costs more than a small model's whole step).
    Where steps run on the calling thread (CPU, `finetune.runtime`), batches are made on a background thread, and
    there too their big arrays are put on the device and waited for (`ready`).
    """
    if layout is not None:
        return data_lib.prefetch(map(layout.put_batch, batches), sharding=layout.batch)
    if runtime.runs_inline():  # steps run on this thread: the next batch is made meanwhile on another
        return data_lib.prefetch_on_thread(batches, put=ready)
    return batches


# XLA:CPU copies a host array of this many bytes or more into a step's arguments on a worker thread, and a step
# whose argument is not ready yet runs on that thread too, where its scratch memory cannot be kept (`finetune.runtime`).
INLINE_COPY_BYTES = 100 * 1024


def ready(batch: dict) -> dict:
    """``batch`` with its arrays of `INLINE_COPY_BYTES` or more on the device, copied (smaller ones are copied at
    once when the step is called)."""
    big = {k: v for k, v in batch.items() if getattr(v, "nbytes", 0) >= INLINE_COPY_BYTES}
    return {**batch, **jax.block_until_ready(jax.device_put(big))} if big else batch
