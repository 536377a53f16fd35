"""Each faithful paper preset is the same function as the paper's code, from the same initial distribution.

The paper's model is restated here in a few lines (written for this test from reading the public code,
not copied), the same weights go into both, and the last-position logits must agree in float64 at
1e-10. Every quirk the preset switches on must matter: turning it off breaks the agreement. The initial
weights' statistics (mean and std per tensor) must match the paper's init.
"""
import dataclasses
import math

import pytest
import torch
import torch.nn as nn

import grokfast
from grokfast import ModelConfig, Transformer
from grokfast.config import ConfigError
from ironjr_grokfast import GrokfastPaperDecoder, grokfast_paper_to_ours

TOL = 1e-10


# --- ironjr/grokfast main.py (Lee et al. 2024): the Decoder restated in tests/ironjr_grokfast.py -----------
def grokfast_task():
    return grokfast.Task.from_spec(grokfast.preset("grokfast").task)


def grokfast_pair(seed=0):
    """(their model, our config) with random weights everywhere, LayerNorm and biases included, float64."""
    cfg = grokfast.preset("grokfast").model.for_task(grokfast_task())
    torch.manual_seed(seed)
    theirs = GrokfastPaperDecoder(tokens=cfg.d_vocab).double()
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            p.add_(torch.randn_like(p) * 0.3)                   # biases and LayerNorm away from 0 and 1
    return theirs, cfg


def our_logits(cfg, state, tokens, strict=True):
    ours = Transformer(cfg).double()
    missing, unexpected = ours.load_state_dict(state, strict=False)
    if strict:
        assert not missing and not unexpected
    with torch.no_grad():
        return ours(tokens)


def test_grokfast_preset_computes_the_paper_codes_function():
    theirs, cfg = grokfast_pair()
    tokens = grokfast_task().all_pairs().tokens[::37]          # [B, 4] = [x, op, y, =]
    assert (tokens[:, 1] == 98).all() and (tokens[:, 3] == 97).all()   # their op_token p + 1, eq_token p
    with torch.no_grad():
        want = theirs(tokens.T)[-1]                            # the answer is read at the last position
    got = our_logits(cfg, grokfast_paper_to_ours(theirs, cfg), tokens)
    assert got.shape == want.shape == (len(tokens), 99)
    assert (got - want).abs().max().item() < TOL


@pytest.mark.parametrize("quirk", ["resid_after_ln1", "unembed_all_tokens", "attn_bias"])
def test_grokfast_preset_fails_without_each_quirk(quirk):
    theirs, cfg = grokfast_pair()
    tokens = grokfast_task().all_pairs().tokens[::37]
    with torch.no_grad():
        want = theirs(tokens.T)[-1]
    clean = dataclasses.replace(cfg, **{quirk: False}).for_task(grokfast_task())
    state = grokfast_paper_to_ours(theirs, cfg)
    state = {k: v[:, :clean.d_vocab_out] if k == "unembed.W_U" else v for k, v in state.items()}
    got = our_logits(clean, state, tokens, strict=False)
    assert got.shape != want.shape or (got - want).abs().max().item() > 1e-3


def stats(state: dict) -> dict:
    return {k: (v.double().mean().item(), v.double().std().item(), v.numel()) for k, v in state.items()}


def init_mismatches(ours: dict, theirs: dict) -> list:
    """Tensors whose mean or std differ by more than sampling allows (6 standard errors over n values),
    or whose constants (LayerNorm 1, zero biases) differ."""
    bad = []
    for k, (m1, s1, n) in ours.items():
        m2, s2, _ = theirs[k]
        if s2 == 0 or s1 == 0:
            if (s1, m1) != (s2, m2):
                bad.append(k)
            continue
        if abs(m1 - m2) > 6 * s2 / math.sqrt(n) or abs(s1 / s2 - 1) > 6 / math.sqrt(2 * n):
            bad.append(k)
    return bad


def pooled(states: list) -> dict:
    return {k: torch.cat([s[k].flatten() for s in states]) for k in states[0]}


