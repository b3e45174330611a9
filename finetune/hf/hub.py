"""The Hugging Face Hub: resolve a model name to a local checkpoint directory (every Hub call goes through
``huggingface_hub``, so ``HF_HOME``, ``HF_HUB_OFFLINE``, ``HF_TOKEN`` and the stored login all apply)."""

from __future__ import annotations

import fnmatch
import logging
import os
import pathlib
import re
from typing import Literal, overload

from finetune.errors import ConfigError, HubError, LoadError
from finetune.hf import scrub
from finetune.hf.files import FLAX_MSGPACK, pickle_refused

logger = logging.getLogger("finetune")

HF_SCHEME = "hf://"
# Config, tokenizer and image-processor files. Weights are added by format, see `_weight_patterns`.
METADATA_PATTERNS = ("*.json", "*.txt", "*.model", "*.tiktoken", "tokenizer*")
SAFETENSORS_PATTERNS = ("*.safetensors", "*.safetensors.index.json")
PICKLE_PATTERNS = ("pytorch_model*.bin", "pytorch_model.bin.index.json")


_NAMED_CHARACTERS = {"\n": "a line feed (\\n)", "\r": "a carriage return (\\r)", "\t": "a tab (\\t)", " ": "a space"}
TOKENS_PAGE = "https://huggingface.co/settings/tokens"


@overload
def check_token(token: object, *, name: str = "token", allow_bool: Literal[False] = False) -> str | None: ...


@overload
def check_token(token: object, *, name: str = "token", allow_bool: bool) -> str | bool | None: ...


def check_token(token: object, *, name: str = "token", allow_bool: bool = False) -> str | bool | None:
    """Refuses, before any request, a Hub token that cannot be one; the message describes it without showing it.

    A token is a non-empty string of printable ASCII characters without whitespace: a token with a trailing newline
    (pasted from a file) or a ``\\r\\n`` in it would otherwise be sent as an HTTP header, or echoed in the error of
    the HTTP client.

    Args:
      token: The value to check; ``None`` (use huggingface_hub's usual sources) is returned as is.
      name: How the message names its source: ``token`` (an argument), ``HF_TOKEN`` or ``the stored login``.
      allow_bool: Whether ``True`` / ``False`` (huggingface_hub's "stored token" / "no token") are accepted.

    Returns:
      ``token``.

    Raises:
      ConfigError: ``token`` is not a string (or a bool where allowed), is empty, or holds whitespace, control or
        non-ASCII characters.

    Example:
      >>> check_token("hf_abc\\n")
      Traceback (most recent call last):
      finetune.errors.ConfigError: `token` holds a line feed (\\n) at position 6 of its 7 characters ...
    """
    arg = f"`{name}`" if name.isidentifier() else name
    fix = (
        f"Pass the token itself (a string like 'hf_...', from {TOKENS_PAGE}), or leave `token` unset to use HF_TOKEN "
        "or the stored login (`hf auth login`)."
        if name == "token"
        else f"Set {arg} to the token alone (from {TOKENS_PAGE}), or pass token='hf_...'."
    )
    if token is None or (allow_bool and isinstance(token, bool)):
        return token
    if not isinstance(token, str):
        shown = f"{name}={token!r}" if isinstance(token, (bool, int, float)) else f"a {type(token).__name__} object"
        raise ConfigError(f"{arg} must be a Hub access token, a string; received {shown} (not sent). {fix}")
    if not token:
        raise ConfigError(f"{arg} must be a Hub access token; received an empty string (not sent). {fix}")
    bad = [(i, c) for i, c in enumerate(token) if not (c.isascii() and c.isprintable()) or c.isspace()]
    if bad:
        at, char = bad[0]
        what = _NAMED_CHARACTERS.get(char, f"the character U+{ord(char):04X}")
        more = f" and {len(bad) - 1} more such character(s)" if len(bad) > 1 else ""
        raise ConfigError(
            f"{arg} holds {what} at position {at} of its {len(token)} characters{more}; a Hub token is printable "
            "ASCII without whitespace, and one sent as is would break (or inject) HTTP headers, so nothing was sent "
            f"(the token is not shown). Remove the whitespace (token.strip()) or copy the token again from "
            f"{TOKENS_PAGE}."
        )
    return token


