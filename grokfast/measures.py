"""Progress measures of a modular-arithmetic transformer: pure functions of its weights and a Task.

Sources: Nanda et al. 2023 (key frequencies, restricted and excluded loss, sum of squared weights, Gini
coefficients, the three phases), Zhong et al. 2023 (gradient symmetricity, distance irrelevance,
circularity), Furuta et al. 2024 (Fourier Frequency Sparsity, Fourier Coefficient Ratio). Where a paper
published no formula, the docstring gives this project's definition and says so. Nothing here plots
(grokfast.plots draws) or touches files (grokfast.analyze does).

The grid: the Fourier measures of neurons and logits need every input (a, b) of Z_p x Z_p. ``full_grid``
builds it from ``Task.all_pairs`` and returns the reason instead when the operation has none (division
and domain restrictions skip pairs; S5 is not Z_p). In a mixture the first operation is analysed.
Numbers are the tokens 0..p-1, so "the embedding" below is W_E[:p] (the number rows).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import fourier
from .model import cross_entropy64

F64 = torch.float64


@dataclass
class Grid:
    """Every input (a, b) of one operation, row a * p + b.

    tokens [p*p, n_ctx]; answers [p*p] (the label c of (a, b)); train_mask [p*p] (pair in the train
    split); slot_a, slot_b: the positions of a and b in the layout; op: the operation's name."""

    p: int
    tokens: torch.Tensor
    answers: torch.Tensor
    train_mask: torch.Tensor
    slot_a: int
    slot_b: int
    op: str


def full_grid(task, op_index: int = 0) -> tuple[Grid | None, str]:
    """(Grid, "") for an operation defined on every pair of Z_p x Z_p, else (None, the reason)."""
    o = task.ops[op_index]
    if o.s5 is not None:
        return None, f"{o.name} composes permutations of S5, which has no Fourier basis over Z_p"
    p = task.p
    if p < 3:
        return None, f"p = {p} has no key-frequency candidates (need p >= 3)"
    allp = task.all_pairs(op_index)
    if len(allp) != p * p:
        return None, (f"{o.name} mod {p} is defined on {len(allp)} of the {p * p} pairs (no full p x p grid), "
                      f"so the 2D Fourier measures are skipped")
    slots = task.layout.split()
    sa, sb = slots.index("a"), slots.index("b")
    tok = allp.tokens
    # all_pairs is in (a, b) order; check rather than trust it, the Fourier transforms depend on it
    ar = torch.arange(p, device=tok.device)
    if not (torch.equal(tok[:, sa], ar.repeat_interleave(p)) and torch.equal(tok[:, sb], ar.repeat(p))):
        raise RuntimeError("Task.all_pairs is not in (a, b) order")
    tr = task.train.tokens
    if task.op_tokens:
        tr = tr[tr[:, slots.index("op")] == task.op_tokens[op_index]]
    mask = torch.zeros(p * p, dtype=torch.bool, device=tok.device)
    mask[tr[:, sa] * p + tr[:, sb]] = True
    return Grid(p, tok, allp.labels, mask, sa, sb, o.name), ""


@torch.no_grad()
def grid_forward(model, grid: Grid, chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [p, p, C], neurons [p, p, d_mlp]) over every input, float64. The neurons are the last
    layer's MLP activations (after the nonlinearity) at the last position, "blocks.{L-1}.mlp.post"."""
    L = len(model.blocks)
    logits, post = [], []
    for i in range(0, grid.tokens.shape[0], chunk):
        cache = {}
        logits.append(model(grid.tokens[i:i + chunk], cache=cache).to(F64))
        post.append(cache[f"blocks.{L - 1}.mlp.post"].to(F64))
    p = grid.p
    return torch.cat(logits).reshape(p, p, -1), torch.cat(post).reshape(p, p, -1)


# ----------------------------------------------------------------------------- weights alone

@torch.no_grad()
def sum_squared_weights(model) -> float:
    """sum over every parameter theta of ||theta||_2^2 (Nanda et al.), in float64."""
    return float(sum(p.detach().to(F64).pow(2).sum() for p in model.parameters()))


