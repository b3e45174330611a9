"""Push to the Hugging Face Hub: an export directory, a model, or (from `fit`) the model and its latest checkpoint.

Every Hub call goes through ``huggingface_hub`` (``HF_ENDPOINT``, ``HF_TOKEN`` and the stored login apply). A push
creates the repository if needed (and the branch, when ``revision`` is given) and uploads the folder in one commit.
Errors become `finetune.errors.HubError`; the token is checked before any request (`finetune.hf.hub.check_token`) and
masked in every error, log record and staged file (`finetune.hf.scrub.guard`). The local export is never touched, so
a failed push can simply be retried (files the Hub already holds are not sent again).

Example:
  >>> model.fit(train, epochs=3, callbacks=[PushToHub("me/minilm-reviews", strategy="every_save")])
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, TypedDict, Unpack, get_args

import numpy as np

from finetune import schema
from finetune.errors import ConfigError, FinetuneError, HubError
from finetune.hf import scrub
from finetune.hf.hub import check_token, write_token
from finetune.schema import Card, Flag, Positive, Text
from finetune.sharding import host_local, is_main_process
from finetune.training.callbacks import Callback

logger = logging.getLogger("finetune")

DEFAULT_MESSAGE = "Upload model fine-tuned with finetune"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
_StrategyName = Literal["end", "every_save", "checkpoint"]
STRATEGIES: tuple[str, ...] = get_args(_StrategyName)
Strategy = Annotated[_StrategyName, schema.allowed("one of " + ", ".join(map(repr, STRATEGIES)), "Pick one of these.")]
CHECKPOINT_FOLDER = "last-checkpoint"
# Never uploaded: hidden files (staging directories, caches) and Orbax checkpoints still being written.
IGNORE_PATTERNS = [".*", "**/.*", "*.orbax-checkpoint-tmp*", "**/*.orbax-checkpoint-tmp*"]
REPO_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def _check_repo_id(repo_id: str) -> str:
    if not isinstance(repo_id, str) or not REPO_ID.fullmatch(repo_id) or ".." in repo_id:
        raise ConfigError(
            f"`repo_id` must be a Hub repository id like 'me/my-model' (letters, digits, '-', '_', '.'); received "
            f"repo_id={repo_id!r}. Pass the id of the repository to create or update."
        )
    return repo_id


def _check_export(folder: str | os.PathLike) -> Path:
    """The export directory, refused when it is missing, a staging directory, or lacks config or weights."""
    path = Path(folder).expanduser().absolute()
    if not path.is_dir():
        raise ConfigError(
            f"`folder` must be an export directory (written by save_pretrained); received folder={str(folder)!r}, "
            "which is not a directory. Export the model first: model.save_pretrained(folder)."
        )
    if ".partial-" in path.name or ".old-" in path.name:
        raise ConfigError(
            f"`folder`={str(path)!r} is an unfinished or superseded export (a save_pretrained staging directory). "
            "Push the completed export directory instead."
        )
    missing = [name for name in ("config.json",) if not (path / name).is_file()]
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES))
    if missing:
        raise ConfigError(
            f"`folder`={str(path)!r} is not a complete export: it lacks {', '.join(missing)}. Push a directory "
            "written by model.save_pretrained (or `finetune fit --output DIR`, whose export is DIR/model)."
        )
    return path


@contextlib.contextmanager
def _hub_errors(what: str, repo_id: str, folder: Path) -> Iterator[None]:
    """Turns huggingface_hub / network errors into a `HubError` naming the repo and the intact local folder (inside
    `finetune.hf.scrub.guard`, which masks the token in them and in their chain)."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    intact = f"The local files in {str(folder)!r} are intact; "
    try:
        yield
    except FinetuneError:
        raise
    except RevisionNotFoundError as e:
        raise HubError(f"{what} failed: the branch does not exist on {repo_id!r}. {intact}check `revision`.") from e
    except (RepositoryNotFoundError, HfHubHTTPError) as e:
        status = getattr(e.response, "status_code", None)
        if status in (401, 403) or isinstance(e, RepositoryNotFoundError):
            raise HubError(
                f"{what} failed: the Hub refused the token for {repo_id!r} (HTTP {status}). {intact}pass a token "
                "with write access to that namespace (token=, HF_TOKEN or `hf auth login`) and retry."
            ) from e
        detail = scrub.scrub(getattr(e, "server_message", "") or type(e).__name__)
        raise HubError(
            f"{what} failed: the Hub answered HTTP {status} for {repo_id!r} ({detail}). {intact}retry later."
        ) from e
    except ValueError as e:  # huggingface_hub's checks of the server's answers (model card metadata, LFS batch)
        raise HubError(
            f"{what} failed: the Hub rejected the upload to {repo_id!r} ({scrub.scrub(str(e))[:300]}). {intact}fix "
            "the reported problem and retry."
        ) from e
    except (httpx2.HTTPError, OSError, RuntimeError) as e:
        cause = e.__cause__ if isinstance(e, RuntimeError) and e.__cause__ is not None else e
        raise HubError(
            f"{what} failed: could not reach the Hub at {constants.ENDPOINT} for {repo_id!r} "
            f"({type(cause).__name__}: {scrub.scrub(str(cause))[:200]}). {intact}check the network or HF_ENDPOINT "
            "and retry; files the Hub already received are not sent again."
        ) from e


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    path_in_repo: str | None = None,
    delete_patterns: list[str] | None = None,
    check_export: bool = True,
) -> str:
    """Uploads a directory to a Hub model repository in one commit; returns the commit URL.

    Args:
      folder: The directory to upload (an export written by ``save_pretrained`` unless ``check_export=False``).
      repo_id: ``"namespace/name"``; the repository is created when missing.
      private: Visibility of a newly created repository (an existing one is left as it is).
      revision: A branch to push to, created from ``main`` when missing (default: ``main``).
      commit_message: The commit title.
      token: A write token; default: huggingface_hub's usual sources (``HF_TOKEN``, ``hf auth login``).
      path_in_repo: A folder of the repository to upload into (default: its root).
      delete_patterns: Remote files (relative to ``path_in_repo``) to delete in the same commit, unless re-uploaded.
      check_export: Refuse directories that are not a complete export (no ``config.json`` or weights).

    Returns:
      The URL of the commit.

    Raises:
      ConfigError: A bad ``repo_id`` or ``folder``, or a token that cannot be one (`finetune.hf.hub.check_token`).
      HubError: No token, a file of ``folder`` holding the token, the Hub unreachable or refusing the push. The
        local folder is never modified, and the token is in no message (`finetune.hf.scrub`).

    Example:
      >>> push_folder("out/minilm-reviews", "me/minilm-reviews", revision="v1")
      'https://huggingface.co/me/minilm-reviews/commit/...'
    """
    from huggingface_hub import HfApi

    with scrub.guard(token):
        token = write_token(token)
        repo_id = _check_repo_id(repo_id)
        path = _check_export(folder) if check_export else Path(folder).absolute()
        _refuse_files_with_token(path)
        api = HfApi(token=token)
        with _hub_errors(f"Pushing {str(path)!r} to the Hub", repo_id, path):
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=path,
                path_in_repo=path_in_repo,
                revision=revision,
                commit_message=commit_message or DEFAULT_MESSAGE,
                ignore_patterns=IGNORE_PATTERNS,
                delete_patterns=delete_patterns,
            )
        logger.info("Pushed %s to %s: %s", path, repo_id, info.commit_url)
    return str(info.commit_url)


