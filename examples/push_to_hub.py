"""Fine-tune briefly, push to the Hugging Face Hub, and load the pushed model back.

Needs a write token (``HF_TOKEN`` or ``hf auth login``) and network access; set ``HF_ENDPOINT`` for another Hub.

  python examples/push_to_hub.py me/minilm-sst2-demo
"""

import os
import sys

import numpy as np

import finetune
from finetune.hf.push import PushToHub

finetune.tune()  # the CPU tuning, before JAX starts

repo_id = sys.argv[1]
base = os.environ.get("EXAMPLE_MODEL", "sentence-transformers/all-MiniLM-L6-v2")  # a Hub id or a local directory
model = finetune.load(base, task="text-classification", num_labels=2)
texts = ["a delight from start to finish", "dull and far too long", "warm and funny", "I want my evening back"]
train = {**model.tokenizer(texts, padding=True, return_tensors="np"), "labels": np.array([1, 0, 1, 0])}

model.compile(learning_rate=3e-5)
push = PushToHub(repo_id, strategy="every_save")  # uploads in the background after each epoch
model.fit(train, epochs=2, batch_size=4, callbacks=[push])
push.wait()
print("pushed during training:", push.commit_urls, "errors:", push.last_error)

print("pushed:", model.push_to_hub(repo_id, revision="final", commit_message="Final model"))
reloaded = finetune.load(repo_id, task="text-classification", revision="final")
print("same predictions:", np.allclose(model.predict(train)["logits"], reloaded.predict(train)["logits"], atol=1e-5))
