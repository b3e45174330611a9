"""One loader for every architecture: checkpoint key <-> NNX path tables, applied both ways.

A table is data: a sequence of `Row`s. ``Row.key`` is an escaped full-match regex on the checkpoint key, ``Row.path``
an NNX path template (``\\1`` back-references to the key's groups) or a tuple of them when one checkpoint tensor
feeds several parameters (a fused qkv split), and ``Row.transform`` turns the checkpoint array into the parameter
array(s) and back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


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

    def forward(self, x):
        return (np.transpose(x, self.axes),)

    def inverse(self, xs):
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

    def forward(self, x):
        if self.transpose is not None:
            x = np.transpose(x, self.transpose)
        return (np.reshape(x, self.shape),)

    def inverse(self, xs):
        (x,) = xs
        x = np.reshape(x, self.source)
        return x if self.transpose is None else np.transpose(x, np.argsort(self.transpose))


@dataclasses.dataclass(frozen=True)
class Split(Transform):
    """One fused checkpoint tensor (e.g. GPT-2's ``c_attn``) <-> ``n`` equal parameters along ``axis``."""

    n: int
    axis: int = -1
    transpose: bool = False

    def forward(self, x):
        if self.transpose:
            x = x.T
        return tuple(np.split(x, self.n, axis=self.axis))

    def inverse(self, xs):
        x = np.concatenate(list(xs), axis=self.axis)
        return x.T if self.transpose else x


IDENTITY = Transform()
TRANSPOSE = Transpose()


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of a mapping table: checkpoint key regex -> NNX path template(s), with a transform."""

    key: str
    path: str | tuple[str, ...]
    transform: Transform = IDENTITY

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.path,) if isinstance(self.path, str) else self.path
