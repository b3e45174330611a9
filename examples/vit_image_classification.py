"""Image classification with a tiny ViT built from a config (no pretrained weights), on scikit-learn's digits.

The `vit` preset is big_vision's fine-tuning recipe (SGD momentum 0.9, cosine, clip 1.0, no weight decay); from
scratch, AdamW learns faster, so the example overrides the optimizer and keeps the rest of the recipe.

  python examples/vit_image_classification.py
"""

import os

import transformers

import finetune
from finetune.data.examples import digits

finetune.tune()  # the CPU tuning, before JAX starts

epochs = int(os.environ.get("EXAMPLE_EPOCHS", 10))
data = digits()  # 8x8 grey images, 10 classes

config = transformers.ViTConfig(
    image_size=8,
    patch_size=2,
    num_channels=1,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
)
processor = transformers.ViTImageProcessor(size={"height": 8, "width": 8}, image_mean=[0.5], image_std=[0.5])
model = finetune.from_config(config, task="image-classification", num_labels=10, processor=processor)
model.compile(preset="vit", optimizer="adamw", optimizer_options={}, learning_rate=3e-3, batch_size=64)
model.fit(data["train"], validation_data=data["test"], epochs=epochs)
print("test:", model.evaluate(data["test"]))
