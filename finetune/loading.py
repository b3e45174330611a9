"""`finetune.load`: a Hub id or local directory -> a `finetune.Model` with pretrained weights.

Resolve the directory (`finetune.hf.hub`), read its config, look the architecture up in the registry, build the module
abstractly, fill it from the checkpoint (`finetune.hf.weights`, through the architecture's key table), and attach
tokenizer / image processor and labels.

The task head: parameters matching the architecture's ``head`` regex that the checkpoint lacks are initialised fresh
and form the ``new`` group. A head the checkpoint has with another shape (a classifier trained for 5 labels loaded
with ``num_labels=2``) is also initialised fresh, with a warning in the ``finetune`` logger, rather than refused:
replacing the classifier is what fine-tuning for a new label set means.
"""

from __future__ import annotations

import logging
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from finetune import schema, sharding
from finetune._torch import deferred
from finetune.errors import ConfigError, LoadError
from finetune.hf import files, hub, weights
from finetune.model import Model
from finetune.models import heads, registry
from finetune.params.rules import path_str
from finetune.schema import Count, DType, Flag, Index, Labels, Text

logger = logging.getLogger("finetune")

LABELLED_TASKS = ("text-classification", "token-classification", "image-classification")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model")
PROCESSOR_FILES = ("preprocessor_config.json",)


def build_rngs(seed: int) -> nnx.Rngs:
    """``nnx.Rngs(seed)`` for building modules under tracing (`load_weights`), with the same random numbers.

    Its counters are numpy scalars: flax bumps a traced counter through a path that asks the tracer for its
    ``sharding``, and jax answers by walking the whole trace, so tracing a model's init would grow quadratically with
    its size (docs/performance.md). Each read of a counter is a copy: flax increments it in place, and jax keeps a
    numpy argument of a traced call (the count in ``fold_in(key, count)``) by reference, so without the copy every
    key drawn under tracing would see the final count, and every module built from these streams (each `Dropout`'s
    stream, each fresh parameter's initialiser) would get one and the same key.
    """
    rngs = nnx.Rngs(seed)
    for stream in vars(rngs).values():
        if isinstance(stream, nnx.RngStream):
            stream.count.set_value(np.zeros(stream.count.shape, np.uint32))  # type: ignore[arg-type]  # flax takes numpy
            stream.count.set_metadata(on_get_value=_copied)
    return rngs


def _copied(variable: nnx.Variable, value: np.ndarray) -> np.ndarray:
    return np.array(value)


def read_config(directory: pathlib.Path) -> Any:
    """The checkpoint's `transformers` config; refuses custom-code configs, unsupported model types and configs
    whose structure the architecture's modules cannot run (`registry.check_config`)."""
    path = directory / "config.json"
    if not path.is_file():
        contents = ", ".join(sorted(p.name for p in directory.iterdir())) or "nothing"
        raise LoadError(
            f"No `config.json` in {directory}, so the architecture is unknown. The directory contains: {contents}. "
            "Point to a Hugging Face model directory (one written by `save_pretrained`)."
        )
    raw = files.read_json(path)
    if not isinstance(raw, dict):
        raise LoadError(
            f"`config.json` in {directory} holds a JSON {type(raw).__name__}, not an object of config fields. "
            "Write or download the checkpoint's config.json again."
        )
    if "auto_map" in raw:
        raise LoadError(
            f"The config in {directory} asks for custom modelling code (`auto_map`: {raw['auto_map']}), which "
            "finetune does not run (it never sets trust_remote_code). Pick a checkpoint of a supported architecture: "
            f"{', '.join(sorted(registry.REGISTRY))}."
        )
    arch = registry.get(raw.get("model_type", "<missing>"))  # a clear error listing the supported types
    where = f"`config.json` in {directory}"
    registry.check_config(arch, raw, where)  # before transformers, whose own errors name no file
    with deferred():  # transformers' config modules import torch at module level; finetune never calls it
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(str(directory), trust_remote_code=False)
        except Exception as e:  # noqa: BLE001 -- transformers and huggingface_hub validate with their own types
            raise LoadError(
                f"transformers cannot read {where}: {type(e).__name__}: {e}. Fix the field it names (the values "
                "must be those the model was built with), or download the config again."
            ) from None
    registry.check_config(arch, config, where)  # with transformers' defaults for the fields the file leaves out
    return config


