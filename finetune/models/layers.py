"""The layer stack of every architecture, with optional rematerialisation (`finetune.Recipe.remat`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flax import nnx


def run_layers(layers: Sequence[nnx.Module], x: Any, *args: Any, remat: bool = False) -> Any:
    """``x`` through each layer in turn (``layer(x, *args)``).

    With ``remat``, each layer is rematerialised on its own: the backward pass keeps only the layer's inputs and
    recomputes its forward one layer at a time, so at most one layer's activations are alive at once (one
    checkpoint around the whole model would recompute them all together, saving nothing).
    """
    if not remat:
        for layer in layers:
            x = layer(x, *args)
        return x
    step = nnx.remat(lambda layer, h, *a: layer(h, *a))
    for layer in layers:
        x = step(layer, x, *args)
    return x