def ambient_token() -> str | None:
    """The token huggingface_hub sends when none is given (``HF_TOKEN``, the stored login), checked with
    `check_token` under the name of its source; None when there is none."""
    import huggingface_hub

    found = huggingface_hub.get_token()
    if not found:
        return None
    env = next((n for n in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN") if os.environ.get(n)), None)
    return check_token(found, name=env or "the stored login (`hf auth login`)")


def write_token(token: object) -> str:
    """The token to write with: ``token`` if given, else `ambient_token`, each checked with `check_token`; a
    `HubError` when there is none. No request is made."""
    found = check_token(token)
    if found is None:
        found = ambient_token()
    if not found:
        raise HubError(
            "Pushing to the Hub needs a write token, and none was found (`token` is None, HF_TOKEN is unset and "
            "no login is stored). Pass token='hf_...', set HF_TOKEN, or run `hf auth login`."
        )
    return found


def _weight_patterns(files: list[str] | None, *, allow_pickle: bool) -> list[str]:
    """Only the best format the repository has (when its listing is known), else every format we may read."""
    if files is None:  # offline: take whatever the cache holds
        return [*SAFETENSORS_PATTERNS, FLAX_MSGPACK, *(PICKLE_PATTERNS if allow_pickle else ())]
    for patterns in (SAFETENSORS_PATTERNS, (FLAX_MSGPACK,)):
        if any(fnmatch.filter(files, p) for p in patterns):
            return list(patterns)
    if any(fnmatch.filter(files, p) for p in PICKLE_PATTERNS) and not allow_pickle:
        raise pickle_refused(f"the Hub repository (files: {', '.join(sorted(files))})")
    return list(PICKLE_PATTERNS)


def _list_files(repo_id: str, *, revision: str | None, token: str | bool | None) -> list[str] | None:
    """The repository's files, or None when the Hub cannot be reached (snapshot_download then uses the cache)."""
    import huggingface_hub
    from huggingface_hub import errors

    try:
        return huggingface_hub.list_repo_files(repo_id, revision=revision, token=token)
    except errors.HfHubHTTPError:
        raise
    except Exception as e:  # noqa: BLE001 -- network errors come from the HTTP client; fall back to the cache
        logger.warning("Could not reach the Hub to list %r (%s); trying the local cache.", repo_id, type(e).__name__)
        return None


def _repo_id(name_or_path: str) -> str:
    repo_id = name_or_path.removeprefix(HF_SCHEME)
    parts = repo_id.split("/")
    if not 1 <= len(parts) <= 2 or not all(parts) or repo_id.startswith((".", "~")):
        raise LoadError(
            f"`name_or_path` must be an existing local directory or a Hub id like 'org/name' or 'hf://org/name'; "
            f"received name_or_path={name_or_path!r}, which is neither. Check the path or the model id."
        )
    return repo_id


def resolve(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    allow_pickle: bool = False,
) -> pathlib.Path:
    """Returns a local directory holding the checkpoint: a local directory as is, else a Hub snapshot.

    Hub ids (``org/name`` or ``hf://org/name``) are fetched with ``huggingface_hub.snapshot_download`` into the
    usual cache, downloading only config, tokenizer, image-processor and weight files (one weights format:
    safetensors, else Flax msgpack, else pickle when ``allow_pickle``).

    Args:
      name_or_path: A local directory, ``org/name`` or ``hf://org/name``.
      revision: A branch, tag or commit of the Hub repository (default: its main branch).
      token: A Hub token; ``None`` uses huggingface_hub's usual sources (``HF_TOKEN``, ``hf auth login``).
      allow_pickle: Whether ``pytorch_model.bin`` may be downloaded (and later unpickled).

    Returns:
      The checkpoint directory.

    Raises:
      LoadError: If the repository or revision does not exist (or is private without a token), or the Hub is
        offline and the checkpoint is not cached.
      ConfigError: A ``token`` that cannot be a Hub token (`check_token`).

    Example:
      >>> resolve("sentence-transformers/all-MiniLM-L6-v2")
      PosixPath('.../snapshots/...')
    """
    token = check_token(token, allow_bool=True)
    path = pathlib.Path(os.fspath(name_or_path)).expanduser()
    if path.is_dir():
        return path
    name = os.fspath(name_or_path)
    repo_id = _repo_id(name)
    import huggingface_hub

    with scrub.guard(token):
        if token in (None, True) and not huggingface_hub.is_offline_mode():  # the token huggingface_hub will send
            ambient_token()
        return _download(repo_id, name, revision=revision, token=token, allow_pickle=allow_pickle)


def _download(repo_id: str, name: str, *, revision: str | None, token: str | bool | None, allow_pickle: bool):
    """`resolve` for a Hub id: the listing, then the snapshot of the files finetune reads."""
    import huggingface_hub
    from huggingface_hub import errors

    offline = huggingface_hub.is_offline_mode()
    at = f" at revision={revision!r}" if revision else ""
    try:
        files = None if offline else _list_files(repo_id, revision=revision, token=token)
        unsafe = [f for f in files or () if f.startswith(("/", "\\")) or ".." in re.split(r"[/\\]", f)]
        if unsafe:  # refused before any download (huggingface_hub refuses them too, but only once it fetches them)
            raise LoadError(
                f"The Hub repository {repo_id!r}{at} lists file names that point outside its folder: {unsafe[:3]}. "
                "finetune downloads nothing from it; ask its owner to fix the repository, or pass a local directory."
            )
        patterns = [*METADATA_PATTERNS, *_weight_patterns(files, allow_pickle=allow_pickle)]
        return pathlib.Path(
            huggingface_hub.snapshot_download(repo_id, revision=revision, token=token, allow_patterns=patterns)
        )
    except errors.RevisionNotFoundError as e:
        raise LoadError(
            f"The Hub repository {repo_id!r} has no revision {revision!r} (`revision`). Pass an existing branch, "
            "tag or commit hash, or leave `revision` unset for the main branch."
        ) from e
    except errors.RepositoryNotFoundError as e:
        raise LoadError(
            f"No Hub repository {repo_id!r} (from name_or_path={name!r}), or it is private or gated and no valid "
            "token was found. Check the id, pass `token=` or log in with `hf auth login`, or pass a local directory."
        ) from e
    except errors.LocalEntryNotFoundError as e:
        raise LoadError(
            f"The Hub is offline (HF_HUB_OFFLINE is set or the network is unreachable) and {repo_id!r}{at} is not in "
            "the local cache. Download it once while online, unset HF_HUB_OFFLINE, or pass a local directory as "
            "`name_or_path`."
        ) from e
    except errors.HfHubHTTPError as e:
        raise LoadError(
            f"The Hub refused to serve {repo_id!r}{at}: {type(e).__name__} (status "
            f"{getattr(e.response, 'status_code', 'unknown')}). If it is gated, accept its terms on the Hub and "
            "pass a token; otherwise retry later or pass a local directory."
        ) from e
