"""The reference optimizer: Grokfast gradient filters (Lee et al. 2024) and AdamW, on dicts of tensors.

Both are written as the plain formulas so that the fused optimizer kernel can be checked against
them and their state can be checkpointed by name.

Grokfast EMA (alpha, lamb), the state starting at the first gradient:
    ema <- g                              on the first step
    ema <- alpha * ema + (1 - alpha) * g  afterwards
    g   <- g + lamb * ema
Grokfast MA (window w, lamb), applied once w raw gradients have been seen:
    g   <- g + lamb * mean(last w raw gradients)
AdamW (decoupled weight decay, torch.optim.AdamW's formula), at step t = 1, 2, ... with lr_t:
    theta <- theta * (1 - lr_t * wd)
    m <- beta1 m + (1 - beta1) g;  v <- beta2 v + (1 - beta2) g^2
    theta <- theta - lr_t * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)
Adam (TrainConfig.optimizer "adam", torch.optim.Adam's formula): weight decay as coupled L2, added to
the (filtered) gradient before the moments, and no decoupled decay:
    g <- g + wd * theta;  then m, v and theta as above
Warm-up: lr_t = lr * min(1, t / warmup) for warmup > 0 (t counts from 1, so the first step moves);
warmup_schedule "lambdalr": lr_t = lr * min(1, (t - 1) / warmup), torch's LambdaLR(lambda u: min(1, u /
warmup)) stepped after each update as the papers' code does, so step 1 has lr 0 (it moves nothing
but still fills m and v).
"""
from __future__ import annotations

import torch

from .config import TrainConfig


def lr_at(cfg: TrainConfig, t: int) -> float:
    """Learning rate of optimizer step t (1-based)."""
    if cfg.warmup > 0:
        if cfg.warmup_schedule == "lambdalr":
            return cfg.lr * min(1.0, (t - 1) / cfg.warmup)
        return cfg.lr * min(1.0, t / cfg.warmup)
    return cfg.lr


class GrokfastFilter:
    """Stateful gradient filter; ``apply`` returns the filtered gradients (inputs are not changed)."""

    def __init__(self, kind: str, alpha: float = 0.98, lamb: float = 2.0, window: int = 100):
        self.kind, self.alpha, self.lamb, self.window = kind, alpha, lamb, window
        self.ema: dict[str, torch.Tensor] = {}
        self.ring: dict[str, torch.Tensor] = {}   # [window, *shape]: raw gradients, slot = count % window
        self.count = 0                            # raw gradients seen

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "GrokfastFilter":
        return cls(cfg.grokfast, cfg.alpha, cfg.lamb, cfg.window)

    @torch.no_grad()
    def apply(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.kind == "none":
            return grads
        out = {}
        if self.kind == "ema":
            for n, g in grads.items():
                if self.count == 0:
                    self.ema[n] = g.clone()
                else:
                    self.ema[n].mul_(self.alpha).add_(g, alpha=1 - self.alpha)
                out[n] = g + self.lamb * self.ema[n]
        else:
            slot = self.count % self.window
            full = self.count + 1 >= self.window
            for n, g in grads.items():
                if n not in self.ring:
                    self.ring[n] = torch.zeros((self.window, *g.shape), dtype=g.dtype, device=g.device)
                self.ring[n][slot] = g
                # The mean over the window: a sum over the ring slots in a fixed order, then / w.
                out[n] = g + self.lamb * (self.ring[n].sum(0) / self.window) if full else g
        self.count += 1
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        s = {f"filter.ema.{n}": t for n, t in self.ema.items()}
        s.update({f"filter.ring.{n}": t for n, t in self.ring.items()})
        s["filter.count"] = torch.tensor(self.count, dtype=torch.int64)
        return s

    def load_state_dict(self, s: dict[str, torch.Tensor], device=None) -> None:
        self.count = int(s["filter.count"])
        self.ema = {k[len("filter.ema."):]: v.to(device) for k, v in s.items() if k.startswith("filter.ema.")}
        self.ring = {k[len("filter.ring."):]: v.to(device) for k, v in s.items() if k.startswith("filter.ring.")}


class AdamW:
    """AdamW over named parameters (tensors updated in place), state m, v by name; Adam with coupled
    L2 weight decay instead when cfg.optimizer is "adam"."""

    def __init__(self, params: dict[str, torch.Tensor], cfg: TrainConfig):
        self.params, self.cfg = params, cfg
        self.m = {n: torch.zeros_like(p) for n, p in params.items()}
        self.v = {n: torch.zeros_like(p) for n, p in params.items()}
        self.t = 0

    @torch.no_grad()
    def step(self, grads: dict[str, torch.Tensor]) -> None:
        cfg = self.cfg
        self.t += 1
        lr = lr_at(cfg, self.t)
        bc1 = 1 - cfg.beta1 ** self.t
        bc2 = 1 - cfg.beta2 ** self.t
        for n, p in self.params.items():
            g = grads[n]
            if cfg.optimizer == "adam":
                g = g + cfg.wd * p if cfg.wd else g
            else:
                p.mul_(1 - lr * cfg.wd)
            self.m[n].mul_(cfg.beta1).add_(g, alpha=1 - cfg.beta1)
            self.v[n].mul_(cfg.beta2).addcmul_(g, g, value=1 - cfg.beta2)
            denom = (self.v[n] / bc2).sqrt_().add_(cfg.eps)
            p.addcdiv_(self.m[n], denom, value=-lr / bc1)

    def state_dict(self) -> dict[str, torch.Tensor]:
        s = {f"opt.m.{n}": t for n, t in self.m.items()}
        s.update({f"opt.v.{n}": t for n, t in self.v.items()})
        s["opt.t"] = torch.tensor(self.t, dtype=torch.int64)
        return s

    def load_state_dict(self, s: dict[str, torch.Tensor]) -> None:
        self.t = int(s["opt.t"])
        for n in self.params:
            self.m[n].copy_(s[f"opt.m.{n}"])
            self.v[n].copy_(s[f"opt.v.{n}"])
