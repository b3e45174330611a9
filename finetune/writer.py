"""The one writer of export directories (`save_pretrained`, `save_adapter`, and the exports `push_to_hub` uploads).

It writes only what finetune owns, and a crash never leaves a corrupt export:

* **The target is checked first.** A missing or empty directory, or an earlier finetune export of the same kind
  (``finetune.json`` lists every file it holds), is replaced; anything else is refused before any work is done: a
  directory holding other files (they would be deleted), a checkpoint directory of a training run, ``""`` and the
  working directory (or a directory that contains it), a file.
* **The export is written beside the target**, into ``.<name>.partial-<pid>-<random>`` on the same file system, its
  files flushed to disk, and ``finetune.json`` (the marker and the list of files) written last.
* **One atomic step puts it in place.** A new target is a rename. An existing one is swapped with the staging
  directory in one system call (``renameat2(RENAME_EXCHANGE)`` on Linux, ``renamex_np(RENAME_SWAP)`` on macOS); the
  staging name then holds the old export, which is removed.

The invariant: **at every instant the target path holds a complete export, the old one or the new one** (or nothing,
when there was none), whenever the process is killed. Where the file system cannot swap two directories, the old
export is renamed to ``.<name>.old-<pid>-<random>`` and the new one renamed into place; a kill between those two
renames leaves the target missing for that moment, and the next export to the target puts the old one back first.
Each export removes what killed earlier exports of its target left (their process is gone): staging directories and
set-aside old exports.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import glob
import json
import os
import secrets
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from finetune.errors import ConfigError, ExportError

MARKER = "finetune.json"
# A checkpoint directory of a training run holds this lock file (finetune.training.checkpoint), or Orbax step
# directories.
CHECKPOINT_LOCK = ".finetune.lock"
_LISTED = 5  # foreign files named in a refusal


def write_directory(
    directory: str | os.PathLike,
    fill: Callable[[Path], None],
    *,
    kind: str,
    argument: str = "directory",
) -> Path:
    """Writes an export with ``fill(staging_dir)`` and swaps it into ``directory`` atomically; returns the path.

    Args:
      directory: The export directory (see the module docstring for what may be replaced).
      fill: Writes the export's files into the directory it is given (empty, beside the target).
      kind: What the export is (``"model"``, ``"adapter"``): an export replaces only one of its kind.
      argument: The argument name used in error messages.

    Raises:
      ConfigError: The target may not be replaced (it holds what finetune did not write).
      ExportError: The export could not be written (disk full, read-only); the target holds what it held before.
    """
    target = check_target(directory, kind=kind, argument=argument)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _recover(target)
        staging = target.with_name(f".{target.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
        staging.mkdir()
    except OSError as e:
        raise _write_error(target, e, argument) from e
    try:
        fill(staging)
        _finish(staging, kind)
        _swap_in(staging, target)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError) or type(e).__name__ == "SafetensorError":  # safetensors' IO errors
            raise _write_error(target, e, argument) from e
        raise
    return target


def check_target(directory: str | os.PathLike, *, kind: str, argument: str = "directory") -> Path:
    """The absolute export path, or a `ConfigError` when an export there would delete what finetune did not write."""
    try:
        text = os.fspath(directory)
    except TypeError:
        raise ConfigError(
            f"`{argument}` must be a directory path (str or os.PathLike); received {argument}={directory!r}. Pass the "
            "directory to export to, e.g. 'out/model'."
        ) from None
    if not str(text).strip():
        raise ConfigError(
            f"`{argument}` is empty (received {argument}={text!r}), which would mean the working directory. Pass the "
            "directory to export to, e.g. 'out/model'."
        )
    target = Path(text).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise ConfigError(
            f"`{argument}`={text!r} is the working directory {str(cwd)!r} or holds it, and an export replaces its "
            "whole directory. Pass a new directory for the export, e.g. 'out/model'."
        )
    if target.exists() and not target.is_dir():
        raise ConfigError(f"`{argument}`={text!r} is a file; pass a directory path for the export.")
    problem = _foreign(target, kind) if target.is_dir() else None
    if problem is not None:
        raise ConfigError(
            f"`{argument}`={text!r} {problem}, and an export replaces its whole directory, so finetune will not "
            "write there. Pass a new or empty directory, or the directory of an earlier export of this kind."
        )
    return target


def _foreign(target: Path, kind: str) -> str | None:
    """Why ``target`` (an existing directory) may not be replaced by an export of ``kind``, or None if it may."""
    entries = sorted(p.name for p in target.iterdir())
    if not entries:
        return None
    if CHECKPOINT_LOCK in entries or any(n.isdigit() and (target / n / "state").is_dir() for n in entries):
        return "is the checkpoint directory of a training run (fit(checkpoint_dir=...)); its checkpoints would be lost"
    manifest = _manifest(target)
    if manifest is None:
        return f"holds files finetune did not write ({_listing(target, set()) or ', '.join(entries[:_LISTED])})"
    if manifest.get("kind", "model") != kind:
        return f"holds a finetune {manifest.get('kind', 'model')} export, not a {kind} export"
    files = manifest.get("files")
    if files is None:  # an export from before the list of files: it held files only
        extra = [n for n in entries if (target / n).is_dir()]
        return f"holds directories finetune did not write ({', '.join(extra)})" if extra else None
    owned = set(files) | {MARKER}
    unknown = _listing(target, owned)
    return f"holds files finetune did not write ({unknown})" if unknown else None


def _manifest(target: Path) -> dict | None:
    """The ``export`` record of ``target/finetune.json`` (``{}`` for an export from before it), or None."""
    try:
        data = json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    record = data.get("export", {})
    return record if isinstance(record, dict) else None


def _listing(target: Path, owned: set[str]) -> str:
    """The first files under ``target`` not in ``owned`` (relative paths), as text; '' when there are none."""
    found = []
    for path in sorted(target.rglob("*")):
        rel = path.relative_to(target).as_posix()
        if path.is_dir() or rel in owned:
            continue
        found.append(rel)
        if len(found) > _LISTED:
            break
    more = ", ..." if len(found) > _LISTED else ""
    return ", ".join(found[:_LISTED]) + more


def _finish(staging: Path, kind: str) -> None:
    """Flushes every file to disk, then writes ``finetune.json`` with the list of files (the marker goes last)."""
    files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
    for name in files:
        _fsync(staging / name)
    marker = staging / MARKER
    data = json.loads(marker.read_text()) if marker.is_file() else {}
    data["export"] = {"kind": kind, "files": [f for f in files if f != MARKER]}
    marker.write_text(json.dumps(data, indent=1, default=str))
    _fsync(marker)
    _fsync(staging)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap_in(staging: Path, target: Path) -> None:
    """Puts ``staging`` at ``target`` in one atomic step; the old export (now at ``staging``) is then removed."""
    if not target.exists():
        staging.rename(target)
    elif _exchange(staging, target):
        shutil.rmtree(staging, ignore_errors=True)  # a kill here leaves it to the next export's cleanup
    else:  # no atomic swap on this file system: two renames; `_recover` repairs a kill between them
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    with contextlib.suppress(OSError):
        _fsync(target.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swaps the two paths in one system call; False where the system or file system cannot."""
    libc = _libc()
    if libc is None:
        return False
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        at_fdcwd, rename_exchange = -100, 2
        result = libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        rename_swap = 2
        result = libc.renamex_np(os.fsencode(a), os.fsencode(b), rename_swap)
    else:
        return False
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None


