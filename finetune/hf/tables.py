"""Key templates: the grammar the architectures' conversion tables are written in, parsed and rendered both ways.

A table (``models/<arch>/convert.py``) is plain data: rows ``(key, path)`` or ``(key, path, transform)``, where
``key`` is a checkpoint key template, ``path`` an NNX path template (or a tuple of them when one checkpoint tensor
feeds several parameters) and ``transform`` a name from `TRANSFORMS`, a record ``(kind, *arguments)`` of a kind in
`KINDS` (``("reshape", (768, 12, 64), (768, 768), (1, 0))``), or a `Transform`. The grammar:

- ``{i}``: a placeholder for a layer index (digits), the same number in a row's key and path(s);
- ``[a|b]``: alternatives. Loading accepts each, export writes the first: ``LayerNorm.[weight|gamma]`` reads the
  legacy spelling too, ``[bert.|]`` is an optional model prefix that task models export, ``[|bert.]`` one that the
  bare encoder drops (as transformers' classes expect);
- ``*``: any rest of the key (for the keys a table ignores; such a template cannot be rendered).

`parse` and `render` are the one function pair: ``parse(t, render(t, values)) == values``.

Example:
  >>> parse("[bert.|]encoder.layer.{i}.output.dense.weight", "encoder.layer.3.output.dense.weight")
  {'i': '3'}
  >>> render("encoder/layers/{i}/output/kernel", {"i": "3"})
  'encoder/layers/3/output/kernel'
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from finetune.errors import LoadError

# One token of a template: a placeholder, an alternatives group, the wildcard, or literal text.
_TOKEN = re.compile(r"\{(?P<name>\w+)\}|\[(?P<alts>[^\[\]]*)\]|(?P<star>\*)|(?P<text>[^{}\[\]*|]+)")


@functools.lru_cache(maxsize=4096)
def _tokens(template: str) -> tuple[re.Match, ...]:
    """The template's tokens; a `LoadError` names a template that is not in the grammar."""
    tokens, end = [], 0
    for m in _TOKEN.finditer(template):
        if m.start() != end:
            break
        tokens.append(m)
        end = m.end()
    if end != len(template):
        raise LoadError(
            f"The table template {template!r} is not in the key grammar at {template[end:]!r}: use literal text, "
            "`{i}` placeholders, `[a|b]` alternatives (not nested) and `*` for any rest."
        )
    return tuple(tokens)


@functools.lru_cache(maxsize=4096)
def _pattern(template: str) -> re.Pattern:
    """The full-match regex of a template: placeholders are named groups (repeated ones must agree)."""
    seen: set[str] = set()

    def regex(template: str) -> str:
        out = []
        for m in _tokens(template):
            if m["name"]:
                out.append(f"(?P={m['name']})" if m["name"] in seen else rf"(?P<{m['name']}>\d+)")
                seen.add(m["name"])
            elif m["alts"] is not None:
                out.append("(?:" + "|".join(regex(alt) for alt in m["alts"].split("|")) + ")")
            elif m["star"]:
                out.append(".*")
            else:
                out.append(re.escape(m["text"]))
        return "".join(out)

    return re.compile(regex(template))


def parse(template: str, text: str) -> dict[str, str] | None:
    """The placeholder values for which ``template`` stands for ``text`` (a key or a path), or None if it does not."""
    m = _pattern(template).fullmatch(text)
    return None if m is None else {k: v for k, v in m.groupdict().items() if v is not None}


def render(template: str, values: Mapping[str, str]) -> str:
    """The key (or path) ``template`` stands for with ``values``: each alternatives group writes its first."""
    out = []
    for m in _tokens(template):
        if m["name"]:
            if m["name"] not in values:
                raise LoadError(f"The table template {template!r} needs a value for `{{{m['name']}}}` to be rendered.")
            out.append(str(values[m["name"]]))
        elif m["alts"] is not None:
            out.append(render(m["alts"].split("|")[0], values))
        elif m["star"]:
            raise LoadError(f"The table key {template!r} cannot be turned back into a checkpoint key for export.")
        else:
            out.append(m["text"])
    return "".join(out)


# --------------------------------------------------------------------------------------------------------------------
# Transforms: checkpoint array <-> parameter array(s)
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Transform:
    """Checkpoint array <-> parameter array(s). The base class is the identity."""

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        """Checkpoint array -> one array per target path."""
        return (x,)

    def inverse(self, xs: Sequence[np.ndarray]) -> np.ndarray:
        """Parameter arrays (one per target path) -> checkpoint array."""
        (x,) = xs
        return x


@dataclasses.dataclass(frozen=True)
class Transpose(Transform):
    """A PyTorch ``nn.Linear`` weight ``(out, in)`` <-> an NNX kernel ``(in, out)``; any permutation via ``axes``."""

    axes: tuple[int, ...] | None = None

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        return (np.transpose(x, self.axes),)

    def inverse(self, xs: Sequence[np.ndarray]) -> np.ndarray:
        (x,) = xs
        return np.transpose(x, None if self.axes is None else np.argsort(self.axes))


