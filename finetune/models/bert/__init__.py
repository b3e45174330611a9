"""BERT (``model_type`` ``bert``): feature extraction, sequence and token classification."""

from finetune.models.bert import convert
from finetune.models.bert.modeling import HEADS, Bert, Config
from finetune.models.registry import Architecture, ConfigRules

_HF_CLASSES = {
    "feature-extraction": "BertModel",
    "text-classification": "BertForSequenceClassification",
    "token-classification": "BertForTokenClassification",
}


def build(config: Config, *, task: str, num_labels: int | None, dtype, param_dtype, rngs) -> Bert:
    return Bert(config, task=task, num_labels=num_labels, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


CONFIG_RULES = ConfigRules(
    sizes=("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    + ("max_position_embeddings", "type_vocab_size"),
    rates=("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"),
    positive=("layer_norm_eps",),
    divides=(("hidden_size", "num_attention_heads"),),
)


ARCHITECTURE = Architecture(
    name="bert",
    heads=HEADS,
    config_from_hf=Config.from_hf,
    build=build,
    table=convert.table,
    ignore=convert.ignore,
    stack="encoder/layers",
    num_layers=lambda config: config.num_layers,
    hf_architecture=lambda config, task: _HF_CLASSES[task],
    config_rules=CONFIG_RULES,
)

__all__ = ["ARCHITECTURE", "CONFIG_RULES", "Bert", "Config"]
