"""Keeping Hub tokens out of everything finetune shows or writes: one scrubber, applied where finetune calls the Hub.

`guard` wraps every call finetune makes into ``huggingface_hub``. It registers the tokens in play (the one given, and
those of ``HF_TOKEN`` and the stored login) for the life of the process, and from then on every form of them (as
given, stripped, inside the repr of a string, of bytes or of a header dict, JSON-escaped, URL- or percent-encoded, and
inside any base64 text such as a basic-auth header) is replaced by ``<redacted>`` in:

- every log record of every logger (a log-record factory, so child loggers such as ``huggingface_hub.file_download``
  or ``httpx`` are covered too, and the exception a record carries),
- every warning shown,
- the exception leaving the guarded call and its whole chain (``__cause__``, ``__context__``, notes, the args and
  string attributes of each), so neither ``str(error)`` nor a printed traceback holds a token.

Files that finetune stages for an upload are scrubbed with `scrub_files`; `find_in_files` refuses to upload a
folder finetune did not write that holds a token.

Example:
  >>> with guard("hf_secret"):
  ...     api.upload_folder(...)   # any error or log record it produces shows <redacted> instead of the token
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import threading
import traceback
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

MASK = "<redacted>"  # safe wherever it lands: YAML (a model card), JSON, a URL, a message
# Derived forms shorter than this are not searched for (they would mask ordinary text); the token itself always is.
_MIN_FORM = 8
# Staged files larger than this are weights (float arrays finetune computed), never text that could hold a token.
_MAX_SCANNED_BYTES = 64 * 2**20

_lock = threading.Lock()
_forms: tuple[str, ...] = ()  # every form of every registered token, longest first


def forms(token: str) -> set[str]:
    """Every way ``token`` may be written into text: as given (stripped: a form never swallows the text around it),
    with its whitespace removed or cut at it, escaped in reprs and JSON, URL-encoded, and the base64 of it at each
    of the three byte alignments (the part that any base64 text holding it contains)."""
    stripped = token.strip()
    pieces = re.split(r"[\s\x00-\x1f\x7f]+", stripped)  # what a client that drops whitespace or cuts at it sends
    bases = {stripped, "".join(pieces), *(p for p in pieces if len(p) >= _MIN_FORM)} - {""}
    out = set(bases)
    for t in bases:
        out |= {repr(t)[1:-1], repr(t.encode())[2:-1], json.dumps(t)[1:-1], quote(t, safe=""), quote(t), quote_plus(t)}
        out |= _base64_cores(t.encode())
    return {f for f in out if f in bases or len(f) >= min(_MIN_FORM, len(token))}


def _base64_cores(data: bytes) -> set[str]:
    """The base64 characters fixed by ``data`` alone, for ``data`` starting at each offset modulo 3 of a longer
    text (e.g. ``user:token`` in a basic-auth header): the groups that hold only bytes of ``data``."""
    out = set()
    for offset in range(3):
        padded = b"\0" * offset + data
        full = len(padded) // 3 * 4  # the characters of complete groups; a partial last group depends on what follows
        start = 4 if offset else 0  # the first group mixes in bytes before ``data``
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            core = encode(padded)[start:full].decode()
            if core:
                out.add(core)
    return out


def register(*tokens: Any) -> None:
    """Adds the forms of every string in ``tokens`` to those masked from now on, in this process."""
    global _forms
    new = set().union(*(forms(t) for t in tokens if isinstance(t, str) and t))
    with _lock:
        if not new <= set(_forms):
            _forms = tuple(sorted(set(_forms) | new, key=len, reverse=True))
        if _forms:  # nothing to mask: the process's log-record factory and warning display stay as they are
            _install()


def scrub(text: str) -> str:
    """``text`` with every form of every registered token replaced by ``<redacted>``."""
    for form in _forms:
        if form in text:
            text = text.replace(form, MASK)
    return text


def leaks(text: str) -> bool:
    """Whether ``text`` holds a form of a registered token."""
    return any(form in text for form in _forms)


def _repr(value: Any) -> str:
    try:
        return repr(value)
    except Exception:  # noqa: BLE001 -- an object whose repr fails holds nothing we could show
        return ""


def _scrub_value(value: Any) -> Any:
    """``value`` with every registered token masked: strings and bytes, inside tuples, lists and dicts; an exception
    in place; any other object whose repr holds a token becomes the mask. Unchanged values are returned as they are."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, BaseException):
        return value  # scrubbed as a member of the chain (`_chain`)
    if value is None or isinstance(value, (int, float)) or not leaks(_repr(value)):
        return value
    if isinstance(value, bytes):
        return scrub(value.decode("utf-8", "backslashreplace")).encode()
    if type(value) in (tuple, list):
        return type(value)(_scrub_value(v) for v in value)
    if type(value) is dict:
        return {_scrub_value(k): _scrub_value(v) for k, v in value.items()}
    return MASK  # an object whose repr holds a token (a request, a header mapping)


