"""Nothing lost: exports replace only what finetune wrote and are swapped in atomically; checkpoint directories are
locked, damaged steps are skipped, a resume on other data is refused, and a full or read-only disk is a clear error
with nothing left behind.

Faults: a full disk and a read-only file system are real (a small tmpfs, remounted read-only) where this process may
mount one (root with CAP_SYS_ADMIN); elsewhere they are injected at the lowest call Python makes (``os.mkdir`` /
``os.open`` raising EROFS, the safetensors writer and Orbax's JSON writer raising ENOSPC). SIGKILLs are real: a child
process kills itself at the named point.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

import finetune as ft
from finetune.training.checkpoint import Checkpointer, read_meta
from tests.catalogue import assert_unchanged, snapshot
from tests.models.reference import tiny_bert_config, tiny_model
from tests.tiny import TinyClassifier, blobs, params_of

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- faults
@functools.cache
def _can_mount() -> bool:
    probe = tempfile.mkdtemp()
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", probe], capture_output=True)
        if ok.returncode != 0:
            return False
        subprocess.run(["umount", probe], check=True)
        return True
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        os.rmdir(probe)


@contextlib.contextmanager
def small_disk(path: Path, kib: int):
    """``path`` on a real tmpfs of ``kib`` KiB where mounting is allowed (yields True), else a plain directory."""
    path.mkdir(parents=True)
    if not _can_mount():
        yield False
        return
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(path)], check=True)
    try:
        yield True
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def make_read_only(path: Path, real: bool, monkeypatch) -> None:
    """Remounts the tmpfs at ``path`` read-only, or makes every write call under ``path`` fail with EROFS."""
    if real:
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        return
    mkdir, open_ = os.mkdir, os.open
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def refuse(p):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(p))

    def fake_mkdir(p, *args, **kwargs):
        return refuse(p) if os.fspath(p).startswith(str(path)) else mkdir(p, *args, **kwargs)

    def fake_open(p, flags, *args, **kwargs):
        if flags & writes and os.fspath(p).startswith(str(path)):
            refuse(p)
        return open_(p, flags, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", fake_mkdir)
    monkeypatch.setattr(os, "open", fake_open)


def fill_disk(path: Path) -> None:
    """Fills the tmpfs holding ``path`` to the last byte."""
    try:
        with open(path / "filler", "wb") as f:
            while True:
                f.write(b"x" * 4096)
                f.flush()
    except OSError:
        pass


# ---------------------------------------------------------------- exports
@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    _, path = tiny_model(tmp_path_factory.mktemp("lost") / "base", "BertModel", tiny_bert_config())
    return path


@pytest.fixture(scope="module")
def model(bert_dir):
    return ft.load(bert_dir, task="text-classification", num_labels=2)


def _assert_refused(error, argument, value):
    text = str(error.value)
    assert f"`{argument}`" in text and str(value) in text, text


def test_S01_an_export_into_a_directory_holding_user_files_is_refused_and_both_files_stay(model, tmp_path):
    d = tmp_path / "d"
    (d / "ckpt").mkdir(parents=True)
    (d / "notes.txt").write_text("mine")
    (d / "ckpt" / "important.bin").write_bytes(b"\0\1")
    before = snapshot(tmp_path)
    with pytest.raises(ft.ConfigError) as error:
        model.save_pretrained(d)
    _assert_refused(error, "directory", d)
    assert "notes.txt" in str(error.value) and "ckpt/important.bin" in str(error.value)
    assert_unchanged(before, tmp_path)


def test_S03_an_export_into_a_checkpoint_directory_is_refused_and_the_checkpoints_stay(model, tmp_path):
    d = tmp_path / "run"
    x, y = blobs(32)
    tiny = ft.Model(TinyClassifier(), task="text-classification").compile(learning_rate=1e-2)
    tiny.fit((x, y), epochs=1, batch_size=16, verbose=0, checkpoint_dir=d)
    before = snapshot(tmp_path)
    with pytest.raises(ft.ConfigError) as error:
        model.save_pretrained(d)
    _assert_refused(error, "directory", d)
    assert "checkpoint directory" in str(error.value)
    assert_unchanged(before, tmp_path)
    assert Checkpointer(d).latest() == 2


@pytest.mark.parametrize("value", ["", ".", ".."], ids=["empty-string", "working-directory", "its-parent"])
def test_an_export_to_the_working_directory_or_above_it_is_refused(model, tmp_path, monkeypatch, value):
    work = tmp_path / "work"
    work.mkdir()
    (work / "train.py").write_text("print(1)")
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    with pytest.raises(ft.ConfigError) as error:
        model.save_pretrained(value)
    _assert_refused(error, "directory", repr(value))
    assert_unchanged(before, tmp_path)


def test_a_re_export_replaces_an_earlier_export_and_a_file_added_to_it_is_never_deleted(model, tmp_path):
    out = model.save_pretrained(tmp_path / "export")
    manifest = json.loads((out / "finetune.json").read_text())["export"]
    assert manifest["kind"] == "model" and "model.safetensors" in manifest["files"]
    (out / "model.safetensors").write_bytes(b"stale")  # replaced: finetune wrote it
    model.save_pretrained(tmp_path / "export")
    assert ft.load(out, task="text-classification")  # a complete export again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no staging left
    (out / "notes.md").write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(ft.ConfigError) as error:
        model.save_pretrained(out)
    _assert_refused(error, "directory", out)
    assert "notes.md" in str(error.value)
    assert_unchanged(before, tmp_path)


def test_save_adapter_goes_through_the_same_writer(bert_dir, model, tmp_path):
    lora = ft.load(bert_dir, task="text-classification", num_labels=2).compile("lora")
    out = lora.save_adapter(tmp_path / "adapter")
    assert json.loads((out / "finetune.json").read_text())["export"]["kind"] == "adapter"
    lora.save_adapter(out)  # an earlier adapter export is replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    (out / "notes.txt").write_text("mine")
    model_export = model.save_pretrained(tmp_path / "model")
    for target, fragment in ((out, "notes.txt"), (model_export, "model export")):
        before = snapshot(tmp_path)
        with pytest.raises(ft.ConfigError) as error:
            lora.save_adapter(target)
        _assert_refused(error, "directory", target)
        assert fragment in str(error.value)
        assert_unchanged(before, tmp_path)


def test_R11_an_export_on_a_full_disk_is_an_export_error_and_the_earlier_export_stays(model, tmp_path, monkeypatch):
    with small_disk(tmp_path / "disk", 900) as real:
        out = model.save_pretrained(tmp_path / "disk" / "export")  # ~0.4 MB: a second copy does not fit
        if real:
            fill_disk(tmp_path / "disk")
        else:
            monkeypatch.setattr(
                "safetensors.numpy.save_file", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space"))
            )
        before = snapshot(tmp_path / "disk")
        with pytest.raises(ft.ExportError) as error:
            model.save_pretrained(out)
        _assert_refused(error, "directory", out)
        assert "No space" in str(error.value) and "MiB free" in str(error.value)
        assert_unchanged(before, tmp_path / "disk")
        assert ft.load(out, task="text-classification")


def test_R13_an_export_on_a_read_only_disk_is_an_export_error_naming_the_directory(model, tmp_path, monkeypatch):
    with small_disk(tmp_path / "disk", 900) as real:
        out = model.save_pretrained(tmp_path / "disk" / "export")
        make_read_only(tmp_path / "disk", real, monkeypatch)
        before = snapshot(tmp_path / "disk")
        for target in (out, tmp_path / "disk" / "new"):
            with pytest.raises(ft.ExportError) as error:
                model.save_pretrained(target)
            _assert_refused(error, "directory", target)
            assert "Read-only file system" in str(error.value)
        assert_unchanged(before, tmp_path / "disk")


_KILL_CHILD = """
import os, signal, sys
from pathlib import Path
import finetune as ft
from finetune import writer
base, target, point = sys.argv[1:]
model = ft.load(base, task="text-classification", num_labels=2)
model.id2label = {0: "new-a", 1: "new-b"}
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
if point == "before-swap":  # the new export is complete in its staging directory
    writer._swap_in = die
