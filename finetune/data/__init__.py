"""The training data's path, one module a stage, each entered once and in this order by `as_source`:

``sources`` (what was passed -> a table) -> ``columns`` (which column is what) -> ``labels`` (encoded and checked
before any work on the inputs) -> ``text`` or ``images`` (token ids or pixels) -> ``batches`` (``ArrayData``: padded,
bucketed or packed batches) -> ``prefetch`` (to device). ``pipeline`` holds `as_source`, which calls the stages;
``check`` (the checks against the model) and ``buckets`` lie beneath them all, and ``examples`` (bundled data sets)
beside them. Imports point one way, down this order.
"""

from finetune.data.batches import ArrayData, BatchIterable
from finetune.data.buckets import fitted_buckets, length_buckets
from finetune.data.labels import num_labels
from finetune.data.pipeline import as_source, count_labels
from finetune.data.prefetch import prefetch, prefetch_on_thread
from finetune.data.sources import load_file, rows_to_columns

__all__ = [
    "ArrayData",
    "BatchIterable",
    "as_source",
    "count_labels",
    "fitted_buckets",
    "length_buckets",
    "load_file",
    "num_labels",
    "prefetch",
    "prefetch_on_thread",
    "rows_to_columns",
]