def test_grokfast_preset_starts_from_the_paper_codes_distribution():
    cfg = grokfast.preset("grokfast").model.for_task(grokfast_task())
    theirs = []
    for seed in range(3):
        torch.manual_seed(seed)
        theirs.append(grokfast_paper_to_ours(GrokfastPaperDecoder(tokens=cfg.d_vocab), cfg))
    want = stats(pooled(theirs))
    ours = stats(pooled([Transformer(cfg, seed=s).state_dict() for s in range(3)]))
    assert init_mismatches(ours, want) == []
    nanda_init = stats(pooled([Transformer(dataclasses.replace(cfg, init="nanda"), seed=s).state_dict()
                               for s in range(3)]))
    assert "embed.W_E" in init_mismatches(nanda_init, want)    # the check sees a wrong distribution


def test_quirk_options_are_validated():
    with pytest.raises(ConfigError, match="resid_after_ln1"):
        ModelConfig(resid_after_ln1=True, layernorm=False)
    with pytest.raises(ConfigError, match="init"):
        ModelConfig(init="xavier")


def test_fused_backend_refuses_the_residual_quirk():
    from grokfast.backends import fused_status, resolve_backend
    cfg = grokfast.preset("grokfast").model
    ok, why = fused_status(cfg, "cpu", allow_interpreter=True)
    assert not ok and "resid_after_ln1" in why
    assert resolve_backend("auto", cfg, "cpu")[0] == "reference"


# --- Nanda et al. 2023 (progress-measures-paper transformers.py): 1 layer, no LayerNorm ------------------
class NandaPaper(nn.Module):
    """Their shapes: W_E [d_model, d_vocab], W_Q/K/V [H, d_head, d_model], W_O [d_model, H d_head],
    W_in [d_mlp, d_model], W_out [d_model, d_mlp], W_U [d_model, d_vocab]; the scores are tril'ed and
    the upper triangle pushed to -1e10 rather than -inf."""

    def __init__(self, p=113, d=128, heads=4, d_mlp=512, n_ctx=3):
        super().__init__()
        V, Dh = p + 1, d // heads
        r = lambda *s, scale=d: nn.Parameter(torch.randn(*s) / math.sqrt(scale))
        self.W_E, self.W_pos = r(d, V), r(n_ctx, d)
        self.W_Q, self.W_K, self.W_V, self.W_O = r(heads, Dh, d), r(heads, Dh, d), r(heads, Dh, d), r(d, heads * Dh)
        self.W_in, self.b_in, self.W_out, self.b_out = r(d_mlp, d), nn.Parameter(torch.zeros(d_mlp)), r(d, d_mlp), \
            nn.Parameter(torch.zeros(d))
        self.W_U = r(d, V, scale=V)
        self.register_buffer("mask", torch.tril(torch.ones(n_ctx, n_ctx)))

    def forward(self, tokens):                               # [B, T] -> logits [B, T, d_vocab]
        x = self.W_E[:, tokens].permute(1, 2, 0) + self.W_pos
        q, k, v = (torch.einsum("ihd,bpd->biph", W, x) for W in (self.W_Q, self.W_K, self.W_V))
        scores = torch.einsum("biph,biqh->biqp", k, q)
        scores = torch.tril(scores) - 1e10 * (1 - self.mask)
        z = torch.einsum("biph,biqp->biqh", v, (scores / math.sqrt(q.shape[-1])).softmax(-1))
        x = x + torch.einsum("df,bqf->bqd", self.W_O, z.permute(0, 2, 1, 3).flatten(2))
        h = torch.relu(torch.einsum("md,bpd->bpm", self.W_in, x) + self.b_in)
        x = x + torch.einsum("dm,bpm->bpd", self.W_out, h) + self.b_out
        return x @ self.W_U


def nanda_paper_to_ours(t: NandaPaper, cfg: ModelConfig) -> dict:
    H, Dh, D = cfg.n_heads, cfg.d_head, cfg.d_model
    s = {"embed.W_E": t.W_E.T, "pos_embed.W_pos": t.W_pos,
         "blocks.0.attn.W_Q": t.W_Q.transpose(1, 2), "blocks.0.attn.W_K": t.W_K.transpose(1, 2),
         "blocks.0.attn.W_V": t.W_V.transpose(1, 2), "blocks.0.attn.W_O": t.W_O.T.reshape(H, Dh, D),
         "blocks.0.mlp.W_in": t.W_in.T, "blocks.0.mlp.b_in": t.b_in, "blocks.0.mlp.W_out": t.W_out.T,
         "blocks.0.mlp.b_out": t.b_out, "unembed.W_U": t.W_U}
    return {k: v.detach().clone() for k, v in s.items()}


