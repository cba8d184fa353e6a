"""Fine-tuning: training data -> harmony sequences with loss masks -> LoRA adapters (PEFT format)."""

from inhouse.train.data import DataError, load_examples, render_examples
from inhouse.train.trainer import StepInfo, TrainConfig, TrainResult, finetune

__all__ = ["DataError", "StepInfo", "TrainConfig", "TrainResult", "finetune", "load_examples",
           "render_examples"]