def gini(x: torch.Tensor) -> float:
    """The Gini coefficient of non-negative values x [n]: with x sorted ascending and i = 1..n,
    G = sum_i (2 i - n - 1) x_i / (n sum_i x_i). 0 when all are equal, (n - 1) / n when one holds all."""
    x = torch.sort(x.flatten().to(F64)).values
    n = x.numel()
    s = x.sum()
    if n == 0 or s <= 0:
        return 0.0
    i = torch.arange(1, n + 1, dtype=F64, device=x.device)
    return float(((2 * i - n - 1) * x).sum() / (n * s))


def embedding(model, p: int) -> torch.Tensor:
    """The number rows of the embedding, W_E[:p] [p, d_model], float64."""
    return model.embed.W_E.detach()[:p].to(F64)


def neuron_logit_map(model) -> torch.Tensor:
    """W_L = W_out W_U [d_mlp, d_vocab_out] of the last layer: how each neuron moves each logit
    (the direct path; LayerNorm, where a model has it, is left out)."""
    W_out = model.blocks[-1].mlp.W_out.detach().to(F64)
    return W_out @ model.unembed.W_U.detach().to(F64)


def gini_embedding(model, p: int) -> float:
    """Gini of the p Fourier component norms ||(B W_E[:p])[i]|| (Nanda et al.; their code was not found,
    this is our reading: one norm per basis row, the constant included)."""
    return gini(fourier.component_norms(embedding(model, p)))


def gini_neuron_logit(model, p: int) -> float:
    """Gini of the p Fourier component norms of W_L = W_out W_U over the output classes:
    ||(B W_L^T)[i]|| for each basis row i (our reading of Nanda et al., as for gini_embedding)."""
    return gini(fourier.component_norms(neuron_logit_map(model).T[:p]))


FFS_TAU = 0.5


def fourier_frequency_sparsity(W: torch.Tensor, tau: float = FFS_TAU) -> float:
    """Fourier Frequency Sparsity (Furuta et al. 2024, later "Fourier Frequency Density").

    No formula was published in code; this project's definition: with n_k = ||cos_k||^2 + ||sin_k||^2
    the squared norm of W's components at frequency k (W [p, d], e.g. W_E[:p]; k = 1 .. (p - 1) // 2),

        FFS = |{k : n_k >= tau * max_k n_k}| / ((p - 1) // 2),   tau = 0.5,

    the fraction of frequencies that carry significant norm. Why: the paper's reading is "how many
    frequencies does the embedding use", and counting against the strongest one makes the measure
    scale-free (weight decay shrinks every norm) and independent of d_model. A random embedding has
    n_k spread evenly (FFS near 1); a clock at K frequencies gives K / ((p - 1) // 2).
    """
    c, s = fourier.cos_sin_norms(W)
    n = c ** 2 + s ** 2
    if n.numel() == 0 or n.max() <= 0:
        return 0.0
    return float((n >= tau * n.max()).double().mean())


def fourier_coefficient_ratio(W: torch.Tensor, tau: float = FFS_TAU) -> float:
    """Fourier Coefficient Ratio (Furuta et al. 2024): how cosine and sine components compare.

    No formula was published in code; this project's definition, over the significant frequencies S
    (those FFS counts, n_k >= tau * max n_k):

        FCR = sum_{k in S} ||cos_k||^2 / sum_{k in S} (||cos_k||^2 + ||sin_k||^2)   in [0, 1].

    Why: the paper reports that multiplication needs cosine-biased components; a share (rather than
    the raw ratio cos / sin) stays finite when the sine part vanishes. 0.5 means balanced cos and sin
    (a circle: the clock of addition), 1 pure cosine (W[x] = W[-x]), 0 pure sine. Restricting to S
    keeps the noise at unused frequencies out of it.
    """
    c, s = fourier.cos_sin_norms(W)
    n = c ** 2 + s ** 2
    if n.numel() == 0 or n.max() <= 0:
        return 0.5
    S = n >= tau * n.max()
    return float((c[S] ** 2).sum() / n[S].sum())


