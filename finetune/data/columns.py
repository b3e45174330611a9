"""Which column is what: the role of each column of a table (text, label, image, tokens...) for a task.

The second stage of the data's path (`finetune.data.pipeline`), after `finetune.data.sources` made the table; the
roles it finds decide what `finetune.data.labels` encodes and what `finetune.data.text` or `finetune.data.images`
prepares. `Prepared` is what those stages hand on to `finetune.data.batches`.

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

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, NoReturn

import numpy as np

from finetune.errors import DataError

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


class Prepared(NamedTuple):
    """A data set as numpy: fixed ``columns``, ragged ``sequences`` (values, offsets) and their ``pad_values``."""

    columns: dict[str, Any]
    sequences: dict[str, tuple[np.ndarray, np.ndarray]]
    pad_values: dict[str, int]
    max_length: int | None


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
            picked = {r: pick(r) for r in roles}
            if all(picked.values()) and (not given or any(r in given for r in roles)):
                return {r: c for r, c in picked.items() if c}
        missing("messages, prompt + completion, or text", task, names)
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
            missing(role, task, names)
    return {role: column for role, column in found.items() if column is not None}


def missing(role: str, task: str, names: Sequence[str]) -> NoReturn:
    """Raises the `DataError` of a role with no column, naming the names looked for and the fix."""
    looked = ", ".join(ROLES.get(role, ())) or role
    raise DataError(
        f"Found no {role} column for task {task!r}: the data has columns {list(names)}, and none is named "
        f"{looked}. Name it with `columns={{{role.split(',')[0].split(' ')[0]!r}: '<column>'}}` "
        "(finetune.data.pipeline.as_source(data, ..., columns=...)), or rename it (dataset.rename_column)."
    )


def roles(
    names: Sequence[str], task: str, columns: Mapping[str, str] | None = None, *, stage: str = "fit"
) -> dict[str, str]:
    """``{role: column}`` of a table for ``task`` at ``stage``: `find_columns`' roles, without the labels for
    ``predict``; for a table that is already tokenized (an ``input_ids`` column), ``input_ids`` and its label column
    (``labels`` or ``label``), as ``token_labels`` for token classification (one id per token).

    Raises:
      DataError: A named column that does not exist, or a required role with no column.
    """
    if "input_ids" in names:
        label = next((c for c in ("labels", "label") if c in names), None) if stage != "predict" else None
        if label is None and stage != "predict" and task != "causal-lm":
            missing("label", task, names)
        found = {"input_ids": "input_ids"}
        if label is not None and task != "causal-lm":
            found["token_labels" if task == "token-classification" else "label"] = label
        return found
    cols = find_columns(names, task, columns, need_labels=stage != "predict")
    if stage == "predict":  # predictions need no labels, and labels the model lacks must not stop them
        cols = {role: c for role, c in cols.items() if role not in ("label", "tags")}
    return cols
