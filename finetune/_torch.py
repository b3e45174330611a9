"""Reading Hugging Face configs and tokenizers without importing PyTorch.

When torch is installed, transformers' configuration and tokenizer modules import it at module level
(``configuration_utils`` through ``modeling_rope_utils``, ``utils.generic``), although reading a config or
tokenizing text never calls it. For finetune that import is pure cost, more than any other part of loading a small
model (docs/performance.md, "finetune/_torch.py").

`deferred()` hands those imports a stand-in module. The stand-in imports the real torch on its first attribute use
(``torch.Tensor``, ``torch.nn``, ...) and forwards to it, so code holding it keeps working. It sits in
``sys.modules`` only inside the ``with`` block: afterwards ``import torch`` anywhere gets the real module, and
libraries that test ``"torch" in sys.modules`` to decide whether torch is in use (``datasets`` does) see that it is
not. A process that has imported torch already is left as it is.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import threading
import types
from collections.abc import Iterator

_lock = threading.RLock()


class _Deferred(types.ModuleType):
    """Stands in for ``torch``; the first attribute lookup imports the real module and answers from it."""

    def __getattr__(self, name: str):
        with _lock:
            if sys.modules.get("torch") is self:  # used inside the window: put the real module in its place
                del sys.modules["torch"]
            real = importlib.import_module("torch")
        return getattr(real, name)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Inside the block, a module-level ``import torch`` binds a stand-in that imports torch on first use."""
    with _lock:
        spec = None if "torch" in sys.modules else importlib.util.find_spec("torch")
        if spec is None:  # torch already imported, or not installed: nothing to defer
            stand_in = None
        else:
            stand_in = _Deferred("torch")
            # What import machinery and find_spec() read without touching the real module; no __path__, so
            # importing a submodule (torch.nn) asks __getattr__ for it and gets the real package first.
            stand_in.__spec__, stand_in.__file__, stand_in.__loader__ = spec, spec.origin, spec.loader
            sys.modules["torch"] = stand_in
    try:
        yield
    finally:
        if stand_in is not None:
            with _lock:
                if sys.modules.get("torch") is stand_in:
                    del sys.modules["torch"]


def torch_imported() -> bool:
    """Whether the real torch has been imported in this process."""
    module = sys.modules.get("torch")
    return module is not None and not isinstance(module, _Deferred)
