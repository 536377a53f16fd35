"""Flat parameter layout shared by the fused kernels.

Every model's parameters live in one contiguous float32 buffer ``flat [M, N]`` (M independent models,
N = ModelConfig.n_params()), the named parameters laid end to end in the order of
``ModelConfig.param_shapes()`` (the TransformerLens contract). Gradients, AdamW moments and Grokfast
state use the same layout, so the optimizer is one pass over ``[M, N]`` buffers, and
``views(flat)["blocks.0.mlp.W_in"]`` is a ``[M, d_model, d_mlp]`` view into it (no copy).
"""
from __future__ import annotations

import math


class ParamLayout:
    """Offsets of each named parameter inside a flat [M, N] buffer."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.shapes = dict(cfg.param_shapes())
        self.offsets = {}
        n = 0
        for name, shape in self.shapes.items():
            self.offsets[name] = n
            n += math.prod(shape)
        self.numel = n

    def sizes(self) -> list[int]:
        """Each parameter tensor's number of elements, in layout order (they sum to numel)."""
        return [math.prod(shape) for shape in self.shapes.values()]

    def views(self, flat):
        """{name: view [M, *shape]} into a contiguous [M, N] tensor."""
        if flat.dim() != 2 or flat.shape[1] != self.numel or not flat.is_contiguous():
            raise ValueError(f"expected a contiguous [M, {self.numel}] buffer, got {tuple(flat.shape)}")
        M = flat.shape[0]
        out = {}
        for name, shape in self.shapes.items():
            o = self.offsets[name]
            out[name] = flat[:, o:o + math.prod(shape)].view(M, *shape)
        return out

    def flatten(self, tensors: dict, M: int | None = None):
        """Pack {name: [M, *shape] or [*shape]} into a new contiguous [M, N] float32 tensor."""
        import torch

        first = tensors[next(iter(self.shapes))]
        batched = first.dim() == len(self.shapes[next(iter(self.shapes))]) + 1
        M = first.shape[0] if batched else 1
        flat = torch.empty((M, self.numel), dtype=torch.float32, device=first.device)
        for name, view in self.views(flat).items():
            t = tensors[name]
            view.copy_(t if batched else t.unsqueeze(0))
        return flat
