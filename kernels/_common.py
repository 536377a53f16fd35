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
if INTERPRET:   # make the opt-in TF32 precisions mean under the interpreter what they mean on a GPU
    from .interpret_dot import install as _install_interpreted_tf32
    _install_interpreted_tf32()

# How float32 tl.dot operands are multiplied on an NVIDIA GPU (the interpreter always uses float32):
#   "ieee"    IEEE float32 products on the CUDA cores: exact to float32, the default;
#   "tf32x3"  each operand split into a TF32 high part and a TF32 remainder, three tensor-core products
#             (hi*hi + hi*lo + lo*hi): close to float32 accuracy at tensor-core speed (opt-in until a
#             GPU session shows it meets the float32 bounds of `grokfast check`);
#   "tf32"    one TF32 product (10-bit mantissa, ~1e-3 relative): fastest, opt-in only.
# GROKFAST_DOT_PRECISION sets the process default; ``dot_precision(p)`` sets it for a block.
PRECISIONS = ("ieee", "tf32x3", "tf32")
DOT_PRECISION = os.environ.get("GROKFAST_DOT_PRECISION", "ieee")
if DOT_PRECISION not in PRECISIONS:
    raise ValueError(f"GROKFAST_DOT_PRECISION must be one of {', '.join(PRECISIONS)}, got {DOT_PRECISION!r}")


@contextlib.contextmanager
def dot_precision(precision: str | None):
    """Inside the block, the kernels' float32 dots use ``precision`` (one of PRECISIONS; None keeps
    the current one). Read when a launch is prepared: a CUDA graph keeps what it captured."""
    global DOT_PRECISION
    if precision is None:
        yield
        return
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    prev, DOT_PRECISION = DOT_PRECISION, precision
    try:
        yield
    finally:
        DOT_PRECISION = prev

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
    """Inside the block, ``launch`` appends (kernel, grid, args, constexprs, num_warps, num_stages) to the
    yielded list instead of running the kernel (num_stages None: Triton's default). Used with ``meta`` tensors to list kernels for AOT compiling."""
    global _recorder
    prev, _recorder = _recorder, []
    try:
        yield _recorder
    finally:
        _recorder = prev


def recording() -> bool:
    return _recorder is not None


# Floating-point contraction (a * b + c as one FMA) is pinned rather than left to Triton's default, which
# changes in Triton 3.10: the same source then gives the same bits under every Triton. On: turning it off
# also splits the FMAs of the float32 dots on the CUDA cores (ptxas --fmad=false), halving their speed.
# The interpreter never contracts, so GPU and interpreter agree to rounding, not bit for bit.
FP_FUSION = True

_in_launch = False


def in_launch() -> bool:
    """True while ``launch`` runs a kernel: lets a test tell the host work of the step's orchestration
    from the interpreter's own copies of the kernel's arguments."""
    return _in_launch


def launch(kernel, grid, args: dict, constexprs: dict, num_warps: int = 4, num_stages: int | None = None) -> None:
    """kernel[grid](**args, **constexprs), or a record of it inside ``record_launches``. num_stages: the
    software-pipelining depth of the kernel's loops on a GPU (None: Triton's default; the interpreter ignores it)."""
    global _in_launch
    grid = tuple(int(g) for g in grid)
    if any(g <= 0 for g in grid):
        return
    if _recorder is not None:
        _recorder.append((kernel, grid, args, constexprs, num_warps, num_stages))
        return
    _in_launch = True
    try:
        opts = {} if num_stages is None else {"num_stages": num_stages}
        kernel[grid](**args, **constexprs, num_warps=num_warps, enable_fp_fusion=FP_FUSION, **opts)
    finally:
        _in_launch = False


_TYPES = {torch.float32: "*fp32", torch.float64: "*fp64", torch.int64: "*i64", torch.int32: "*i32"}


def _aligned(t: torch.Tensor) -> bool:
    """Whether the JIT sees t's address as 16-byte aligned: data_ptr % 16 on a real tensor; on a meta
    tensor (no address) the storage offset's bytes, the base being an allocator's (>= 256-byte aligned)."""
    if t.device.type == "meta":
        return (t.storage_offset() * t.element_size()) % 16 == 0
    return t.data_ptr() % 16 == 0


def specialization(kernel, args: dict, constexprs: dict) -> dict:
    """What the JIT compiles for one launch of ``kernel`` with these values, as triton.compile's inputs:
    {"signature": arg -> Triton type ("constexpr" for constexprs), "constexprs": the kernel's constexprs
    plus every integer argument equal to 1 (the JIT makes those constants), "attrs": {(index,):
    [["tt.divisibility", 16]]} for every integer divisible by 16 and every 16-byte-aligned pointer}.
    These are the JIT's specialisation rules (Triton 3.x), so an ahead-of-time compile sees the
    registers and spills of the code that runs (tests check them against Triton's own rules)."""
    sig, cx, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        v = args[name]
        divisible = False
        if isinstance(v, torch.Tensor):
            sig[name] = _TYPES[v.dtype]
            divisible = _aligned(v)
        elif isinstance(v, bool):
            sig[name] = "u1"
        elif isinstance(v, int):
            if v == 1:
                sig[name], cx[name] = "constexpr", 1
                continue
            sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
            divisible = v % 16 == 0
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"argument {name} of {kernel.__name__}: cannot type {type(v).__name__}")
        if divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return {"signature": sig, "constexprs": cx, "attrs": attrs}


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
