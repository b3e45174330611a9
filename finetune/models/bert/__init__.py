"""BERT (``model_type`` ``bert``): feature extraction, sequence and token classification."""

from finetune.models.bert import convert
from finetune.models.bert.modeling import Bert, Config
from finetune.models.registry import Architecture

_HF_CLASSES = {
    "feature-extraction": "BertModel",
    "text-classification": "BertForSequenceClassification",
    "token-classification": "BertForTokenClassification",
}


def build(config: Config, *, task: str, num_labels: int | None, dtype, param_dtype, rngs) -> Bert:
    return Bert(config, task=task, num_labels=num_labels, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


ARCHITECTURE = Architecture(
    name="bert",
    tasks=tuple(_HF_CLASSES),
    config_from_hf=Config.from_hf,
    build=build,
    table=convert.table,
    ignore=convert.ignore,
    head=r"(?:pooler|classifier)/.*",
    layer=r"encoder/layers/(\d+)/.*",
    num_layers=lambda config: config.num_layers,
    hf_architecture=lambda config, task: _HF_CLASSES[task],
)

__all__ = ["ARCHITECTURE", "Bert", "Config"]