def _chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and every exception linked to it (cause, context, the members of a group, exceptions held in args or
    attributes), each once."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        held = [*e.args, *vars(e).values(), *(e.exceptions if isinstance(e, BaseExceptionGroup) else ())]
        todo.extend(x for x in (e.__cause__, e.__context__, *held) if isinstance(x, BaseException))


def scrub_exception(error: BaseException) -> BaseException:
    """Masks every registered token in ``error`` and its chain, in place: args, notes, string attributes (such as
    ``OSError.filename`` or huggingface_hub's ``server_message``). A link whose text still holds a token (an
    exception whose ``__str__`` reads elsewhere) is cut from the chain. Returns ``error``."""
    if not _forms:
        return error
    for e in _chain(error):
        try:
            e.args = _scrub_value(e.args)
        except (AttributeError, TypeError):  # an exception type with read-only args
            pass
        if isinstance(e, OSError):  # its message is built from these, not from args
            for key in ("strerror", "filename", "filename2"):
                if isinstance(getattr(e, key), str):
                    setattr(e, key, scrub(getattr(e, key)))
        if hasattr(e, "__notes__"):
            e.__notes__ = [scrub(str(n)) for n in e.__notes__]
        for key, value in list(vars(e).items()):
            if key.startswith("__") or isinstance(value, BaseException):
                continue
            cleaned = _scrub_value(value)
            if cleaned is not value:
                try:
                    setattr(e, key, cleaned)
                except (AttributeError, TypeError):
                    pass
    for e in _chain(error):
        for link in ("__cause__", "__context__"):
            linked = getattr(e, link)
            if linked is not None and leaks("".join(traceback.format_exception_only(linked)) + _repr(linked)):
                setattr(e, link, None)
                e.__suppress_context__ = True
    return error


# ---------------------------------------------------------------------- logging and warnings
def _scrub_record(record: logging.LogRecord) -> None:
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 -- a record whose args do not fit its message: leave it to the handler
        message = str(record.msg)
    if leaks(message):
        record.msg, record.args = scrub(message), None
    if record.exc_info and isinstance(record.exc_info[1], BaseException):
        scrub_exception(record.exc_info[1])
        text = "".join(traceback.format_exception(*record.exc_info))
        if leaks(text):
            record.exc_text = scrub(text).rstrip("\n")
    if record.stack_info and leaks(record.stack_info):
        record.stack_info = scrub(record.stack_info)


def _install() -> None:
    """Puts the log-record factory and the warning display in front of the current ones: once, and again if
    someone replaced them since (a display restored by ``warnings.catch_warnings`` may be one of ours: not wrapped
    twice)."""
    factory = logging.getLogRecordFactory()
    if not getattr(factory, "_finetune_scrub", False):

        def make(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = factory(*args, **kwargs)
            if _forms:
                _scrub_record(record)
            return record

        make._finetune_scrub = True  # type: ignore[attr-defined]  # a mark on the function object
        logging.setLogRecordFactory(make)
    show = warnings.showwarning
    if not getattr(show, "_finetune_scrub", False):

        def display(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None):
            if leaks(str(message)):
                message = scrub(str(message))
            return show(message, category, filename, lineno, file, line)

        display._finetune_scrub = True  # type: ignore[attr-defined]
        warnings.showwarning = display


# ---------------------------------------------------------------------- the boundary
def ambient_tokens() -> list[str]:
    """The tokens huggingface_hub may send without being given one: ``HF_TOKEN`` (and its older name) as set, and the
    stored login, raw (before huggingface_hub strips them)."""
    from huggingface_hub import constants

    found = [os.environ.get(name) for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")]
    try:
        found.append(Path(constants.HF_TOKEN_PATH).read_text())
    except (OSError, UnicodeDecodeError):
        pass
    return [t for t in found if t]


@contextmanager
def guard(*tokens: Any) -> Iterator[None]:
    """Around a call into the Hub: ``tokens`` and the ambient ones are masked from then on in every log record and
    warning, and the exception leaving the call (if any) is scrubbed with its whole chain."""
    register(*tokens, *ambient_tokens())
    try:
        yield
    except BaseException as e:
        scrub_exception(e)
        raise


# ---------------------------------------------------------------------- files
def _text_files(folder: Path) -> Iterable[Path]:
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink() and path.stat().st_size <= _MAX_SCANNED_BYTES:
            yield path


def find_in_files(folder: str | os.PathLike) -> list[str]:
    """The files under ``folder`` (relative paths) that hold a form of a registered token."""
    folder = Path(folder)
    return [str(p.relative_to(folder)) for p in _text_files(folder) if leaks(p.read_bytes().decode("latin-1"))]


def scrub_files(folder: str | os.PathLike) -> list[str]:
    """Masks every registered token in the files under ``folder`` (a staging folder finetune wrote: a model card or
    config that was given a token by mistake); returns the files changed."""
    changed = []
    for path in _text_files(Path(folder)):
        text = path.read_bytes().decode("latin-1")  # byte for byte: tokens are ASCII, so are their forms
        if leaks(text):
            path.write_bytes(scrub(text).encode("latin-1"))
            changed.append(str(path.relative_to(folder)))
    return changed