def _recover(target: Path) -> None:
    """Cleans what killed exports of ``target`` left, first putting a set-aside old export back if it is missing."""
    leftovers = [p for p in target.parent.glob(f".{glob.escape(target.name)}.*-*") if _dead(p, target.name)]
    olds = sorted((p for p in leftovers if ".old-" in p.name), key=lambda p: p.stat().st_mtime)
    if not target.exists() and olds and (olds[-1] / MARKER).is_file():
        olds.pop().rename(target)
    for path in leftovers:
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)


def _dead(path: Path, name: str) -> bool:
    """Whether ``path`` is a staging or set-aside directory of an export of ``name`` whose process has ended."""
    rest = path.name.removeprefix(f".{name}.")
    kind, _, tail = rest.partition("-")
    pid = tail.split("-")[0]
    if kind not in ("partial", "old") or not pid.isdigit() or not path.is_dir():
        return False
    if int(pid) == os.getpid():
        return True  # this process writes one export of a target at a time
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _write_error(target: Path, error: BaseException, argument: str) -> ExportError:
    """The `ExportError` of an export that could not be written, naming the directory and the disk's free space."""
    reason = getattr(error, "strerror", None) or str(error)
    where = target.parent if target.parent.exists() else Path(target.anchor)
    try:
        free = f" The disk holding it has {shutil.disk_usage(where).free / 2**20:.1f} MiB free."
    except OSError:
        free = ""
    before = "the export already there is intact" if target.exists() else "nothing was left there"
    return ExportError(
        f"Could not write the export to `{argument}`={str(target)!r}: {reason}.{free} Nothing was changed: {before}. "
        "Free disk space, or pass a directory on a writable disk."
    )
