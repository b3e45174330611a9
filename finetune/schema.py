"""The one schema of finetune's public arguments: pydantic types, and their violations as `ConfigError`s.

Every public argument is declared with a type from here (on a `Recipe` field, a `Group`, a `LayerDecay`, a LoRA
config, or a parameter of a public function via `arguments`), and checked by pydantic v2 when the value is given:

- types are strict: a bool is a bool (not ``"no"``), an int is an int (not ``2.5``, ``True`` or ``"3"``), and a number
  that must be finite is finite (NaN and infinity refused);
- ranges come from the type (`Count` is an int >= 1, `Fraction` a number in [0, 1));
- unknown keys are refused with the closest names;
- nested values keep their place, so a violation names its dotted path (``groups.backbone.trainable``).

Three entry points apply it: `checked` (a class decorator: a frozen pydantic dataclass, e.g. `finetune.Recipe`),
`arguments` (a function decorator: the parameters' annotations) and `check` (one value, e.g. a command-line option).
All three turn pydantic's `ValidationError` into one finetune exception (one converter, `finetune.violations.error`)
whose message names the argument, the value received, what is allowed and the fix. Python and the command line
(``--set``) go through the same types, so they accept and refuse the same values.

Example:
  >>> check(Count, 0, name="batch_size")
  Traceback (most recent call last):
  finetune.errors.ConfigError: `batch_size` must be an int >= 1; received batch_size=0. Write a whole number ...
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import re
import typing
from collections.abc import Callable, Mapping
from typing import Annotated, Any

import pydantic
from pydantic import ConfigDict, Field, Strict, TypeAdapter, ValidationError, WrapValidator
from pydantic_core import ArgsKwargs
from typing_extensions import TypedDict, Unpack, is_typeddict

from finetune import violations
from finetune.errors import ConfigError, FinetuneError
from finetune.violations import INT_FIX, NUMBER_FIX, unknown, violation

# Pydantic settings of every checked class: unknown keys refused, arbitrary objects (optax, callables) allowed.
CONFIG = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


def allowed(text: str, fix: str = "") -> WrapValidator:
    """Annotation: any failure of the type it follows is reported as ``must be <text>`` with ``fix``.

    Violations further in (a bad regex inside a rule) are kept as they are, with their paths. (So the type should
    hold no union: pydantic names a union's failed members in the path.)
    """

    def validate(value: Any, handler: Callable[[Any], Any]) -> Any:
        try:
            return handler(value)
        except ValidationError as e:
            if any(item["loc"] for item in e.errors()):  # a part of the value is wrong: name that part
                raise
            raise violation(text, fix) from None

    return WrapValidator(validate)


Flag = Annotated[
    bool,
    Strict(),
    allowed("True or False", "A string such as 'no' is not a bool: write True or False (true or false with --set)."),
]
Text = Annotated[str, Strict(), allowed("a string", "Quote the value as a string.")]
Count = Annotated[int, Strict(), Field(ge=1), allowed("an int >= 1", INT_FIX)]
Index = Annotated[int, Strict(), Field(ge=0), allowed("an int >= 0", INT_FIX)]
Integer = Annotated[int, Strict(), allowed("an int", INT_FIX)]
Finite = Annotated[float, Strict(), Field(allow_inf_nan=False), allowed("a finite number", NUMBER_FIX)]
Positive = Annotated[float, Strict(), Field(gt=0, allow_inf_nan=False), allowed("a finite number > 0", NUMBER_FIX)]
NonNegative = Annotated[
    float, Strict(), Field(ge=0, allow_inf_nan=False), allowed("a finite number >= 0", NUMBER_FIX + " 0 is none.")
]
Fraction = Annotated[float, Strict(), Field(ge=0, lt=1), allowed("a number in [0, 1)", NUMBER_FIX)]
Unit = Annotated[float, Strict(), Field(gt=0, le=1), allowed("a number in (0, 1]", NUMBER_FIX)]


def _regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as e:
        raise violation(
            f"a valid regular expression ({e})", "Fix the pattern (escape a literal '(' as '\\(')."
        ) from None
    return value


Regex = Annotated[str, Strict(), allowed("a regular expression (a string)"), pydantic.AfterValidator(_regex)]


def _is_path(value: Any) -> bool:
    return isinstance(value, str) and value != "" or isinstance(value, os.PathLike)


def _path(value: Any) -> Any:
    if _is_path(value):
        return value
    raise violation("a non-empty path (a str or an os.PathLike)", "Pass a directory or file path.")


Path = Annotated[Any, pydantic.AfterValidator(_path)]


def _source(value: Any) -> Any:
    if _is_path(value):
        return value
    raise violation(
        "a Hub id ('org/name' or 'hf://org/name') or a local directory (a str or an os.PathLike)",
        "Pass e.g. 'sentence-transformers/all-MiniLM-L6-v2' or the directory of a saved model.",
    )


# Where a model comes from: a Hub id or a local directory.
Source = Annotated[Any, pydantic.AfterValidator(_source)]


def _callable(value: Any) -> Any:
    if callable(value):
        return value
    raise violation("a callable", "Pass a function.")


Function = Annotated[Any, pydantic.AfterValidator(_callable)]


# ---------------------------------------------------------------------------------------------------- arguments
class Card(TypedDict, total=False):
    """The model-card options of `save_pretrained` and `push_to_hub`."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]

    datasets: list[Text]
    license: Text
    metrics: dict[Text, Finite]


def _verbose(value: Any) -> Any:
    if isinstance(value, bool) or (isinstance(value, int) and 0 <= value <= 2):
        return int(value)
    raise violation("0 (silent), 1 (report and progress bar) or 2", "Write verbose=0 or verbose=1.")


Verbose = Annotated[Any, pydantic.AfterValidator(_verbose)]


def _resume(value: Any) -> Any:
    if isinstance(value, bool) or value is None:
        return bool(value)
    return _path(value)


# `fit(resume=...)`: True / False, or the path of a checkpoint directory to continue from.
Resume = Annotated[Any, pydantic.AfterValidator(_resume)]

_DTYPES = ("float32", "bfloat16", "float16")


def _dtype(value: Any) -> Any:
    import jax.numpy as jnp

    try:
        name = jnp.dtype(value).name
    except TypeError:
        name = None
    if isinstance(value, bool) or name not in _DTYPES:
        raise violation(f"one of {', '.join(_DTYPES)} (a name or a jax/numpy dtype)", "Write e.g. dtype='bfloat16'.")
    return getattr(jnp, name)  # the form of the defaults (jnp.float32), whatever form was given


DType = Annotated[Any, pydantic.AfterValidator(_dtype)]


def _labels(value: Any) -> dict[int, str]:
    out: dict[int, str] = {}
    ok = isinstance(value, Mapping)
    for key, name in value.items() if ok else ():
        index = key if isinstance(key, int) and not isinstance(key, bool) else None
        if isinstance(key, str) and re.fullmatch(r"\d+", key):  # the string keys of a Hugging Face config.json
            index = int(key)
        ok = ok and index is not None and index >= 0 and isinstance(name, str)
        if ok and index is not None:
            out[index] = name
    if not ok:
        raise violation("a dict {class index (an int >= 0): label name (a string)}", "Write e.g. {0: 'neg', 1: 'pos'}.")
    return out


Labels = Annotated[Any, pydantic.AfterValidator(_labels)]


def arguments(func: Callable | None = None, *, error: type[FinetuneError] = ConfigError) -> Callable:
    """Decorator: checks a public function's arguments against their annotations before its body runs.

    Every parameter annotated with a type from this module (or any type pydantic knows) is validated, and the body
    receives the validated values (one callback becomes ``[callback]``, a dtype name a dtype); ``Any`` passes through.
    A ``**kwargs`` parameter annotated with a `TypedDict` (e.g. `Card`) takes exactly its keys. Violations raise
    ``error`` naming the argument, before any work is done.
    """
    if func is None:
        return functools.partial(arguments, error=error)
    signature = inspect.signature(func)
    owner = func.__qualname__.replace(".__init__", "") + "()"

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            names = [p for p in signature.parameters if p != "self"]
            extra = [k for k in kwargs if k not in names]
            if not extra:
                raise  # a call that misses a required argument: Python's own message says which
            raise unknown(extra, names, owner=owner, values=kwargs) from None
        model, var_keyword = _arguments_model(func)
        values = {k: v for k, v in bound.arguments.items() if k in model.model_fields}
        try:
            checked_values = model.model_validate(values)
        except ValidationError as e:
            raise violations.error(e, error, owner=owner, names=_names(model, var_keyword), skip=var_keyword) from None
        for name in values:
            bound.arguments[name] = getattr(checked_values, name)
        if var_keyword is not None and var_keyword in bound.arguments:
            bound.arguments[var_keyword] = dict(bound.arguments[var_keyword])
        return func(*bound.args, **bound.kwargs)

    return wrapper


def _names(model: type[pydantic.BaseModel], var_keyword: str | None) -> tuple[str, ...]:
    names = [n for n in model.model_fields if n != var_keyword]
    card = model.model_fields.get(var_keyword) if var_keyword else None  # the TypedDict of **kwargs, if any
    return (*names, *(typing.get_type_hints(card.annotation) if card is not None else ()))


@functools.cache
def _arguments_model(func: Callable) -> tuple[type[pydantic.BaseModel], str | None]:
    """The pydantic model of ``func``'s annotated parameters (built at the first call, when every name resolves)."""
    hints = typing.get_type_hints(func, include_extras=True)
    fields: dict[str, Any] = {}
    var_keyword = None
    for p in inspect.signature(func).parameters.values():
        if p.name == "self" or p.name not in hints or p.kind is p.VAR_POSITIONAL:
            continue
        if p.kind is p.VAR_KEYWORD:
            var_keyword = p.name
            hint = hints[p.name]
            hint = typing.get_args(hint)[0] if typing.get_origin(hint) in (typing.Unpack, Unpack) else hint
            if is_typeddict(hint):
                fields[p.name] = (hint, {})
            continue
        fields[p.name] = (hints[p.name], ... if p.default is p.empty else p.default)
    config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, protected_namespaces=())
    model: type[pydantic.BaseModel] = pydantic.create_model(func.__qualname__, __config__=config, **fields)
    return model, var_keyword


