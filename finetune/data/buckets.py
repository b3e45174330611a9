"""Length buckets: the padded lengths a batch of token sequences may take, so that only a few shapes are compiled."""

from __future__ import annotations

from typing import Any

import numpy as np

SMALLEST_BUCKET = 16


def length_buckets(max_length: int, smallest: int = SMALLEST_BUCKET) -> tuple[int, ...]:
    """Padded lengths a batch may take: powers of two from ``smallest`` below ``max_length``, then ``max_length``.

    Example:
      >>> length_buckets(100)
      (16, 32, 64, 100)
    """
    sizes, size = [], smallest
    while size < max_length:
        sizes.append(size)
        size *= 2
    return (*sizes, max_length)


BUCKET_MULTIPLE = 8  # bucket widths `fitted_buckets` may pick: multiples of this (and the limit itself)


def fitted_buckets(lengths: Any, limit: int, *, multiple: int = BUCKET_MULTIPLE) -> tuple[int, ...]:
    """Length buckets placed where the data's lengths are: no more of them than `length_buckets`, less padding.

    The number of buckets is the number of `length_buckets` (powers of two from 16 up to ``limit``) that the
    examples fall into, so no more shapes are compiled. Their widths are multiples of ``multiple`` (or ``limit``),
    chosen by dynamic programming to minimise the padding of the examples, each padded to its bucket; batches
    grouped by length (`finetune.Recipe.group_by_length`) come close to that. The longest bucket is the longest
    example rounded up to ``multiple``, at most ``limit`` (what that saves: docs/performance.md).

    Args:
      lengths: Token count of every example.
      limit: The truncation limit (longer examples count as ``limit``).
      multiple: Bucket widths are multiples of this, so that they suit vector units.

    Example:
      >>> fitted_buckets([20] * 100 + [40] * 100 + [60] * 10, limit=128)
      (40, 64)
    """
    lengths = np.clip(np.asarray(lengths, np.int64), 1, limit)
    if lengths.size == 0:
        return (limit,)
    powers = np.asarray(length_buckets(limit))
    count = len(np.unique(np.searchsorted(powers, lengths)))  # the power-of-two buckets the examples fall into
    top = min(limit, -(-int(lengths.max()) // multiple) * multiple)
    widths = np.asarray(sorted({*range(multiple, top, multiple), top}))
    below = np.concatenate([[0], np.cumsum(np.bincount(np.searchsorted(widths, lengths), minlength=len(widths)))])
    # cost[k][j]: fewest tokens for the examples up to widths[j] in k + 1 buckets, the largest widths[j].
    cost = [widths * below[1:]]
    choice = []
    for _ in range(1, min(count, len(widths))):
        prev = cost[-1]
        best = np.full(len(widths), np.iinfo(np.int64).max // 2)
        arg = np.zeros(len(widths), np.int64)
        for j in range(1, len(widths)):
            totals = prev[:j] + widths[j] * (below[j + 1] - below[1 : j + 1])
            arg[j] = int(np.argmin(totals))
            best[j] = totals[arg[j]]
        cost.append(best)
        choice.append(arg)
    k = int(np.argmin([c[-1] for c in cost]))
    picked, j = [len(widths) - 1], len(widths) - 1
    for arg in reversed(choice[:k]):
        j = int(arg[j])
        picked.append(j)
    return tuple(int(widths[i]) for i in reversed(picked))