def resolve_labels(
    task: str, hf_config: Any, num_labels: int | None, id2label: Mapping[int, str] | None
) -> tuple[int | None, dict[int, str] | None]:
    """``(num_labels, id2label)``: from the arguments, else from the config (its label names only if sizes match)."""
    if task not in LABELLED_TASKS:
        if num_labels is not None or id2label is not None:
            raise ConfigError(
                f"`num_labels` and `id2label` apply to {', '.join(LABELLED_TASKS)}; received num_labels={num_labels!r}"
                f", id2label={id2label!r} with task={task!r}. Drop them, or pick a classification task."
            )
        return None, None
    if id2label is not None:  # `load` / `from_config` checked it (finetune.schema.Labels)
        id2label = {int(k): str(v) for k, v in id2label.items()}
        if num_labels is not None and num_labels != len(id2label):
            raise ConfigError(
                f"`num_labels` and `id2label` disagree: received num_labels={num_labels} and {len(id2label)} label "
                "names. Pass one of them, or make them agree."
            )
        return len(id2label), id2label
    config_labels = {int(k): str(v) for k, v in (getattr(hf_config, "id2label", None) or {}).items()}
    if num_labels is None:
        num_labels = len(config_labels) or 2
    return num_labels, (config_labels if len(config_labels) == num_labels else None)


def _check_json_files(directory: pathlib.Path, names: tuple[str, ...]) -> None:
    """A JSON file among ``names`` that does not parse is a `LoadError` naming it, not a missing tokenizer later."""
    for name in names:
        if name.endswith(".json") and (directory / name).is_file():
            files.read_json(directory / name)


