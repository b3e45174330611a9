"""Raw examples -> model inputs, once per data set: columns, tokenization, word-piece labels, chat templates, packing.

`prepare` turns a `datasets.Dataset` into numpy columns for `finetune.data.batches.ArrayData`: tokenization runs as one
batched ``map`` (cached by `datasets` under a fingerprint of the data, the tokenizer and the options), never on the
training hot path. Token sequences come back ragged (flat values + offsets); batches pad them later to a length
bucket. Images go through `finetune.data.images`.

Column roles and the names found for them (the first present wins; name them with ``columns={role: name}``):

=================  ==============================================================
role               names looked for
=================  ==============================================================
text (+ pair)      sentence1 + sentence2, premise + hypothesis, question1 + question2, text, sentence, content, review
label              label, labels, target
image              image, img
tokens + tags      tokens / words + ner_tags / tags / labels / label
prompt/completion  prompt + completion
messages           messages, conversations
=================  ==============================================================
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from finetune.data import check as datacheck
from finetune.data import labels as labels_lib
from finetune.errors import DataError

logger = logging.getLogger("finetune")

IGNORE = -100
ROLES: dict[str, tuple[str, ...]] = {
    "text": ("text", "sentence", "content", "review", "document"),
    "text_pair": (),
    "label": ("label", "labels", "target"),
    "image": ("image", "img"),
    "tokens": ("tokens", "words"),
    "tags": ("ner_tags", "tags", "labels", "label"),
    "prompt": ("prompt",),
    "completion": ("completion",),
    "messages": ("messages", "conversations"),
}
PAIRS = (("sentence1", "sentence2"), ("premise", "hypothesis"), ("question1", "question2"))
# Columns that hold raw inputs (text, words, images, prompts): data with one of them goes through `prepare`.
RAW_COLUMNS = frozenset(
    {n for role, names in ROLES.items() if role not in ("label", "tags") for n in names} | {n for p in PAIRS for n in p}
)
DEFAULT_MAX_LENGTH = 512


class Prepared(NamedTuple):
    """A data set as numpy: fixed ``columns``, ragged ``sequences`` (values, offsets) and their ``pad_values``."""

    columns: dict[str, Any]
    sequences: dict[str, tuple[np.ndarray, np.ndarray]]
    pad_values: dict[str, int]
    max_length: int | None


# ---------------------------------------------------------------- columns
def find_columns(
    names: Sequence[str], task: str, columns: Mapping[str, str] | None = None, *, need_labels: bool = True
) -> dict[str, str]:
    """``{role: column}`` for ``task``: the explicit ``columns`` first, then the usual names (see the module doc).

    Args:
      names: The data set's column names.
      task: The model's task.
      columns: Explicit ``{role: column name}``.
      need_labels: Whether a label column is required (not for `predict`).

    Returns:
      The column of every role the task uses and the data has.

    Raises:
      DataError: A named column that does not exist, or a required role with no column.

    Example:
      >>> find_columns(["review", "sentiment"], "text-classification", {"text": "review", "label": "sentiment"})
      {'text': 'review', 'label': 'sentiment'}
    """
    given = dict(columns or {})  # its roles were checked by the recipe's schema (`finetune.recipe.Columns`)
    for role, name in given.items():
        if name not in names:
            raise DataError(
                f"`columns` names {name!r} for {role!r}, but the data has no such column. Columns: {list(names)}."
            )
    pick = lambda role: given.get(role) or next((c for c in ROLES[role] if c in names), None)  # noqa: E731
    label_role = "tags" if task == "token-classification" else "label"
    if task == "causal-lm":
        for roles in (("messages",), ("prompt", "completion"), ("text",)):
            if all(pick(r) for r in roles) and (not given or any(r in given for r in roles)):
                return {r: pick(r) for r in roles}
        return _missing("messages, prompt + completion, or text", task, names)
    if task == "token-classification":
        found = {"tokens": pick("tokens"), "tags": pick("tags")}
    elif task == "image-classification":
        found = {"image": pick("image"), "label": pick("label")}
    else:
        pair = next((p for p in PAIRS if p[0] in names and p[1] in names), (None, None))
        found = {"text": given.get("text") or pair[0] or pick("text"), "text_pair": given.get("text_pair") or pair[1]}
        if task != "feature-extraction":
            found["label"] = pick("label")
    for role, column in found.items():
        if column is None and role not in ("text_pair",) and (role != label_role or need_labels):
            _missing(role, task, names)
    return {role: column for role, column in found.items() if column is not None}


def _missing(role: str, task: str, names: Sequence[str]):
    looked = ", ".join(ROLES.get(role, ())) or role
    raise DataError(
        f"Found no {role} column for task {task!r}: the data has columns {list(names)}, and none is named "
        f"{looked}. Name it with `columns={{{role.split(',')[0].split(' ')[0]!r}: '<column>'}}` "
        "(finetune.data.batches.as_source(data, ..., columns=...)), or rename it (dataset.rename_column)."
    )


# ---------------------------------------------------------------- one data set -> numpy
def prepare(
    ds: Any,
    *,
    task: str,
    model: Any,
    columns: Mapping[str, str] | None = None,
    max_length: int | None = None,
    packing: bool = False,
    stage: str = "fit",
) -> Prepared:
    """Tokenizes (or processes) a `datasets.Dataset` for ``task`` and encodes its labels.

    Args:
      ds: The data set.
      task: The model's task.
      model: The `finetune.Model` whose tokenizer / image processor, label names and positions are used.
      columns: Explicit column names by role (see `find_columns`).
      max_length: Truncation length; default ``min(512, the model's positions)``.
      packing: Causal LM: concatenate consecutive examples into rows of up to ``max_length`` tokens.
      stage: ``fit`` / ``evaluate`` need labels, ``predict`` ignores them; only ``fit`` sets new label names.

    Returns:
      The `Prepared` columns.

    Example:
      >>> prepared = prepare(ds, task="text-classification", model=model, max_length=128)
    """
    if len(ds) == 0:
        raise DataError("The data set is empty (0 examples). Pass a data set with at least one example.")
    if "input_ids" in ds.column_names:
        return _pretokenized(ds, task=task, model=model, max_length=max_length, stage=stage)
    cols = find_columns(ds.column_names, task, columns, need_labels=stage != "predict")
    if stage == "predict":  # predictions need no labels, and labels the model lacks must not stop them
        cols = {role: c for role, c in cols.items() if role not in ("label", "tags")}
    fixed = {}
    if "label" in cols:  # labels first: they are checked before any work is done on the inputs
        fixed["labels"] = encode_label_column(ds, cols["label"], model=model, stage=stage)
    if task == "image-classification":
        from finetune.data import images

        return images.prepare(ds, cols, model=model, labels=fixed.get("labels"))
    tokenizer = tokenizer_of(model)
    datacheck.check_tokenizer(tokenizer, model)
    max_length = resolve_max_length(model, tokenizer, max_length)
    encode = {"token-classification": _words_fn, "causal-lm": _lm_fn}.get(task, _text_fn)
    fn = encode(ds, cols, tokenizer=tokenizer, max_length=max_length, model=model, stage=stage)
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
    return Prepared(fixed, sequences, pad_values, max_length)


def run_map(ds: Any, fn: Callable, parts: Any, **kwargs: Any) -> Any:
    """``ds.map(fn)`` batched, replacing every column, under a fingerprint of ``parts`` (so `datasets` can cache)."""
    from datasets.fingerprint import Hasher

    return ds.map(
        fn,
        batched=True,
        batch_size=1000,
        with_indices=True,
        remove_columns=ds.column_names,
        new_fingerprint=Hasher.hash(("finetune-v1", parts)),
        desc="finetune: preparing data",
        **kwargs,
    )


def ragged(ds: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A list column of ``ds`` as ``(values int32, offsets int64)``, read from Arrow without Python lists."""
    column = ds.with_format("arrow")[name].combine_chunks()
    values = column.values.to_numpy(zero_copy_only=False)
    return values.astype(np.int32, copy=False), column.offsets.to_numpy().astype(np.int64)


def encode_label_column(ds: Any, column: str, *, model: Any, stage: str) -> np.ndarray:
    """The label column encoded by `finetune.data.labels.encode`, with names from a ``ClassLabel`` feature if any."""
    feature = ds.features[column]
    names = getattr(feature, "names", None) or getattr(getattr(feature, "feature", None), "names", None)
    arrow = ds.with_format("arrow")[column]
    values = arrow.to_pylist() if hasattr(feature, "feature") else arrow.to_numpy(zero_copy_only=False)
    if any(v is None for v in (values if isinstance(values, list) else values.tolist())):
        raise DataError(f"Column `{column}` has missing (None) labels. Drop those examples or fill in their labels.")
    return labels_lib.encode(values, model=model, column=column, stage=stage, names=names)


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
    positions = datacheck.positions(model)
    if max_length is not None:
        if positions and max_length > positions:
            raise DataError(
                f"`max_length`={max_length} is more than the model's {positions} positions. Pass max_length <= "
                f"{positions}."
            )
        return int(max_length)
    tok_limit = getattr(tokenizer, "model_max_length", None)
    limits = [DEFAULT_MAX_LENGTH, positions, tok_limit if tok_limit and tok_limit < 1_000_000 else None]
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


def _text_fn(ds, cols, *, tokenizer, max_length, **_) -> Callable:
    text, pair, inputs = cols["text"], cols.get("text_pair"), _inputs(tokenizer)

    def fn(batch, indices):
        first = [_as_text(t, text) for t in batch[text]]
        second = [_as_text(t, pair) for t in batch[pair]] if pair else None
        enc = tokenizer(first, second, truncation=True, max_length=max_length)
        return {**{k: enc[k] for k in inputs}, "_truncated": _truncated(enc, max_length)}

    return fn


def _words_fn(ds, cols, *, tokenizer, max_length, model, stage) -> Callable:
    """Token classification: words -> word pieces; the first piece of a word carries its tag, the rest -100."""
    words, tags, inputs = cols["tokens"], cols.get("tags"), _inputs(tokenizer)
    flat, offsets = None, None
    if tags:
        tag_rows, word_rows = ds[tags], ds[words]
        bad = next((i for i, (a, b) in enumerate(zip(tag_rows, word_rows, strict=True)) if len(a) != len(b)), None)
        if bad is not None:
            raise DataError(
                f"Example {bad} has {len(word_rows[bad])} words in `{words}` but {len(tag_rows[bad])} tags in "
                f"`{tags}`. Give every word exactly one tag."
            )
        feature = getattr(ds.features[tags], "feature", None)
        flat = labels_lib.encode(
            np.asarray([t for row in tag_rows for t in row]), model=model, column=tags, stage=stage,
            names=getattr(feature, "names", None),
        )  # fmt: skip
        offsets = np.concatenate([[0], np.cumsum([len(row) for row in tag_rows])])

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


def _lm_fn(ds, cols, *, tokenizer, max_length, **_) -> Callable:
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
def _pretokenized(ds, *, task, model, max_length, stage) -> Prepared:
    """A data set with an ``input_ids`` column: its sequences used as they are (truncated to ``max_length``)."""
    tokenizer = getattr(model, "tokenizer", None)
    max_length = resolve_max_length(model, tokenizer, max_length)
    names = [n for n in ("input_ids", "token_type_ids", "loss_mask") if n in ds.column_names]
    label = next((c for c in ("labels", "label") if c in ds.column_names), None) if stage != "predict" else None
    if label is None and stage != "predict" and task != "causal-lm":
        _missing("label", task, ds.column_names)
    sequences = {n: ragged(ds, n) for n in names}
    fixed = {}
    if label is not None and task == "token-classification":
        sequences["labels"] = ragged(ds, label)
        labels_lib.check_range(sequences["labels"][0].astype(np.int64), labels_lib.num_labels(model), label)
    elif label is not None and task != "causal-lm":
        fixed["labels"] = encode_label_column(ds, label, model=model, stage=stage)
    count = int(np.sum(np.diff(sequences["input_ids"][1]) > max_length))
    if count:
        logger.warning("Truncated %d of %d examples longer than max_length=%d tokens.", count, len(ds), max_length)
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    return Prepared(fixed, sequences, {"input_ids": pad_id, "labels": IGNORE}, max_length)