elif point == "after-swap":  # swapped in; the old export not yet removed
    writer.shutil.rmtree = die
elif point == "between-renames":  # a file system without an atomic swap: after the old export is set aside
    writer._exchange = lambda a, b: False
    rename = Path.rename
    def first_then_die(self, other):
        rename(self, other)
        die()
    Path.rename = first_then_die
model.save_pretrained(target)
"""


@pytest.mark.parametrize(
    "point, holds",
    [("before-swap", "old"), ("after-swap", "new"), ("between-renames", "old")],
    ids=["R15-kill-before-the-swap", "R16-kill-after-the-swap", "R16-kill-between-the-fallback-renames"],
)
def test_R15_R16_a_killed_export_leaves_a_complete_export_and_the_next_export_cleans_up(
    bert_dir, model, tmp_path, point, holds
):
    target = model.save_pretrained(tmp_path / "export")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_KILL_CHILD), str(bert_dir), str(target), point],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert any(p.name.startswith(".export.") for p in tmp_path.iterdir())  # what the killed export left
    if point != "between-renames":  # the atomic swap: the path holds a complete export at every instant
        labels = ft.load(target, task="text-classification").id2label
        assert (labels[0] == "new-a") == (holds == "new")
    else:  # no atomic swap: the old export, complete, set aside until the next export puts it back
        (old,) = (p for p in tmp_path.iterdir() if p.name.startswith(".export.old-"))
        assert not target.exists() and ft.load(old, task="text-classification").id2label[0] != "new-a"
    model.save_pretrained(tmp_path / "other")  # another target's export leaves this one's leftovers alone
    assert any(p.name.startswith(".export.") for p in tmp_path.iterdir())
    model.id2label = {0: "next-a", 1: "next-b"}
    model.save_pretrained(target)  # puts a set-aside old export back first, then replaces it; cleans leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "other"]
    assert ft.load(target, task="text-classification").id2label[0] == "next-a"
    model.id2label = None


# ---------------------------------------------------------------- checkpoints
def _tiny(**kw):
    return ft.Model(TinyClassifier(), task="text-classification").compile(learning_rate=1e-2, **kw)


_HOLDER = """
import sys, time
from finetune.training.checkpoint import Checkpointer, read_meta
held = Checkpointer(sys.argv[1], lock=True)
print("locked", flush=True)
time.sleep(120)
"""


def test_R14_a_second_run_into_a_checkpoint_dir_in_use_is_refused_at_start_and_a_dead_holder_frees_it(tmp_path):
    d = tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(d)], cwd=ROOT, env=env, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        x, y = blobs(32)
        model = _tiny()
        start = params_of(model)
        before = snapshot(tmp_path)
        with pytest.raises(ft.CheckpointError) as error:
            model.fit((x, y), epochs=1, batch_size=16, verbose=0, checkpoint_dir=d)
        _assert_refused(error, "checkpoint_dir", d)
        assert "in use" in str(error.value) and f"process {holder.pid}" in str(error.value)
        assert_unchanged(before, tmp_path)
        assert all(np.array_equal(start[k], v) for k, v in params_of(model).items())  # not one step trained
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    model.fit((x, y), epochs=1, batch_size=16, verbose=0, checkpoint_dir=d)  # the killed holder's lock is free
    assert Checkpointer(d).latest() == 2
    first = Checkpointer(d, lock=True)  # in one process too: the lock is per run, not per process
    with pytest.raises(ft.CheckpointError, match="in use"):
        Checkpointer(d, lock=True)
    first.close()
    Checkpointer(d, lock=True).close()


def test_R12_a_read_only_checkpoint_dir_is_a_checkpoint_error_before_the_first_step(tmp_path, monkeypatch):
    with small_disk(tmp_path / "disk", 256) as real:
        make_read_only(tmp_path / "disk", real, monkeypatch)
        x, y = blobs(32)
        model = _tiny()
        start = params_of(model)
        before = snapshot(tmp_path)
        with pytest.raises(ft.CheckpointError) as error:
            model.fit((x, y), epochs=1, batch_size=16, verbose=0, checkpoint_dir=tmp_path / "disk" / "ckpt")
        _assert_refused(error, "checkpoint_dir", tmp_path / "disk" / "ckpt")
        assert "Read-only file system" in str(error.value)
        assert_unchanged(before, tmp_path)
        assert all(np.array_equal(start[k], v) for k, v in params_of(model).items())


def test_R10_a_full_disk_during_a_checkpoint_write_leaves_no_tmp_dir_and_the_previous_step(tmp_path, monkeypatch):
    d = tmp_path / "disk" / "ckpt"

    class Full(ft.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:  # the first epoch's checkpoint (step 4) is written
                self.trainer.checkpoints.wait()
                if real:
                    fill_disk(tmp_path / "disk")
                else:
                    from etils.epath import abstract_path

                    def no_space(self, *args, **kwargs):
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

                    monkeypatch.setattr(abstract_path.Path, "write_text", no_space)

    with small_disk(tmp_path / "disk", 1024) as real:
        x, y = blobs(64)
        with pytest.raises(ft.CheckpointError) as error:
            _tiny().fit((x, y), epochs=3, batch_size=16, verbose=0, checkpoint_dir=d, callbacks=[Full()])
        _assert_refused(error, "checkpoint_dir", d)
        assert "No space left" in str(error.value) and "previous checkpoint (step 4) is intact" in str(error.value)
        assert sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) == ["4"]  # no tmp directory
        monkeypatch.undo()
        (tmp_path / "disk" / "filler").unlink(missing_ok=True)
        model = _tiny()
        model.fit((x, y), epochs=3, batch_size=16, verbose=0, checkpoint_dir=d, resume=True)
        assert Checkpointer(d).latest() == 12


def _run_with_checkpoints(d, n=64, epochs=2, **kw):
    x, y = blobs(n)
    model = _tiny()
    model.fit((x, y), epochs=epochs, batch_size=16, verbose=0, checkpoint_dir=d, **kw)
    return model, (x, y)


def _truncate_arrays(step_dir: Path) -> None:
    for p in step_dir.glob("state/**/d/*"):
        p.write_bytes(p.read_bytes()[:10])


def _drop_metadata(step_dir: Path) -> None:
    (step_dir / "state" / "_METADATA").unlink()


def test_each_checkpoint_records_the_history_as_of_its_own_step(tmp_path):
    # The metadata is written in the background while training goes on: it must hold a copy, not the live record.
    d = tmp_path / "ckpt"
    model, _ = _run_with_checkpoints(d, epochs=4)  # steps 4, 8, 12, 16; the last 3 kept
    for step in Checkpointer(d).steps():
        history = read_meta(d, step)["history"]
        assert history["epochs"] == list(range(step // 4)), (step, history["epochs"])
        assert all(entry["step"] <= step for entry in history["steps"]), (step, history["steps"])


@pytest.mark.parametrize(
    "damage", [_truncate_arrays, _drop_metadata], ids=["R01-truncated-arrays", "R03-state-metadata-deleted"]
)
def test_R01_R03_a_damaged_newest_step_resumes_from_the_newest_intact_one_with_a_warning(tmp_path, caplog, damage):
    d = tmp_path / "ckpt"
    _, data = _run_with_checkpoints(d)  # steps 4 and 8
    damage(d / "8")
    model = _tiny()
    with caplog.at_level(logging.WARNING, logger="finetune.training.checkpoint"):
        history = model.fit(data, epochs=3, batch_size=16, verbose=0, checkpoint_dir=d, resume=True)
    assert "step 4" in caplog.text and "damaged step 8" in caplog.text
    assert history.epochs == [0, 1, 2] and Checkpointer(d).latest() == 12  # epochs 2 and 3 trained again


def test_R01_every_step_damaged_is_a_checkpoint_error_and_nothing_is_changed(tmp_path):
    d = tmp_path / "ckpt"
    _, data = _run_with_checkpoints(d)
    for step in ("4", "8"):
        _truncate_arrays(d / step)
    before = snapshot(tmp_path)
    with pytest.raises(ft.CheckpointError) as error:
        _tiny().fit(data, epochs=3, batch_size=16, verbose=0, checkpoint_dir=d, resume=True)
    _assert_refused(error, "checkpoint_dir", d)
    assert "step 8" in str(error.value) and "step 4" in str(error.value)
    assert_unchanged(before, tmp_path)


@pytest.mark.parametrize(
    "n, batch_size, change",
    [(80, 16, "number of examples 40 -> 80"), (40, 8, "`batch_size` 16 -> 8"), (40, 16, "fingerprint")],
    ids=["R04-more-examples", "R04-another-batch-size", "R04-same-size-other-contents"],
)
def test_R04_a_resume_on_other_data_is_refused_unless_allowed(tmp_path, n, batch_size, change):
    d = tmp_path / "ckpt"
    _run_with_checkpoints(d, n=40, epochs=1)
    x, y = blobs(n, seed=1) if change == "fingerprint" else blobs(n)
    before = snapshot(tmp_path)
    with pytest.raises(ft.CheckpointError) as error:
        _tiny().fit((x, y), epochs=2, batch_size=batch_size, verbose=0, checkpoint_dir=d, resume=True)
    _assert_refused(error, "checkpoint_dir", d)
    assert change in str(error.value) and "allow_changed_data=True" in str(error.value)
    assert_unchanged(before, tmp_path)
    history = _tiny().fit(
        (x, y), epochs=2, batch_size=batch_size, verbose=0, checkpoint_dir=d, resume=True, allow_changed_data=True
    )
    assert history.epochs == [0, 1]  # the first epoch from the checkpoint, the second trained on the new data


def test_mesh_resume_a_mesh_checkpoint_resumes_on_one_device_with_default_packing_and_a_packed_one_not_on_a_mesh(
    tmp_path,
):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.mesh_resume_job", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["packed_on_one_device"] is True  # packing=None packs on one device, not on the mesh
    assert result["resumed_steps"] == result["steps"]
    np.testing.assert_allclose(
        result["resumed_losses"], result["mesh_losses"][-len(result["resumed_losses"]) :], atol=1e-5
    )
    assert result["param_diff"] < 1e-5
    assert "packed its batches (packing=None)" in result["packed_to_mesh"] and "mesh" in result["packed_to_mesh"]


def test_a_lock_is_released_when_fit_fails_before_training(tmp_path):
    d = tmp_path / "ckpt"
    x, y = blobs(32)
    with pytest.raises(ft.LoadError):
        _tiny().fit((x, y), epochs=1, batch_size=16, verbose=0, checkpoint_dir=d, resume=tmp_path / "empty")
    Checkpointer(d, lock=True).close()  # free again: a refused call does not keep the directory locked