def circularity(W: torch.Tensor) -> float:
    """How close the embedding's first two principal components lie to a circle (Zhong et al.).

    Our formula (the paper describes it in words): centre W [p, d] over the p numbers, project it on its
    top two principal components, read the projection as complex numbers z_x, and take the largest share
    of its energy at one frequency of the discrete Fourier transform,

        circularity = max_{k = 1 .. p-1} |sum_x z_x exp(-2 pi i k x / p)|^2 / (p sum_x |z_x|^2)   in [0, 1].

    By Parseval the shares over k sum to 1; the maximum is 1 exactly when z_x = r exp(i (w_k x + phi)),
    number x at angle w_k x on a circle (a clock), and small for a random cloud (about 0.05-0.1 at
    p = 31 to 113 for a fresh model).
    """
    W = W.to(F64)
    Wc = W - W.mean(dim=0, keepdim=True)
    if Wc.norm() == 0:
        return 0.0
    _, _, Vh = torch.linalg.svd(Wc, full_matrices=False)
    xy = Wc @ Vh[:2].T                                                    # [p, 2]
    if xy.shape[1] < 2:
        return 0.0
    z = torch.complex(xy[:, 0], xy[:, 1])
    Z = torch.fft.fft(z)
    p = W.shape[0]
    return float((Z.abs() ** 2)[1:].max() / (p * (z.abs() ** 2).sum()))


def pca_2d(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W centred and projected on its top two principal components [p, 2], their variance shares [2])."""
    W = W.to(F64)
    Wc = W - W.mean(dim=0, keepdim=True)
    _, S, Vh = torch.linalg.svd(Wc, full_matrices=False)
    share = S ** 2 / (S ** 2).sum().clamp_min(1e-300)
    return Wc @ Vh[:2].T, share[:2]


# ----------------------------------------------------------------------------- logits over the grid

def answer_directions(grid: Grid, freqs) -> torch.Tensor:
    """Orthonormal columns [p*p, r] spanning cos(w_k c) and sin(w_k c) over the inputs, each centred
    (its mean over the inputs removed), for the key frequencies k, where c = c(a, b) is the answer of
    each input. For x+y, c = a + b mod p and these are exactly Nanda et al.'s directions
    cos(w_k (a + b)), sin(w_k (a + b)) (already centred and orthogonal: r = 2K). Other operations get
    the same construction on their own answers; directions that are linearly dependent there count
    once (an SVD with a relative rank cut of 1e-9)."""
    c = grid.answers.to(F64)
    cols = []
    for k in freqs:
        w = 2 * math.pi * k / grid.p
        cols += [torch.cos(w * c), torch.sin(w * c)]
    if not cols:
        return torch.zeros(c.shape[0], 0, dtype=F64, device=c.device)
    X = torch.stack(cols, dim=1)
    X = X - X.mean(dim=0, keepdim=True)
    U, S, _ = torch.linalg.svd(X, full_matrices=False)
    return U[:, S > 1e-9 * S.max()] if S.max() > 0 else U[:, :0]


def restricted_excluded_loss(logits: torch.Tensor, grid: Grid, freqs) -> tuple[float, float]:
    """(restricted loss, excluded loss) of Nanda et al., logits [p, p, C] over the grid.

    For every output class separately, the logits over the p^2 inputs (a vector of p^2) are split by
    the projection P = Q Q^T onto Q = answer_directions(grid, freqs), the key-frequency directions
    cos(w_k c), sin(w_k c):
      restricted logits = mean over the inputs + P (logits - mean): the key-frequency components alone;
        the restricted loss is their cross-entropy over all p^2 inputs.
      excluded logits = logits - P (logits - mean): those components removed; the excluded loss is
        their cross-entropy over the train pairs only.
    With no key frequencies the restricted logits are the per-class means alone.
    """
    p = grid.p
    L = logits.to(F64).reshape(p * p, -1)
    Q = answer_directions(grid, freqs)
    mean = L.mean(dim=0, keepdim=True)
    proj = Q @ (Q.T @ (L - mean))
    y = grid.answers
    r = cross_entropy64(mean + proj, y)
    m = grid.train_mask
    e = cross_entropy64((L - proj)[m], y[m])
    return float(r), float(e)


def distance_irrelevance(logits: torch.Tensor, grid: Grid) -> tuple[float | None, str]:
    """(distance irrelevance, "") of Zhong et al. for x+y (and x-y), or (None, reason).

    L(a, b) = the correct-class logit. Lay it out with rows the answer c = a + b and columns the
    "distance" d = a - b (for x-y the roles swap: rows a - b, columns a + b). Then
        q = mean over columns d of std over the rows of L in column d  /  std of all of L.
    A pizza's correct logit depends on the distance (q near 0); a clock's does not (q near 1)."""
    p = grid.p
    op = grid.op.replace(" ", "")
    a = torch.arange(p, device=logits.device).repeat_interleave(p)
    b = torch.arange(p, device=logits.device).repeat(p)
    if op == "x+y":
        d = (a - b) % p
    elif op == "x-y":
        d = (a + b) % p
    else:
        return None, f"distance irrelevance is defined for x+y and x-y, not {grid.op}"
    L = logits.to(F64).reshape(p * p, -1).gather(1, grid.answers[:, None])[:, 0]
    total = L.std(unbiased=False)
    if total <= 0:
        return 1.0, ""
    per = [L[d == j].std(unbiased=False) for j in range(p)]
    return float(torch.stack(per).mean() / total), ""


def notebook_triples(p: int, n: int = 100, seed: int = 42) -> list[tuple[int, int, int]]:
    """Zhong et al.'s evaluation notebook's sample for gradient symmetricity: every (a, b, c) of Z_p^3 in
    lexicographic order, shuffled by Python's random.Random(seed), the first n."""
    import random

    xs = [(a, b, c) for a in range(p) for b in range(p) for c in range(p)]
    random.Random(seed).shuffle(xs)
    return xs[:n]