def _auto(directory: pathlib.Path, names: tuple[str, ...], loader_name: str) -> Any:
    if not any((directory / name).is_file() for name in names):
        return None
    _check_json_files(directory, (*names, "special_tokens_map.json", "added_tokens.json"))
    import transformers

    try:
        with deferred():
            return getattr(transformers, loader_name).from_pretrained(str(directory), trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 -- an exotic tokenizer (a missing optional library) must not block loading
        if (directory / "tokenizer.json").is_file() and loader_name == "AutoTokenizer":
            _check_tokenizer_json(directory / "tokenizer.json")
        logger.warning(
            "Could not load the %s from %s (%s: %s); continuing without.", loader_name, directory, type(e).__name__, e
        )
        return None


def _check_tokenizer_json(path: pathlib.Path) -> None:
    """A `LoadError` naming ``tokenizer.json`` when it is valid JSON that the tokenizers library cannot read."""
    import tokenizers

    try:
        tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 -- the Rust library raises a bare Exception
        raise LoadError(
            f"`{path.name}` in {path.parent} is not a tokenizer the tokenizers library can read: {e}. The file is "
            "corrupt or was written by another program: download it again, or save the tokenizer again with "
            "`tokenizer.save_pretrained`."
        ) from None


def default_rules(arch: registry.Architecture, module: nnx.Module, new_paths: tuple[str, ...]) -> list[tuple[str, str]]:
    """``new`` (exact fresh paths), ``head`` (the architecture's head regex), ``backbone``; rules matching nothing
    are left out, since a rule that matches nothing is an error."""
    rules = []
    if new_paths:
        rules.append(("(?:" + "|".join(re.escape(p) for p in new_paths) + ")", "new"))
    paths = [path_str(p) for p, _ in nnx.to_flat_state(nnx.state(module, nnx.Param))]
    if any(re.fullmatch(arch.head, p) and p not in new_paths for p in paths):
        rules.append((arch.head, "head"))
    return [*rules, (".*", "backbone")]


@schema.arguments
def load(
    name_or_path: schema.Source,
    task: Text = "feature-extraction",
    num_labels: Count | None = None,
    revision: Text | None = None,
    dtype: DType = jnp.float32,
    param_dtype: DType = jnp.float32,
    allow_pickle: Flag = False,
    *,
    id2label: Labels | None = None,
    token: Any = None,
    seed: Index = 0,
    mesh: Any = None,
) -> Model:
    """Loads a pretrained Hugging Face checkpoint as a `finetune.Model`.

    Args:
      name_or_path: A local directory, a Hub id ``org/name``, or ``hf://org/name``.
      task: ``feature-extraction`` (hidden states), ``text-classification``, ``token-classification``,
        ``image-classification`` or ``causal-lm``, as the architecture supports.
      num_labels: Classifier outputs (1 = regression). Default: the size of ``id2label``, else the config's.
      revision: Hub branch, tag or commit.
      dtype: Computation dtype.
      param_dtype: Storage dtype of the parameters (checkpoint tensors are cast to it).
      allow_pickle: Read ``pytorch_model.bin`` when a repository has nothing else. Unpickling can execute code.
      id2label: Label names by class index.
      token: Hub token; default: huggingface_hub's usual sources.
      seed: Seed of the fresh head and of dropout.
      mesh: Load straight onto several devices: a strategy (``"fsdp"``...), a mesh shape or a `jax.sharding.Mesh`
        (see `finetune.sharding`). Each weight goes directly into its sharding as it is read, and ``fit`` /
        ``evaluate`` use the same layout unless told otherwise.

    Returns:
      The `finetune.Model`, with default rules ``new`` (fresh head parameters), ``head`` and ``backbone``.

    Raises:
      LoadError: Unresolvable name, unsupported architecture, or a checkpoint that does not fit.
      ConfigError: Unsupported task or inconsistent label arguments.

    Example:
      >>> model = finetune.load("sentence-transformers/all-MiniLM-L6-v2", task="text-classification", num_labels=2)
      >>> model.new_paths
      ('classifier/bias', 'classifier/kernel')
    """
    if revision is not None and pathlib.Path(name_or_path).is_dir():
        raise ConfigError(
            f"`revision` applies to Hub repositories, and {os.fspath(name_or_path)!r} is a local directory, which has "
            f"no revisions; received revision={revision!r}. Drop `revision`, or check out that revision into the "
            "directory."
        )
    directory = hub.resolve(name_or_path, revision=revision, token=token, allow_pickle=allow_pickle)
    hf_config = read_config(directory)
    arch = registry.get(hf_config.model_type)
    heads.check_task(task, arch.tasks, f" for {arch.name} checkpoints")
    num_labels, id2label = resolve_labels(task, hf_config, num_labels, id2label)
    cfg = arch.config_from_hf(hf_config)

    def init_fn() -> nnx.Module:
        kw = {"task": task, "num_labels": num_labels, "dtype": dtype, "param_dtype": param_dtype}
        return arch.build(cfg, **kw, rngs=build_rngs(seed))

    checkpoint = files.find_checkpoint(directory, allow_pickle=allow_pickle)
    layout = sharding.resolve(mesh)
    module, new_paths = weights.load_weights(
        init_fn, arch.table(cfg, task), checkpoint, ignore=arch.ignore(cfg, task), fresh=arch.head, layout=layout
    )
    if num_labels is not None:  # so that an exported config describes this head
        hf_config.id2label = id2label or {i: f"LABEL_{i}" for i in range(num_labels)}
        hf_config.label2id = {v: k for k, v in hf_config.id2label.items()}
    model = Model(
        module,
        task=task,
        rules=default_rules(arch, module, new_paths),
        tokenizer=_auto(directory, TOKENIZER_FILES, "AutoTokenizer"),
        processor=_auto(directory, PROCESSOR_FILES, "AutoImageProcessor"),
        hf_config=hf_config,
        architecture=arch,
        id2label=id2label,
        source=os.fspath(name_or_path),
        new_paths=new_paths,
        layer_pattern=arch.layer,
        num_layers=arch.num_layers(cfg),
        layout=layout,
        # a sentence-transformers checkpoint says how its embeddings are pooled
        pooling=heads.read(directory) if task == "feature-extraction" else None,
    )
    return model


@schema.arguments
def from_config(
    config: Any,
    task: Text = "feature-extraction",
    num_labels: Count | None = None,
    *,
    id2label: Labels | None = None,
    dtype: DType = jnp.float32,
    param_dtype: DType = jnp.float32,
    tokenizer: Any = None,
    processor: Any = None,
    seed: Index = 0,
) -> Model:
    """A freshly initialised model (no pretrained weights) from a Hugging Face config, to train from scratch.

    Every parameter is new, so the default rules put everything in group ``new``; the model exports and loads like a
    pretrained one.

    Args:
      config: A `transformers.PretrainedConfig` (e.g. ``transformers.ViTConfig(...)``) of a supported model type.
      task: The task head to build.
      num_labels: Classifier outputs (classification tasks).
      id2label: Label names by class index.
      dtype: Computation dtype.
      param_dtype: Storage dtype of the parameters.
      tokenizer: A tokenizer to attach (text models).
      processor: An image processor to attach (vision models).
      seed: Initialisation and dropout seed.

    Returns:
      The `finetune.Model`.

    Example:
      >>> model = finetune.from_config(transformers.ViTConfig(image_size=32, patch_size=8, num_hidden_layers=2),
      ...                              task="image-classification", num_labels=10)
    """
    import copy

    hf_config = copy.deepcopy(config)
    arch = registry.get(hf_config.model_type)
    heads.check_task(task, arch.tasks, f" for {arch.name} models")
    num_labels, id2label = resolve_labels(task, hf_config, num_labels, id2label)
    fix = "Pass a config whose values satisfy this."
    registry.check_config(arch, hf_config, "the `config` passed to `from_config`", ConfigError, fix)
    cfg = arch.config_from_hf(hf_config)
    kw = {"task": task, "num_labels": num_labels, "dtype": dtype, "param_dtype": param_dtype}
    module = arch.build(cfg, **kw, rngs=build_rngs(seed))
    if num_labels is not None:
        hf_config.id2label = id2label or {i: f"LABEL_{i}" for i in range(num_labels)}
        hf_config.label2id = {v: k for k, v in hf_config.id2label.items()}
    paths = tuple(path_str(p) for p, _ in nnx.to_flat_state(nnx.state(module, nnx.Param)))
    return Model(
        module,
        task=task,
        rules=[(".*", "new")],
        tokenizer=tokenizer,
        processor=processor,
        hf_config=hf_config,
        architecture=arch,
        id2label=id2label,
        source=None,
        new_paths=paths,
        layer_pattern=arch.layer,
        num_layers=arch.num_layers(cfg),
    )
