"""Text -> token ids with the checkpoint's own tokenizer, once per data set: word pieces, chat templates, packing.

The fourth stage of the data's path for text (`finetune.data.pipeline`; images take `finetune.data.images`):
`prepare` turns a `datasets.Dataset` into ragged token sequences (flat values + offsets) for
`finetune.data.batches.ArrayData`. Tokenization runs as one batched ``map`` (cached by `datasets` under a fingerprint
of the data, the tokenizer and the options), never on the training hot path; batches pad the sequences later to a
length bucket. The columns come from `finetune.data.columns` and the encoded labels from `finetune.data.labels`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from finetune.data.check import check_tokenizer, positions
from finetune.data.columns import Prepared
from finetune.data.sources import ragged, run_map
from finetune.errors import DataError

logger = logging.getLogger("finetune")

IGNORE = -100
DEFAULT_MAX_LENGTH = 512


# ---------------------------------------------------------------- one data set -> token ids
def prepare(
    ds: Any,
    cols: Mapping[str, str],
    *,
    task: str,
    model: Any,
    labels: Mapping[str, Any],
    max_length: int | None = None,
    packing: bool = False,
    stage: str = "fit",
) -> Prepared:
    """Tokenizes a `datasets.Dataset` for ``task``, its labels already encoded.

    Args:
      ds: The data set.
      cols: ``{role: column}`` (`finetune.data.columns.roles`).
      task: The model's task.
      model: The `finetune.Model` whose tokenizer and positions are used.
      labels: The encoded labels (`finetune.data.labels.encode_columns`): ``labels`` per example or per token,
        ``word_labels`` per word (aligned here to the word pieces).
      max_length: Truncation length; default ``min(512, the model's positions)``.
      packing: Causal LM: concatenate consecutive examples into rows of up to ``max_length`` tokens.
      stage: ``fit``, ``evaluate`` or ``predict`` (part of the cache key: ``fit`` may set new label names).

    Returns:
      The `Prepared` columns.

    Example:
      >>> prepared = prepare(ds, {"text": "text"}, task="text-classification", model=model, labels={})
    """
    if "input_ids" in cols:
        return _pretokenized(ds, model=model, labels=labels, max_length=max_length)
    tokenizer = tokenizer_of(model)
    check_tokenizer(tokenizer, model)
    max_length = resolve_max_length(model, tokenizer, max_length)
    encode = {"token-classification": _words_fn, "causal-lm": _lm_fn}.get(task, _text_fn)
    fn = encode(cols, tokenizer=tokenizer, max_length=max_length, word_labels=labels.get("word_labels"))
    parts = (ds._fingerprint, task, sorted(cols.items()), max_length, stage == "fit", _tokenizer_id(tokenizer))
    out = run_map(ds, fn, parts)
    _log_truncation(out, max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    names = [n for n in ("input_ids", "token_type_ids", "labels", "loss_mask") if n in out.column_names]
    sequences = {n: ragged(out, n) for n in names}
    if packing:
        if task != "causal-lm":
            raise DataError(
                f"`packing` applies to tasks 'causal-lm' (rows joined here) and 'text-classification' (batches packed "
                f"by fit); received packing=True with task={task!r}. Pass packing=False for this task."
            )
        sequences = pack(sequences, max_length)
    pad_values = {"input_ids": pad_id, "labels": IGNORE}
    return Prepared({"labels": labels["labels"]} if "labels" in labels else {}, sequences, pad_values, max_length)


# ---------------------------------------------------------------- tokenizers
def tokenizer_of(model: Any) -> Any:
    """The model's tokenizer, or a `DataError` that says how to give it one."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        where = getattr(model, "source", None) or "the checkpoint directory"
        raise DataError(
            f"The data holds raw text, but the model has no tokenizer: none was found in {where}. Save one there "
            "(tokenizer.save_pretrained(dir)), or set `model.tokenizer = transformers.AutoTokenizer.from_pretrained("
            "'<the base model>')`, or pass tokenized data (`input_ids`)."
        )
    return tokenizer


def resolve_max_length(model: Any, tokenizer: Any, max_length: int | None) -> int:
    """``max_length``, checked against the model's positions; default ``min(512, positions)``."""
    limit = positions(model)
    if max_length is not None:
        if limit and max_length > limit:
            raise DataError(
                f"`max_length`={max_length} is more than the model's {limit} positions. Pass max_length <= {limit}."
            )
        return int(max_length)
    tok_limit = getattr(tokenizer, "model_max_length", None)
    limits = [DEFAULT_MAX_LENGTH, limit, tok_limit if tok_limit and tok_limit < 1_000_000 else None]
    return int(min(x for x in limits if x))


def _tokenizer_id(tokenizer: Any) -> tuple:
    return (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer),
            getattr(tokenizer, "chat_template", None), tokenizer.eos_token, tokenizer.pad_token_id)  # fmt: skip