# ---------------------------------------------------------------------------------------------------- checked classes
@typing.dataclass_transform(frozen_default=True)
def checked(
    cls: type | None = None,
    *,
    error: type[FinetuneError] = ConfigError,
    what: str = "",
    errors: Mapping[str, type[FinetuneError]] | None = None,
) -> Any:
    """Class decorator: a frozen pydantic dataclass whose construction raises ``error`` on bad fields (or
    ``errors[field]`` when the first bad field has its own class, e.g. `RulesError` for a recipe's rules).

    ``dataclasses.fields`` / ``replace`` / ``asdict`` work as on any dataclass; `dataclasses.replace` validates.
    """
    if cls is None:
        return functools.partial(checked, error=error, what=what, errors=errors)
    out = pydantic.dataclasses.dataclass(frozen=True, config=CONFIG)(cls)
    init = out.__init__
    owner = what or f"{cls.__name__}"
    names = tuple(f.name for f in dataclasses.fields(out))

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if len(args) <= len(names):  # positional arguments by name, so that a violation names its field
            args, kwargs = (), {**dict(zip(names, args, strict=False)), **kwargs}
        try:
            init(self, *args, **kwargs)
        except ValidationError as e:
            first = e.errors()[0]["loc"][:1]
            kind = (errors or {}).get(str(first[0]) if first else "", error)
            raise violations.error(e, kind, owner=owner, names=names) from None

    out.__init__ = __init__  # type: ignore[method-assign]
    return out