def _refuse_files_with_token(path: Path) -> None:
    """A folder to upload must not hold the token (a card or config it was pasted into): refused, nothing sent."""
    found = scrub.find_in_files(path)
    if found:
        raise HubError(
            f"{', '.join(found[:5])} in {str(path)!r} hold a Hub token; nothing was uploaded. Remove the token from "
            "these files (or from the model card options that wrote it) and push again."
        )


def push_model(
    model: Any,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    **card: Any,
) -> str:
    """Exports ``model`` to a temporary directory (`finetune.Model.save_pretrained`) and pushes it in one commit.

    See `finetune.Model.push_to_hub` for the arguments; returns the commit URL.
    """
    with scrub.guard(token):
        token = write_token(token)  # first: a bad or missing token should not cost an export
        _check_repo_id(repo_id)
        with tempfile.TemporaryDirectory(prefix="finetune-push-") as tmp:
            folder = model.save_pretrained(Path(tmp) / "export", **card)  # every process gathers; process 0 writes
            if not is_main_process():
                return ""
            scrub.scrub_files(folder)  # a card option given the token by mistake: masked in this copy, never sent
            return push_folder(
                folder, repo_id, private=private, revision=revision, commit_message=commit_message, token=token
            )


# ---------------------------------------------------------------------- pushes during training
def _host_snapshot(model: Any) -> Any:
    """A shallow copy of ``model`` whose parameters are host copies, so that an export can run on another thread
    while training goes on (the trainer donates its device buffers at every step)."""
    import jax
    from flax import nnx

    # gathered when sharded over hosts; flax types the split of n filters as a tuple of unknown length
    graphdef, params, rest = nnx.split(host_local(model.module), nnx.Param, ...)  # type: ignore[misc]
    cpu = jax.devices("cpu")[0]  # host memory, as jax arrays (the export reads their sharding)
    return model.with_module(
        nnx.merge(graphdef, jax.tree.map(lambda x: jax.device_put(np.asarray(x), cpu), params), rest)
    )