def nanda_faithful():
    """The nanda preset with the one quirk of their code: 114 outputs (`=` has a logit)."""
    task = grokfast.Task.from_spec(grokfast.preset("nanda").task)
    return dataclasses.replace(grokfast.preset("nanda").model, unembed_all_tokens=True).for_task(task), task


def test_nanda_with_unembed_all_tokens_computes_the_paper_codes_function():
    cfg, task = nanda_faithful()
    torch.manual_seed(0)
    theirs = NandaPaper().double()
    with torch.no_grad():
        theirs.b_in.normal_(), theirs.b_out.normal_()
    tokens = task.all_pairs().tokens[::13]
    with torch.no_grad():
        want = theirs(tokens)[:, -1]
    got = our_logits(cfg, nanda_paper_to_ours(theirs, cfg), tokens)
    assert got.shape == want.shape == (len(tokens), 114)
    assert (got - want).abs().max().item() < TOL
    clean = grokfast.preset("nanda").model.for_task(task)                  # the quirk removed: 113 outputs
    state = nanda_paper_to_ours(theirs, cfg)
    state["unembed.W_U"] = state["unembed.W_U"][:, :113]
    assert our_logits(clean, state, tokens).shape != want.shape


def test_nanda_starts_from_the_paper_codes_distribution():
    cfg, _ = nanda_faithful()
    theirs = []
    for seed in range(3):
        torch.manual_seed(seed)
        theirs.append(nanda_paper_to_ours(NandaPaper(), cfg))
    want = stats(pooled(theirs))
    ours = stats(pooled([Transformer(cfg, seed=s).state_dict() for s in range(3)]))
    assert init_mismatches(ours, want) == []
    torch_init = stats(pooled([Transformer(dataclasses.replace(cfg, init="torch"), seed=s).state_dict() for s in range(3)]))
    assert "embed.W_E" in init_mismatches(torch_init, want)


# --- Zhong et al. 2023 (fjzzq2002/pizza code/train-main.py): [a, b], no mask, attention rate -----------
class PizzaPaper(NandaPaper):
    """Nanda's shapes with p outputs, no causal mask, the attention mixed as softmax * alpha + (1 - alpha),
    and W_in randn / sqrt(d_mlp)."""

    def __init__(self, alpha, p=59, d=128, heads=4, d_mlp=512):
        super().__init__(p=p - 1, d=d, heads=heads, d_mlp=d_mlp, n_ctx=2)
        self.alpha = alpha
        self.W_in = nn.Parameter(torch.randn(d_mlp, d) / math.sqrt(d_mlp))

    def forward(self, tokens):
        x = self.W_E[:, tokens].permute(1, 2, 0) + self.W_pos
        q, k, v = (torch.einsum("ihd,bpd->biph", W, x) for W in (self.W_Q, self.W_K, self.W_V))
        pattern = (torch.einsum("biph,biqh->biqp", k, q) / math.sqrt(q.shape[-1])).softmax(-1)
        z = torch.einsum("biph,biqp->biqh", v, pattern * self.alpha + (1 - self.alpha))
        x = x + torch.einsum("df,bqf->bqd", self.W_O, z.permute(0, 2, 1, 3).flatten(2))
        h = torch.relu(torch.einsum("md,bpd->bpm", self.W_in, x) + self.b_in)
        x = x + torch.einsum("dm,bpm->bpd", self.W_out, h) + self.b_out
        return x @ self.W_U


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_pizza_preset_computes_the_paper_codes_function(alpha):
    pre = grokfast.preset("pizza")
    task = grokfast.Task.from_spec(pre.task)
    cfg = dataclasses.replace(pre.model, attn_alpha=alpha).for_task(task)
    torch.manual_seed(1)
    theirs = PizzaPaper(alpha).double()
    with torch.no_grad():
        theirs.b_in.normal_(), theirs.b_out.normal_()
    tokens = task.all_pairs().tokens[::7]
    with torch.no_grad():
        want = theirs(tokens)[:, -1]
    state = nanda_paper_to_ours(theirs, cfg)
    got = our_logits(cfg, state, tokens)
    assert got.shape == want.shape == (len(tokens), 59)
    assert (got - want).abs().max().item() < TOL
    if alpha != 1.0:   # the attention rate removed (ordinary softmax attention): another function
        assert (our_logits(dataclasses.replace(cfg, attn_alpha=1.0), state, tokens) - want).abs().max() > 1e-3


