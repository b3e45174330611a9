"""DistilBERT (``model_type`` ``distilbert``): feature extraction, sequence and token classification."""

from finetune.models.distilbert import convert
from finetune.models.distilbert.modeling import HEADS, Config, DistilBert
from finetune.models.registry import Architecture, ConfigRules

_HF_CLASSES = {
    "feature-extraction": "DistilBertModel",
    "text-classification": "DistilBertForSequenceClassification",
    "token-classification": "DistilBertForTokenClassification",
}


def build(config: Config, *, task: str, num_labels: int | None, dtype, param_dtype, rngs) -> DistilBert:
    """Builds the DistilBERT module for ``task`` (see `DistilBert`)."""
    return DistilBert(config, task=task, num_labels=num_labels, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


CONFIG_RULES = ConfigRules(
    sizes=("vocab_size", "dim", "n_layers", "n_heads", "hidden_dim", "max_position_embeddings"),
    rates=("dropout", "attention_dropout", "seq_classif_dropout", "qa_dropout"),
    divides=(("dim", "n_heads"),),
)


ARCHITECTURE = Architecture(
    name="distilbert",
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

__all__ = ["ARCHITECTURE", "Config", "DistilBert"]
