"""Several steps per call of the compiled program (a scan over stacked batches): the same training as one step per
call, bit for bit, with logs, callbacks and checkpoints at the same steps."""

import numpy as np
import pytest

import finetune as ft
from finetune.callbacks import Callback
from tests.tiny import TinyClassifier, blobs, params_of


class Steps(Callback):
    def __init__(self, stop_at=None):
        self.seen, self.stop_at = [], stop_at

    def on_step_end(self, step, logs=None):
        self.seen.append((step, logs["loss"]))
        if self.stop_at is not None and step >= self.stop_at:
            self.trainer.stop_training = True


def _fit(spe, *, epochs=6, callbacks=(), **kw):
    x, y = blobs(100)  # 10 batches of 10 per epoch
    model = ft.Model(TinyClassifier(dropout=0.1), task="text-classification")
    model.compile(optimizer="adamw", learning_rate=1e-2, log_every=5, steps_per_execution=spe)
    history = model.fit((x, y), epochs=epochs, batch_size=10, verbose=0, callbacks=list(callbacks), **kw)
    return model, history


@pytest.mark.parametrize("spe", [5, "auto"])
def test_stacked_steps_train_exactly_like_single_steps(spe):
    single, stacked = Steps(), Steps()
    one, h1 = _fit(1, callbacks=[single])
    many, h2 = _fit(spe, callbacks=[stacked])
    program = many.trainer.program
    assert program.compiled("train_steps") == 1  # the stacked program did run (auto: tiny steps are short)
    assert one.trainer.program.compiled("train_steps") == 0
    a, b = params_of(one), params_of(many)
    for path in a:
        np.testing.assert_array_equal(a[path], b[path], err_msg=path)  # dropout draws and updates are identical
    assert stacked.seen == single.seen  # the same steps reported, with the same losses
    assert h2.history == h1.history


def test_a_ragged_last_batch_in_a_stack_compiles_nothing_new():
    x, y = blobs(95)  # the last batch of each epoch has 5 real rows and 5 padded ones
    model = ft.Model(TinyClassifier(), task="text-classification").compile(log_every=5, steps_per_execution=5)
    history = model.fit((x, y), epochs=3, batch_size=10, verbose=0)
    program = model.trainer.program
    assert (program.compiled("train_step"), program.compiled("train_steps")) == (0, 1)  # padded: stackable
    assert history.compilations == [1] and history.steps[-1]["step"] == 30


def test_a_callback_stop_takes_effect_within_one_call():
    stopper = Steps(stop_at=5)
    model, history = _fit(5, callbacks=[stopper])
    assert [s for s, _ in stopper.seen] == [5, 10]
    assert model.trainer.step == 10  # step 5 was reported while steps 6-10 ran: one call more, no further
    assert history.epochs == [0]


def test_checkpoints_land_on_the_same_steps(tmp_path):
    one, _ = _fit(1, epochs=2, checkpoint_dir=tmp_path / "one", save_every=3, save_each_epoch=False, keep=20)
    many, _ = _fit(5, epochs=2, checkpoint_dir=tmp_path / "many", save_every=3, save_each_epoch=False, keep=20)
    listed = [sorted(int(p.name) for p in (tmp_path / d).iterdir() if p.name.isdigit()) for d in ("one", "many")]
    assert listed[0] == listed[1] == [3, 6, 9, 12, 15, 18, 20]
    a, b = params_of(one), params_of(many)
    for path in a:
        np.testing.assert_array_equal(a[path], b[path], err_msg=path)


def test_stacking_steps_is_refused_on_a_mesh():
    from finetune.errors import ConfigError

    x, y = blobs(40)
    model = ft.Model(TinyClassifier(), task="text-classification").compile(steps_per_execution=4, sharding="data")
    with pytest.raises(ConfigError, match="steps_per_execution`=4"):
        model.fit((x, y), epochs=1, batch_size=8, verbose=0)
