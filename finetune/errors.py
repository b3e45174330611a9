"""Exceptions raised by finetune.

Every error finetune raises on bad input is a `FinetuneError`, with a message that names the argument, the value
received, what is allowed, and how to fix it. The subclasses also derive from the matching builtin so that code
catching `ValueError` / `FileNotFoundError` keeps working.
"""

from __future__ import annotations


class FinetuneError(Exception):
    """Base class of every error finetune raises on purpose."""


class ConfigError(FinetuneError, ValueError):
    """A bad argument, recipe field, rule or group."""


class RulesError(ConfigError):
    """Parameter-group rules that do not cover the model, match nothing, or name an unknown group."""


class LoadError(FinetuneError, ValueError):
    """A checkpoint that cannot be resolved, read, or mapped onto the architecture."""


class DataError(FinetuneError, ValueError):
    """A data set that cannot be turned into batches for the task."""


class NonFiniteError(FinetuneError, FloatingPointError):
    """Training stopped after too many consecutive non-finite steps."""


class HubError(FinetuneError, RuntimeError):
    """A Hugging Face Hub operation (a push) that failed: unreachable, refused, or missing credentials."""


class CheckpointError(FinetuneError, OSError):
    """A checkpoint could not be written (disk full, unwritable directory); the previous one is intact."""


class ExportError(FinetuneError, OSError):
    """An export (`save_pretrained`, `save_adapter`, `push_to_hub`) that could not be written; the target directory
    holds what it held before (a complete earlier export, or nothing)."""
