"""fit / evaluate / predict: learning, compile-once, masking of the ragged last batch, callbacks, one-call fit."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sklearn.metrics

import finetune as ft
from finetune.callbacks import Callback, EarlyStopping, JSONLLogger, LearningRateLogger
from tests.tiny import TinyClassifier, blobs, params_of


def _model(classes=3, **compile_kwargs):
    model = ft.Model(TinyClassifier(classes=classes, dropout=0.1), task="text-classification")
    return model.compile(**{"optimizer": "adamw", "learning_rate": 1e-2, **compile_kwargs})


def test_overfits_one_batch_to_near_zero_loss():
    x, y = blobs(16)
    model = _model(learning_rate=3e-2)
    history = model.fit((x, y), epochs=150, batch_size=16, verbose=0)
    assert history.history["loss"][-1] < 0.01
    assert model.evaluate((x, y))["accuracy"] == 1.0


def test_compiles_once_across_epochs_with_a_ragged_last_batch():
    x, y = blobs(100)  # 100 = 6 * 16 + 4: the last batch is padded, not dropped or recompiled
    model = _model()
    history = model.fit((x, y), epochs=2, batch_size=16, verbose=0)
    assert model.trainer.program.compilations() == 1
    assert history.compilations == [1]
    assert history.steps[-1]["step"] == 14


class _Noted(TinyClassifier):
    """TinyClassifier that notes each run of its forward pass (a host callback inside the compiled step)."""

    def __init__(self, events: list, **kwargs):
        super().__init__(**kwargs)
        self.events = events

    def __call__(self, x):
        jax.debug.callback(lambda: self.events.append("run"))
        return super().__call__(x)


def test_the_compilers_freed_memory_goes_back_before_each_new_program_first_runs(monkeypatch):
    import platform

    from finetune import runtime

    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert runtime.release_freed_memory() is True  # glibc's malloc_trim was found and called
    events = []
    monkeypatch.setattr(runtime, "release_freed_memory", lambda: events.append("trim") or True)
    jax.jit(lambda v: v * 3.0)(jnp.ones(5))
    assert events == []  # outside finetune's loops, compiles are left alone
    x, y = blobs(100)
    model = ft.Model(_Noted(events, classes=3), task="text-classification")
    model.compile(optimizer="adamw", learning_rate=1e-2, steps_per_execution=1)
    model.fit((x, y), epochs=3, batch_size=16, verbose=0)
    runs = [i for i, e in enumerate(events) if e == "run"]
    assert len(runs) == 21  # 7 steps an epoch
    assert "trim" in events[: runs[0]]  # after the train step's compile, before its first run
    assert events[runs[0] :].count("trim") <= 3  # the programs that read logs compile once; no trim per step
    for call, compiles in ((model.evaluate, True), (model.evaluate, False), (model.predict, True)):
        del events[:]
        call((x, y), batch_size=16)
        first = events.index("run")
        assert ("trim" in events[:first]) is compiles  # once before the first run of a new program, else never
        assert "trim" not in events[first:]


def test_the_optimizer_step_is_traced_once_for_every_batch_shape(monkeypatch):
    from finetune import optim

    traced = []
    plain = optim.apply_step
    monkeypatch.setattr(optim, "apply_step", lambda *args: traced.append(1) or plain(*args))
    x, y = blobs(64)
    model = _model(steps_per_execution=1)
    model.fit((x, y), epochs=1, batch_size=16, verbose=0)
    trainer = model.trainer
    before = jax.device_get(trainer.state["params"])
    for size in (8, 4):  # new batch shapes: the train step is traced and compiled again, the optimizer step is not
        batch = next(trainer.source((x, y), stage="fit").batches(size, seed=0))
        trainer.state = trainer.program.train_step(trainer.state, batch)
    assert trainer.program.compilations() == 3
    assert len(traced) == 1
    after = jax.device_get(trainer.state["params"])
    assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before), strict=True))


def test_padding_rows_never_count_in_evaluation():
    x, y = blobs(100)
    model = _model()
    model.fit((x, y), epochs=1, batch_size=16, verbose=0)
    ragged = model.evaluate((x, y), batch_size=16)  # 4 real rows in the last batch, 12 padding
    exact = model.evaluate((x, y), batch_size=20)
    assert ragged["loss"] == pytest.approx(exact["loss"], rel=1e-5)
    assert ragged["accuracy"] == exact["accuracy"]


def test_metrics_equal_scikit_learn_on_the_same_predictions():
    x, y = blobs(90, classes=4, seed=3)
    model = _model(classes=4, metrics=["accuracy", "f1_macro", "f1_micro", "precision", "recall"])
    model.fit((x[:40], y[:40]), epochs=1, batch_size=16, verbose=0)  # partly trained: imperfect predictions
    got = model.evaluate((x, y), batch_size=16)
    pred = model.predict((x, y), batch_size=16)["labels"]
    assert got["accuracy"] == pytest.approx(sklearn.metrics.accuracy_score(y, pred))
    assert got["f1_macro"] == pytest.approx(sklearn.metrics.f1_score(y, pred, average="macro"))
    assert got["f1_micro"] == pytest.approx(sklearn.metrics.f1_score(y, pred, average="micro"))
    assert got["precision"] == pytest.approx(sklearn.metrics.precision_score(y, pred, average="macro", zero_division=0))
    assert got["recall"] == pytest.approx(sklearn.metrics.recall_score(y, pred, average="macro", zero_division=0))


def test_predict_returns_one_row_per_example_with_probabilities():
    x, y = blobs(37)
    out = _model().predict((x, y), batch_size=16)
    assert out["logits"].shape == (37, 3) and out["labels"].shape == (37,)
    np.testing.assert_allclose(out["probabilities"].sum(-1), 1.0, rtol=1e-5)


def test_model_call_is_inference_mode():
    x, _ = blobs(4)
    model = ft.Model(TinyClassifier(dropout=0.5), task="text-classification")
    np.testing.assert_array_equal(np.asarray(model(x=x)), np.asarray(model(x=x)))


def test_early_stopping_stops_and_restores_the_best_weights():
    x, y = blobs(64)
    stopper = EarlyStopping("val_loss", patience=1, restore_best_weights=True)
    model = _model(learning_rate=1.0, optimizer="sgd")  # diverging: val_loss stops improving fast
    history = model.fit((x, y), (x, y), epochs=30, batch_size=16, callbacks=[stopper], verbose=0)
    assert stopper.stopped_epoch is not None and len(history.epochs) < 30
    best = min(history.history["val_loss"])
    assert model.evaluate((x, y), batch_size=16)["loss"] == pytest.approx(best, rel=1e-5)


def test_a_callback_can_stop_training_and_loggers_write(tmp_path):
    class StopAt(Callback):
        def on_step_end(self, step, logs=None):
            if step >= 4:
                self.trainer.stop_training = True

    x, y = blobs(160)
    lrs = LearningRateLogger()
    model = _model(log_every=2, groups={"backbone": ft.Group(lr_mult=0.1)})
    history = model.fit(
        (x, y), epochs=5, batch_size=16, verbose=0, callbacks=[StopAt(), JSONLLogger(tmp_path / "log.jsonl"), lrs]
    )
    assert history.steps[-1]["step"] == 4
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in lines] == ["step", "step", "epoch"]
    assert lrs.records[0]["backbone"] == pytest.approx(1e-3) and lrs.records[0]["new"] == pytest.approx(1e-2)


def test_verbose_zero_is_silent_and_verbose_prints_the_group_report(capsys):
    x, y = blobs(32)
    _model().fit((x, y), epochs=1, batch_size=16, verbose=0)
    assert capsys.readouterr().out == ""
    _model().fit((x, y), epochs=1, batch_size=16, verbose=1)
    out = capsys.readouterr().out
    assert "backbone" in out and "optimizer state" in out


def test_one_call_fit_returns_model_and_history():
    x, y = blobs(64)
    model, history = ft.fit(
        ft.Model(TinyClassifier(), task="text-classification"),
        (x, y),
        epochs=3,
        batch_size=16,
        learning_rate=1e-2,
        verbose=0,
    )
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert params_of(model)


def test_unknown_recipe_field_suggests_the_closest():
    with pytest.raises(ft.ConfigError, match="did you mean 'weight_decay'"):
        _model(weight_decai=0.1)


def test_phases_run_in_one_fit_with_one_compilation_each():
    x, y = blobs(64)
    model = _model(
        groups={"backbone": ft.Group(lr_mult=0.1)},
        phases=[{"epochs": 1, "learning_rate": 1e-2, "groups": {"backbone": {"trainable": False}}}],
    )
    before = params_of(model)
    seen = []

    class Watch(ft.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append((epoch, dict(self.trainer.assignment.groups)))

    history = model.fit((x, y), epochs=2, batch_size=16, verbose=0, callbacks=[Watch()])
    assert history.epochs == [0, 1, 2] and history.compilations == [1, 1]
    assert seen[0][1]["backbone"].trainable is False and seen[1][1]["backbone"].trainable is True
    after = params_of(model)
    assert not np.array_equal(before["encoder/0/kernel"], after["encoder/0/kernel"])  # unfrozen in phase 2


def test_layer_decay_needs_declared_layers_and_uses_them():
    model = _model(layer_decay=0.5)
    with pytest.raises(ft.ConfigError, match="declares none"):
        model.plan()
    model = ft.Model(TinyClassifier(), task="text-classification", layer_pattern=r"encoder/(\d+)/.*", num_layers=2)
    a = model.compile(layer_decay=0.5).plan()
    mult = {p: a.groups[g].lr_mult for p, g in a.group_of.items()}
    assert mult["encoder/0/kernel"] == 0.25 and mult["encoder/1/kernel"] == 0.5
    assert mult["norm/scale"] == 0.125 and mult["classifier/kernel"] == 1.0


def test_remat_trains_the_same_and_keeps_less_for_the_backward_pass(tmp_path):
    from tests.models.reference import tiny_bert

    _, path = tiny_bert(
        tmp_path / "bert",
        "BertForSequenceClassification",
        num_labels=2,
        num_hidden_layers=4,
        hidden_size=128,
        num_attention_heads=8,
        intermediate_size=512,
    )
    ids = np.random.default_rng(0).integers(3, 250, (32, 128)).astype(np.int32)
    data = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": (ids[:, 0] % 2).astype(np.int32)}
    runs = {}
    for remat in (False, True):
        model = ft.load(path, task="text-classification", num_labels=2)
        model.compile(optimizer="sgd", learning_rate=1e-2, remat=remat)  # updates proportional to the gradients
        model.fit(data, epochs=2, batch_size=32, verbose=0)
        program, state = model.trainer.program, model.trainer.state
        batch = next(model.trainer.train_source.batches(32, seed=0))

        def loss(params, rest, program=program, state=state, batch=batch):
            return program.forward(program.graphdef, params, state["frozen"], rest, batch)[0].sum()

        # What the train step's backward pass keeps: the leaves of the vjp closure (weights and activations).
        kept = jax.tree.leaves(jax.vjp(loss, state["params"], state["rest"])[1])
        runs[remat] = (params_of(model), sum(x.nbytes for x in kept if jnp.issubdtype(x.dtype, jnp.floating)))
    (base, base_kept), (other, other_kept) = runs[False], runs[True]
    for name in base:  # dropout draws included: the recomputed forward is the same forward
        np.testing.assert_allclose(other[name], base[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # Per layer, only its input is kept; the rest is recomputed. (XLA:CPU's scratch memory shrinks much less than
    # this: see docs/performance.md.)
    assert other_kept < 0.3 * base_kept


def _faults_of_a_reused_block(size=256 << 20) -> int:
    """Minor page faults of touching a block of ``size`` bytes allocated right after one of that size was freed."""
    import ctypes
    import resource

    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    for _ in range(2):  # the second block's faults
        block = libc.malloc(size)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        ctypes.memset(block, 1, size)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        libc.free(block)
    return faults


@pytest.mark.skipif(
    __import__("platform").libc_ver()[0] != "glibc", reason="the C allocator settings are glibc's (Linux)"
)
def test_a_freed_scratch_block_is_kept_for_the_next_call_only_inside_finetunes_loops():
    from finetune import runtime

    pages = (256 << 20) // 4096
    assert jax.config.read("jax_cpu_enable_async_dispatch") is False  # set by `ft.tune()` (tests/conftest.py)
    assert _faults_of_a_reused_block() > pages // 2  # by default a block this big is a fresh mmap each time
    runtime.keep(True)
    assert _faults_of_a_reused_block() > pages // 2  # outside fit, evaluate and predict: nothing changes
    with runtime.kept_scratch() as applies:
        assert applies
        runtime.keep(True)
        with runtime.kept_scratch():  # re-entrant: evaluation inside fit
            assert _faults_of_a_reused_block() < pages // 50
        assert _faults_of_a_reused_block() < pages // 50  # still kept: the outer block runs
        runtime.keep(False)  # as before a call of a new shape
        assert _faults_of_a_reused_block() > pages // 2
        runtime.keep(True)
    assert _faults_of_a_reused_block() > pages // 2  # the defaults are back


def test_batches_are_made_on_a_thread_and_steps_run_on_the_calling_one(monkeypatch):
    import threading

    from finetune.data import batches as data_lib

    made_on, plain = [], data_lib.ArrayData.batches

    def batches(self, *args, **kwargs):
        for batch in plain(self, *args, **kwargs):
            made_on.append(threading.current_thread().name)
            yield batch

    monkeypatch.setattr(data_lib.ArrayData, "batches", batches)
    x, y = blobs(8192)  # batches of 4096 x 8 floats, 128 KB: put on the device and waited for before the step
    model = _model(steps_per_execution=1)
    model.fit((x, y), epochs=3, batch_size=4096, verbose=0)
    assert set(made_on[1:]) == {"finetune-batches"}  # the first builds the step, on the calling thread
    assert model.evaluate((x, y), batch_size=4096)["accuracy"] > 0.9


def test_an_error_while_making_batches_on_the_thread_reaches_the_caller():
    from finetune.data import prefetch_on_thread

    def broken():
        yield {"x": np.zeros(3)}
        raise ft.DataError("row 7 has no label")

    got = prefetch_on_thread(broken())
    assert next(got)["x"].shape == (3,)
    with pytest.raises(ft.DataError, match="row 7 has no label"):
        next(got)


@pytest.mark.skipif(
    __import__("platform").libc_ver()[0] != "glibc", reason="the C allocator settings are glibc's (Linux)"
)
def test_fit_steps_reuse_their_scratch_memory_instead_of_faulting_it_in_again(monkeypatch):
    import contextlib
    import resource

    from finetune import runtime

    x, y = blobs(8192 * 10, features=64, classes=2)  # batches of 2 MB; the step's scratch is about 420 MB

    def step_faults() -> list[int]:
        counts = []

        class Faults(Callback):
            def on_step_end(self, step, logs=None):
                counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)

        model = ft.Model(TinyClassifier(features=64, hidden=1024, classes=2), task="text-classification")
        model.compile(optimizer="adamw", learning_rate=1e-3, log_every=1, steps_per_execution=1)
        model.fit((x, y), epochs=1, batch_size=8192, verbose=0, callbacks=[Faults()])
        return np.diff(counts)[2:].tolist()  # steps 4 to 10: past the compile and the first placement

    kept = step_faults()
    monkeypatch.setattr(runtime, "kept_scratch", lambda: contextlib.nullcontext(False))
    fresh = step_faults()
    assert min(fresh) > 50_000  # each step maps its scratch afresh: 4 KB pages
    # Most steps find it kept; one whose scratch lands elsewhere faults it in once (`finetune.runtime.keep`).
    assert np.median(kept) < 5_000 and sum(f > 50_000 for f in kept) <= 2, kept
