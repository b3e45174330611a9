"""GPT-2 (``model_type`` gpt2): causal LM, sequence and token classification, feature extraction."""

from finetune.models.gpt2 import convert
from finetune.models.gpt2.modeling import GPT2, HEADS, Config
from finetune.models.registry import Architecture, ConfigRules

_HF_CLASSES = {
    "causal-lm": "GPT2LMHeadModel",
    "text-classification": "GPT2ForSequenceClassification",
    "token-classification": "GPT2ForTokenClassification",
    "feature-extraction": "GPT2Model",
}


def build(config: Config, *, task: str, num_labels: int | None, dtype, param_dtype, rngs) -> GPT2:
    """The `GPT2` module for ``task`` (see `finetune.models.registry.Architecture.build`)."""
    return GPT2(config, task=task, num_labels=num_labels, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


CONFIG_RULES = ConfigRules(
    sizes=("vocab_size", "n_embd", "n_layer", "n_head", "n_positions"),
    optional_sizes=("n_inner",),
    rates=("resid_pdrop", "embd_pdrop", "attn_pdrop", "classifier_dropout"),
    positive=("layer_norm_epsilon",),
    divides=(("n_embd", "n_head"),),
)


ARCHITECTURE = Architecture(
    name="gpt2",
    heads=HEADS,
    config_from_hf=Config.from_hf,
    build=build,
    table=convert.table,
    ignore=convert.ignore,
    stack="layers",
    num_layers=lambda config: config.num_layers,
    hf_architecture=lambda config, task: _HF_CLASSES[task],
    config_rules=CONFIG_RULES,
)

__all__ = ["ARCHITECTURE", "GPT2", "Config"]