def validate(cls: type, values: Mapping[str, Any]) -> Any:
    """An instance of checked class ``cls`` from ``values``, raising pydantic's `ValidationError` (for nesting)."""
    return cls.__pydantic_validator__.validate_python(ArgsKwargs((), dict(values)))  # type: ignore[attr-defined]


@functools.cache
def _adapter(kind: Any) -> TypeAdapter:
    return TypeAdapter(kind, config=None if _is_dataclass_or_model(kind) else CONFIG)


def _is_dataclass_or_model(kind: Any) -> bool:
    return isinstance(kind, type) and (dataclasses.is_dataclass(kind) or issubclass(kind, pydantic.BaseModel))


def validate_as(kind: Any, value: Any) -> Any:
    """``value`` validated as ``kind``, raising pydantic's `ValidationError` (inside a validator: the errors nest)."""
    return _adapter(kind).validate_python(value)


def check(kind: Any, value: Any, *, name: str, error: type[FinetuneError] = ConfigError) -> Any:
    """``value`` validated as ``kind`` (a type of this module), or ``error`` naming the argument ``name``."""
    try:
        return _adapter(kind).validate_python(value)
    except ValidationError as e:
        names = tuple(f.name for f in dataclasses.fields(kind)) if dataclasses.is_dataclass(kind) else ()
        raise violations.error(e, error, prefix=name, names=names) from None
