"""PEFT adapter files: `save_adapter` writes a model's LoRA adapters as ``adapter_config.json`` and
``adapter_model.safetensors``, which ``peft.PeftModel.from_pretrained(base, directory)`` loads onto the transformers
base model. The adapters themselves are `finetune.params.lora`'s.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
from flax import nnx

from finetune.errors import ConfigError
from finetune.hf import tables
from finetune.params.lora import LoRALinear, adapted, linears
from finetune.params.plan import of_model
from finetune.params.rules import path_str
from finetune.writer import write_directory

PEFT_TASKS = {
    "text-classification": "SEQ_CLS",
    "token-classification": "TOKEN_CLS",
    "causal-lm": "CAUSAL_LM",
    "feature-extraction": "FEATURE_EXTRACTION",
}


def _hf_key(table: Sequence[Any], path: str) -> tuple[str, Any, tuple[str, ...]] | None:
    """``(checkpoint key, row, the row's parameter paths)`` that exports ``path``, or None (first row wins)."""
    return tables.key_for(tables.rows(table), path)


def _module_name(key: str) -> str:
    return key.rsplit(".", 1)[0]


def _target_names(adapted_names: Sequence[str], linear_names: Sequence[str]) -> list[str]:
    """PEFT ``target_modules``: the last name parts (``["query", "value"]``) when they select exactly the adapted
    modules, else every adapted module's full name."""
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in adapted_names})
    if {n for n in linear_names if n.rsplit(".", 1)[-1] in suffixes} == set(adapted_names):
        return suffixes
    return sorted(adapted_names)


def _adapter_tensors(layers: Mapping[str, LoRALinear], table: Sequence[Any]) -> tuple[dict, list[str]]:
    """PEFT's ``lora_A`` ``(r, in)`` and ``lora_B`` ``(out, r)`` of every adapted layer, and their module names."""
    tensors, names, problems = {}, [], []
    for path, layer in layers.items():
        found = _hf_key(table, f"{path}/kernel")
        if found is None or len(found[1].paths) > 1 or found[1].transform != tables.TRANSPOSE:
            problems.append(path)
            continue
        name = _module_name(found[0])
        a, b = (np.asarray(v.get_value(), np.float32) for v in (layer.lora.lora_a, layer.lora.lora_b))
        tensors[f"base_model.model.{name}.lora_A.weight"] = np.ascontiguousarray(a.T)
        tensors[f"base_model.model.{name}.lora_B.weight"] = np.ascontiguousarray(b.T)
        names.append(name)
    if problems:
        raise ConfigError(
            f"These adapted layers have no single transposed nn.Linear weight in the Hugging Face checkpoint (a fused "
            f"or reshaped tensor), so PEFT cannot load adapters for them: {', '.join(problems)}. Target other layers, "
            "or export the merged model with save_pretrained."
        )
    return tensors, names


# The module names PEFT itself adds to ``modules_to_save`` for these task types (``PeftModelForSequenceClassification``,
# ``...ForTokenClassification``): it wraps them whether or not the adapter trained them, and reads their weights from
# the adapter file, so those weights must be there (the pretrained ones when the head stayed frozen).
PEFT_HEADS: dict[str, tuple[str, ...]] = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score")}


def _wrapped(names: set[str], requested: set[str]) -> set[str]:
    """The modules PEFT wraps for ``modules_to_save=requested``: every module name ending with one of them (PEFT
    matches plain string suffixes, so ``classifier`` also wraps ``pre_classifier``), outermost only, since a
    wrapper holds its submodules whole."""
    matched = {n for n in names if any(n.endswith(r) for r in requested)}
    return {n for n in matched if not any(n.startswith(f"{m}.") for m in matched)}


def _saved_modules(
    module: nnx.Module, table: Sequence[Any], trainable: set[str], task_type: str | None
) -> tuple[dict, list[str]]:
    """PEFT's ``modules_to_save``: the Hugging Face modules that own a trainable non-adapter parameter (a new or
    trained head), and those PEFT adds by itself for the task type (`PEFT_HEADS`), as the outermost modules PEFT
    wraps; with the tensors of everything under them, stored whole."""
    params = {path_str(p): v for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
    keys = {p: _hf_key(table, p) for p in params if not isinstance(params[p], nnx.LoRAParam)}
    owners = {_module_name(k[0]) for k in (keys.get(p) for p in trainable) if k is not None}
    exported = {k[0]: k for k in keys.values() if k is not None}
    names = {".".join(key.split(".")[:i]) for key in exported for i in range(1, key.count(".") + 1)}
    heads = PEFT_HEADS.get(task_type, ()) if task_type is not None else ()
    wrapped = _wrapped(names, owners | set(heads))
    tensors = {}
    for key, row, paths in exported.values():
        if any(key.startswith(f"{m}.") for m in wrapped):
            arrays = [np.asarray(params[p].get_value()) for p in paths]
            tensors[f"base_model.model.{key}"] = np.ascontiguousarray(row.transform.inverse(arrays))
    return tensors, sorted(wrapped)


def save_adapter(model: Any, directory: str | Path, *, trainable: set[str] | None = None) -> Path:
    """Writes the adapters in PEFT's format: ``adapter_config.json`` and ``adapter_model.safetensors``.

    ``peft.PeftModel.from_pretrained(base, directory)`` then puts them on the transformers base model. Trained
    parameters outside the adapters (a new classifier) are saved whole as PEFT's ``modules_to_save``.

    Args:
      model: A `finetune.Model` loaded with `finetune.load`, with adapters.
      directory: New, empty, or an earlier adapter export (replaced atomically, as `finetune.writer` describes); a
        directory holding other files is refused.
      trainable: Parameter paths that trained; default: the trainable groups of the model's current plan.

    Returns:
      The directory, as a `pathlib.Path`.

    Example:
      >>> model.save_adapter("out/adapter")
      >>> peft.PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base), "out/adapter")
    """
    layers = adapted(model.module)
    if model.architecture is None or not layers:
        raise ConfigError(
            "save_adapter needs a model loaded with finetune.load and adapted with LoRA (compile with preset 'lora' "
            "or 'lora-sft', or a `lora` recipe field). Use save_pretrained to export a model without adapters."
        )
    if trainable is None:
        assignment = of_model(model, model.recipe)
        trainable = {p for p in assignment.group_of if assignment.trainable(p)}
    table = model.architecture.table(model.architecture.config_from_hf(model.hf_config), model.task)
    tensors, names = _adapter_tensors(layers, table)
    task_type = PEFT_TASKS.get(model.task)
    head, saved = _saved_modules(model.module, table, trainable, task_type)
    keys = [_hf_key(table, f"{p}/kernel") for p in linears(model.module)]
    first = next(iter(layers.values()))
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": model.source,
        "r": first.rank,
        "lora_alpha": first.alpha,
        "lora_dropout": first.lora_dropout.rate,
        "target_modules": _target_names(names, [_module_name(k[0]) for k in keys if k is not None]),
        "modules_to_save": saved or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
    }

    def fill(out: Path) -> None:
        (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
        safetensors.numpy.save_file({**tensors, **head}, str(out / "adapter_model.safetensors"), {"format": "pt"})

    return write_directory(directory, fill, kind="adapter")
