"""Llama-family decoders (``model_type`` llama, mistral, qwen2, qwen3): causal LM, classification, features."""

from finetune.models.llama import convert
from finetune.models.llama.modeling import FAMILIES, HEADS, Config, Llama
from finetune.models.registry import Architecture, ConfigRules

# task -> suffix of the transformers class name, after the family prefix (``Qwen2`` + ``ForCausalLM``).
_HF_SUFFIXES = {
    "causal-lm": "ForCausalLM",
    "text-classification": "ForSequenceClassification",
    "token-classification": "ForTokenClassification",
    "feature-extraction": "Model",
}


def build(config: Config, *, task: str, num_labels: int | None, dtype, param_dtype, rngs) -> Llama:
    """The `Llama` module for ``task`` (see `finetune.models.registry.Architecture.build`)."""
    return Llama(config, task=task, num_labels=num_labels, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def hf_architecture(config: Config, task: str) -> str:
    """The transformers class name of this family and task, e.g. ``Qwen2ForSequenceClassification``."""
    return FAMILIES[config.model_type]["hf_prefix"] + _HF_SUFFIXES[task]


# The width need not be a multiple of the heads: ``head_dim`` (default hidden_size // heads) sets the head size.
CONFIG_RULES = ConfigRules(
    sizes=("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    + ("max_position_embeddings",),
    optional_sizes=("num_key_value_heads", "head_dim", "sliding_window"),
    rates=("attention_dropout",),
    positive=("rms_norm_eps",),
    divides=(("num_attention_heads", "num_key_value_heads"), ("head_dim", 2)),
)


ARCHITECTURE = Architecture(
    name="llama",
    heads=HEADS,
    config_from_hf=Config.from_hf,
    build=build,
    table=convert.table,
    ignore=convert.ignore,
    stack="layers",
    num_layers=lambda config: config.num_layers,
    hf_architecture=hf_architecture,
    config_rules=CONFIG_RULES,
)

__all__ = ["ARCHITECTURE", "Config", "Llama"]
