"""Helpers shared by the model kernels: block-size arithmetic, input checks, and one launch point.

Every model kernel is launched through ``launch``, with keyword arguments only. That gives one place
to record what would be launched instead of launching it (``record_launches``), which is how
``forward_backward.aot_specs`` lists each kernel's signature and constexprs at a given shape
without a GPU: the orchestration runs on ``meta`` tensors and every launch is written down.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Float32 dots at IEEE accuracy by default (on an NVIDIA GPU a float32 tl.dot is TF32 otherwise).
DOT_PRECISION = "ieee"

_recorder: list | None = None


def pow2(n: int, lo: int = 1, hi: int | None = None) -> int:
    """The smallest power of two >= n, clamped to [lo, hi]."""
    v = max(lo, triton.next_power_of_2(max(1, int(n))))
    return v if hi is None else min(v, hi)


def pow2_floor(n: int) -> int:
    """The largest power of two <= n (n >= 1)."""
    return 1 << (max(1, int(n)).bit_length() - 1)


@contextlib.contextmanager
def record_launches():
    """Inside the block, ``launch`` appends (kernel, grid, args, constexprs, num_warps) to the yielded
    list instead of running the kernel. Used with ``meta`` tensors to list kernels for AOT compiling."""
    global _recorder
    prev, _recorder = _recorder, []
    try:
        yield _recorder
    finally:
        _recorder = prev


def recording() -> bool:
    return _recorder is not None


def launch(kernel, grid, args: dict, constexprs: dict, num_warps: int = 4) -> None:
    """kernel[grid](**args, **constexprs), or a record of it inside ``record_launches``."""
    grid = tuple(int(g) for g in grid)
    if any(g <= 0 for g in grid):
        return
    if _recorder is not None:
        _recorder.append((kernel, grid, args, constexprs, num_warps))
        return
    kernel[grid](**args, **constexprs, num_warps=num_warps)


_TYPES = {torch.float32: "*fp32", torch.int64: "*i64", torch.int32: "*i32"}


def signature_of(kernel, args: dict, constexprs: dict) -> dict:
    """Triton type strings for every argument of ``kernel`` in declaration order ("constexpr" for
    the constexpr ones), from the values one launch passes."""
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        v = args[name]
        if isinstance(v, torch.Tensor):
            sig[name] = _TYPES[v.dtype]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"argument {name} of {kernel.__name__}: cannot type {type(v).__name__}")
    return sig


def check(name: str, t, dtype=torch.float32, dims: int | None = None, shape=None, device=None) -> None:
    """Raise ValueError with one line naming the argument unless ``t`` is a tensor of this dtype,
    number of dimensions, shape (None entries match anything) and device."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(t.shape)}")
    if shape is not None:
        if len(shape) != t.dim() or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name} is on {t.device} but the parameters are on {device}: move it there")
