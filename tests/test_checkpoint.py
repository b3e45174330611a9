"""Checkpoints: exact resume after a crash or SIGKILL (also mid-write), keep-last-K and best, clear resume errors."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import finetune as ft
from finetune.training.checkpoint import Checkpointer
from tests.tiny import TinyClassifier, blobs, params_of

ROOT = Path(__file__).resolve().parents[1]


def _job(tmp_path, name, ckpt, *extra):
    out = tmp_path / f"{name}.npz"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.resume_job", str(out), str(ckpt), *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return proc, out


def _assert_bitwise_equal(a_path, b_path):
    a, b = np.load(a_path), np.load(b_path)
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
        assert np.array_equal(a[key], b[key]), key


def test_sigkill_mid_training_then_resume_is_bitwise_equal_to_uninterrupted(tmp_path):
    proc, reference = _job(tmp_path, "reference", tmp_path / "ref_ckpt")
    assert proc.returncode == 0, proc.stderr
    proc, _ = _job(tmp_path, "killed", tmp_path / "ckpt", "--kill-at", "10")
    assert proc.returncode == -9  # SIGKILL
    assert Checkpointer(tmp_path / "ckpt").latest() in (7, 8)  # epoch end at 7; 8 unless its write was cut
    proc, resumed = _job(tmp_path, "resumed", tmp_path / "ckpt")
    assert proc.returncode == 0, proc.stderr
    _assert_bitwise_equal(reference, resumed)


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one_restorable(tmp_path):
    proc, reference = _job(tmp_path, "reference", tmp_path / "ref_ckpt")
    proc, _ = _job(tmp_path, "killed", tmp_path / "ckpt", "--kill-at", "13", "--kill-in-save")
    assert proc.returncode == -9
    assert Checkpointer(tmp_path / "ckpt").latest() in (8, 12, 13)  # 13 only if the write won the race
    proc, resumed = _job(tmp_path, "resumed", tmp_path / "ckpt")
    assert proc.returncode == 0, proc.stderr
    _assert_bitwise_equal(reference, resumed)


def _model(**kw):
    return ft.Model(TinyClassifier(), task="text-classification").compile(learning_rate=1e-2, **kw)


def test_keeps_the_last_k_and_the_best_checkpoint(tmp_path):
    x, y = blobs(64)
    model = _model(optimizer="sgd")
    model.fit(
        (x, y),
        (x[:8], y[:8]),
        epochs=6,
        batch_size=16,
        verbose=0,
        checkpoint_dir=tmp_path / "c",
        keep=2,
        monitor="val_accuracy",
    )
    ckpt = Checkpointer(tmp_path / "c", monitor="val_accuracy")
    steps = ckpt.steps()
    assert steps[-2:] == [20, 24]
    assert len(steps) <= 3 and ckpt.best() in steps


def test_resume_from_a_checkpoint_of_another_model_is_refused(tmp_path):
    x, y = blobs(64)
    _model().fit((x, y), epochs=1, batch_size=16, verbose=0, checkpoint_dir=tmp_path / "c")
    other = ft.Model(TinyClassifier(hidden=32), task="text-classification").compile(learning_rate=1e-2)
    with pytest.raises(ft.ConfigError, match="different model"):
        other.fit((x, y), epochs=2, batch_size=16, verbose=0, checkpoint_dir=tmp_path / "c", resume=True)


def test_resume_with_another_recipe_is_refused(tmp_path):
    x, y = blobs(64)
    _model().fit((x, y), epochs=1, batch_size=16, verbose=0, checkpoint_dir=tmp_path / "c")
    with pytest.raises(ft.ConfigError, match="learning_rate"):
        ft.Model(TinyClassifier(), task="text-classification").compile(learning_rate=5e-2).fit(
            (x, y), epochs=2, batch_size=16, verbose=0, checkpoint_dir=tmp_path / "c", resume=True
        )


def test_resume_from_an_empty_path_and_a_file_as_checkpoint_dir_are_errors(tmp_path):
    x, y = blobs(32)
    with pytest.raises(ft.LoadError, match="no complete checkpoint"):
        _model().fit((x, y), epochs=1, batch_size=16, verbose=0, resume=tmp_path / "nothing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ft.ConfigError, match="is a file"):
        _model().fit((x, y), epochs=1, batch_size=16, verbose=0, checkpoint_dir=tmp_path / "file")


def test_in_process_crash_then_resume_matches(tmp_path):
    x, y = blobs(80)

    class Crash(ft.callbacks.Callback):
        def on_step_end(self, step, logs=None):
            if step == 7:
                raise KeyboardInterrupt

    def run(**kw):
        model = ft.Model(TinyClassifier(dropout=0.3), task="text-classification")
        model.compile(learning_rate=1e-2, log_every=1)
        model.fit((x, y), epochs=2, batch_size=16, verbose=0, **kw)
        return params_of(model)

    reference = run()
    with pytest.raises(KeyboardInterrupt):
        run(checkpoint_dir=tmp_path / "c", save_every=3, callbacks=[Crash()])
    resumed = run(checkpoint_dir=tmp_path / "c", save_every=3, resume=True)
    assert all(np.array_equal(reference[k], resumed[k]) for k in reference)


def test_sigterm_writes_a_checkpoint_before_exiting_and_the_run_resumes_exactly(tmp_path):
    proc, reference = _job(tmp_path, "reference", tmp_path / "ref_ckpt")
    proc, _ = _job(tmp_path, "preempted", tmp_path / "ckpt", "--term-at", "10")
    assert proc.returncode == 143, proc.stderr  # 128 + SIGTERM, after the checkpoint
    assert Checkpointer(tmp_path / "ckpt").latest() == 10
    proc, resumed = _job(tmp_path, "resumed", tmp_path / "ckpt")
    assert proc.returncode == 0, proc.stderr
    _assert_bitwise_equal(reference, resumed)


def test_ctrl_c_writes_a_checkpoint_then_raises_keyboard_interrupt(tmp_path):
    import signal

    x, y = blobs(80)
    before = signal.getsignal(signal.SIGINT)  # Python's default handler, or SIG_IGN in a background job

    class CtrlC(ft.callbacks.Callback):
        def on_step_end(self, step, logs=None):
            if step == 6:
                signal.raise_signal(signal.SIGINT)

    with pytest.raises(KeyboardInterrupt, match="checkpoint was written"):
        _model(log_every=1).fit(
            (x, y), epochs=2, batch_size=16, verbose=0, checkpoint_dir=tmp_path / "c", callbacks=[CtrlC()]
        )
    assert Checkpointer(tmp_path / "c").latest() == 6
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_disk_full_during_save_is_a_clear_error_and_the_previous_checkpoint_stays(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    x, y = blobs(64)
    real_save, calls = ocp.CheckpointManager.save, []

    def save(self, step, *args, **kwargs):
        calls.append(step)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    model = _model()
    with pytest.raises(ft.CheckpointError, match=r"No space left.*previous checkpoint \(step 4\) is intact"):
        model.fit((x, y), epochs=3, batch_size=16, verbose=0, checkpoint_dir=tmp_path / "c")
    assert Checkpointer(tmp_path / "c").latest() == 4
    assert all(np.isfinite(v).all() for v in params_of(model).values())  # the in-memory state was written back
    monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)
    model.fit((x, y), epochs=3, batch_size=16, verbose=0, checkpoint_dir=tmp_path / "c", resume=True)
    assert Checkpointer(tmp_path / "c").latest() == 12


def test_non_finite_steps_stop_training_and_the_last_good_checkpoint_stays_intact(tmp_path):
    x, y = blobs(64)
    bad = x.copy()
    bad[32:] = np.nan  # the second epoch's later batches are all non-finite
    order_free = [{"x": bad[i : i + 16], "labels": y[i : i + 16]} for i in range(0, 64, 16)]
    model = _model(max_nonfinite=2, log_every=1)
    with pytest.raises(ft.NonFiniteError, match="2 consecutive steps"):
        model.fit(order_free, epochs=3, batch_size=16, verbose=0, checkpoint_dir=tmp_path / "c", save_every=1)
    ckpt = Checkpointer(tmp_path / "c")
    state, meta = ckpt.restore(None, model.trainer.state)
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(state["params"]))
    good = params_of(model)  # the skipped steps left the parameters at the last finite step
    assert all(np.isfinite(v).all() for v in good.values())


def test_resuming_a_checkpoint_from_before_the_newer_recipe_fields():
    from finetune.recipe import Recipe
    from finetune.training.resume import recipe_changes

    old = Recipe().to_dict()
    for field in ("remat", "group_by_length", "steps_per_execution"):
        old.pop(field)
    assert recipe_changes(old, Recipe(group_by_length=False).to_dict()) == []  # the old behaviour: resumable
    assert recipe_changes(old, Recipe().to_dict()) == ["group_by_length"]  # the data order would change


def test_a_checkpoint_from_before_default_packing_resumes_where_nothing_is_packed():
    from finetune.recipe import Recipe
    from finetune.training.resume import recipe_changes, with_packing

    old, new = Recipe(packing=False).to_dict(), Recipe().to_dict()  # the default was False, is now None
    assert recipe_changes(*(with_packing(r, False) for r in (old, new))) == []  # e.g. images, or DistilBERT
    assert recipe_changes(*(with_packing(r, True) for r in (old, new))) == ["packing"]  # BERT: another order
    assert recipe_changes(*(with_packing(r, True) for r in (new, new))) == []