def circularity_pca(W: torch.Tensor, components: int = 4) -> float:
    """Circularity as Zhong et al.'s evaluation notebook computes it: for each of the first ``components``
    principal components of W [p, d] (its scores v [p] over the numbers, W centred), the largest share of
    v's energy at one frequency pair +-k, 2 |sum_x v_x exp(2 pi i k x / p)|^2 / (p ||v||^2) over k = 1 .. p-1,
    clipped to [0, 1]; averaged over the components. 1 when each component is a pure cos/sin of one
    frequency (the numbers on circles)."""
    W = W.to(F64)
    Wc = W - W.mean(dim=0, keepdim=True)
    U, S, _ = torch.linalg.svd(Wc, full_matrices=False)
    p = W.shape[0]
    shares = []
    for i in range(min(components, U.shape[1])):
        v = U[:, i] * S[i]
        e = float(v @ v)
        if e <= 0:
            shares.append(0.0)
            continue
        Z = torch.fft.fft(v.to(torch.complex128))
        shares.append(min(1.0, max(0.0, float((2 * Z.abs() ** 2)[1:].max()) / (p * e))))
    return sum(shares) / max(1, len(shares))


def embedding_gradients(model, task, n: int = 100, seed: int = 0, op_index: int = 0, triples=None):
    """(g_a [n, d_model], g_b [n, d_model], tokens [n, n_ctx], classes [n]) for n random (a, b, c), seeded:
    (a, b) an input the operation defines, c a random class; g_a is the gradient of output logit c with
    respect to the input embedding at a's position -- the vector W_E[a] + W_pos[slot_a] as it enters the
    first block -- and g_b likewise. Autograd on the reference model; its parameters are not changed."""
    allp = task.all_pairs(op_index)
    slots = task.layout.split()
    sa, sb = slots.index("a"), slots.index("b")
    if triples is None:
        g = torch.Generator().manual_seed(int(seed))
        rows = torch.randint(0, len(allp), (n,), generator=g)
        cls = torch.randint(0, task.p, (n,), generator=g).to(allp.tokens.device)
        tokens = allp.tokens[rows.to(allp.tokens.device)]
    else:  # given (a, b, c): the rows of those (a, b), in that order
        t = torch.tensor(triples, dtype=torch.long, device=allp.tokens.device)
        where = {(int(x), int(y)): i for i, (x, y) in enumerate(zip(allp.tokens[:, sa], allp.tokens[:, sb]))}
        tokens = allp.tokens[[where[(int(a), int(b))] for a, b, _ in t]]
        cls = t[:, 2]
    captured = {}

    def hook(module, args):
        captured["x"] = args[0]

    handle = model.blocks[0].register_forward_pre_hook(hook)
    try:
        with torch.enable_grad():
            logits = model(tokens)
            (gx,) = torch.autograd.grad(logits.gather(1, cls[:, None]).sum(), captured["x"])
    finally:
        handle.remove()
    return gx[:, sa].to(F64), gx[:, sb].to(F64), tokens, cls