def test_pizza_preset_starts_from_the_paper_codes_distribution():
    pre = grokfast.preset("pizza")
    cfg = pre.model.for_task(grokfast.Task.from_spec(pre.task))
    theirs = []
    for seed in range(3):
        torch.manual_seed(seed)
        theirs.append(nanda_paper_to_ours(PizzaPaper(0.0), cfg))
    want = stats(pooled(theirs))
    assert init_mismatches(stats(pooled([Transformer(cfg, seed=s).state_dict() for s in range(3)])), want) == []
    nanda_init = stats(pooled([Transformer(dataclasses.replace(cfg, init="nanda"), seed=s).state_dict() for s in range(3)]))
    assert init_mismatches(nanda_init, want) == ["blocks.0.mlp.W_in"]     # their W_in scale is the quirk


# --- Furuta et al. 2024 (frt03/grok_mod_poly model.py, train_emb.py): no positions, no MLP biases ------------
class FurutaPaper(nn.Module):
    """Their Transformer with use_ln False: W_E [d, V] ~ N(0, 1 / V), W_U [d, V] ~ N(0, 1 / d), every other
    matrix randn / sqrt(d) in Nanda's shapes; no positional embedding (commented out in their code), no MLP
    biases, the tril / -1e10 mask; V = p + 5 tokens (= + - * / after the numbers), a logit for each."""

    def __init__(self, p=97, d=128, heads=4, d_mlp=512):
        super().__init__()
        V, Dh = p + 5, d // heads
        r = lambda *s: nn.Parameter(torch.randn(*s) / math.sqrt(d))
        self.W_E, self.W_U = nn.Parameter(torch.randn(d, V) / math.sqrt(V)), nn.Parameter(torch.randn(d, V) / math.sqrt(d))
        self.W_Q, self.W_K, self.W_V, self.W_O = r(heads, Dh, d), r(heads, Dh, d), r(heads, Dh, d), r(d, heads * Dh)
        self.W_in, self.W_out = r(d_mlp, d), r(d, d_mlp)

    def forward(self, tokens):                               # [B, 3] = [x, op, y] -> logits [B, T, V]
        x = self.W_E[:, tokens].permute(1, 2, 0)
        T = x.shape[1]
        q, k, v = (torch.einsum("ihd,bpd->biph", W, x) for W in (self.W_Q, self.W_K, self.W_V))
        scores = torch.einsum("biph,biqh->biqp", k, q)
        mask = torch.tril(torch.ones(T, T, dtype=x.dtype))
        z = torch.einsum("biph,biqp->biqh", v, ((torch.tril(scores) - 1e10 * (1 - mask)) / math.sqrt(q.shape[-1])).softmax(-1))
        x = x + torch.einsum("df,bqf->bqd", self.W_O, z.permute(0, 2, 1, 3).flatten(2))
        x = x + torch.einsum("dm,bpm->bpd", self.W_out, torch.relu(torch.einsum("md,bpd->bpm", self.W_in, x)))
        return x @ self.W_U


FURUTA_OP_TOKEN = {"x+y": 1, "x-y": 2, "x*y": 3}        # their '+', '-', '*' ids are p + 1 .. p + 3 ('=' is p)


def furuta_token_map(p: int, op: str) -> list:
    """Our token id -> theirs: numbers alike; our operation token (p) is theirs; our extra tokens are their
    other special tokens in order."""
    theirs_op = p + FURUTA_OP_TOKEN[op]
    return list(range(p)) + [theirs_op] + [t for t in range(p, p + 5) if t != theirs_op]


