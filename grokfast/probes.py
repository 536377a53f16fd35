"""Looking inside a model of modular arithmetic: the probes and readings behind the explainers' pictures.

Pure functions of a model's weights, its activations over every input (a, b) (grokfast.measures.grid_forward)
and its Task, in float64; nothing here plots (grokfast.plots) or touches files (grokfast.analyze).

- ``embedding_probes``: sparse linear probes of the embedding for cos(w_k x) and sin(w_k x), per number
  slot: how many embedding directions they need and their R^2.
- ``surface_components``: one neuron over (a, b), its largest 2D Fourier components named (cos 4a,
  cos 4a cos 4b, ...) with their shares of the neuron's variance.
- ``answer_shares`` / ``adding_units``: units (logits, or a later layer's neurons) that are constant along
  the lines c(a, b) = const of the task's answer, e.g. a + b = c.
- ``adding_decomposition``: for the last MLP layer, the neurons read along a key frequency by W_out W_U,
  where cos(w a) cos(w b) - sin(w a) sin(w b) = cos(w (a + b)) appears.
- ``spectrum_components``: the logits' 2D Fourier spectrum, its largest components named.
- ``verdict``: "grokked", "memorising" or "untrained", with the evidence.

Frequencies: w_k = 2 pi k / p, k = 1 .. (p - 1) // 2 (grokfast.fourier). Thresholds are this project's
own, stated where they are defined.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from . import fourier

F64 = torch.float64

# A probe "finds" a feature when it explains this much of the target's variance ...
PROBE_R2 = 0.9
# ... and it may use at most this many embedding directions (a grokked embedding needs one or two).
PROBE_MAX_DIRS = 4
# A unit "adds" when the answer c(a, b) alone explains this much of its variance (correlation ratio).
ADDING_SHARE = 0.9


# ----------------------------------------------------------------------------- embedding probes

@dataclass
class Probe:
    """One sparse linear probe: target f(w_k x) (f = cos or sin) from the embedding of x at one slot.

    n_dirs: embedding directions used; r2: its R^2 over the p numbers; r2_by_dirs[m-1]: R^2 with the best
    m directions (m = 1 .. PROBE_MAX_DIRS); prediction, target [p]; found: r2 >= PROBE_R2."""

    k: int
    fn: str
    slot: str
    n_dirs: int
    r2: float
    r2_by_dirs: list
    prediction: torch.Tensor
    target: torch.Tensor
    found: bool


def position_row(model, t: int) -> torch.Tensor:
    """[d_model] float64: what the model adds to the embedding at position t (the learned W_pos, the fixed
    sinusoidal table of pos_embed "sinusoidal", or nothing with pos_embed False)."""
    cfg = model.cfg
    if getattr(cfg, "pos_embed", True) is True:
        return model.pos_embed.W_pos.detach().to(F64)[t]
    if cfg.pos_embed == "sinusoidal":
        return model.W_pos_fixed.detach().to(F64)[t]
    return torch.zeros(cfg.d_model, dtype=F64, device=model.embed.W_E.device)


def slot_inputs(model, task) -> dict[str, torch.Tensor]:
    """{"a": X_a, "b": X_b}: the input of number x at a's slot and at b's, [p, d_model] float64, as the first
    block reads it: W_E[x] + W_pos[slot] (position_row), then ln1 of block 0 where the model has pre-LayerNorm (whose
    normalisation makes the two slots differ; without it the slots differ by a constant row only)."""
    p = task.p
    slots = task.layout.split()
    W_E = model.embed.W_E.detach().to(F64)[:p]
    out = {}
    for s in ("a", "b"):
        x = W_E + position_row(model, slots.index(s))
        if getattr(model.cfg, "layernorm", False) and getattr(model.cfg, "ln_position", "pre") == "pre":
            ln = model.blocks[0].ln1
            x = torch.nn.functional.layer_norm(x, (x.shape[-1],), eps=ln.eps) * ln.w.detach().to(F64) \
                + ln.b.detach().to(F64)
        out[s] = x
    return out


def sparse_probe(X: torch.Tensor, y: torch.Tensor, max_dirs: int = PROBE_MAX_DIRS):
    """(n_dirs, r2, r2_by_dirs, prediction) of the sparse affine probe y ~ b + X v, X [n, d], y [n].

    The directions are the principal directions of X (the residual stream has no privileged basis, so a
    probe sparse in raw coordinates would depend on an arbitrary rotation): with X - mean = U S V^T, the
    columns of U are orthonormal, so the best m-direction probe takes the m columns with the largest
    |U_i . (y - mean y)| and R^2_m = sum of those squared / ||y - mean y||^2 (least squares exactly).
    n_dirs is the smallest m <= max_dirs with R^2_m >= PROBE_R2, else max_dirs."""
    X, y = X.to(F64), y.to(F64)
    Xc, yc = X - X.mean(0, keepdim=True), y - y.mean()
    U, S, _ = torch.linalg.svd(Xc, full_matrices=False)
    U = U[:, S > 1e-9 * S.max()] if S.numel() and S.max() > 0 else U[:, :0]
    total = float(yc @ yc)
    corr = U.T @ yc
    order = torch.argsort(corr.abs(), descending=True)[:max_dirs]
    if total <= 0 or order.numel() == 0:
        return 0, 0.0, [0.0] * max_dirs, y.clone()
    r2s = (torch.cumsum(corr[order] ** 2, 0) / total).tolist()
    r2s += [r2s[-1]] * (max_dirs - len(r2s))
    m = next((i + 1 for i, r in enumerate(r2s) if r >= PROBE_R2), max_dirs)
    m = min(m, order.numel())
    chosen = order[:m]
    pred = y.mean() + U[:, chosen] @ corr[chosen]
    return m, float(r2s[m - 1]), r2s, pred


def probe_frequencies(model, p: int, key_freqs) -> list[int]:
    """The frequencies to probe: the key frequencies, or where there are none, the three frequencies that
    carry the most of the embedding's norm (so that a model with no circuit shows how far it is from one)."""
    if key_freqs:
        return list(key_freqs)
    norms = fourier.frequency_norms(model.embed.W_E.detach().to(F64)[:p])
    return sorted((torch.argsort(norms, descending=True)[:3] + 1).tolist())


