"""The Hugging Face Hub: resolve a model name to a local checkpoint directory (every Hub call goes through
``huggingface_hub``, so ``HF_HOME``, ``HF_HUB_OFFLINE``, ``HF_TOKEN`` and the stored login all apply)."""

from __future__ import annotations

import fnmatch
import logging
import os
import pathlib
import re

from finetune.errors import LoadError
from finetune.weights import FLAX_MSGPACK, pickle_refused

logger = logging.getLogger("finetune")

HF_SCHEME = "hf://"
# Config, tokenizer and image-processor files. Weights are added by format, see `_weight_patterns`.
METADATA_PATTERNS = ("*.json", "*.txt", "*.model", "*.tiktoken", "tokenizer*")
SAFETENSORS_PATTERNS = ("*.safetensors", "*.safetensors.index.json")
PICKLE_PATTERNS = ("pytorch_model*.bin", "pytorch_model.bin.index.json")


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

    Example:
      >>> resolve("sentence-transformers/all-MiniLM-L6-v2")
      PosixPath('.../snapshots/...')
    """
    path = pathlib.Path(os.fspath(name_or_path)).expanduser()
    if path.is_dir():
        return path
    name = os.fspath(name_or_path)
    repo_id = _repo_id(name)
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