def furuta_paper_to_ours(t: FurutaPaper, cfg: ModelConfig, perm: list) -> dict:
    H, Dh, D = cfg.n_heads, cfg.d_head, cfg.d_model
    s = {"embed.W_E": t.W_E.T[perm], "blocks.0.attn.W_Q": t.W_Q.transpose(1, 2),
         "blocks.0.attn.W_K": t.W_K.transpose(1, 2), "blocks.0.attn.W_V": t.W_V.transpose(1, 2),
         "blocks.0.attn.W_O": t.W_O.T.reshape(H, Dh, D), "blocks.0.mlp.W_in": t.W_in.T,
         "blocks.0.mlp.W_out": t.W_out.T, "unembed.W_U": t.W_U[:, perm]}
    return {k: v.detach().clone() for k, v in s.items()}


def furuta_setup(op="x+y"):
    pre = grokfast.preset("furuta")
    task = grokfast.Task(op, pre.task.p, pre.task.frac, 0, pre.task.layout)
    return pre.model.for_task(task), task, furuta_token_map(task.p, op)


@pytest.mark.parametrize("op", ["x+y", "x-y", "x*y"])
def test_furuta_preset_computes_the_paper_codes_function(op):
    cfg, task, perm = furuta_setup(op)
    assert (cfg.d_vocab, cfg.d_vocab_out, cfg.n_ctx) == (102, 102, 3)
    torch.manual_seed(2)
    theirs = FurutaPaper().double()
    tokens = task.all_pairs().tokens[::11]                     # ours [x, op, y]; theirs with their op id
    their_tokens = torch.tensor(perm)[tokens]
    assert (their_tokens[:, 1] == 97 + FURUTA_OP_TOKEN[op]).all()
    with torch.no_grad():
        want = theirs(their_tokens)[:, -1][:, perm]            # their logits in our class order
    got = our_logits(cfg, furuta_paper_to_ours(theirs, cfg, perm), tokens)
    assert got.shape == want.shape == (len(tokens), 102)
    assert (got - want).abs().max().item() < TOL


def test_furuta_preset_trains_as_the_paper_code_and_fails_without_each_quirk():
    """One full-batch step as train_emb.py takes it (torch.optim.AdamW, lr 1e-3, betas (0.9, 0.98), wd 1, no
    scheduler; their high-precision cross-entropy over all 102 logits) from the same weights: the logits
    after it agree at 1e-10. Without the preset's quirks the function or the training differs."""
    from grokfast.optim import AdamW
    cfg, task, perm = furuta_setup("x+y")
    pre = grokfast.preset("furuta")
    torch.manual_seed(3)
    theirs = FurutaPaper().double()
    tokens, labels = task.train.tokens[:300], task.train.labels[:300]     # a batch of the train split: seconds
    their_tokens = torch.tensor(perm)[tokens]
    topt = torch.optim.AdamW(theirs.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=1.0)
    state = furuta_paper_to_ours(theirs, cfg, perm)
    torch.nn.functional.cross_entropy(theirs(their_tokens)[:, -1], labels).backward()
    topt.step()

    def one_step(c, s):
        ours = Transformer(c).double()
        ours.load_state_dict(s, strict=False)
        params = dict(ours.named_parameters())
        loss = torch.nn.functional.cross_entropy(ours(tokens), labels)
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
        with torch.no_grad():
            AdamW({k: p.data for k, p in params.items()}, pre.train).step(grads)
            return ours(tokens[::7])

    with torch.no_grad():
        want = theirs(their_tokens[::7])[:, -1][:, perm]
    assert (one_step(cfg, state) - want).abs().max().item() < TOL
    for quirk in ("pos_embed", "mlp_bias"):   # W_pos from our init / b_in, b_out at 0 but trained: another run
        clean = dataclasses.replace(cfg, **{quirk: True})
        assert (one_step(clean, state) - want).abs().max().item() > 1e-6, quirk
    for quirk, value, classes in (("extra_tokens", 0, 98), ("unembed_all_tokens", False, 97)):   # fewer classes
        clean = dataclasses.replace(cfg, **{quirk: value}).for_task(task)
        trimmed = dict(state, **{"embed.W_E": state["embed.W_E"][:clean.d_vocab],
                                 "unembed.W_U": state["unembed.W_U"][:, :clean.d_vocab_out]})
        assert our_logits(clean, trimmed, tokens).shape[1] == classes != want.shape[1]


