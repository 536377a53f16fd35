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

Orthogonal gradient (TrainConfig.orthograd; Prieto et al. 2025, their OrthoGrad wrapper), per parameter
tensor, on the (filtered) gradient the optimizer is about to use, w and g flattened:
    g_perp <- g - (w.g / (w.w + 1e-30)) w
    g      <- g_perp * |g| / (|g_perp| + 1e-30)
then the optimizer as usual (with optimizer "adam" the coupled L2 term is added after, as torch's Adam
adds it inside the step their wrapper calls). Their Figure 1 run wraps AdamW at lr 0.01 with weight
decay 0; their --beta2 and --adam_epsilon never reach the wrapped optimizer (it is rebuilt from lr
and weight_decay only), so it runs at torch's defaults: betas (0.9, 0.999), eps 1e-8.
Muon (TrainConfig.optimizer "muon"; Keller Jordan's Muon as published in his repository), at step t
with lr'_t = muon_lr * lr_t / lr and mu = muon_momentum, for each hidden weight matrix W (W_Q, W_K, W_V
as [d_model, n_heads * d_head], W_O as [n_heads * d_head, d_model], W_in, W_out; the model multiplies
x @ W, so W is [d_in, d_out]):
    b <- mu b + (1 - mu) g;  u <- (1 - mu) g + mu b                   (Nesterov)
    O <- NS5(u): X = u / (|u|_F + 1e-7) (transposed so that rows <= columns), 5 times
         A = X X^T;  X <- a X + (b' A + c A A) X,  (a, b', c) = (3.4445, -4.7750, 2.0315)
    W <- W (1 - lr'_t wd) - lr'_t sqrt(max(1, d_out / d_in)) O
and AdamW at lr_t (above) for everything else (embeddings, unembedding, biases, LayerNorm), as Muon is
meant to be used. NS5 runs in float32 here (Muon's own code uses bfloat16).
Learning-rate-matched baseline (TrainConfig.lr_matched): no filter, AdamW at lr * (1 + lamb). Why that
number: fed a constant gradient g, Grokfast-EMA's state stays at g (it starts there and
alpha g + (1 - alpha) g = g) and MA's mean is g once the window is full, so both filters hand the
optimizer (1 + lamb) g: a steady-state gain of 1 + lamb. For SGD that is exactly a learning rate
(1 + lamb) times larger. Adam divides the gain back out of a constant gradient (m / sqrt(v) does not
change when g is scaled), so under AdamW the gain reaches the step only in the component the filter
amplifies relative to the rest: a slow direction buried in fast-varying gradient (which sets sqrt(v)
almost alone) moves up to (1 + lamb) times further. lr * (1 + lamb) is that upper bound, given to plain
AdamW on every direction: the "is Grokfast just a larger learning rate" control (see lr_gain).
"""
from __future__ import annotations

import torch

from .config import TrainConfig


def lr_gain(cfg: TrainConfig) -> float:
    """1 + lamb with lr_matched (the Grokfast filters' steady-state gain on a constant gradient; see the
    module docstring), else 1: the factor on cfg.lr."""
    return 1.0 + cfg.lamb if cfg.lr_matched else 1.0


def lr_at(cfg: TrainConfig, t: int) -> float:
    """Learning rate of optimizer step t (1-based), lr_gain included."""
    lr = cfg.lr * lr_gain(cfg)
    if cfg.warmup > 0:
        if cfg.warmup_schedule == "lambdalr":
            return lr * min(1.0, (t - 1) / cfg.warmup)
        return lr * min(1.0, t / cfg.warmup)
    return lr


@torch.no_grad()
def orthogonalize(params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each gradient made orthogonal to its tensor's weights and rescaled to its own norm (the module
    docstring's formula, Prieto et al.'s epsilons); sums in float64, the result in the gradient's dtype.
    Inputs are not changed."""
    out = {}
    for n, g in grads.items():
        w64, g64 = params[n].reshape(-1).double(), g.reshape(-1).double()
        perp = g64 - (w64 @ g64) / (w64 @ w64 + 1e-30) * w64
        perp = perp * (g64.norm() / (perp.norm() + 1e-30))
        out[n] = perp.to(g.dtype).view_as(g)
    return out


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
    L2 weight decay instead when cfg.optimizer is "adam"; orthograd applied to the gradients first."""

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
        if cfg.orthograd:
            grads = orthogonalize(self.params, {n: grads[n] for n in self.params})
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


NS_COEFFS = (3.4445, -4.7750, 2.0315)
MUON_MATRICES = ("attn.W_Q", "attn.W_K", "attn.W_V", "attn.W_O", "mlp.W_in", "mlp.W_out")


def newton_schulz5(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration (the module docstring's NS5): about U V^T of G = U S V^T,
    its singular values pushed into roughly [0.7, 1.2] rather than exactly 1 (Muon's choice of speed over
    exactness). G is 2-D; the result has its shape and dtype."""
    a, b, c = NS_COEFFS
    X = G.float()
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    X = X / (X.norm() + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return (X.T if tall else X).to(G.dtype)


def as_matrix(name: str, t: torch.Tensor) -> torch.Tensor:
    """A hidden weight as the [d_in, d_out] matrix the model multiplies by: W_Q/W_K/W_V [H, D, Dh] ->
    [D, H*Dh]; W_O [H, Dh, D] -> [H*Dh, D]; W_in, W_out as they are."""
    if name.endswith(("attn.W_Q", "attn.W_K", "attn.W_V")):
        H, D, Dh = t.shape
        return t.permute(1, 0, 2).reshape(D, H * Dh)
    if name.endswith("attn.W_O"):
        H, Dh, D = t.shape
        return t.reshape(H * Dh, D)
    return t


def from_matrix(name: str, m: torch.Tensor, shape) -> torch.Tensor:
    """as_matrix's inverse."""
    if name.endswith(("attn.W_Q", "attn.W_K", "attn.W_V")):
        H, D, Dh = shape
        return m.reshape(D, H, Dh).permute(1, 0, 2)
    return m.reshape(shape)


class Muon:
    """Muon for the hidden weight matrices (MUON_MATRICES), AdamW (cfg's lr, wd, betas) for the rest;
    the module docstring has the formula. State: b by name ("opt.mu.*"), AdamW's m, v, t."""

    def __init__(self, params: dict[str, torch.Tensor], cfg: TrainConfig):
        self.cfg = cfg
        self.matrices = {n: p for n, p in params.items() if n.endswith(MUON_MATRICES)}
        self.adamw = AdamW({n: p for n, p in params.items() if n not in self.matrices}, cfg)
        self.mu = {n: torch.zeros_like(p) for n, p in self.matrices.items()}

    @property
    def t(self) -> int:
        return self.adamw.t

    @torch.no_grad()
    def step(self, grads: dict[str, torch.Tensor]) -> None:
        cfg = self.cfg
        self.adamw.step(grads)          # advances t (and orthogonalises its own gradients)
        lr = cfg.muon_lr * lr_at(cfg, self.t) / cfg.lr
        mom = cfg.muon_momentum
        g_all = {n: grads[n] for n in self.matrices}
        if cfg.orthograd:
            g_all = orthogonalize(self.matrices, g_all)
        for n, p in self.matrices.items():
            g = g_all[n]
            self.mu[n].mul_(mom).add_(g, alpha=1 - mom)
            u = as_matrix(n, (1 - mom) * g + mom * self.mu[n])
            d_in, d_out = u.shape
            O = newton_schulz5(u) * max(1.0, d_out / d_in) ** 0.5
            p.mul_(1 - lr * cfg.wd)
            p.sub_(lr * from_matrix(n, O, p.shape))

    def state_dict(self) -> dict[str, torch.Tensor]:
        s = self.adamw.state_dict()
        s.update({f"opt.mu.{n}": t for n, t in self.mu.items()})
        return s

    def load_state_dict(self, s: dict[str, torch.Tensor]) -> None:
        self.adamw.load_state_dict(s)
        for n in self.mu:
            self.mu[n].copy_(s[f"opt.mu.{n}"])


def make_optimizer(params: dict[str, torch.Tensor], cfg: TrainConfig):
    """The reference optimizer of cfg.optimizer: Muon, or AdamW (Adam with coupled L2 for "adam")."""
    return Muon(params, cfg) if cfg.optimizer == "muon" else AdamW(params, cfg)
