"""The last launch of a training step's forward + backward: every piece of work that nothing else in the
pass reads, put off to the end and done in one launch (``flush_kernel``, driven by ``mlp.Deferred``).

A device table holds one row per task (SEG_FIELDS int64: the task's fields, its first program in
field 11, its kind in field 12), and PROG [n_programs] int32 the task of each program:

    kind 0  SPLIT_SUM   out[m, j] = sum_{s < S} ws[s, m * NJ + j] in the order s = 0, 1, ... (the split-K
                        partials of a weight or bias gradient: mlp._split_sum_segment)
    kind 1  MEAN        loss_out[m] = mean_b loss_ex[m, b], correct_out[m] = sum_b correct_ex[m, b]
                        (unembed_loss._mean_rows, the bits of mean_reduce_kernel)
    kind 2  EMBED_GRAD  dW_E[v] = sum_t dX0[t * V + v], dW_pos[t] = sum_v dX0[t * V + v]
                        (embed_attn._embed_grad_block)
    kind 3  ADAMW_SCALARS  the optimizer's step scalars and counters (optimizer._adamw_scalars), so that
                        the optimizer's own step is one launch

Each task's programs write only that task's outputs and read only what earlier launches wrote, so the
programs run in any order with the same bits.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .embed_attn import _embed_grad_block
from .mlp import _split_sum_segment
from .optimizer import BLOCK_M, SCALARS, _adamw_scalars
from .unembed_loss import _mean_rows

SEG_FIELDS = 13
SPLIT_SUM, MEAN, EMBED_GRAD, ADAMW_SCALARS = 0, 1, 2, 3


@triton.jit
def flush_kernel(TAB, PROG, BLOCK: tl.constexpr, SCALARS: tl.constexpr, BLOCK_M: tl.constexpr):
    """Program pid runs its share of task PROG[pid] (module docstring); grid (n_programs,)."""
    pid = tl.program_id(0)
    seg = tl.load(PROG + pid).to(tl.int64)
    row = TAB + seg * 13
    kind = tl.load(row + 12)
    local = pid - tl.load(row + 11)
    if kind == 0:
        _split_sum_segment(row, local, BLOCK)
    elif kind == 1:
        _mean_rows(tl.load(row + 0).to(tl.pointer_type(tl.float32)), tl.load(row + 1).to(tl.pointer_type(tl.int32)),
                   tl.load(row + 2).to(tl.pointer_type(tl.float32)), tl.load(row + 3).to(tl.pointer_type(tl.int32)),
                   local, tl.load(row + 4), tl.load(row + 5), BLOCK)
    elif kind == 2:
        _embed_grad_block(row, local, BLOCK)
    else:
        _adamw_scalars(tl.load(row + 0).to(tl.pointer_type(tl.int64)), tl.load(row + 1).to(tl.pointer_type(tl.float64)),
                       tl.load(row + 2).to(tl.pointer_type(tl.float32)), tl.load(row + 3).to(tl.pointer_type(tl.float32)),
                       tl.load(row + 4).to(tl.pointer_type(tl.float32)), tl.load(row + 5).to(tl.pointer_type(tl.int64)),
                       tl.load(row + 6), tl.load(row + 7), tl.load(row + 8), SCALARS, BLOCK_M)
