"""TrainConfig.rng "stream": one torch generator per run, seeded with the run's seed, draws everything random
in the order of a script that calls torch.manual_seed(seed) once and then builds its model, splits its data and
shuffles each epoch, as ironjr/grokfast's main.py does:

    g = torch.Generator().manual_seed(seed)
    1. the initial weights            Transformer(cfg, generator=g)  (init "torch": their Decoder's draws)
    2. the train/test split           task.split_by(torch.randperm(n_pairs, generator=g))
    3. each epoch's shuffle           order_e = order_{e-1}[torch.randperm(n_train, generator=g)]
                                      (main.py shuffles train_data in place, so the shuffles compose)
       or, minibatches "draw", each step's torch.randperm(n_train, generator=g)[:batch_size]

A CPU torch.Generator and torch's default CPU generator give the same numbers from the same seed, so with the
`grokfast` preset `--rng stream --seed S` starts from their weights, split and batch order for seed S
(tests/test_paper_step.py).
"""
from __future__ import annotations

import math

import torch

from .data import Task
from .model import Transformer


def start(model_cfg, task: Task, seed: int, device="cpu") -> tuple[Transformer, Task, torch.Generator]:
    """(model, task re-split, the generator positioned after both): steps 1 and 2 above."""
    g = torch.Generator().manual_seed(int(seed))
    model = Transformer(model_cfg, generator=g, device=device)
    task = task.split_by(torch.randperm(task.n_pairs(), generator=g), seed).to(device)
    return model, task, g


class EpochOrder:
    """Minibatch indices for minibatches "epoch" under the stream: epoch e = step // k, k = ceil(n / batch_size),
    is order_e cut into consecutive batches, the last one short. A function of the step: resuming replays the
    shuffles from the generator state the split left (``start_state``), a few ms for thousands of epochs."""

    def __init__(self, n: int, batch_size: int, start_state: torch.Tensor):
        self.n, self.bs, self.start_state = n, batch_size, start_state.clone()
        self.k = math.ceil(n / batch_size)
        self._rewind()

    def _rewind(self):
        self.g = torch.Generator()
        self.g.set_state(self.start_state)
        self.epoch, self._order = -1, torch.arange(self.n)

    def order(self, epoch: int) -> torch.Tensor:
        """order_epoch (int64 [n]): the 0-based epoch's order of task.train, which its batches cut."""
        if epoch < self.epoch:
            self._rewind()
        while self.epoch < epoch:
            self._order = self._order[torch.randperm(self.n, generator=self.g)]
            self.epoch += 1
        return self._order

    def batch(self, step: int) -> torch.Tensor:
        """Indices into task.train of the 0-based `step`'s minibatch."""
        epoch, j = divmod(step, self.k)
        return self.order(epoch)[j * self.bs:(j + 1) * self.bs]
