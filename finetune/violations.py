"""How a schema violation reads: pydantic's `ValidationError` as one finetune exception naming the argument (a dotted
path for nested fields), the value received, what is allowed and the fix; unknown keys with their closest names.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError
from pydantic_core import PydanticCustomError

from finetune.errors import ConfigError, FinetuneError

_KIND = "finetune"  # the pydantic error type of every violation described here (allowed + fix)


def violation(allowed: str, fix: str = "", *, path: str | None = None, value: Any = None) -> PydanticCustomError:
    """The pydantic error a validator raises: what is allowed and the fix; for a check across fields (raised where
    the value's own location is unknown), the ``path`` and the ``value`` it names."""
    ctx = {"allowed": allowed, "fix": fix, **({"path": path, "received": _show(value)} if path else {})}
    return PydanticCustomError(_KIND, "{allowed}", ctx)


INT_FIX = "Write a whole number, e.g. 3 (not a string, a bool or a float)."
NUMBER_FIX = "Write a finite number, e.g. 0.1 (not a string, a bool, NaN or infinity)."


def close_names(value: Any, names: Any) -> str:
    """`` (did you mean 'x'?)`` with the names closest to ``value``, or ``""``."""
    close = difflib.get_close_matches(str(value), [str(n) for n in names], n=3)
    return f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""


def unknown(names: Any, allowed_names: Any, *, owner: str, values: Mapping[str, Any] | None = None) -> ConfigError:
    """The error for keys that are not fields or options: each with its closest names, then every allowed name."""
    parts = []
    for key in names:
        shown = f"{key}={_show(values[key])}" if values is not None and key in values else repr(key)
        parts.append(f"`{key}`{close_names(key, allowed_names)}; received {shown}")
    return ConfigError(
        f"Unknown option(s) of {owner}: {'; '.join(parts)}. Allowed: {', '.join(map(str, allowed_names))}. "
        "Fix the name."
    )


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 160 else text[:150] + "...(" + str(len(text)) + " characters)"


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (("." if out else "") + str(part))
    return out


# What pydantic's own checks (of the structure around the schema's types) allow, and the fix.
_PHRASES = {
    "int_type": ("an int", INT_FIX),
    "int_from_float": ("an int", INT_FIX),
    "bool_type": ("True or False", "Write True or False."),
    "float_type": ("a number", NUMBER_FIX),
    "finite_number": ("a finite number", NUMBER_FIX),
    "string_type": ("a string", "Quote the value as a string."),
    "dict_type": ("a dict", "Write a dict, e.g. {'name': value}."),
    "list_type": ("a list", "Write a list, e.g. [value, ...]."),
    "tuple_type": ("a list", "Write a list, e.g. [value, ...]."),
    "callable_type": ("a callable", "Pass a function."),
}


def _sentence(item: Mapping[str, Any], prefix: str) -> str:
    ctx = item.get("ctx") or {}
    loc = tuple(p for p in item["loc"] if p not in ("[key]",))
    path = _dotted(((prefix,) if prefix else ()) + loc + ((ctx["path"],) if "path" in ctx else ())) or "value"
    received = f"received {path}={ctx['received'] if 'received' in ctx else _show(item['input'])}"
    if isinstance(ctx.get("error"), FinetuneError):
        return str(ctx["error"])
    if item["type"] == _KIND:
        fix = f" {ctx['fix']}" if ctx.get("fix") else ""
        return f"`{path}` must be {ctx['allowed']}; {received}.{fix}"
    if item["type"] == "missing":
        return f"`{path}` is required and was not given."
    phrase, fix = _PHRASES.get(item["type"]) or (
        item["msg"].removeprefix("Input should be "),
        "Give a value of that form.",
    )
    return f"`{path}` must be {phrase}; {received}. {fix}"


def problems(e: ValidationError, prefix: str, owner: str, names: tuple[str, ...], skip: str | None) -> list[str]:
    out: list[str] = []
    unknown_keys: dict[tuple, dict] = {}
    for item in e.errors():
        if skip is not None and item["loc"][:1] == (skip,):
            item = {**item, "loc": item["loc"][1:]}
        if item["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
            unknown_keys.setdefault(item["loc"][:-1], {})[item["loc"][-1]] = item["input"]
        else:
            out.append(_sentence(item, prefix))
    for parent, values in unknown_keys.items():
        allowed_names = _names_at(parent) if parent else names
        where = f"`{_dotted(((prefix,) if prefix else ()) + parent)}`" if parent or prefix else owner
        out.insert(0, str(unknown(values, allowed_names or (), owner=where, values=values)))
    return list(dict.fromkeys(out))


def first_problem(e: ValidationError) -> str:
    """The first violation of ``e`` as a sentence (for a value described as a whole, such as a schedule dict)."""
    item = e.errors()[0]
    if item["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        return f"`{_dotted(item['loc'])}` is not one of its arguments."
    return _sentence(item, "")


def error(
    e: ValidationError,
    error: type[FinetuneError],
    *,
    prefix: str = "",
    owner: str = "",
    names: tuple[str, ...] = (),
    skip: str | None = None,
) -> FinetuneError:
    found = problems(e, prefix, owner or e.title, names, skip)
    return error(found[0] + "".join(f"\nAlso: {p}" for p in found[1:]))


# Nested field name -> the keys it takes (a recipe's `groups.<name>` takes a Group's fields, `lora` LoRAConfig's).
_NESTED: dict[str, tuple[str, ...]] = {}


def nested(field: str, names: tuple[str, ...]) -> None:
    """Records that the dict under ``field`` (at any depth) takes the keys ``names``, for unknown-key hints."""
    _NESTED[field] = names


def _names_at(parent: tuple) -> tuple[str, ...] | None:
    """The keys allowed at ``parent`` (a location inside a checked value): those of its innermost registered field."""
    return next((_NESTED[p] for p in reversed(parent) if isinstance(p, str) and p in _NESTED), None)