def _latest_checkpoint(directory: Path, at_least: int, timeout: float) -> Path | None:
    """The newest finished Orbax step directory numbered ``>= at_least``, waiting up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        steps = sorted((int(p.name) for p in directory.glob("[0-9]*") if p.is_dir() and p.name.isdigit()), reverse=True)
        if steps and steps[0] >= at_least:
            return directory / str(steps[0])
        if time.monotonic() > deadline:
            return None
        time.sleep(0.1)


class _PushOptions(TypedDict):
    """The `push_folder` options `PushToHub` passes to every push."""

    private: bool | None
    revision: str | None
    token: str | None


class PushToHub(Callback):
    """Pushes to the Hub during `fit` from a background thread, so training never waits for the network.

    Each push exports the model (a host copy taken at the hook, written and uploaded on the thread) and commits it to
    the repository root. A push that fails is logged and kept in ``last_error``; training goes on. When pushes queue
    up, only the newest waits: an older, not yet started one is dropped.

    Args:
      repo_id: ``"namespace/name"``, created when missing.
      strategy: ``"end"``: push the final model when training ends. ``"every_save"``: also at the end of every
        epoch. ``"checkpoint"``: like ``every_save``, and also upload the latest Orbax checkpoint to
        ``last-checkpoint/<step>`` (replacing the previous one) so that training can be resumed on another machine
        (needs ``fit(checkpoint_dir=...)``).
      private: Visibility of a newly created repository.
      revision: Branch to push to (created when missing).
      token: A write token; default: huggingface_hub's usual sources.
      commit_message: Commit title prefix (the epoch or "end" is appended).
      checkpoint_timeout: Seconds the thread waits for a checkpoint still being written.
      **card: ``datasets=``, ``license=`` for the model card.

    Example:
      >>> push = PushToHub("me/minilm-reviews", strategy="checkpoint")
      >>> model.fit(train, epochs=3, checkpoint_dir="runs/ckpt", callbacks=[push])
      >>> push.wait()   # the last upload may still be running
      >>> push.commit_urls[-1]
      >>> # on another machine: download last-checkpoint/ (huggingface_hub.snapshot_download), then
      >>> # model.fit(train, epochs=3, resume="<download>/last-checkpoint")
    """

    @schema.arguments
    def __init__(
        self,
        repo_id: Text,
        *,
        strategy: Strategy = "end",
        private: Flag | None = None,
        revision: Text | None = None,
        token: Any = None,
        commit_message: Text = DEFAULT_MESSAGE,
        checkpoint_timeout: Positive = 600.0,
        **card: Unpack[Card],
    ):
        self.repo_id, self.strategy = _check_repo_id(repo_id), strategy
        self.options: _PushOptions = {"private": private, "revision": revision, "token": check_token(token)}
        self.commit_message, self.checkpoint_timeout, self.card = commit_message, checkpoint_timeout, card
        self.commit_urls: list[str] = []
        self.last_error: BaseException | None = None
        self._pending: queue.Queue = queue.Queue(maxsize=1)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ hooks (training thread: cheap only)
    def on_train_begin(self, logs=None):
        with scrub.guard(self.options["token"]):
            write_token(self.options["token"])  # a missing or malformed token stops fit now, not after an epoch
        if self.strategy == "checkpoint" and self._checkpoint_dir() is None:
            raise ConfigError(
                "PushToHub(strategy='checkpoint') uploads the latest checkpoint, but fit has no `checkpoint_dir`. "
                "Pass fit(checkpoint_dir=...), or use strategy='every_save'."
            )

    def on_epoch_end(self, epoch, logs=None):
        if self.strategy != "end":
            self._submit(f"epoch {epoch + 1}", metrics=logs)

    def on_train_end(self, logs=None):
        self._submit("end of training", metrics=None)

    # ------------------------------------------------------------------ background work
    def _checkpoint_dir(self) -> Path | None:
        directory = self.trainer.checkpoint_dir
        return Path(directory).absolute() if directory is not None else None

    def _submit(self, label: str, *, metrics: dict | None) -> None:
        self.trainer.sync_model()
        job = {"label": label, "model": _host_snapshot(self.trainer.model), "metrics": metrics}
        if self.strategy == "checkpoint":
            job["checkpoint"] = (self._checkpoint_dir(), self.trainer.step)
        with self._lock:
            with contextlib.suppress(queue.Empty):
                self._pending.get_nowait()  # superseded by this newer push
            self._pending.put_nowait(job)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="finetune-push", daemon=True)
                self._thread.start()

    def _work(self) -> None:
        while True:
            with self._lock:
                try:
                    job = self._pending.get_nowait()
                except queue.Empty:
                    self._thread = None
                    return
            try:
                with scrub.guard(self.options["token"]):  # the error kept in last_error and logged is masked too
                    self._push(job)
            except Exception as e:  # noqa: BLE001 -- a failed push must never stop training
                self.last_error = e
                logger.warning("PushToHub: the push at %s to %r failed: %s", job["label"], self.repo_id, e)

    def _push(self, job: dict) -> None:
        message = f"{self.commit_message} ({job['label']})"
        metrics = {k: v for k, v in (job["metrics"] or {}).items() if isinstance(v, float) and math.isfinite(v)} or None
        with tempfile.TemporaryDirectory(prefix="finetune-push-") as tmp:
            folder = Path(tmp) / "export"
            from finetune.hf.export import write

            # mypy counts Card's pydantic ``__pydantic_config__`` (and ``metrics``) as keys the card may hold
            write(job["model"], folder, metrics=metrics, **self.card)  # type: ignore[misc]
            if "checkpoint" in job:
                directory, step = job["checkpoint"]
                self._stage_checkpoint(directory, step, folder)
            scrub.scrub_files(folder)  # this staged copy only: the run's own files are left as they are
            deletes = [f"{CHECKPOINT_FOLDER}/**"] if "checkpoint" in job else None
            url = push_folder(folder, self.repo_id, commit_message=message, delete_patterns=deletes, **self.options)
        self.commit_urls.append(url)
        logger.info("PushToHub: pushed the model at %s to %r.", job["label"], self.repo_id)

    def _stage_checkpoint(self, directory: Path, step: int, folder: Path) -> None:
        """Copies the newest finished checkpoint into ``folder/last-checkpoint/<step>`` (old ones may be deleted by
        the checkpoint manager while we upload, so we upload a copy)."""
        found = _latest_checkpoint(directory, step, self.checkpoint_timeout)
        if found is None:
            raise HubError(
                f"No finished checkpoint >= step {step} appeared in {str(directory)!r} within "
                f"{self.checkpoint_timeout:.0f} s; pushed nothing. Raise `checkpoint_timeout` if saving is slow."
            )
        shutil.copytree(found, folder / CHECKPOINT_FOLDER / found.name, ignore=shutil.ignore_patterns(".*"))

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until every queued push is done (or ``timeout`` seconds); returns True when none is left."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                thread = self._thread
            if thread is None:
                return True
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                return False
