"""RoBERTa and XLM-RoBERTa (``model_type`` ``roberta``, ``xlm-roberta``): feature extraction, sequence and token
classification."""

from finetune.models.registry import Architecture, ConfigRules
from finetune.models.roberta import convert
from finetune.models.roberta.modeling import HEADS, Config, Roberta

_TASK_CLASSES = {
    "feature-extraction": "Model",
    "text-classification": "ForSequenceClassification",
    "token-classification": "ForTokenClassification",
}


def build(config: Config, *, task: str, num_labels: int | None, dtype, param_dtype, rngs) -> Roberta:
    """Builds the RoBERTa module for ``task`` (see `Roberta`)."""
    return Roberta(config, task=task, num_labels=num_labels, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def hf_architecture(config: Config, task: str) -> str:
    """The transformers class that loads an export: ``RobertaForSequenceClassification``, ``XLMRobertaModel``..."""
    family = "XLMRoberta" if config.model_type == "xlm-roberta" else "Roberta"
    return family + _TASK_CLASSES[task]


# The fields of the BERT-family config (`finetune.models.blocks.EncoderConfig.from_hf` reads them).
CONFIG_RULES = ConfigRules(
    sizes=("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    + ("max_position_embeddings", "type_vocab_size"),
    rates=("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"),
    positive=("layer_norm_eps",),
    divides=(("hidden_size", "num_attention_heads"),),
)


ARCHITECTURE = Architecture(
    name="roberta",
    heads=HEADS,
    config_from_hf=Config.from_hf,
    build=build,
    table=convert.table,
    ignore=convert.ignore,
    stack="encoder/layers",
    num_layers=lambda config: config.num_layers,
    hf_architecture=hf_architecture,
    config_rules=CONFIG_RULES,
)

__all__ = ["ARCHITECTURE", "Config", "Roberta"]