def _inputs(tokenizer: Any) -> list[str]:
    names = getattr(tokenizer, "model_input_names", ["input_ids"])
    return [n for n in ("input_ids", "token_type_ids") if n in names]


def _truncated(encoding: Any, max_length: int) -> list[bool]:
    """Which rows were truncated: the fast tokenizers record what they cut off (``overflowing``)."""
    if getattr(encoding, "encodings", None):
        return [bool(e.overflowing) for e in encoding.encodings]
    return [len(ids) >= max_length for ids in encoding["input_ids"]]


def _log_truncation(out: Any, max_length: int) -> None:
    count = int(np.sum(out.with_format("arrow")["_truncated"].to_numpy(zero_copy_only=False)))
    if count:
        logger.warning(
            "Truncated %d of %d examples longer than max_length=%d tokens (pass a larger `max_length`, up to the "
            "model's positions, to keep more).",
            count,
            len(out),
            max_length,
        )


def _as_text(value: Any, column: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"Column `{column}` must hold text; received a {type(value).__name__} ({value!r:.60}).")
    return value


def _text_fn(cols, *, tokenizer, max_length, **_) -> Callable:
    text, pair, inputs = cols["text"], cols.get("text_pair"), _inputs(tokenizer)

    def fn(batch, indices):
        first = [_as_text(t, text) for t in batch[text]]
        second = [_as_text(t, pair) for t in batch[pair]] if pair else None
        enc = tokenizer(first, second, truncation=True, max_length=max_length)
        return {**{k: enc[k] for k in inputs}, "_truncated": _truncated(enc, max_length)}

    return fn


def _words_fn(cols, *, tokenizer, max_length, word_labels, **_) -> Callable:
    """Token classification: words -> word pieces; the first piece of a word carries its tag, the rest -100."""
    words, inputs = cols["tokens"], _inputs(tokenizer)
    flat, offsets = word_labels if word_labels is not None else (None, None)

    def fn(batch, indices):
        enc = tokenizer(batch[words], is_split_into_words=True, truncation=True, max_length=max_length)
        out = {**{k: enc[k] for k in inputs}, "_truncated": _truncated(enc, max_length)}
        if flat is not None:
            out["labels"] = [align(enc.word_ids(i), flat[offsets[j] : offsets[j + 1]]) for i, j in enumerate(indices)]
        return out

    return fn


def align(word_ids: Sequence[int | None], word_labels: Sequence[int]) -> list[int]:
    """Word labels -> token labels: the first piece of each word gets the word's label; other pieces and special
    tokens get -100 (ignored by the loss and the metrics).

    Example:
      >>> align([None, 0, 1, 1, None], [3, 5])
      [-100, 3, 5, -100, -100]
    """
    out, previous = [], None
    for w in word_ids:
        out.append(IGNORE if w is None or w == previous else int(word_labels[w]))
        previous = w
    return out


