"""Fused Triton kernels for the grokking training step (installed as grokfast.kernels).

Tensors in, tensors out: nothing here knows of training loops, files or the command line.
Importing this package imports triton (set TRITON_INTERPRET=1 before, to run on a CPU).

    make_stepper(model, tcfg)             the fused backend's stepper (kernels/stepper.py)
    loss_and_grads(model, tokens, labels, loss="ce")  (float64 loss, {name: grad}) through the fused kernels
                                          (loss "ce" or "stablemax": kernels/unembed_loss.py)
    unsupported_reason(cfg)               None if the fused kernels handle this ModelConfig, else why not
    FusedOptimizer                        Grokfast + AdamW over flat [M, N] buffers (kernels/optimizer.py)
    ParamLayout                           the flat [M, N] parameter layout (kernels/layout.py)
    make_batched_stepper(models, tcfgs, train, test)  M models in one launch (kernels/batched.py)
    KernelConfigError                     what they raise for input they cannot take (kernels/errors.py)
"""
import triton  # noqa: F401  (a missing triton is reported here, where grokfast.backends looks)

from .errors import KernelConfigError
from .layout import ParamLayout
from .optimizer import FusedOptimizer
from .stepper import FusedStepper, loss_and_grads, unsupported_reason
from .batched import BatchedStepper, make_batched_stepper  # M models per launch (sweeps)


def make_stepper(model, tcfg, cuda_graph: bool | None = None):
    """The fused training step for `model` (a grokfast.Transformer) with TrainConfig `tcfg`.
    cuda_graph: capture the step as a CUDA graph on a GPU (default: yes unless GROKFAST_CUDA_GRAPH=0)."""
    return FusedStepper(model, tcfg, cuda_graph=cuda_graph)


__all__ = ["KernelConfigError", "make_stepper", "loss_and_grads", "unsupported_reason", "FusedOptimizer", "FusedStepper", "ParamLayout",
           "BatchedStepper", "make_batched_stepper"]
