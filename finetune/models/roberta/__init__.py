"""RoBERTa and XLM-RoBERTa (``model_type`` ``roberta``, ``xlm-roberta``): feature extraction, sequence and token
classification."""

from finetune.models.bert import CONFIG_RULES
from finetune.models.registry import Architecture
from finetune.models.roberta import convert
from finetune.models.roberta.modeling import Config, Roberta

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


ARCHITECTURE = Architecture(
    name="roberta",
    tasks=tuple(_TASK_CLASSES),
    config_from_hf=Config.from_hf,
    build=build,
    table=convert.table,
    ignore=convert.ignore,
    head=r"classifier/.*",
    layer=r"encoder/layers/(\d+)/.*",
    num_layers=lambda config: config.num_layers,
    hf_architecture=hf_architecture,
    config_rules=CONFIG_RULES,
)

__all__ = ["ARCHITECTURE", "Config", "Roberta"]