def gradient_symmetricity(model, task, n: int = 100, seed: int = 0, op_index: int = 0, triples=None) -> float:
    """Gradient symmetricity of Zhong et al.: the mean over n random (a, b, c) of the cosine similarity
    between the gradients of logit c with respect to the input embeddings of a and of b
    (embedding_gradients). Near 1 for a pizza (the logit depends on embed(a) + embed(b)), lower for a
    clock. ``triples`` [(a, b, c)] replaces the random sample (notebook_triples: Zhong et al.'s own)."""
    g_a, g_b, _, _ = embedding_gradients(model, task, n, seed, op_index, triples)
    return float(torch.nn.functional.cosine_similarity(g_a, g_b, dim=-1).mean())


# ----------------------------------------------------------------------------- together

@torch.no_grad()
def weight_measures(model, p: int) -> dict[str, float]:
    """The measures that read weights alone (no forward pass)."""
    W = embedding(model, p)
    return {
        "sum_sq_weights": sum_squared_weights(model),
        "gini_W_E": gini_embedding(model, p),
        "gini_W_L": gini_neuron_logit(model, p),
        "fourier_frequency_sparsity": fourier_frequency_sparsity(W),
        "fourier_coefficient_ratio": fourier_coefficient_ratio(W),
        "circularity": circularity(W),
    }


def cheap_measures(model, task, key_freqs=None) -> dict[str, float]:
    """Measures cheap enough to record every few hundred steps: weight_measures, and where key
    frequencies are given and the task has a full grid, restricted and excluded loss (one forward over
    the p^2 inputs). Values are floats; a measure that does not apply is left out."""
    model_was_training = model.training
    model.eval()
    try:
        out = weight_measures(model, task.p)
        if key_freqs is not None:
            grid, _ = full_grid(task)
            if grid is not None:
                logits, _ = grid_forward(model, grid)
                out["restricted_loss"], out["excluded_loss"] = restricted_excluded_loss(logits, grid, key_freqs)
    finally:
        model.train(model_was_training)
    return out


def all_measures(model, task, key_freqs=None, grad_samples: int = 100) -> dict:
    """Every measure at one checkpoint, as a dict:

    scalars (float): the weight_measures; with a full grid also "n_key_freqs", "restricted_loss",
    "excluded_loss" (along ``key_freqs``, default this model's own key frequencies -- pass the final
    checkpoint's to follow one circuit over training, as Nanda et al. do), "distance_irrelevance"
    (x+y, x-y), "gradient_symmetricity" (always); "key_freqs": this model's own key frequencies;
    "skipped": {measure: reason} for those that do not apply.
    """
    out: dict = dict(weight_measures(model, task.p))
    skipped = {}
    out["gradient_symmetricity"] = gradient_symmetricity(model, task, n=grad_samples)
    grid, why = full_grid(task)
    if grid is None:
        for k in ("key_freqs", "restricted_loss", "excluded_loss", "distance_irrelevance"):
            skipped[k] = why
    else:
        logits, neurons = grid_forward(model, grid)
        own = fourier.key_frequencies(neurons)
        out["key_freqs"] = own
        out["n_key_freqs"] = float(len(own))
        use = own if key_freqs is None else list(key_freqs)
        out["restricted_loss"], out["excluded_loss"] = restricted_excluded_loss(logits, grid, use)
        di, why_di = distance_irrelevance(logits, grid)
        if di is None:
            skipped["distance_irrelevance"] = why_di
        else:
            out["distance_irrelevance"] = di
    out["skipped"] = skipped
    return out


