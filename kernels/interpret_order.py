"""Run the programs of every launch in another order under the Triton interpreter.

A GPU runs the programs of one launch concurrently, in any order; the interpreter (TRITON_INTERPRET=1)
runs them one after another in grid order, so a kernel whose result depends on the order (two programs
writing the same address, a program reading what another writes) passes on a CPU and races on a GPU.
Inside ``program_order(mode)`` every launch visits its grid in the order ``mode`` gives:

    "forward"    the interpreter's own order (x outermost, then y, then z)
    "reversed"   the last program first
    "shuffled"   a random permutation per launch (numpy Generator seeded with ``seed``, then one draw
                 per launch, so a run is repeatable)

A deterministic kernel gives the same bits in every order (tests/test_kernels_paths.py checks every
kernel and the whole step). How: the interpreter's grid loop calls ``set_grid_idx(x, y, z)`` once per
program, in order, on its builder; the patched builder maps the k-th call to the k-th index of the
permutation drawn when the launch set the grid size. It relies on that loop visiting every index
once (Triton 3.6 to 3.9 do).
"""
from __future__ import annotations

import contextlib

import numpy as np

MODES = ("forward", "reversed", "shuffled")


@contextlib.contextmanager
def program_order(mode: str = "reversed", seed: int = 0):
    """Inside the block, interpreted launches run their programs in ``mode`` order (module docstring)."""
    if mode not in MODES:
        raise ValueError(f"program order must be one of {', '.join(MODES)}, got {mode!r}")
    from triton.runtime import interpreter as interp

    builder = interp.interpreter_builder
    cls = type(builder)
    rng = np.random.default_rng(seed)
    state = {"order": None, "k": 0}
    orig_dim, orig_idx = cls.set_grid_dim, cls.set_grid_idx

    def set_grid_dim(self, nx, ny, nz):
        orig_dim(self, nx, ny, nz)
        n = nx * ny * nz
        if mode == "forward":
            order = None
        elif mode == "reversed":
            order = np.arange(n - 1, -1, -1)
        else:
            order = rng.permutation(n)
        state["order"], state["k"], state["dims"] = order, 0, (nx, ny, nz)

    def set_grid_idx(self, x, y, z):
        order = state["order"]
        if order is not None:
            nx, ny, nz = state["dims"]
            k = state["k"]
            state["k"] = k + 1
            i = int(order[k % len(order)])
            x, y, z = i // (ny * nz), (i // nz) % ny, i % nz
        orig_idx(self, x, y, z)

    cls.set_grid_dim, cls.set_grid_idx = set_grid_dim, set_grid_idx
    try:
        yield
    finally:
        cls.set_grid_dim, cls.set_grid_idx = orig_dim, orig_idx
