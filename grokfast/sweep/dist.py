"""This process's place under torchrun (``Dist``, ``dist_from_env``): rank and world size, and the gather
and barrier the sweep uses (gloo, which also carries Python objects between GPU ranks)."""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class Dist:
    """This process's place under torchrun (rank 0 of 1 without it)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    started_here: bool = False

    def gather(self, obj) -> list:
        """obj from every rank, in rank order (every rank gets the list)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as td
        out = [None] * self.world
        td.all_gather_object(out, obj)
        return out

    def barrier(self):
        if self.world > 1:
            import torch.distributed as td
            td.barrier()

    def close(self):
        if self.started_here:
            import torch.distributed as td
            td.destroy_process_group()


def dist_from_env() -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo; a long timeout, since ranks wait at the
    final gather for the slowest rank's runs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import datetime
    import torch.distributed as td

    started = False
    if not td.is_initialized():
        td.init_process_group("gloo", timeout=datetime.timedelta(days=7))
        started = True
    return Dist(td.get_rank(), td.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), started)
