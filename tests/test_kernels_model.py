"""The fused forward + backward (kernels/forward_backward.py) against the float64 reference model.

Every test builds grokfast.Transformer, packs its float32 weights with ParamLayout, runs the Triton
kernels on DEVICE (a CUDA GPU when there is one, else the CPU under TRITON_INTERPRET=1, see conftest.py)
on fresh random tokens, labels and weights, and compares the loss and EVERY parameter's gradient with
grokfast.model.loss_and_grads_reference on model.double(). Output buffers and the kernels'
workspace are filled with NaN first, so an entry that no kernel writes (or a read of one) fails.
Shapes are tiny (p 7-13, d_model 16-32) because the interpreter runs ~1 ms per program.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
try:  # CI installs hypothesis ('.[test]'); the GPU image does not, and runs the other tests of this file
    from hypothesis import given, settings, HealthCheck, strategies as st
except ImportError:
    given = None

from grokfast.backends import interpreter_on
from grokfast.config import ConfigError, ModelConfig
from grokfast.model import Transformer, loss_and_grads_reference
from grokfast.kernels import KernelConfigError, forward_backward as fb
from grokfast.kernels import mlp
from grokfast.kernels.embed_attn import token_index, token_scatter
from grokfast.kernels.layout import ParamLayout
from grokfast.kernels.mlp import gemm
from grokfast.kernels.unembed_loss import cross_entropy, unembed_cross_entropy

# Relative error bounds, ||g - g_ref|| / ||g_ref|| per parameter, against the float64 reference.
# Float32 kernels on well-conditioned inputs (default init, O(1) logits) land near 1e-7..1e-6.
GRAD_RTOL = 1e-5
LOSS_RTOL = 1e-6

# Where the kernels run: the GPU when there is one (and the interpreter is off), else the CPU under the
# interpreter. Inputs are drawn on the CPU (same values everywhere) and moved; the float64 reference and
# every comparison run on the CPU (kernel outputs are moved back; .cpu() of a CPU tensor is the tensor).
DEVICE = "cuda" if torch.cuda.is_available() and not interpreter_on() else "cpu"


@pytest.fixture(autouse=True)
def _poisoned_workspace(monkeypatch):
    monkeypatch.setattr(fb, "POISON_WORKSPACE", True)
    fb._CACHE.clear()
    yield
    fb._CACHE.clear()


def tiny(**kw) -> ModelConfig:
    base = dict(d_model=16, n_heads=2, d_head=8, d_mlp=32, n_ctx=3, d_vocab=12, d_vocab_out=11)
    base.update(kw)
    return ModelConfig(**base)


def make_model(cfg, seed, w_u_scale=1.0):
    """Reference model with random weights, and random (not zero) biases and LayerNorm parameters."""
    model = Transformer(cfg, seed=seed)
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf.startswith("b_") or leaf == "b":
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif leaf == "w":
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
        model.unembed.W_U.mul_(w_u_scale)
    return model


def random_data(cfg, B, M, per_model, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (M, B) if per_model else (B,)
    tokens = torch.randint(0, cfg.d_vocab, shape + (cfg.n_ctx,), generator=g)
    labels = torch.randint(0, cfg.d_vocab_out, shape, generator=g)
    return tokens, labels


def pack(models, cfg):
    """(layout, flat [M, N] float32 on DEVICE) of CPU models."""
    lay = ParamLayout(cfg)
    return lay, torch.cat([lay.flatten(m.state_dict()) for m in models]).contiguous().to(DEVICE)


def fused(cfg, flat, tokens, labels):
    """The kernels on DEVICE (flat there already; tokens and labels moved); (loss [M], grad [M, N]) on the CPU."""
    M = flat.shape[0]
    grad = torch.full_like(flat, float("nan"))
    loss = torch.full((M,), float("nan"), device=flat.device)
    out = fb.loss_and_grads_flat(cfg, flat, tokens.to(DEVICE), labels.to(DEVICE), grad_out=grad, loss_out=loss)
    assert out[0] is loss and out[1] is grad
    return loss.cpu(), grad.cpu()


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check_model(cfg, model, lay, grad_m, loss_m, tokens, labels, grad_rtol=GRAD_RTOL, loss_rtol=LOSS_RTOL):
    loss_ref, grads_ref = loss_and_grads_reference(copy.deepcopy(model).double(), tokens, labels)
    assert torch.isfinite(grad_m).all(), "a gradient entry was not written (NaN poison survived)"
    assert abs(loss_m.item() - loss_ref.item()) <= loss_rtol * abs(loss_ref.item()), (loss_m.item(), loss_ref.item())
    views = lay.views(grad_m.unsqueeze(0))
    for name in lay.shapes:
        g, g_ref = views[name][0], grads_ref[name]
        if name.endswith("attn.b_K"):
            # Exactly zero in exact arithmetic (every key's score shifts by the same q . b_K), so only
            # rounding remains: bound it by the scale of its neighbour W_K's gradient.
            bound = GRAD_RTOL * grads_ref[name.replace("b_K", "W_K")].norm().item()
            assert (g.double() - g_ref).norm().item() <= bound, name
            continue
        if g_ref.norm() == 0:          # e.g. W_Q, W_K with attn_alpha = 0: attention ignores the scores
            assert (g == 0).all(), name
            continue
        err = rel(g, g_ref)
        assert err <= grad_rtol, f"{name}: relative error {err:.3g} > {grad_rtol}"


SPREAD = [
    # (id, config overrides, M, per-model tokens, B)
    ("nanda-like", dict(), 1, False, 37),
    ("pizza-alpha0", dict(n_ctx=2, attn_alpha=0.0, d_vocab=11, attn_bias=True, unembed_bias=True), 1, False, 21),
    ("alpha-half-T5-1head", dict(n_ctx=5, attn_alpha=0.5, n_heads=1, d_head=16, d_vocab_out=13, d_vocab=15), 1,
     False, 19),
    ("power-like-M3", dict(n_layers=2, layernorm=True, act="gelu", n_ctx=4, d_vocab=13), 3, False, 23),
    ("2L-relu-T2-M3-own", dict(n_layers=2, n_ctx=2, n_heads=4, d_head=4, d_model=32, d_mlp=64, d_vocab_out=13,
                               d_vocab=13), 3, True, 17),
    ("1L-ln-gelu-p7-M3-own", dict(layernorm=True, act="gelu", attn_alpha=0.5, d_vocab_out=7, d_vocab=8), 3, True, 25),
    ("2L-ln-T5-alpha0-bias", dict(n_layers=2, layernorm=True, n_ctx=5, attn_alpha=0.0, attn_bias=True,
                                  unembed_bias=True, d_vocab_out=13, d_vocab=14), 1, False, 11),
]


@pytest.mark.parametrize("name,over,M,per_model,B", SPREAD, ids=[s[0] for s in SPREAD])
def test_loss_and_every_gradient_match_float64_reference(name, over, M, per_model, B):
    cfg = tiny(**over)
    models = [make_model(cfg, seed=10 * len(name) + m) for m in range(M)]
    lay, flat = pack(models, cfg)
    tokens, labels = random_data(cfg, B, M, per_model, seed=len(name))
    loss, grad = fused(cfg, flat, tokens, labels)
    for m, model in enumerate(models):
        tk = tokens[m] if per_model else tokens
        lb = labels[m] if per_model else labels
        check_model(cfg, model, lay, grad[m], loss[m], tk, lb)


def test_split_k_gradients_match_reference(monkeypatch):
    """Weight and bias gradients through the split-K path (partials + fixed-order reduction), which
    real sizes take (K = examples >= 1024) and tiny test sizes only when the threshold is lowered."""
    monkeypatch.setattr(mlp, "SPLIT_MIN_K", 16)
    cfg = tiny(n_layers=2, layernorm=True, act="gelu", n_ctx=4, attn_bias=True, unembed_bias=True)
    model = make_model(cfg, seed=11)
    lay, flat = pack([model], cfg)
    tokens, labels = random_data(cfg, 45, 1, False, seed=11)
    loss, grad = fused(cfg, flat, tokens, labels)
    check_model(cfg, model, lay, grad[0], loss[0], tokens, labels)
    assert torch.equal(grad, fused(cfg, flat, tokens, labels)[1])


@pytest.mark.parametrize("split_min_k", [16, 10**9])
def test_gemm_strided_batched_against_float64(monkeypatch, split_min_k):
    """out[m, j] = a[m, j] @ b[m, j] over a (KO, KI) contraction with transposed and broadcast operands.
    Bound: 1e-6 relative (float32 sums of 200 products of O(1) numbers, error ~ sqrt(200) eps)."""
    monkeypatch.setattr(mlp, "SPLIT_MIN_K", split_min_k)
    g = torch.Generator().manual_seed(0)
    M, J, R, KO, KI, N = 2, 3, 20, 1, 200, 24
    a = torch.randn(M, KI, R, generator=g).transpose(1, 2)               # [M, R, KI], column-major
    b = torch.randn(M, J, KI, N, generator=g)
    a_d = a.transpose(1, 2).to(DEVICE).transpose(1, 2)                    # the same strides on DEVICE
    out = torch.full((M, J, R, N), float("nan"), device=DEVICE)
    gemm(a_d.unsqueeze(1).unsqueeze(3).expand(M, J, R, KO, KI), b.to(DEVICE).unsqueeze(2), out)
    ref = torch.einsum("mrk,mjkn->mjrn", a.double(), b.double())
    assert rel(out.cpu(), ref) <= 1e-6
    # contraction over (heads x d_head) of a [H, D, Dh] weight: KO = H, KI = Dh
    H, Dh, D = 3, 5, 17
    x = torch.randn(M, R, H * Dh, generator=g)
    W = torch.randn(M, H, D, Dh, generator=g)
    out2 = torch.full((M, R, D), float("nan"), device=DEVICE)
    gemm(x.to(DEVICE).view(M, R, H, Dh).unsqueeze(1), W.to(DEVICE).permute(0, 1, 3, 2).unsqueeze(1), out2)
    assert rel(out2.cpu(), torch.einsum("mrhe,mhde->mrd", x.view(M, R, H, Dh).double(), W.double())) <= 1e-6


def test_grouped_launch_equals_separate_launches_and_float64(monkeypatch):
    """gemm_launch runs up to four independent problems in one launch (gemm2/3/4 kernels): each gives
    the same bits as launched alone, with different epilogues (bias + GELU storing the pre-activation,
    act' times a saved z plus a residual) and split-K partials reduced later by one Deferred flush.
    Bound: 1e-6 relative against float64 (sums of <= 90 O(1) products)."""
    monkeypatch.setattr(mlp, "SPLIT_MIN_K", 16)
    g = torch.Generator().manual_seed(7)
    M, R, K, N = 2, 37, 90, 20

    def r(*shape):
        return torch.randn(*shape, generator=g)

    x, w, bias, z, res, dy = r(M, R, K), r(M, K, N), r(M, N), r(M, R, N), r(M, R, N), r(M, R, N)
    d = {k: v.to(DEVICE) for k, v in dict(x=x, w=w, bias=bias, z=z, res=res, dy=dy).items()}

    def outs():
        return [torch.full(s, float("nan"), device=DEVICE) for s in ((M, R, N), (M, R, N), (M, R, N), (M, K, N), (M, N))]

    def plans(o, defer):
        return [mlp.gemm_plan(d["x"], d["w"], o[0], bias=d["bias"], act="gelu", pre_out=o[1]),
                mlp.gemm_plan(d["x"], d["w"], o[2], dact="relu", z=d["z"], res=d["res"]),
                mlp.gemm_plan(d["x"].transpose(1, 2), d["dy"], o[3], defer=defer),   # K = R = 37: split
                mlp.colsum_plan(d["dy"], o[4], defer=defer)]
    alone = outs()
    for p in plans(alone, None):
        mlp.gemm_launch(p)
    assert plans(alone, None)[2].cx["SPLIT"], "the weight-gradient problem should take the split-K path"
    for group, kernels in ((4, ["gemm4_kernel"]), (3, ["gemm3_kernel", "gemm_kernel"])):
        monkeypatch.setattr(mlp, "MAX_GROUP", group)
        grouped, defer = outs(), mlp.Deferred()
        with fb.record_launches() as rec:             # count what one grouped call launches (meta-free dry run)
            mlp.gemm_launch(*plans(outs(), mlp.Deferred()))
        assert [k.__name__ for k, *_ in rec] == kernels
        mlp.gemm_launch(*plans(grouped, defer))
        assert torch.isnan(grouped[3]).all() and torch.isnan(grouped[4]).all()   # deferred: not written yet
        defer.flush()
        for a, b in zip(alone, grouped):
            assert torch.equal(a, b)
    X, W, Bi, Z, Rs, DY = (t.double() for t in (x, w, bias, z, res, dy))
    pre = X @ W + Bi[:, None, :]
    refs = [torch.nn.functional.gelu(pre), pre, (X @ W) * (Z > 0) + Rs, X.transpose(1, 2) @ DY, DY.sum(1)]
    for o, ref in zip(grouped, refs):
        assert rel(o.cpu(), ref) <= 1e-6


def test_dot_precision_reaches_every_dot_and_is_validated():
    """The float32 dot mode (ieee by default; tf32x3 / tf32 opt-in) is what every tl.dot of the step is
    compiled with: the launches' PRECISION constexprs follow dot_precision / the precision argument."""
    from grokfast.kernels import _common
    cfg = ModelConfig.preset("power")

    def modes(**kw):
        specs = fb.aot_specs(cfg, M=1, B=4096)
        return {v for sp in specs for k, v in sp["constexprs"].items() if k.startswith("PRECISION")}
    assert modes() == {"ieee"}
    with _common.dot_precision("tf32x3"):
        assert modes() == {"tf32x3"}
    assert modes() == {"ieee"}
    with pytest.raises(ValueError, match="precision"):
        with _common.dot_precision("fp16"):
            pass
    flat = torch.zeros(1, ParamLayout(tiny()).numel, device=DEVICE)
    tokens = torch.zeros(4, 3, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="precision"):
        fb.loss_and_grads_flat(tiny(), flat, tokens, tokens[:, 0].contiguous(), precision="half")


def test_ungrouped_launches_give_the_same_step(monkeypatch):
    """mlp.MAX_GROUP = 1 (GROKFAST_GEMM_GROUP=1) launches every product alone: the same loss and gradient
    bits as the grouped step, with more launches."""
    monkeypatch.setattr(mlp, "SPLIT_MIN_K", 16)
    cfg = tiny(n_layers=2, layernorm=True, attn_bias=True, unembed_bias=True)
    model = make_model(cfg, seed=5)
    lay, flat = pack([model], cfg)
    tokens, labels = random_data(cfg, 40, 1, False, seed=5)
    grouped = fused(cfg, flat, tokens, labels)
    n_grouped = sum(fb.launches_per_step(cfg, 1, 40).values())
    monkeypatch.setattr(mlp, "MAX_GROUP", 1)
    alone = fused(cfg, flat, tokens, labels)
    assert torch.equal(grouped[0], alone[0]) and torch.equal(grouped[1], alone[1])
    assert sum(fb.launches_per_step(cfg, 1, 40).values()) > n_grouped


def test_group_kernels_file_is_generated_from_mlp():
    import pathlib
    path = pathlib.Path(mlp.__file__).with_name("gemm_group.py")
    assert path.read_text() == mlp.group_kernels_source(), \
        "kernels/gemm_group.py is stale: regenerate it (command in its docstring)"


# The launches of one training step's forward + backward (the optimizer adds optimizer.STEP_LAUNCHES, one:
# its scalars ride in the flush). A regression guard: grouped GEMMs, one deferred reduction of the
# weight-gradient partials and the unembedding fused with the loss brought nanda from 31 to 18; the
# segmented token scatter (no split launch) and the flush carrying the loss mean and the embedding
# gradients, the unembedding's input gradient formed with the loss, X0 formed by its first reader, dz
# formed inside the attention backward and z W_O inside the attention forward, to 11. Power: 34 to 29 with
# the LayerNorms' weight-gradient partials summed in the flush (5 column-sum launches gone), 29 to 23 with the
# final LayerNorm inside the unembedding and LayerNorm 2 inside the attention forward and backward.
MAX_LAUNCHES = {"nanda": 11, "pizza": 11, "power": 23}


@pytest.mark.parametrize("name", sorted(MAX_LAUNCHES))
def test_launches_per_step(name):
    from grokfast.aot import preset_shapes
    cfg, B = preset_shapes(name)
    counts = fb.launches_per_step(cfg, 1, B)
    assert 0 < sum(counts.values()) <= MAX_LAUNCHES[name], counts
    assert counts["flush_kernel"] == 1      # every split-K sum, the loss mean, the embedding gradients: one launch


@pytest.mark.parametrize("shared", [False, True])
def test_token_scatter_sums_rows_by_position_and_token(shared):
    """out[m, t * V + v] = sum over examples b with tok[m, b, t] == v of G[m, b * T + t] (per-model or shared
    tokens; a token absent at a position gives a zero row; tokens V-1 never used). With zero=(t0, lo, hi)
    the columns outside [lo, hi) at positions t < t0, zero in G, are written as 0 unread: here G holds NaN
    there, so a read would show. Bound: 1e-6 relative (float32 sums of ~20 O(1) terms)."""
    g = torch.Generator().manual_seed(4)
    M, B, T, V, W = 2, 70, 3, 6, 40
    G = torch.randn(M, B * T, W, generator=g)
    tok = torch.randint(0, V - 1, (1 if shared else M, B, T), generator=g)
    tok[:, :, 2] = torch.randint(0, 2, (tok.shape[0], B), generator=g)       # long segments at t = 2
    out = torch.full((M, T * V, W), float("nan"), device=DEVICE)
    index = token_index(tok.to(DEVICE), V)
    token_scatter(G.to(DEVICE), index, out)
    onehot = torch.nn.functional.one_hot(tok, V).double().expand(M, B, T, V)      # [M, B, T, V]
    ref = torch.einsum("mbtv,mbtw->mtvw", onehot, G.double().view(M, B, T, W)).reshape(M, T * V, W)
    assert rel(out.cpu(), ref) <= 1e-6
    t0, lo, hi = 2, 8, 24
    Gz = G.view(M, B, T, W).clone()
    Gz[:, :, :t0, :lo] = float("nan")
    Gz[:, :, :t0, hi:] = float("nan")
    out.fill_(float("nan"))
    token_scatter(Gz.view(M, B * T, W).to(DEVICE), index, out, zero=(t0, lo, hi))
    refz = ref.view(M, T, V, W).clone()
    refz[:, :t0, :, :lo] = 0
    refz[:, :t0, :, hi:] = 0
    assert rel(out.cpu(), refz.view(M, T * V, W)) <= 1e-6


if given is None:
    @pytest.mark.skip(reason="hypothesis is not installed: pip install hypothesis (the '[test]' extra has it)")
    def test_random_configs_match_reference():
        pass
else:
    @settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(n_layers=st.sampled_from([1, 2]), layernorm=st.booleans(), act=st.sampled_from(["relu", "gelu"]),
           n_ctx=st.integers(2, 5), alpha=st.sampled_from([0.0, 0.5, 1.0]), n_heads=st.sampled_from([1, 2]),
           p=st.sampled_from([7, 11, 13]), B=st.integers(1, 40), seed=st.integers(0, 2**16))
    def test_random_configs_match_reference(n_layers, layernorm, act, n_ctx, alpha, n_heads, p, B, seed):
        cfg = tiny(n_layers=n_layers, layernorm=layernorm, act=act, n_ctx=n_ctx, attn_alpha=alpha, n_heads=n_heads,
                   d_head=16 // n_heads, d_vocab_out=p, d_vocab=p + 1)
        fb._CACHE.clear()
        model = make_model(cfg, seed)
        lay, flat = pack([model], cfg)
        tokens, labels = random_data(cfg, B, 1, False, seed)
        loss, grad = fused(cfg, flat, tokens, labels)
        check_model(cfg, model, lay, grad[0], loss[0], tokens, labels)


@pytest.mark.parametrize("n_layers,layernorm", [(1, False), (2, True)])
def test_confident_model(n_layers, layernorm):
    """Labels = the model's own argmax and W_U scaled up: small loss, the regime of grokking. The logits
    are large here, so float32 rounding of the forward itself limits the agreement with float64:
    bound each error by 4x that of the same computation in float32 torch autograd (and by 1e-5)."""
    cfg = tiny(n_layers=n_layers, layernorm=layernorm, act="gelu" if layernorm else "relu")
    model = make_model(cfg, seed=7, w_u_scale=25.0)
    tokens, _ = random_data(cfg, 40, 1, False, seed=3)
    with torch.no_grad():
        labels = model(tokens).argmax(-1)
    lay, flat = pack([model], cfg)
    loss, grad = fused(cfg, flat, tokens, labels)
    loss64, g64 = loss_and_grads_reference(copy.deepcopy(model).double(), tokens, labels)
    loss32, g32 = loss_and_grads_reference(copy.deepcopy(model), tokens, labels)
    assert loss64.item() < 0.1
    assert abs(loss.item() / loss64.item() - 1) <= max(1e-5, 4 * abs(loss32.item() / loss64.item() - 1))
    views = lay.views(grad)
    for name in lay.shapes:
        if name.endswith("attn.b_K"):
            continue
        err, err32 = rel(views[name][0], g64[name]), rel(g32[name], g64[name])
        assert err <= max(GRAD_RTOL, 4 * err32), f"{name}: {err:.3g} vs float32 torch {err32:.3g}"


@pytest.mark.parametrize("fused_unembed", [False, True])
def test_cross_entropy_accurate_when_confident(fused_unembed):
    """loss = log1p(r) + m - l_y and dl_y = -(sum_{j != y} e_j)/s keep their relative accuracy when
    p_y -> 1 (a naive float32 log-softmax returns loss 0 and gradient 0 there). Logits are exact float32
    values; the reference is float64 on the same values. fused_unembed: the same logits formed on chip by
    unembed_cross_entropy as x @ W_U with x = the logits and W_U = the identity (exact products)."""
    g = torch.Generator().manual_seed(5)
    M, B, P = 2, 40, 13
    logits = torch.randn(M, B, P, generator=g)
    labels = torch.randint(0, P, (M, B), generator=g)
    margin = torch.linspace(0.0, 40.0, B)              # up to loss ~ 1e-17
    logits.scatter_(2, labels.unsqueeze(-1), (logits.max(-1).values + margin).unsqueeze(-1))
    loss_ex = torch.full((M, B), float("nan"), device=DEVICE)
    correct = torch.full((M, B), -1, dtype=torch.int32, device=DEVICE)
    dlog = torch.full((M, B, P), float("nan"), device=DEVICE)
    if fused_unembed:
        eye = torch.eye(P).expand(M, P, P).contiguous()
        unembed_cross_entropy(logits.to(DEVICE), eye.to(DEVICE), None, labels.to(DEVICE), loss_ex, correct, dlog)
    else:
        cross_entropy(logits.to(DEVICE), labels.to(DEVICE), loss_ex, correct, dlog)
    loss_ex, correct, dlog = loss_ex.cpu(), correct.cpu(), dlog.cpu()
    l64 = logits.double()
    # float64 logsumexp(l) - l_y cancels once the loss is below ~1e-12; here the label is the argmax,
    # so the exact loss is log1p(sum_{j != y} exp(l_j - l_y)), which float64 evaluates accurately.
    l_y = l64.gather(2, labels.unsqueeze(-1))
    not_y = torch.ones_like(l64, dtype=torch.bool).scatter_(2, labels.unsqueeze(-1), False)
    ref = torch.log1p(torch.where(not_y, torch.exp(l64 - l_y), 0.0).sum(-1))
    # Bound: exp(l_j - m) of float32 differences has relative error ~ eps32 * |l_j - m| (exp's
    # condition number), so per example 4 * eps32 * (1 + max_j |l_j - m|): 1e-6 at margin 4, 1e-5 at 40.
    eps32 = torch.finfo(torch.float32).eps
    bound = 4 * eps32 * (1 + (l64.max(-1).values - l64.min(-1).values))
    r = (loss_ex.double() - ref).abs() / ref
    assert (r <= bound).all(), (r / bound).max()
    assert ref.min() < 1e-15            # the regime where float32 log-softmax would return 0
    # gradient at the label, computed without forming p_y - 1
    e = torch.exp(l64 - l64.max(-1, keepdim=True).values)
    others = torch.where(not_y, e, 0.0).sum(-1)
    dy_ref = -(others / e.sum(-1)) / B
    dy = dlog.gather(2, labels.unsqueeze(-1)).squeeze(-1).double()
    assert ((dy - dy_ref).abs() <= bound * dy_ref.abs()).all()
    soft = torch.softmax(l64, -1) / B
    assert ((dlog.double() - soft).abs() <= bound[..., None] * soft)[not_y].all()
    assert torch.equal(correct, (logits.argmax(-1) == labels).int())    # ties: first index, as torch
    assert correct.sum() >= 2 * B - 2


def test_two_calls_are_bit_identical():
    cfg = tiny(n_layers=2, layernorm=True, act="gelu", n_ctx=4)
    models = [make_model(cfg, seed=s) for s in (1, 2)]
    _, flat = pack(models, cfg)
    tokens, labels = random_data(cfg, 29, 2, True, seed=9)
    l1, g1 = fused(cfg, flat, tokens, labels)
    l2, g2 = fused(cfg, flat, tokens, labels)
    assert torch.equal(l1, l2) and torch.equal(g1, g2)


def test_eval_matches_reference_and_chunks(monkeypatch):
    cfg = tiny(n_ctx=3, attn_alpha=0.5)
    models = [make_model(cfg, seed=s) for s in (3, 4)]
    _, flat = pack(models, cfg)
    tokens, labels = random_data(cfg, 100, 2, True, seed=2)
    # make one model confident on its own predictions so that correct counts are not all ~1/p
    with torch.no_grad():
        labels[0] = models[0](tokens[0]).argmax(-1)
        labels[0, :13] = (labels[0, :13] + 1) % cfg.d_vocab_out
    monkeypatch.setattr(fb, "EVAL_CHUNK_FLOATS", 1)      # chunks of 64 examples: 64 + 36
    loss = torch.full((2,), float("nan"), device=DEVICE)
    correct = torch.full((2,), -1, dtype=torch.int32, device=DEVICE)
    fb.eval_flat(cfg, flat, tokens.to(DEVICE), labels.to(DEVICE), loss_out=loss, correct_out=correct)
    loss, correct = loss.cpu(), correct.cpu()
    for m, model in enumerate(models):
        with torch.no_grad():
            logits = copy.deepcopy(model).double()(tokens[m])
        ref = torch.nn.functional.cross_entropy(logits, labels[m]).item()
        assert abs(loss[m].item() - ref) <= LOSS_RTOL * ref
        assert correct[m].item() == (logits.argmax(-1) == labels[m]).sum().item()
    assert correct[0].item() == 87


def test_loss_and_grads_of_a_module_is_keyed_like_state_dict():
    cfg = tiny(unembed_bias=True)
    model = make_model(cfg, seed=5)
    tokens, labels = random_data(cfg, 13, 1, False, seed=5)
    loss, grads = fb.loss_and_grads(copy.deepcopy(model).to(DEVICE), tokens.to(DEVICE), labels.to(DEVICE))
    loss, grads = loss.cpu(), {n: g.cpu() for n, g in grads.items()}
    loss_ref, grads_ref = loss_and_grads_reference(copy.deepcopy(model).double(), tokens, labels)
    assert loss.dtype == torch.float64 and abs(loss.item() - loss_ref.item()) <= LOSS_RTOL * loss_ref.item()
    assert list(grads) == list(model.state_dict())
    assert all(rel(grads[n], grads_ref[n]) <= GRAD_RTOL for n in grads if not n.endswith("b_K"))


def test_presets_supported_and_limits_named():
    for name in ("nanda", "power", "pizza", "small"):
        assert fb.supported(ModelConfig.preset(name)) is None, name
    assert "n_layers" in fb.supported(tiny(n_layers=3))
    assert "d_model" in fb.supported(tiny(d_model=512, d_head=64))
    assert "d_mlp" in fb.supported(tiny(d_mlp=2048))
    assert "n_heads" in fb.supported(tiny(n_heads=16, d_head=1))
    assert "d_vocab_out" in fb.supported(tiny(d_vocab_out=1000, d_vocab=1001))
    with pytest.raises(KernelConfigError, match="n_layers"):
        fb.loss_and_grads_flat(tiny(n_layers=3), torch.zeros(1, 1), torch.zeros(1, 3, dtype=torch.long),
                               torch.zeros(1, dtype=torch.long))


def test_bad_inputs_raise_clear_errors():
    cfg = tiny()
    lay, flat = pack([make_model(cfg, 0)], cfg)
    tokens, labels = (t.to(DEVICE) for t in random_data(cfg, 8, 1, False, seed=0))
    call = fb.loss_and_grads_flat
    with pytest.raises(ValueError, match="float32"):
        call(cfg, flat.double(), tokens, labels)
    with pytest.raises(ValueError, match="contiguous"):
        call(cfg, torch.cat([flat, flat], 1)[:, ::2], tokens, labels)
    with pytest.raises(ValueError, match=str(lay.numel)):
        call(cfg, flat[:, :-1].contiguous(), tokens, labels)
    with pytest.raises(ValueError, match="int64"):
        call(cfg, flat, tokens.int(), labels)
    with pytest.raises(ValueError, match="tokens must be"):
        call(cfg, flat, tokens[:, :2].contiguous(), labels)
    with pytest.raises(ValueError, match="labels must be"):
        call(cfg, flat, tokens, labels[:5])
    with pytest.raises(ValueError, match="tokens must be"):
        call(cfg, flat, tokens.expand(2, -1, -1).contiguous(), labels)      # M = 1 but 2 token sets
    with pytest.raises(ValueError, match="grad_out"):
        call(cfg, flat, tokens, labels, grad_out=torch.empty(1, 5, device=DEVICE))
    with pytest.raises(ValueError, match="loss_out"):
        call(cfg, flat, tokens, labels, loss_out=torch.empty(2, device=DEVICE))
    with pytest.raises(ValueError, match="meta"):
        call(cfg, flat, tokens.to("meta"), labels)
    with pytest.raises(ValueError, match="correct_out"):
        fb.eval_flat(cfg, flat, tokens, labels, correct_out=torch.empty(1, device=DEVICE))
    with pytest.raises(ValueError, match="d_vocab"):
        fb.check_token_range(cfg, tokens + cfg.d_vocab, labels)
    # the fused unembedding + loss launch function on its own
    M, B, D, P = 1, 8, 16, 11
    x, W = torch.zeros(M, B, D, device=DEVICE), torch.zeros(M, D, P, device=DEVICE)
    lab = torch.zeros(1, B, dtype=torch.int64, device=DEVICE)
    le, ce = torch.empty(M, B, device=DEVICE), torch.empty(M, B, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="W_U must have shape"):
        unembed_cross_entropy(x, W[:, :5], None, lab, le, ce)
    with pytest.raises(ValueError, match="contiguous per model"):
        unembed_cross_entropy(x, W.transpose(1, 2).contiguous().transpose(1, 2), None, lab, le, ce)
    with pytest.raises(ValueError, match="b_U must have shape"):
        unembed_cross_entropy(x, W, torch.zeros(M, P + 1, device=DEVICE), lab, le, ce)
    with pytest.raises(ValueError, match="dlogits must have shape"):
        unembed_cross_entropy(x, W, None, lab, le, ce, dlogits=torch.empty(M, B, P + 1, device=DEVICE))
    with pytest.raises(ValueError, match="labels must be"):
        unembed_cross_entropy(x, W, None, lab[:, :3].contiguous(), le, ce)
    # with the final LayerNorm in front: its output buffer, and somewhere for its weight gradients with dx
    lw = torch.ones(M, D, device=DEVICE)
    with pytest.raises(ValueError, match="xf must have shape"):
        unembed_cross_entropy(x, W, None, lab, le, ce, ln=(lw, lw, 1e-5, torch.empty(M, B, D + 1, device=DEVICE)))
    with pytest.raises(ValueError, match="ln_grads"):
        unembed_cross_entropy(x, W, None, lab, le, ce, dlogits=torch.empty(M, B, P, device=DEVICE),
                              dx=torch.empty(M, B, D, device=DEVICE), ln=(lw, lw, 1e-5, torch.empty_like(x)))


def test_aot_specs_cover_every_kernel_with_full_signatures():
    cfg = ModelConfig.preset("power")
    specs = fb.aot_specs(cfg, M=1, B=4096)
    names = {s["fn"].__name__ for s in specs}
    # (no gemm2_kernel: the LayerNorms' weight-gradient pairs, its last users here, are summed in the flush)
    assert names == {"ln_fwd_kernel", "gemm_kernel", "gemm3_kernel", "gemm4_kernel",
                     "attn_fwd_kernel", "ln_bwd_kernel",
                     "flush_kernel", "unembed_ce_kernel", "mean_reduce_kernel",
                     "attn_bwd_kernel", "token_scatter_kernel"}
    for s in specs:
        assert list(s["signature"]) == list(s["fn"].arg_names), s["name"]
        for arg, ty in s["signature"].items():
            if ty == "constexpr":
                assert arg in s["constexprs"]
            else:
                assert ty in ("*fp32", "*i64", "*i32", "i32", "i64", "fp32", "i1"), (s["name"], arg, ty)
        blocks = [v for k, v in s["constexprs"].items() if k.startswith("BLOCK_")]
        assert all(isinstance(b, int) and b & (b - 1) == 0 for b in blocks), s["name"]
        cx = s["constexprs"]
        if s["fn"].__name__ == "unembed_ce_kernel":            # tl.dot operands >= 16 on a GPU
            assert min(v for k, v in cx.items() if k.startswith("BLOCK_")) >= 16
        if s["fn"].__name__ in ("gemm_kernel", "gemm2_kernel", "gemm3_kernel", "gemm4_kernel"):   # (sums: no dot)
            for g in ([""] if s["fn"].__name__ == "gemm_kernel" else ["0", "1", "2", "3"][:int(s["fn"].__name__[4])]):
                if not cx[f"A_ONES{g}"]:
                    assert min(cx[f"BLOCK_{d}{g}"] for d in "RNK") >= 16, s["name"]
