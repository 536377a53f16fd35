"""The Fourier basis over Z_p and the spectra that Nanda et al. (2023) read off a grokked network.

All functions are pure (tensors in, tensors out), computed in float64, and know nothing of models,
files or plotting.

The basis (Nanda et al.): rows of the orthonormal real p x p matrix B,

    B[0]      = 1 / sqrt(p)                                   (the constant)
    B[2k - 1] = cos(w_k x) / ||cos(w_k x)||,  w_k = 2 pi k / p  for k = 1 .. (p - 1) // 2
    B[2k]     = sin(w_k x) / ||sin(w_k x)||
    B[p - 1]  = cos(pi x) / sqrt(p)                           (even p only: the Nyquist row)

so a function f over Z_p (a length-p vector) has coefficients B @ f, and f = B.T @ (B @ f). The key
frequencies are the k in 1 .. (p - 1) // 2; the Nyquist row of an even p is never one of them (it has
no sine partner and no rotation to represent) and counts as "the rest" everywhere.

A function of two numbers f(a, b) (a p x p grid, a the row) has the 2D transform B @ f @ B.T: entry
[i, j] is the coefficient of B[i](a) * B[j](b).
"""
from __future__ import annotations

import math

import torch

F64 = torch.float64


def n_freqs(p: int) -> int:
    """The number of key-frequency candidates k = 1 .. (p - 1) // 2."""
    return (p - 1) // 2


def fourier_basis(p: int, device="cpu") -> tuple[torch.Tensor, list[str]]:
    """(B [p, p] float64 with orthonormal rows, labels ["const", "cos 1", "sin 1", ...])."""
    x = torch.arange(p, dtype=F64, device=device)
    rows, labels = [torch.ones(p, dtype=F64, device=device)], ["const"]
    for k in range(1, n_freqs(p) + 1):
        rows += [torch.cos(2 * math.pi * k * x / p), torch.sin(2 * math.pi * k * x / p)]
        labels += [f"cos {k}", f"sin {k}"]
    if p % 2 == 0:
        rows.append(torch.cos(math.pi * x))
        labels.append(f"cos {p // 2}")
    B = torch.stack(rows)
    return B / B.norm(dim=1, keepdim=True), labels


def cos_sin_rows(k: int) -> tuple[int, int]:
    """The rows of B that hold cos(w_k x) and sin(w_k x), for 1 <= k <= (p - 1) // 2."""
    return 2 * k - 1, 2 * k


def transform_1d(f: torch.Tensor) -> torch.Tensor:
    """B @ f along the first axis: f [p, ...] -> coefficients [p, ...]."""
    p = f.shape[0]
    B, _ = fourier_basis(p, f.device)
    return torch.einsum("ia,a...->i...", B, f.to(F64))


def transform_2d(f: torch.Tensor) -> torch.Tensor:
    """B f B^T over the first two axes: f [p, p, ...] (a, b, ...) -> coefficients [p, p, ...]."""
    p = f.shape[0]
    if f.shape[1] != p:
        raise ValueError(f"transform_2d needs a p x p grid over (a, b), got shape {tuple(f.shape)}")
    B, _ = fourier_basis(p, f.device)
    g = torch.einsum("ia,ab...->ib...", B, f.to(F64))
    return torch.einsum("jb,ib...->ij...", B, g)


def component_norms(W: torch.Tensor) -> torch.Tensor:
    """Norm of each Fourier component of a map from Z_p: W [p, d] (row x is the vector of number x,
    e.g. the number rows of W_E) -> ||(B W)[i]||_2 for each basis row i, [p]."""
    return transform_1d(W).norm(dim=1)


