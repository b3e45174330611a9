"""ViT and DeiT (``model_type`` ``vit``, ``deit``): feature extraction and image classification.

DeiT is the ViT architecture plus a distillation token; it loads ``DeiTModel`` and ``DeiTForImageClassification``
checkpoints (the classifier reads the class token). ``DeiTForImageClassificationWithTeacher``'s two heads are not
built: such a checkpoint loads its backbone, and image-classification starts a fresh classifier.
"""

from finetune.models.registry import Architecture, ConfigRules
from finetune.models.vit import convert
from finetune.models.vit.modeling import HEADS, Config, ViT

_TASK_CLASSES = {"feature-extraction": "Model", "image-classification": "ForImageClassification"}


def build(config: Config, *, task: str, num_labels: int | None, dtype, param_dtype, rngs) -> ViT:
    """Builds the ViT for ``task``: the backbone alone, or with a ``num_labels``-way classifier."""
    return ViT(config, task=task, num_labels=num_labels, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def hf_architecture(config: Config, task: str) -> str:
    """The transformers class that loads an export: ``ViTForImageClassification``, ``DeiTModel``..."""
    family = "DeiT" if config.model_type == "deit" else "ViT"
    return family + _TASK_CLASSES[task]


CONFIG_RULES = ConfigRules(
    sizes=("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "num_channels"),
    pairs=("image_size", "patch_size"),
    rates=("hidden_dropout_prob", "attention_probs_dropout_prob"),
    positive=("layer_norm_eps",),
    divides=(("hidden_size", "num_attention_heads"),),
)


ARCHITECTURE = Architecture(
    name="vit",
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

__all__ = ["ARCHITECTURE", "Config", "ViT"]
