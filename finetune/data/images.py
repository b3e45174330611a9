"""Images -> ``pixel_values`` with the checkpoint's own image processor, once per data set.

The fourth stage of the data's path for images (`finetune.data.pipeline`; text takes `finetune.data.text`).

Images may be PIL images (what a `datasets` ``Image`` feature gives), paths of image files, or numpy arrays
(``[H, W, C]``, ``[C, H, W]``, or ``[H, W]`` for one channel) of ``uint8`` in [0, 255] (or integers in that range) or
floats in [0, 1]; images of different sizes are resized by the processor. PIL images are converted to the model's
colour mode (``RGB`` for 3 channels), as the usual fine-tuning scripts do; arrays with another number of channels, or
of another dtype or range (e.g. already normalised floats), are refused with the shape, dtype and range received.
Every path is checked to exist before any image is processed. The processed tensors are stored by `datasets` (Arrow,
memory-mapped when the data set is on disk) and read one batch at a time, so a large image set does not have to fit
in memory.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from finetune.data.check import pixels
from finetune.data.columns import Prepared
from finetune.data.sources import run_map
from finetune.errors import DataError


class DatasetColumn:
    """One column of a `datasets.Dataset` in numpy format, indexed by arrays of example indices (one batch)."""

    dataset_column = True

    def __init__(self, ds: Any, name: str):
        self.ds = ds.with_format("numpy", columns=[name])
        self.name = name

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: Any) -> np.ndarray:
        return np.asarray(self.ds[np.asarray(index).tolist()][self.name])


def processor_of(model: Any) -> Any:
    """The model's image processor, or a `DataError` that says how to give it one."""
    processor = getattr(model, "processor", None)
    if processor is None:
        where = getattr(model, "source", None) or "the checkpoint directory"
        raise DataError(
            f"The data holds images, but the model has no image processor: no preprocessor_config.json in {where}. "
            "Save one there (image_processor.save_pretrained(dir)), set `model.processor = transformers."
            "AutoImageProcessor.from_pretrained('<the base model>')`, or pass processed `pixel_values` "
            "(float32, [N, channels, height, width])."
        )
    return processor


def to_image(value: Any, channels: int, index: int, column: str) -> Any:
    """One image in the form the processor takes, in the model's number of channels (or a `DataError`)."""
    from PIL import Image

    if isinstance(value, Mapping) and ("bytes" in value or "path" in value):  # an undecoded datasets Image
        value = io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]
    if isinstance(value, str | os.PathLike | io.IOBase):
        value = _open(value, index, column)
    if isinstance(value, Image.Image):
        mode = {1: "L", 3: "RGB"}.get(channels)
        return value.convert(mode) if mode and value.mode != mode else value
    array = pixels(np.asarray(value), f"Image {index} in column `{column}`")
    if array.ndim == 2 and channels == 1:
        return array[..., None]
    if array.ndim == 3 and channels in (array.shape[-1], array.shape[0]):
        return array
    raise DataError(
        f"Image {index} in column `{column}` has shape {array.shape}, but the model takes images with {channels} "
        f"channels ([height, width, {channels}] or [{channels}, height, width]). Convert the images (PIL: "
        f"image.convert({'RGB' if channels == 3 else 'L'!r})) before passing them."
    )


def _open(value: Any, index: int, column: str) -> Any:
    """An image file (a path or a file object) opened with PIL, or a `DataError` naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(value)
        image.load()
        return image
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(
            f"Image {index} in column `{column}` ({str(value)[:200]!r}) cannot be read as an image: {e}. Pass paths "
            "of existing image files, PIL images or arrays."
        ) from None


def _check_paths(ds: Any, column: str) -> None:
    """Every image given as a path exists, checked before any image is processed."""
    if getattr(ds.features[column], "dtype", None) != "string":
        return
    paths = ds.with_format("arrow")[column].to_pylist()
    missing = [i for i, p in enumerate(paths) if not (isinstance(p, str) and os.path.isfile(p))]
    if missing:
        raise DataError(
            f"Column `{column}` names {len(missing)} image file{'s' if len(missing) > 1 else ''} that do not exist: "
            f"{paths[missing[0]]!r} (row {missing[0]}){' and others' if len(missing) > 1 else ''}. Pass paths of "
            "existing image files (relative paths are read from the working directory), or images."
        )


def prepare(ds: Any, cols: Mapping[str, str], *, model: Any, labels: Mapping[str, Any]) -> Prepared:
    """``pixel_values`` for an image data set (with its encoded ``labels``); checks files, pixels, channels and the
    processed size before the images are processed.

    Args:
      ds: A `datasets.Dataset` with an image column.
      cols: ``{"image": column}`` (see `finetune.data.columns.roles`).
      model: The `finetune.Model` (its processor and config).
      labels: The encoded labels (`finetune.data.labels.encode_columns`), kept beside the pixels.

    Returns:
      A `finetune.data.columns.Prepared` with ``pixel_values`` read lazily from the processed data set.

    Example:
      >>> prepared = prepare(ds, {"image": "img"}, model=model, labels={})
    """
    from datasets import Array3D, Features

    processor = processor_of(model)
    config = getattr(model, "hf_config", None)
    channels = int(getattr(config, "num_channels", 3))
    column = cols["image"]
    _check_paths(ds, column)
    first = processor(images=[to_image(ds[0][column], channels, 0, column)], return_tensors="np")["pixel_values"][0]
    size = getattr(config, "image_size", None)
    expected = (channels, size, size) if size else first.shape
    if tuple(first.shape) != tuple(expected):
        raise DataError(
            f"The image processor turns image 0 of column `{column}` into shape {tuple(first.shape)}, but the model "
            f"takes {tuple(expected)} (config num_channels={channels}, image_size={size}). Use the image processor "
            "saved with the checkpoint, or resize the images to the model's size."
        )

    def fn(batch, indices):
        images = [to_image(v, channels, i, column) for v, i in zip(batch[column], indices, strict=True)]
        try:
            values = processor(images=images, return_tensors="np")["pixel_values"]
        except ValueError as e:  # differently sized images the processor does not resize cannot be stacked
            raise DataError(
                f"The images of column `{column}` (examples {indices[0]}..{indices[-1]}) could not be processed "
                f"into one batch: {e}. Resize them to one size, or let the image processor resize them."
            ) from e
        if tuple(values.shape[1:]) != tuple(expected):
            raise DataError(
                f"Images of column `{column}` (examples {indices[0]}..{indices[-1]}) were processed into shape "
                f"{tuple(values.shape[1:])}, but the model takes {tuple(expected)}. Resize the images to one size."
            )
        return {"pixel_values": values.astype(np.float32)}

    parts = (ds._fingerprint, sorted(cols.items()), processor.to_json_string(), expected)
    out = run_map(ds, fn, parts, features=Features({"pixel_values": Array3D(tuple(expected), "float32")}))
    return Prepared({"pixel_values": DatasetColumn(out, "pixel_values"), **labels}, {}, {}, None)
