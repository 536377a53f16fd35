"""grokfast: grokking on modular arithmetic at the speed of the hardware.

    import grokfast
    task = grokfast.Task("x+y", p=31, frac=0.7, seed=0)
    cfg = grokfast.ModelConfig.preset("small")
    run = grokfast.train(task, cfg, steps=3000, lr=3e-3, grokfast="ema", out="runs/p31")
    print(run.summary["steps_to_grok"])
"""
from .config import ConfigError, ModelConfig, TrainConfig, TaskSpec, Preset, PRESETS, preset
from .data import Task, Operation, PAPER_OPS
from .model import Transformer, cross_entropy64
from .backends import loss_and_grads, resolve_backend
from .optim import AdamW, GrokfastFilter
from .train import train, evaluate, Run, TrainingDiverged, Interrupted
from .rundir import load_model, load_config, read_metrics

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "ModelConfig", "TrainConfig", "TaskSpec", "Preset", "PRESETS", "preset",
    "Task", "Operation", "PAPER_OPS", "Transformer", "cross_entropy64", "loss_and_grads", "resolve_backend",
    "AdamW", "GrokfastFilter", "train", "evaluate", "Run", "TrainingDiverged", "Interrupted",
    "load_model", "load_config", "read_metrics",
]