def test_furuta_preset_starts_from_the_paper_codes_distribution():
    cfg, _, perm = furuta_setup()
    theirs = []
    for seed in range(3):
        torch.manual_seed(seed)
        theirs.append(furuta_paper_to_ours(FurutaPaper(), cfg, perm))
    want = stats(pooled(theirs))
    assert init_mismatches(stats(pooled([Transformer(cfg, seed=s).state_dict() for s in range(3)])), want) == []
    nanda_init = stats(pooled([Transformer(dataclasses.replace(cfg, init="nanda"), seed=s).state_dict() for s in range(3)]))
    assert init_mismatches(nanda_init, want) == ["embed.W_E", "unembed.W_U"]   # their swapped scales are the quirk


def test_fused_backend_refuses_the_furuta_quirks():
    from grokfast.backends import fused_status
    for quirk in ("pos_embed", "mlp_bias"):
        cfg = dataclasses.replace(grokfast.preset("nanda").model, **{quirk: False})
        ok, why = fused_status(cfg, "cpu", allow_interpreter=True)
        assert not ok and quirk in why
    with pytest.raises(ConfigError, match="extra_tokens"):
        ModelConfig(extra_tokens=-1)


# --- Power et al. 2022 (openai/grok grok/transformer.py, data.py, training.py): post-LayerNorm, no biases ----------
class GrokPaper(nn.Module):
    """Their Transformer with dropout 0 and no weight noise: nn.Embedding(239, d) plus a fixed sinusoidal table;
    per block x = LN(x + attn(x)), x = LN(x + FFN(x)) (post-LayerNorm, no final LayerNorm), attention of
    per-head bias-free nn.Linear Wq, Wk, Wv [d_key, d] and Wo [d, d], FFN bias-free Linear(d, 4d), ReLU,
    Linear(4d, d); a bias-free head over all 239 tokens; future positions masked with -inf."""

    def __init__(self, V=239, d=128, heads=4, layers=2, n_ctx=6):
        super().__init__()
        lin = lambda n_in, n_out: nn.Linear(n_in, n_out, bias=False)
        self.embedding = nn.Embedding(V, d)
        table = [[math.sin(t / 10000 ** (i / d)) if i % 2 == 0 else math.cos(t / 10000 ** ((i - 1) / d))
                  for i in range(d)] for t in range(n_ctx)]
        self.register_buffer("pe", torch.tensor(table, dtype=torch.float64))
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            q=nn.ModuleList(lin(d, d // heads) for _ in range(heads)),
            k=nn.ModuleList(lin(d, d // heads) for _ in range(heads)),
            v=nn.ModuleList(lin(d, d // heads) for _ in range(heads)),
            o=lin(d, d), ln1=nn.LayerNorm(d), ff=nn.Sequential(lin(d, 4 * d), nn.ReLU(), lin(4 * d, d)),
            ln2=nn.LayerNorm(d))) for _ in range(layers))
        self.head = lin(d, V)

    def forward(self, tokens):                                    # [B, T] -> logits [B, T, V]
        T = tokens.shape[1]
        x = self.embedding(tokens) + self.pe[:T].to(self.embedding.weight.dtype)
        future = torch.ones(T, T).tril() == 0
        for b in self.blocks:
            heads = [((q(x) @ k(x).transpose(-2, -1)) / math.sqrt(q.out_features)).masked_fill(future, float("-inf"))
                     .softmax(-1) @ v(x) for q, k, v in zip(b.q, b.k, b.v)]
            x = b.ln1(x + b.o(torch.cat(heads, -1)))
            x = b.ln2(x + b.ff(x))
        return self.head(x)


# their vocabulary: <|eos|> 0, = 1, the 20 operators sorted by name (2..21; "/" is the 9th: 10), numbers 22..118,
# S5 permutations 119..238. Ours: numbers 0..96, = 97, the operation 98, <|eos|> 99, then 139 extra tokens.
GROK_DIV = 10


def grok_token_map() -> list:
    """Our token id -> theirs, for the grok preset (x/y): the extra tokens are their unused ones in order."""
    used = [22 + n for n in range(97)] + [1, GROK_DIV, 0]
    return used + [t for t in range(239) if t not in used]


def grok_paper_to_ours(t: GrokPaper, cfg: ModelConfig, perm: list) -> dict:
    H, Dh, D = cfg.n_heads, cfg.d_head, cfg.d_model
    s = {"embed.W_E": t.embedding.weight[perm], "unembed.W_U": t.head.weight.T[:, perm]}
    for l, b in enumerate(t.blocks):
        p = f"blocks.{l}."
        for ours, theirs in (("W_Q", b.q), ("W_K", b.k), ("W_V", b.v)):
            s[p + "attn." + ours] = torch.stack([h.weight.T for h in theirs])          # [H, D, Dh]
        s[p + "attn.W_O"] = b.o.weight.T.reshape(H, Dh, D)
        s[p + "ln1.w"], s[p + "ln1.b"], s[p + "ln2.w"], s[p + "ln2.b"] = b.ln1.weight, b.ln1.bias, b.ln2.weight, b.ln2.bias
        s[p + "mlp.W_in"], s[p + "mlp.W_out"] = b.ff[0].weight.T, b.ff[2].weight.T
    return {k: v.detach().clone() for k, v in s.items()}


def grok_setup(seed=4):
    pre = grokfast.preset("grok")
    task = grokfast.Task.from_spec(pre.task)
    cfg, perm = pre.model.for_task(task), grok_token_map()
    torch.manual_seed(seed)
    theirs = GrokPaper().double()
    with torch.no_grad():
        for b in theirs.blocks:                                  # LayerNorm away from 1 and 0
            for ln in (b.ln1, b.ln2):
                ln.weight.add_(torch.randn_like(ln.weight) * 0.3), ln.bias.add_(torch.randn_like(ln.bias) * 0.3)
    split = task.all_pairs()
    tokens, labels = split.tokens[::23], split.labels[::23]
    # their model reads the whole <|eos|> a op b = c; the answer's logits are those at the = (position 4)
    their_tokens = torch.tensor(perm)[torch.cat([tokens, labels[:, None]], 1)]
    with torch.no_grad():
        want = theirs(their_tokens)[:, 4][:, perm]             # in our class order
    return cfg, task, perm, theirs, tokens, labels, their_tokens, want


def test_grok_preset_computes_the_paper_codes_function():
    cfg, task, perm, theirs, tokens, _, their_tokens, want = grok_setup()
    assert (cfg.d_vocab, cfg.d_vocab_out, cfg.n_ctx) == (239, 239, 5)
    assert (their_tokens[:, 0] == 0).all() and (their_tokens[:, 2] == GROK_DIV).all() and (their_tokens[:, 4] == 1).all()
    got = our_logits(cfg, grok_paper_to_ours(theirs, cfg, perm), tokens)
    assert got.shape == want.shape == (len(tokens), 239)
    assert (got - want).abs().max().item() < TOL


@pytest.mark.parametrize("quirk,value", [("ln_position", "pre"), ("pos_embed", "learned"), ("pos_embed", "none"),
                                         ("unembed_all_tokens", False), ("extra_tokens", 0)])
def test_grok_preset_fails_without_each_quirk(quirk, value):
    cfg, task, perm, theirs, tokens, _, _, want = grok_setup()
    clean = dataclasses.replace(cfg, **{quirk: value}).for_task(task)
    state = grok_paper_to_ours(theirs, cfg, perm)
    state = dict(state, **{"embed.W_E": state["embed.W_E"][:clean.d_vocab],
                           "unembed.W_U": state["unembed.W_U"][:, :clean.d_vocab_out]})
    got = our_logits(clean, state, tokens, strict=False)     # ln_final at 1 and 0, a learned W_pos from our init
    assert got.shape != want.shape or (got - want).abs().max().item() > 1e-3


def test_grok_preset_trains_as_the_paper_code_and_mlp_biases_would_change_it():
    """Two minibatch steps as their configure_optimizers takes them: CustomAdamW (weight_decay_form "to_zero":
    p *= 1 - lr wd, then Adam; with their default noise_factor 0 that is torch.optim.AdamW) at lr 1, betas
    (0.9, 0.98), under LambdaLR(step / 10 * 1e-3 up to step 10), so step 1 has lr 0; wd 1 here so the decay form
    matters. The loss is the answer's only (their code also scores the <|eos|> after it: not reproduced).
    Our AdamW with the preset's settings gives the same logits at 1e-10; with MLP biases (trained from 0) not."""
    from grokfast.optim import AdamW
    cfg, task, perm, theirs, tokens, labels, their_tokens, _ = grok_setup(5)
    tcfg = dataclasses.replace(grokfast.preset("grok").train, wd=1.0)
    state = grok_paper_to_ours(theirs, cfg, perm)
    opt = torch.optim.AdamW(theirs.parameters(), lr=1, betas=(0.9, 0.98), eps=1e-8, weight_decay=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(s / 10, 1.0) * 1e-3)
    their_labels = torch.tensor(perm)[labels]
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(theirs(their_tokens)[:, 4], their_labels).backward()
        opt.step(), sched.step()
    with torch.no_grad():
        want = theirs(their_tokens)[:, 4][:, perm]

    def two_steps(c):
        ours = Transformer(c).double()
        ours.load_state_dict(state, strict=False)
        params = dict(ours.named_parameters())
        opt = AdamW({k: p.data for k, p in params.items()}, tcfg)
        for _ in range(2):
            loss = torch.nn.functional.cross_entropy(ours(tokens), labels)
            opt.step(dict(zip(params, torch.autograd.grad(loss, list(params.values())))))
        with torch.no_grad():
            return ours(tokens)

    assert (two_steps(cfg) - want).abs().max().item() < TOL
    assert (two_steps(dataclasses.replace(cfg, mlp_bias=True)) - want).abs().max().item() > 1e-6


def test_grok_preset_starts_from_the_paper_codes_distribution():
    pre = grokfast.preset("grok")
    cfg, perm = pre.model.for_task(grokfast.Task.from_spec(pre.task)), grok_token_map()
    theirs = []
    for seed in range(3):
        torch.manual_seed(seed)
        theirs.append(grok_paper_to_ours(GrokPaper(), cfg, perm))
    want = stats(pooled(theirs))
    assert init_mismatches(stats(pooled([Transformer(cfg, seed=s).state_dict() for s in range(3)])), want) == []
    nanda_init = stats(pooled([Transformer(dataclasses.replace(cfg, init="nanda"), seed=s).state_dict() for s in range(3)]))
    assert "embed.W_E" in init_mismatches(nanda_init, want)


def test_grok_quirks_are_validated_and_refused_by_the_fused_backend():
    from grokfast.backends import fused_status
    with pytest.raises(ConfigError, match="ln_position"):
        ModelConfig(ln_position="middle", layernorm=True)
    with pytest.raises(ConfigError, match="layernorm"):
        ModelConfig(ln_position="post")
    with pytest.raises(ConfigError, match="pos_embed"):
        ModelConfig(pos_embed="rotary")
    cfg = grokfast.preset("grok").model
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert ModelConfig(pos_embed="none").to_dict()["pos_embed"] is False     # old config.json files read alike
    for quirk, value in (("ln_position", "post"), ("pos_embed", "sinusoidal")):
        c = dataclasses.replace(grokfast.preset("power").model, **{quirk: value})
        ok, why = fused_status(c, "cpu", allow_interpreter=True)
        assert not ok and quirk in why and str(value) in why


def test_slot_inputs_read_the_fixed_or_missing_positions():
    """The probes' view of what block 0 reads at a's and b's slots: W_E plus the sinusoidal row (grok: no ln1
    before the block, it is post-LayerNorm), or W_E alone (furuta: no positions)."""
    from grokfast.model import sinusoidal_positions
    from grokfast.probes import slot_inputs
    for name, pos in (("grok", sinusoidal_positions(5, 128)), ("furuta", torch.zeros(3, 128, dtype=torch.float64))):
        task = grokfast.Task.from_spec(grokfast.preset(name).task)
        model = Transformer(grokfast.preset(name).model.for_task(task), seed=1)
        got = slot_inputs(model, task)
        slots = task.layout.split()
        W_E = model.embed.W_E.detach().double()[:task.p]
        for s in ("a", "b"):
            assert (got[s] - (W_E + pos[slots.index(s)])).abs().max().item() < 1e-12, (name, s)
