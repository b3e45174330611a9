"""The building blocks every architecture is made of; an architecture folder imports them from here.

- `layers`: activations, dense / embedding / norm layers with their logical axes, the recomputed activation and the
  layer stack (`run_layers`, and `head_rows`, whose last layer computes only the rows a head reads);
- `attention`: bidirectional self-attention and causal (sliding-window, grouped-query) attention;
- `encoder`: the BERT family's config, embeddings, post-norm layer and layer stack (with packed batches);
- `rotary`: rotary position embeddings and their scaling variants;
- `dropout`: dropout with cheap counter-based masks.
"""

from finetune.models.blocks.attention import Attention, causal_attention
from finetune.models.blocks.dropout import Dropout, attend
from finetune.models.blocks.encoder import Embeddings, Encoder, EncoderConfig, Layer
from finetune.models.blocks.layers import (
    ACTIVATIONS,
    Dtype,
    Linear,
    axes,
    check_activation,
    dense,
    embed,
    head_rows,
    layer_norm,
    recomputed,
    rms_norm,
    run_layers,
)
from finetune.models.blocks.rotary import Rope, apply_rope, rope_tables

__all__ = [
    "ACTIVATIONS",
    "Attention",
    "Dropout",
    "Dtype",
    "Embeddings",
    "Encoder",
    "EncoderConfig",
    "Layer",
    "Linear",
    "Rope",
    "apply_rope",
    "attend",
    "axes",
    "causal_attention",
    "check_activation",
    "dense",
    "embed",
    "head_rows",
    "layer_norm",
    "recomputed",
    "rms_norm",
    "rope_tables",
    "run_layers",
]