# ---------------------------------------------------------------- causal LM
def render_chat(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The conversation rendered with the tokenizer's chat template, and the character spans of the assistant turns.

    Example:
      >>> text, spans = render_chat(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", ...}])
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "The data holds chat `messages`, but the tokenizer has no chat template. Set one "
            "(`model.tokenizer.chat_template = '<jinja template>'`), or pass `prompt` + `completion` columns."
        )
    render = lambda msgs, gen: tokenizer.apply_chat_template(list(msgs), tokenize=False, add_generation_prompt=gen)  # noqa: E731
    full = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render(messages[:i], True)) if i else 0
        upto = render(messages[: i + 1], False)
        if full.startswith(upto) and start <= len(upto):
            spans.append((start, len(upto)))
        else:  # a template that renders earlier turns differently once later ones exist: find the content itself
            at = full.find(message["content"], start)
            spans.append((at, at + len(message["content"])) if at >= 0 else (0, 0))
    return full, spans


def _lm_fn(cols, *, tokenizer, max_length, **_) -> Callable:
    """Causal LM: text, prompt + completion (+ EOS), or chat messages; ``loss_mask`` 1 on the trained tokens."""
    eos = tokenizer.eos_token or ""

    def example(batch, i):
        if "messages" in cols:
            return render_chat(tokenizer, batch[cols["messages"]][i])
        if "prompt" in cols:
            prompt = _as_text(batch[cols["prompt"]][i], cols["prompt"])
            completion = _as_text(batch[cols["completion"]][i], cols["completion"])
            text = prompt + completion + ("" if completion.endswith(eos) else eos)
            return text, [(len(prompt), len(text))]
        text = _as_text(batch[cols["text"]][i], cols["text"])
        return text + ("" if text.endswith(eos) else eos), None

    def fn(batch, indices):
        texts, spans = zip(*(example(batch, i) for i in range(len(indices))), strict=True)
        enc = tokenizer(
            list(texts), truncation=True, max_length=max_length, return_offsets_mapping=True,
            add_special_tokens="messages" not in cols,
        )  # fmt: skip
        masks = [
            [1] * len(row) if sp is None else [int(b > a and any(s <= a < e for s, e in sp)) for a, b in row]
            for row, sp in zip(enc["offset_mapping"], spans, strict=True)
        ]
        return {"input_ids": enc["input_ids"], "loss_mask": masks, "_truncated": _truncated(enc, max_length)}

    return fn


def pack(sequences: dict[str, tuple[np.ndarray, np.ndarray]], max_length: int) -> dict:
    """Packs consecutive examples into rows of at most ``max_length`` tokens (no copy: only the offsets change).

    Attention spans the examples packed into one row, as in the classic packing of SFT trainers; the EOS token that
    ends every example separates them.

    Example:
      >>> pack({"input_ids": (np.arange(6), np.array([0, 2, 4, 6]))}, 4)["input_ids"][1]
      array([0, 4, 6])
    """
    offsets = next(iter(sequences.values()))[1]
    bounds, filled = [0], 0
    for i, n in enumerate(np.diff(offsets)):
        if filled + n > max_length and filled:
            bounds.append(i)
            filled = 0
        filled += n
    bounds.append(len(offsets) - 1)
    return {name: (values, offs[bounds]) for name, (values, offs) in sequences.items()}


# ---------------------------------------------------------------- already tokenized
def _pretokenized(ds: Any, *, model: Any, labels: Mapping[str, Any], max_length: int | None) -> Prepared:
    """A data set with an ``input_ids`` column: its sequences used as they are (truncated to ``max_length``)."""
    tokenizer = getattr(model, "tokenizer", None)
    max_length = resolve_max_length(model, tokenizer, max_length)
    names = [n for n in ("input_ids", "token_type_ids", "loss_mask") if n in ds.column_names]
    sequences = {n: ragged(ds, n) for n in names}
    fixed = {}
    if isinstance(labels.get("labels"), tuple):  # one label per token (token classification)
        sequences["labels"] = labels["labels"]
    elif "labels" in labels:
        fixed["labels"] = labels["labels"]
    count = int(np.sum(np.diff(sequences["input_ids"][1]) > max_length))
    if count:
        logger.warning("Truncated %d of %d examples longer than max_length=%d tokens.", count, len(ds), max_length)
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    return Prepared(fixed, sequences, {"input_ids": pad_id, "labels": IGNORE}, max_length)
