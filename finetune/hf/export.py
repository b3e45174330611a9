"""Export in Hugging Face format: weights (the loading table run backwards), config, tokenizer/processor, model card.

Everything an export writes is decided here: `export_weights` runs the architecture's key table backwards (each
template rendered by `finetune.hf.tables`) over the module with its LoRA adapters folded in
(`finetune.params.lora.merged`). The directory is written through `finetune.writer`: beside the target, then
swapped into place in one atomic step, so the target holds a complete export (old or new) whenever the process is
killed; a directory that holds what finetune did not write is refused, never replaced.

Example:
  >>> model.save_pretrained("out/minilm-reviews")   # then: AutoModelForSequenceClassification.from_pretrained(...)
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
from flax import nnx

from finetune._torch import deferred
from finetune.errors import ConfigError, LoadError
from finetune.hf import tables
from finetune.params.lora import merged
from finetune.params.rules import path_str
from finetune.sharding import host_local, is_main_process
from finetune.writer import check_target, write_directory

LIBRARY = "finetune"
TASK_TAGS = {
    "text-classification": "text-classification",
    "token-classification": "token-classification",
    "image-classification": "image-classification",
    "causal-lm": "text-generation",
    "feature-extraction": "feature-extraction",
}


def export_weights(module: nnx.Module, table: Sequence[tables.Row | tuple]) -> dict[str, np.ndarray]:
    """The module's parameters as checkpoint tensors: the table run backwards (first row wins for each path).

    A row with several paths (a fused tensor) is exported when all its paths exist, via ``Transform.inverse``.
    Tied parameters are exported once, under the first row's key; each key template writes its first alternatives
    (`finetune.hf.tables.render`).

    Args:
      module: A module built by an architecture whose table this is.
      table: The same rows `finetune.hf.weights.load_weights` reads with.

    Returns:
      ``{checkpoint key: numpy array}`` (contiguous, in the parameters' dtype), ready for
      ``safetensors.numpy.save_file``.

    Raises:
      LoadError: If some parameter is not covered by any row.

    Example:
      >>> safetensors.numpy.save_file(export_weights(model.module, table), "model.safetensors")
    """
    params = {path_str(p): v for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
    out: dict[str, np.ndarray] = {}
    done: set[str] = set()
    for row in tables.rows(table):
        for path in params:
            values = None if path in done else tables.parse(row.paths[0], path)
            if values is None:
                continue
            paths = [tables.render(t, values) for t in row.paths]
            if any(p not in params or p in done for p in paths):
                continue
            arrays = [np.asarray(params[p].get_value()) for p in paths]
            out[tables.render(row.key, values)] = np.ascontiguousarray(row.transform.inverse(arrays))
            done.update(paths)
    missing = sorted(set(params) - done)
    if missing:
        raise LoadError(
            "These parameters have no row in the checkpoint table, so they cannot be exported:\n"
            + tables.listing("Uncovered parameters", missing)
            + "\nAdd rows for them to the architecture's table."
        )
    return out


def _hf_config(model: Any) -> Any:
    arch = model.architecture
    config = copy.deepcopy(model.hf_config)
    config.architectures = [arch.hf_architecture(arch.config_from_hf(model.hf_config), model.task)]
    if model.id2label:
        config.id2label = {int(k): str(v) for k, v in model.id2label.items()}
        config.label2id = {v: k for k, v in config.id2label.items()}
    return config


def write(
    model: Any,
    directory: str | os.PathLike,
    *,
    datasets: list[str] | None = None,
    license: str | None = None,
    metrics: dict[str, float] | None = None,
) -> Path:
    """Writes ``model`` to ``directory`` in Hugging Face format (atomically); returns the directory.

    Args:
      model: A `finetune.Model` loaded from a Hub-format checkpoint (it knows its architecture and config).
      directory: The export directory: new, empty, or an earlier finetune export (replaced atomically). A directory
        holding other files, a checkpoint directory, ``""`` and the working directory are refused (`ConfigError`).
      datasets: Data set names for the model card.
      license: License for the model card (default: the base model's when known).
      metrics: Evaluation results for the model card (default: the model's last `evaluate`).
    """
    if model.architecture is None or model.hf_config is None:
        raise ConfigError(
            "`save_pretrained` needs a model loaded with finetune.load (it knows its Hugging Face architecture); this "
            "model wraps a custom NNX module. Save it with a checkpoint instead (fit(checkpoint_dir=...))."
        )
    target = check_target(directory, kind="model")  # before any work
    local = host_local(model.module)  # several hosts: every process takes part in gathering sharded parameters
    if not is_main_process():
        return target  # only process 0 writes
    if local is not model.module:
        model = model.with_module(local)

    def fill(staging: Path) -> None:
        with deferred():  # saving configs and tokenizers may import transformers modules that import torch
            _write_files(model, staging, datasets=datasets, license=license, metrics=metrics)

    return write_directory(target, fill, kind="model")


def _write_files(model: Any, out: Path, **card: Any) -> None:
    arch = model.architecture
    cfg = arch.config_from_hf(model.hf_config)
    tensors = export_weights(merged(model.module), arch.table(cfg, model.task))  # LoRA adapters folded in
    safetensors.numpy.save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = _hf_config(model)
    config.save_pretrained(out)
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(out)
    if model.processor is not None:
        model.processor.save_pretrained(out)
    if model.task == "causal-lm":
        from transformers import GenerationConfig

        GenerationConfig.from_model_config(config).save_pretrained(out)
    recipe = model.recipe.to_dict() if model.recipe is not None else None
    (out / "finetune.json").write_text(json.dumps({"task": model.task, "recipe": recipe}, indent=1, default=str))
    (out / "README.md").write_text(model_card(model, **card))


def model_card(
    model: Any,
    *,
    datasets: list[str] | None = None,
    license: str | None = None,
    metrics: dict[str, float] | None = None,
) -> str:
    """The ``README.md`` of an export: Hub metadata, then the recipe, hyperparameters and evaluation results."""
    from huggingface_hub import ModelCard, ModelCardData

    metrics = metrics if metrics is not None else getattr(model, "last_metrics", None) or {}
    base = model.source if model.source and not os.path.isabs(model.source) else None
    data = ModelCardData(
        base_model=base,
        library_name=LIBRARY,
        license=license,
        datasets=datasets or None,
        metrics=sorted({k.removeprefix("val_") for k in metrics if k != "loss"}) or None,
        tags=[LIBRARY, "jax", "flax", TASK_TAGS[model.task]],
        pipeline_tag=TASK_TAGS[model.task],
    )
    recipe = model.recipe.to_dict() if model.recipe is not None else {}
    lines = [
        f"# {model.architecture.name} fine-tuned with finetune",
        "",
        f"Task: `{model.task}`. Base model: `{base or 'a local checkpoint'}`.",
        "",
        "## Recipe",
        "",
        f"Preset: `{recipe.get('name')}`. {recipe.get('description', '')}".rstrip(),
        "",
        "| hyperparameter | value |",
        "| --- | --- |",
        *[f"| {k} | `{v}` |" for k, v in recipe.items() if k not in ("name", "description", "provenance")],
        "",
        "## Evaluation",
        "",
        *(
            ["| metric | value |", "| --- | --- |", *[f"| {k} | {v:.4f} |" for k, v in metrics.items()]]
            if metrics
            else ["No evaluation results were recorded."]
        ),
        "",
        "## Usage",
        "",
        "```python",
        "import finetune",
        f'model = finetune.load("<this repo>", task="{model.task}")',
        "```",
        "",
    ]
    card = ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n" + "\n".join(lines))
    return str(card)
