"""Named recipes: one TOML file per preset in ``presets/`` (shipped in the wheel as ``finetune.recipes``).

Example:
  >>> import finetune
  >>> finetune.presets.list()
  ['discriminative', 'full', 'gradual-unfreeze', 'layer-decay', 'linear-probe', 'sft', 'stable', 'vit']
  >>> print(finetune.presets.describe("discriminative"))
"""

from __future__ import annotations

import builtins
import dataclasses
import difflib
import functools
import importlib.resources
import tomllib
from pathlib import Path
from typing import Any

from finetune.errors import ConfigError
from finetune.recipe import Recipe


def _files() -> dict[str, Any]:
    """``{name: file}`` from the installed package, else from the repository's ``presets/`` folder."""
    try:
        root = importlib.resources.files("finetune.recipes")
        found = {f.name.removesuffix(".toml"): f for f in root.iterdir() if f.name.endswith(".toml")}
        if found:
            return found
    except ModuleNotFoundError:
        pass
    root = Path(__file__).resolve().parent.parent / "presets"
    return {f.stem: f for f in sorted(root.glob("*.toml"))}


@functools.cache
def _load_all() -> dict[str, dict[str, Any]]:
    out = {}
    for name, file in _files().items():
        data = tomllib.loads(file.read_text())
        if data.get("name", name) != name:
            raise ConfigError(f"Preset file {name}.toml declares name={data['name']!r}; the file name must match.")
        out[name] = data
    return out


def list() -> builtins.list[str]:  # noqa: A001 - the public name the docs promise
    """The names of every preset, sorted."""
    return sorted(_load_all())


def _check(name: str) -> dict[str, Any]:
    presets = _load_all()
    if name not in presets:
        close = difflib.get_close_matches(str(name), builtins.list(presets), n=3, cutoff=0.4)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ConfigError(f"Unknown preset {name!r}.{hint} Available presets: {', '.join(sorted(presets))}.")
    return presets[name]


def get(name: str) -> Recipe:
    """The `finetune.Recipe` of a preset. Unknown names get an error with the closest names."""
    data = dict(_check(name))
    try:
        return Recipe().replace(**data)
    except ConfigError as e:  # a preset file edited by hand: say which file
        raise type(e)(f"The preset file {name}.toml does not hold a valid recipe. {e}") from None


def describe(name: str) -> str:
    """What a preset is for, where it comes from, and every hyperparameter it sets (with the defaults it keeps)."""
    data = _check(name)
    recipe = get(name)
    lines = [f"{name}: {data.get('description', '')}", f"  from: {data.get('provenance', '')}", "  hyperparameters:"]
    for field in dataclasses.fields(Recipe):
        if field.name in ("name", "description", "provenance"):
            continue
        value = getattr(recipe, field.name)
        mark = "" if field.name in data else "  (default)"
        lines.append(f"    {field.name} = {_show(value)}{mark}")
    return "\n".join(lines)


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    if dataclasses.is_dataclass(value):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return type(value).__name__ + "(" + ", ".join(f"{k}={v!r}" for k, v in fields.items()) + ")"
    return repr(value)
