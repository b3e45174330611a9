"""Public home of the callbacks: ``from finetune.callbacks import EarlyStopping``."""

from finetune.hf.push import PushToHub
from finetune.training.callbacks import Callback, CSVLogger, EarlyStopping, JSONLLogger, LearningRateLogger

__all__ = ["CSVLogger", "Callback", "EarlyStopping", "JSONLLogger", "LearningRateLogger", "PushToHub"]