def embedding_probes(model, task, key_freqs, max_dirs: int = PROBE_MAX_DIRS) -> list[Probe]:
    """A sparse probe (sparse_probe) for cos(w_k x) and sin(w_k x), for each frequency of
    probe_frequencies and each number slot (a's, b's)."""
    X = slot_inputs(model, task)
    x = torch.arange(task.p, dtype=F64)
    out = []
    for k in probe_frequencies(model, task.p, key_freqs):
        w = 2 * math.pi * k / task.p
        for fn, y in (("cos", torch.cos(w * x)), ("sin", torch.sin(w * x))):
            for slot, Xs in X.items():
                m, r2, r2s, pred = sparse_probe(Xs, y, max_dirs)
                out.append(Probe(k, fn, slot, m, r2, r2s, pred, y, r2 >= PROBE_R2))
    return out


# ----------------------------------------------------------------------------- 2D Fourier components, named

def component_name(i: int, j: int, labels: list[str]) -> str:
    """The name of basis product B[i](a) B[j](b): "const", "cos 4a", "sin 9b", "cos 4a cos 4b", ..."""
    la = "" if i == 0 else labels[i] + "a"
    lb = "" if j == 0 else labels[j] + "b"
    return " ".join(s for s in (la, lb) if s) or "const"


def spectrum_components(F2: torch.Tensor, top: int = 8) -> tuple[list[tuple[str, float, float]], float]:
    """([(name, share, coefficient)] of the ``top`` largest entries, the share the top ones hold together).

    F2 [p, p]: a 2D Fourier transform B f B^T (or, for many functions at once, the norm over them of each
    coefficient). The constant (const, const) entry is left out; shares are of the rest's energy."""
    p = F2.shape[0]
    _, labels = fourier.fourier_basis(p)
    E = F2.to(F64) ** 2
    E[0, 0] = 0.0
    total = float(E.sum())
    if total <= 0:
        return [], 0.0
    vals, idx = torch.topk(E.flatten(), min(top, p * p))
    out = [(component_name(int(f) // p, int(f) % p, labels), float(v) / total, float(F2.flatten()[f]))
           for v, f in zip(vals, idx)]
    return out, float(vals.sum()) / total


def surface_components(act: torch.Tensor, top: int = 8):
    """One unit's activation over every input, act [p, p] (a the row): its largest 2D Fourier components,
    named, as (spectrum_components of B (act - mean) B^T)."""
    a = act.to(F64)
    return spectrum_components(fourier.transform_2d(a - a.mean()), top)


# ----------------------------------------------------------------------------- units that add

def answer_shares(units: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """The correlation ratio of each unit with the answer: units [p, p, U] over the inputs, answers [p*p]
    (the answer c of each input, row a * p + b) -> [U], Var(E[u | c]) / Var(u) in [0, 1]. 1 when the unit
    is constant along every line c(a, b) = const (for x+y: the anti-diagonals a + b = c); about (p - 1) / p^2
    of the variance by chance. A constant unit gets 0."""
    p = units.shape[0]
    U = units.to(F64).reshape(p * p, -1)
    Uc = U - U.mean(0, keepdim=True)
    n = int(answers.max()) + 1
    sums = torch.zeros(n, U.shape[1], dtype=F64).index_add_(0, answers.cpu(), Uc.cpu())
    counts = torch.bincount(answers.cpu(), minlength=n).to(F64).clamp_min(1)
    means = sums / counts[:, None]
    between = (means ** 2 * counts[:, None]).sum(0)
    total = (Uc.cpu() ** 2).sum(0)
    return torch.where(total > 0, between / total.clamp_min(1e-300), torch.zeros_like(total))


@dataclass
class AddingUnits:
    """Units read along the answer: ``kind`` ("logits" or "layer L neurons"), shares [U] (answer_shares),
    the indices of those with share >= ADDING_SHARE, and for each unit the answer c* at which its mean
    is largest (the line c(a, b) = c* it fires on)."""

    kind: str
    shares: torch.Tensor
    adding: list
    preferred: torch.Tensor


def adding_units(units: torch.Tensor, answers: torch.Tensor, kind: str) -> AddingUnits:
    p = units.shape[0]
    sh = answer_shares(units, answers)
    U = units.to(F64).reshape(p * p, -1).cpu()
    n = int(answers.max()) + 1
    sums = torch.zeros(n, U.shape[1], dtype=F64).index_add_(0, answers.cpu(), U)
    means = sums / torch.bincount(answers.cpu(), minlength=n).to(F64).clamp_min(1)[:, None]
    adding = torch.nonzero(sh >= ADDING_SHARE).flatten().tolist()
    return AddingUnits(kind, sh, adding, means.argmax(0))


@dataclass
class AddingDecomposition:
    """The last MLP layer read along frequency k of the answer (adding_decomposition).

    s_cos, s_sin [p, p]: sum_n act_n(a, b) alpha_n and sum_n act_n(a, b) beta_n, where alpha_n, beta_n are
    neuron n's weights W_L = W_out W_U onto the unit vectors cos(w c), sin(w c) over the classes c.
    products: {"cos a cos b", "sin a sin b", "cos a sin b", "sin a cos b"} -> (coefficient in s_cos,
    coefficient in s_sin), in the orthonormal basis. parts: [p, p] grids "cos a cos b", "sin a sin b"
    (each coefficient times its basis product, from s_cos) and their sum "sum". target_share: the share of
    s_cos's variance along cos(w c(a, b)), the function the identity produces (for x+y:
    cos(w (a + b)) = cos a cos b - sin a sin b)."""

    k: int
    s_cos: torch.Tensor
    s_sin: torch.Tensor
    products: dict
    parts: dict
    target_share: float
    identity: str


def adding_decomposition(neurons: torch.Tensor, W_L: torch.Tensor, answers: torch.Tensor, k: int,
                         op: str) -> AddingDecomposition:
    """How the last layer's neurons (neurons [p, p, N] over the inputs) combine, through W_L [N, C] =
    W_out W_U, into a function of the answer at frequency k.

    The logit of class c has the part sum_n act_n(a, b) W_L[n, c]; its component along cos(w c) over the
    classes is s_cos(a, b) = sum_n act_n(a, b) alpha_n with alpha = W_L[:, :p] u_cos (u_cos the unit vector
    cos(w c) / ||cos(w c)||), and likewise s_sin. A model that computes logit_c ~ cos(w (a + b - c)) =
    cos(w (a + b)) cos(w c) + sin(w (a + b)) sin(w c) has s_cos ~ cos(w (a + b)) = cos a cos b - sin a sin b
    (w understood): its 2D Fourier coefficients on (cos a cos b) and (sin a sin b) are opposite and equal,
    those on the mixed products vanish, and s_sin ~ sin(w (a + b)) = sin a cos b + cos a sin b. For x-y
    the sign flips: cos(w (a - b)) = cos a cos b + sin a sin b."""
    p = neurons.shape[0]
    c = torch.arange(p, dtype=F64)
    w = 2 * math.pi * k / p
    uc, us = torch.cos(w * c), torch.sin(w * c)
    uc, us = uc / uc.norm(), us / us.norm()
    WL = W_L.to(F64).cpu()[:, :p]
    N = neurons.to(F64).cpu()
    s_cos, s_sin = N @ (WL @ uc), N @ (WL @ us)
    B, _ = fourier.fourier_basis(p)
    ic, is_ = fourier.cos_sin_rows(k)
    Fc, Fs = fourier.transform_2d(s_cos), fourier.transform_2d(s_sin)
    cells = {"cos a cos b": (ic, ic), "sin a sin b": (is_, is_), "cos a sin b": (ic, is_), "sin a cos b": (is_, ic)}
    products = {n: (float(Fc[i, j]), float(Fs[i, j])) for n, (i, j) in cells.items()}
    parts = {n: float(Fc[i, j]) * torch.outer(B[i], B[j]) for n, (i, j) in cells.items() if n in ("cos a cos b", "sin a sin b")}
    parts["sum"] = parts["cos a cos b"] + parts["sin a sin b"]
    t = torch.cos(w * answers.to(F64).cpu()).reshape(p, p)
    t = t - t.mean()
    sc = s_cos - s_cos.mean()
    den = float((sc ** 2).sum()) * float((t ** 2).sum())
    share = float((sc * t).sum()) ** 2 / den if den > 0 else 0.0
    o = op.replace(" ", "")
    identity = {"x+y": "cos(w a) cos(w b) - sin(w a) sin(w b) = cos(w (a + b))",
                "x-y": "cos(w a) cos(w b) + sin(w a) sin(w b) = cos(w (a - b))"}.get(o, f"cos(w c(a, b)) for c = {op}")
    return AddingDecomposition(k, s_cos, s_sin, products, parts, share, identity)


# ----------------------------------------------------------------------------- the verdict

@dataclass
class Verdict:
    """word: "grokked", "memorising" or "untrained"; why: one sentence of evidence; readings: {figure:
    "grokked" or "memorising"}, what each picture shows on its own."""

    word: str
    why: str
    readings: dict = field(default_factory=dict)


ACC = 0.99


def verdict(train_acc: float, test_acc: float | None, key_freqs, readings: dict) -> Verdict:
    """Which of the two pictures the model shows, from its accuracy and its circuit.

    grokked: train and test accuracy >= 99% (test: over the held-out pairs; where the split is unknown,
    test_acc is None and the accuracy over every pair stands for both). memorising: the train pairs fitted
    (>= 99%) and the test pairs not. untrained: the train pairs not fitted (a fresh model; its pictures look
    like a memorising one's: no Fourier structure). ``readings`` (one word per figure) are reported beside
    the verdict and do not change it."""
    kf = ", ".join(map(str, key_freqs)) if key_freqs else "none"
    if test_acc is None:
        acc = f"accuracy {train_acc:.1%} over every pair (the train split is not known)"
        fitted, general = train_acc >= ACC, train_acc >= ACC
    else:
        acc = f"train accuracy {train_acc:.1%}, test accuracy {test_acc:.1%}"
        fitted, general = train_acc >= ACC, test_acc >= ACC
    if not fitted:
        return Verdict("untrained", f"{acc}: the train pairs are not fitted (key frequencies: {kf})", readings)
    if general:
        return Verdict("grokked", f"{acc}; key frequencies: {kf}", readings)
    return Verdict("memorising", f"{acc}: the train pairs fitted, the held-out ones not (key frequencies: {kf})",
                   readings)


def key_product_share(spectrum: torch.Tensor, key_freqs) -> float:
    """The share of the logits' 2D spectrum energy (spectrum [p, p], fourier.logit_spectrum; the constant
    cell left out) in the product cells {cos k, sin k}a x {cos k, sin k}b of the key frequencies: near 1
    when the logits are sums of cos(w_k (a + b - c)) terms, 0 with no key frequencies."""
    E = spectrum.to(F64) ** 2
    E[0, 0] = 0.0
    total = float(E.sum())
    if total <= 0:
        return 0.0
    idx = [i for k in key_freqs for i in fourier.cos_sin_rows(k)]
    if not idx:
        return 0.0
    idx = torch.tensor(idx)
    return float(E[idx[:, None], idx[None, :]].sum()) / total
