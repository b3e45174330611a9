"""Helpers for the bad-input catalogue tests: what a directory holds, so a test can assert nothing was written or
deleted by a call that was refused."""

from __future__ import annotations

import hashlib
from pathlib import Path


def snapshot(root: str | Path) -> dict[str, str]:
    """``{relative path: sha256 of the file (or "dir")}`` of everything under ``root`` (empty if it does not exist)."""
    root = Path(root)
    if not root.exists():
        return {}
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def assert_unchanged(before: dict[str, str], root: str | Path) -> None:
    """Fails naming what was added, removed or changed under ``root`` since ``before = snapshot(root)``."""
    after = snapshot(root)
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    assert not (added or removed or changed), f"added {added}, removed {removed}, changed {changed}"
