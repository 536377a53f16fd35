"""grokfast: grokking on modular arithmetic at the speed of the hardware.

    import grokfast
    task = grokfast.Task("x+y", p=31, frac=0.7, seed=0)
    cfg = grokfast.ModelConfig.preset("small")
    run = grokfast.train(task, cfg, steps=3000, lr=3e-3, grokfast="ema", out="runs/p31")
    print(run.summary["steps_to_grok"])
"""
import importlib.abc as _abc
import importlib.util as _util
import os as _os
import sys as _sys

# Intel MKL's strict conditional numerical reproducibility: its float32 products give the same bits at any
# thread count (without it they changed from 8 threads up; measured on PyTorch 2.13's MKL 2024.2), so a run
# is the same under torchrun's one thread per process as in one process with all of them. MKL reads this once,
# at its first call: import grokfast before any matrix product, or set MKL_CBWR yourself.
_os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")


class _KernelsBesideThePackage(_abc.MetaPathFinder):
    """Finds ``grokfast.kernels`` in the checkout's ``kernels/`` folder when nothing else does.

    setup.py maps kernels/ to grokfast.kernels (package_dir). A wheel and a modern editable install
    (setuptools >= 64) honour the mapping; a legacy one (``pip install --no-build-isolation -e .`` with an
    older setuptools runs ``setup.py develop``) only puts the checkout on sys.path, where grokfast/ has no
    kernels/ inside. This finder is the last on sys.meta_path, so it acts only then."""

    ROOT = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))

    def find_spec(self, name, path=None, target=None):
        if name != __name__ + ".kernels":
            return None
        init = _os.path.join(self.ROOT, "kernels", "__init__.py")
        if not _os.path.isfile(init):
            return None
        return _util.spec_from_file_location(name, init, submodule_search_locations=[_os.path.dirname(init)])


if not any(isinstance(f, _KernelsBesideThePackage) for f in _sys.meta_path):
    _sys.meta_path.append(_KernelsBesideThePackage())

from .config import ConfigError, ModelConfig, TrainConfig, TaskSpec, Preset, PRESETS, preset
from .data import Task, Operation, PAPER_OPS
from .model import Transformer, cross_entropy64
from .backends import loss_and_grads, resolve_backend
from .optim import AdamW, GrokfastFilter
from .train import train, evaluate, Run, TrainingDiverged, Interrupted
from .rundir import load_model, load_config, read_metrics
from .reproduce import reproduce
from .lens import to_hooked_transformer
from .importers import import_model
from .compare import compare

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "ModelConfig", "TrainConfig", "TaskSpec", "Preset", "PRESETS", "preset",
    "Task", "Operation", "PAPER_OPS", "Transformer", "cross_entropy64", "loss_and_grads", "resolve_backend",
    "AdamW", "GrokfastFilter", "train", "evaluate", "Run", "TrainingDiverged", "Interrupted",
    "load_model", "load_config", "read_metrics", "reproduce", "to_hooked_transformer", "import_model",
    "load_model", "load_config", "read_metrics", "reproduce", "compare",
]