def zhong_notebook_measures(model, task) -> dict[str, float]:
    """Zhong et al.'s three measures as their evaluation notebook (fjzzq2002/pizza code/eval-main.ipynb)
    computes them, to compare with its printed values: gradient symmetricity over notebook_triples(p),
    distance irrelevance on the correct logit, circularity_pca over the first 4 principal components."""
    grid, why = full_grid(task)
    if grid is None:
        raise ValueError(why)
    logits, _ = grid_forward(model, grid)
    di, why = distance_irrelevance(logits, grid)
    return {"gradient_symmetricity": gradient_symmetricity(model, task, triples=notebook_triples(task.p)),
            "distance_irrelevance": di, "circularity": circularity_pca(embedding(model, task.p))}


def clock_or_pizza(gradient_symmetricity: float, distance_irrelevance: float | None,
                   n_key_freqs: int | None) -> str:
    """Our reading of Zhong et al.'s two axes as one word, for a model that has a Fourier circuit.

    "no circuit" when no key frequency was found (a fresh model's correct logit ignores the distance
    and its gradients are symmetric by accident, so the two axes alone would misread it). Otherwise
    pizza when the correct logit depends on the distance a - b (distance irrelevance < 0.5), clock
    when it does not; the gradient symmetricity (pizza: >= 0.98, since its logits read
    embed(a) + embed(b)) qualifies a pizza. The 0.5 and 0.98 cuts are ours: the paper shows the two
    families as separate clusters, not a threshold."""
    if distance_irrelevance is None or n_key_freqs is None:
        return "undetermined"
    if n_key_freqs == 0:
        return "no circuit"
    if distance_irrelevance >= 0.5:
        return "clock"
    return "pizza" if gradient_symmetricity >= 0.98 else "pizza-like (asymmetric gradients)"


# ----------------------------------------------------------------------------- phases

PHASE_NAMES = ("memorisation", "circuit formation", "clean-up")


def phases(history: list[dict], measure_rows: list[dict] | None, p: int,
           acc_threshold: float = 0.99) -> tuple[dict[str, int | None], dict[str, str]]:
    """The end step of each of Nanda et al.'s three phases, as this project reads them.

    ({"memorisation": step, "circuit formation": step, "clean-up": step}, {phase: how it was found}).

    - memorisation ends at the first evaluation with train accuracy >= 99%.
    - circuit formation ends at the first measured checkpoint, at or after the end of memorisation,
      whose excluded loss (the key frequencies of the final checkpoint removed, train set) reaches
      ln p, the loss of a uniform guess: from then on the train set is no longer fitted without the
      circuit, i.e. the generalising circuit, not memorisation, carries the training loss. (Nanda et
      al. mark the boundary by eye from the excluded loss, restricted loss and test loss; ln p is our
      cut.)
    - clean-up ends at the first evaluation with test accuracy >= 99% (the model has grokked; weight
      decay has removed enough of the memorising components for the circuit to win on unseen pairs).
    A phase whose end is not reached (or not measured) is None, with the reason.
    """
    ends: dict[str, int | None] = {n: None for n in PHASE_NAMES}
    how: dict[str, str] = {}
    mem = next((r["step"] for r in history if r["train_acc"] >= acc_threshold), None)
    ends["memorisation"] = mem
    how["memorisation"] = (f"first evaluation with train accuracy >= {acc_threshold:.0%}" if mem is not None
                           else f"train accuracy never reached {acc_threshold:.0%}")
    grok = next((r["step"] for r in history if r["test_acc"] >= acc_threshold), None)
    ends["clean-up"] = grok
    how["clean-up"] = (f"first evaluation with test accuracy >= {acc_threshold:.0%}" if grok is not None
                       else f"test accuracy never reached {acc_threshold:.0%}")
    lnp = math.log(p)
    if not measure_rows or not any("excluded_loss" in r for r in measure_rows):
        how["circuit formation"] = "needs the excluded loss over the checkpoints (not measured)"
    elif mem is None:
        how["circuit formation"] = "memorisation never ended"
    else:
        c = next((r["step"] for r in measure_rows
                  if r["step"] >= mem and r.get("excluded_loss", -math.inf) >= lnp), None)
        ends["circuit formation"] = c
        how["circuit formation"] = (f"first checkpoint after memorisation with excluded loss >= ln p = {lnp:.2f}"
                                    if c is not None else f"excluded loss never reached ln p = {lnp:.2f} "
                                                          f"after memorisation")
    return ends, how