def cos_sin_norms(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(||cos_k component||, ||sin_k component||) for k = 1 .. (p - 1) // 2, each [n_freqs], of W [p, d]."""
    n = component_norms(W)
    K = n_freqs(W.shape[0])
    return n[1:2 * K:2], n[2:2 * K + 1:2]


def frequency_norms(W: torch.Tensor) -> torch.Tensor:
    """sqrt(||cos_k||^2 + ||sin_k||^2) for k = 1 .. (p - 1) // 2, [n_freqs]: how much of W lives at frequency k."""
    c, s = cos_sin_norms(W)
    return torch.sqrt(c ** 2 + s ** 2)


def neuron_frequency_fractions(acts: torch.Tensor) -> torch.Tensor:
    """Nanda et al.'s per-neuron frequency fractions.

    acts [p, p, N]: neuron activations over every input (a, b). Each neuron is centred (its mean over
    the p^2 inputs removed), transformed to F = B acts B^T, and for each frequency k the fraction of its
    variance in the 3 x 3 block {const, cos k, sin k} x {const, cos k, sin k} is returned (the (const,
    const) entry is 0 after centring): fractions [N, n_freqs], each row summing to at most 1.
    A neuron with zero variance (dead) has all fractions 0.
    """
    p, N = acts.shape[0], acts.shape[-1]
    a = acts.to(F64).reshape(p, p, N)
    a = a - a.mean(dim=(0, 1), keepdim=True)
    F = transform_2d(a) ** 2                                              # [p, p, N]
    total = F.sum(dim=(0, 1))[:, None]                                    # [N, 1]
    K = n_freqs(p)
    ks = torch.arange(1, K + 1, device=acts.device)
    idx = torch.stack([torch.zeros_like(ks), 2 * ks - 1, 2 * ks], dim=1)  # [K, 3]: const, cos k, sin k
    out = F[idx[:, :, None], idx[:, None, :]].sum(dim=(1, 2)).T           # [N, K]
    return torch.where(total > 0, out / total.clamp_min(1e-300), torch.zeros_like(out))


def neuron_frequencies(acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(frequency k [N] int64, fraction of variance it explains [N]): each neuron's argmax frequency."""
    fr = neuron_frequency_fractions(acts)
    best, idx = fr.max(dim=1)
    return idx + 1, best


KEY_THRESHOLD = 0.5


def key_frequencies(acts: torch.Tensor, threshold: float = KEY_THRESHOLD, min_neurons: int | None = None) -> list[int]:
    """The key frequencies: the distinct frequencies of the neurons that a single frequency explains.

    Nanda et al. take each neuron's argmax frequency and read the key frequencies off the distinct
    values. To keep a fresh or half-trained model's neurons (whose variance is spread over all
    frequencies: about 8 / p^2 of it in any one block) from naming frequencies, this project counts a
    neuron only when its frequency's block holds at least ``threshold`` of its variance (0.5: most of
    it; Nanda's notebook clusters at 0.85, which the ReLU harmonics of a small model at small p miss --
    a trained p = 19 model has a median neuron at 0.82), and asks a frequency to hold at least
    ``min_neurons`` such neurons (default: 1% of the neurons, at least 2) so that one stray neuron does
    not make a frequency key. Both cuts are our own, stated here.
    acts [p, p, N]; returns the sorted list of k.
    """
    N = acts.shape[-1]
    if min_neurons is None:
        min_neurons = max(2, math.ceil(0.01 * N))
    k, frac = neuron_frequencies(acts)
    k = k[frac >= threshold]
    counts = torch.bincount(k, minlength=n_freqs(acts.shape[0]) + 1)
    return [int(f) for f in torch.nonzero(counts >= min_neurons).flatten().tolist() if f >= 1]


def logit_spectrum(logits: torch.Tensor) -> torch.Tensor:
    """The 2D Fourier spectrum of the logits: logits [p, p, C] over inputs (a, b) -> [p, p], the norm
    over output classes of each coefficient of B logits B^T (how strongly each product of a frequency
    of a and a frequency of b carries into the logits)."""
    return transform_2d(logits).norm(dim=-1)


def frequency_plane(W: torch.Tensor, k: int) -> torch.Tensor:
    """W [p, d] projected onto frequency k's (cos, sin) plane: [p, 2].

    The plane is spanned by the cos_k and sin_k Fourier components of W, c_k = sum_x cos(w_k x) W[x]
    and s_k likewise (vectors in R^d), orthonormalised (Gram-Schmidt, c_k first); row x of the result is
    the coordinates of W[x] - mean_x W[x] in that plane. A clean clock embedding at frequency k draws a
    circle here, number x at angle w_k x (up to a rotation and reflection).
    """
    W = W.to(F64)
    Wc = W - W.mean(dim=0, keepdim=True)
    B, _ = fourier_basis(W.shape[0], W.device)
    ic, is_ = cos_sin_rows(k)
    c, s = B[ic] @ Wc, B[is_] @ Wc
    u = c / c.norm().clamp_min(1e-300)
    v = s - (s @ u) * u
    v = v / v.norm().clamp_min(1e-300)
    return torch.stack([Wc @ u, Wc @ v], dim=1)


def decompose_neuron(act: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """One neuron's activation over (a, b), act [p, p], split by its 2D Fourier transform at frequency k:

        "const": the mean;  "a": the cos(w_k a), sin(w_k a) terms (a alone);  "b": likewise for b;
        "a*b": the four products {cos, sin}(w_k a) x {cos, sin}(w_k b);  "rest": everything else.

    Each is a [p, p] grid; the five sum to act exactly. For the clock algorithm the "a*b" part carries
    cos(w_k (a + b)) = cos(w_k a) cos(w_k b) - sin(w_k a) sin(w_k b).
    """
    p = act.shape[0]
    B, _ = fourier_basis(p, act.device)
    F = B @ act.to(F64) @ B.T
    ic, is_ = cos_sin_rows(k)
    parts = {}
    masks = {"const": [(0, 0)], "a": [(ic, 0), (is_, 0)], "b": [(0, ic), (0, is_)],
             "a*b": [(i, j) for i in (ic, is_) for j in (ic, is_)]}
    used = torch.zeros_like(F, dtype=torch.bool)
    for name, cells in masks.items():
        m = torch.zeros_like(used)
        for i, j in cells:
            m[i, j] = True
        used |= m
        parts[name] = B.T @ torch.where(m, F, 0.0) @ B
    parts["rest"] = B.T @ torch.where(used, 0.0, F) @ B
    return parts