@dataclasses.dataclass(frozen=True)
class Reshape(Transform):
    """Transpose (optional) then reshape, e.g. a ``(heads*dim, embed)`` weight -> an ``(embed, heads, dim)`` kernel.

    ``shape`` is the parameter shape; ``source`` the checkpoint shape after the transpose (for `inverse`).
    """

    shape: tuple[int, ...]
    source: tuple[int, ...]
    transpose: tuple[int, ...] | None = None

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        if self.transpose is not None:
            x = np.transpose(x, self.transpose)
        return (np.reshape(x, self.shape),)

    def inverse(self, xs: Sequence[np.ndarray]) -> np.ndarray:
        (x,) = xs
        x = np.reshape(x, self.source)
        return x if self.transpose is None else np.transpose(x, np.argsort(self.transpose))


@dataclasses.dataclass(frozen=True)
class Split(Transform):
    """One fused checkpoint tensor (e.g. GPT-2's ``c_attn``) <-> ``n`` equal parameters along ``axis``."""

    n: int
    axis: int = -1
    transpose: bool = False

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        if self.transpose:
            x = x.T
        return tuple(np.split(x, self.n, axis=self.axis))

    def inverse(self, xs: Sequence[np.ndarray]) -> np.ndarray:
        x = np.concatenate(list(xs), axis=self.axis)
        return x.T if self.transpose else x


IDENTITY = Transform()
TRANSPOSE = Transpose()
# The names a table row may give its transform. "split" cuts the last axis into one part per path of the row.
TRANSFORMS: dict[str, Transform] = {
    "identity": IDENTITY,
    "transpose": TRANSPOSE,  # PyTorch nn.Linear (out, in) <-> NNX kernel (in, out)
    "conv": Transpose(axes=(2, 3, 1, 0)),  # PyTorch Conv2d (out, in, h, w) <-> NNX Conv (h, w, in, out)
}


# --------------------------------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of a table: checkpoint key template -> NNX path template(s), with a transform."""

    key: str
    path: str | tuple[str, ...]
    transform: Transform = IDENTITY

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.path,) if isinstance(self.path, str) else self.path


# The records a row may give as its transform: ``(kind, *arguments)`` builds ``KINDS[kind](*arguments)``.
KINDS: dict[str, type[Transform]] = {"transpose": Transpose, "reshape": Reshape, "split": Split}


def _transform(spec: str | tuple | Transform, paths: tuple[str, ...]) -> Transform:
    if isinstance(spec, Transform):
        return spec
    if spec == "split":
        return Split(len(paths))
    if isinstance(spec, tuple) and spec and spec[0] in KINDS:
        return KINDS[spec[0]](*spec[1:])
    if isinstance(spec, str) and spec in TRANSFORMS:
        return TRANSFORMS[spec]
    raise LoadError(
        f"A table row gives the transform {spec!r}; the known names are {', '.join([*TRANSFORMS, 'split'])}, and the "
        f"records are (kind, *arguments) with a kind among {', '.join(KINDS)}. Use one of these, or give the row a "
        "`finetune.hf.tables.Transform`."
    )


def rows(table: Iterable[Row | tuple]) -> list[Row]:
    """A table's rows as `Row` records: ``(key, path)`` and ``(key, path, transform name)`` tuples are read too."""
    out = []
    for row in table:
        if not isinstance(row, Row):
            key, path, *rest = row
            paths = (path,) if isinstance(path, str) else tuple(path)
            row = Row(key, path if isinstance(path, str) else paths, _transform(rest[0] if rest else IDENTITY, paths))
        out.append(row)
    return out


def match(table: Sequence[Row], key: str) -> tuple[Row, tuple[str, ...]] | None:
    """Loading: the first row whose key template stands for ``key``, and the parameter paths it fills."""
    for row in table:
        values = parse(row.key, key)
        if values is not None:
            return row, tuple(render(template, values) for template in row.paths)
    return None


def key_for(table: Sequence[Row], path: str) -> tuple[str, Row, tuple[str, ...]] | None:
    """Export: ``(checkpoint key, row, the row's parameter paths)`` of the first row with ``path``, or None."""
    for row in table:
        for template in row.paths:
            values = parse(template, path)
            if values is not None:
                return render(row.key, values), row, tuple(render(t, values) for t in row.paths)
    return None


def ignored(patterns: Sequence[str], key: str) -> bool:
    """Whether ``key`` is one that a table's ignore templates let go unused."""
    return any(parse(p, key) is not None for p in patterns)


def listing(title: str, items: Sequence[str], limit: int = 25) -> str:
    """``title (n):`` and the first ``limit`` items, one a line: a section of a table-coverage error."""
    shown = [f"  - {item}" for item in items[:limit]]
    if len(items) > limit:
        shown.append(f"  - ... and {len(items) - limit} more")
    return f"{title} ({len(items)}):\n" + "\n".join(shown)
