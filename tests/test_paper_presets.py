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

TOL = 1e-10


# --- ironjr/grokfast main.py (Lee et al. 2024): Decoder over [T, B] token ids -------------------------
class GrokfastPaperBlock(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):                                    # x [T, B, d]
        T = x.shape[0]
        causal = torch.full((T, T), -math.inf, dtype=x.dtype).triu(1)
        x = self.ln_1(x)                                      # the quirk: the residual continues from here
        x = x + self.attn(x, x, x, attn_mask=causal, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class GrokfastPaperDecoder(nn.Module):
    def __init__(self, d=128, layers=2, heads=4, tokens=99, seq_len=5):
        super().__init__()
        self.token_embeddings, self.position_embeddings = nn.Embedding(tokens, d), nn.Embedding(seq_len, d)
        self.layers = nn.ModuleList([GrokfastPaperBlock(d, heads) for _ in range(layers)])
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, tokens, bias=False)

    def forward(self, x):                                    # x [T, B] -> logits [T, B, tokens]
        h = self.token_embeddings(x) + self.position_embeddings(torch.arange(x.shape[0]))[:, None]
        for layer in self.layers:
            h = layer(h)
        return self.head(self.ln_f(h))


def grokfast_paper_to_ours(theirs: GrokfastPaperDecoder, cfg: ModelConfig) -> dict:
    """Their state, under our parameter names and shapes."""
    H, Dh, D = cfg.n_heads, cfg.d_head, cfg.d_model
    s = {"embed.W_E": theirs.token_embeddings.weight, "pos_embed.W_pos": theirs.position_embeddings.weight[:cfg.n_ctx]}
    for l, blk in enumerate(theirs.layers):
        b = f"blocks.{l}."
        Wq, Wk, Wv = blk.attn.in_proj_weight.chunk(3)          # each [H*Dh, D]: q = x W^T + b
        bq, bk, bv = blk.attn.in_proj_bias.chunk(3)
        s.update({b + "ln1.w": blk.ln_1.weight, b + "ln1.b": blk.ln_1.bias,
                  b + "ln2.w": blk.ln_2.weight, b + "ln2.b": blk.ln_2.bias})
        for name, W, bias in (("Q", Wq, bq), ("K", Wk, bk), ("V", Wv, bv)):
            s[b + f"attn.W_{name}"] = W.view(H, Dh, D).transpose(1, 2)
            s[b + f"attn.b_{name}"] = bias.view(H, Dh)
        s[b + "attn.W_O"] = blk.attn.out_proj.weight.T.reshape(H, Dh, D)
        s[b + "attn.b_O"] = blk.attn.out_proj.bias
        s[b + "mlp.W_in"], s[b + "mlp.b_in"] = blk.mlp[0].weight.T, blk.mlp[0].bias
        s[b + "mlp.W_out"], s[b + "mlp.b_out"] = blk.mlp[2].weight.T, blk.mlp[2].bias
    s["ln_final.w"], s["ln_final.b"] = theirs.ln_f.weight, theirs.ln_f.bias
    s["unembed.W_U"] = theirs.head.weight.T
    return {k: v.detach().clone() for k, v in s.items()}


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
