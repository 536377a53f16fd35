"""StableMax cross-entropy in the fused loss kernel (loss "stablemax": kernels/unembed_loss.py, LOSS_MODE 1)
against the float64 reference (grokfast.model.stablemax_cross_entropy64), from the loss kernel alone to the
whole training step.

Kernels run on the GPU when there is one, else under the Triton interpreter (conftest.py); references are
float64 on the CPU; outputs are filled with NaN (or -1) first, so an entry no kernel writes fails. Every
input is drawn fresh from a seeded generator. Bounds are written next to each comparison.
"""
from __future__ import annotations

import copy

import pytest
import torch

import grokfast
from grokfast.backends import interpreter_on
from grokfast.config import ModelConfig, TrainConfig
from grokfast.kernels import KernelConfigError, mlp
from grokfast.kernels import forward_backward as fb
from grokfast.kernels.layout import ParamLayout
from grokfast.kernels.unembed_loss import cross_entropy, unembed_cross_entropy
from grokfast.model import loss_and_grads_reference, stablemax_cross_entropy64, stablemax_s

from test_kernels_model import _poisoned_workspace, make_model  # noqa: F401  (autouse: every workspace starts as NaN)

DEVICE = "cuda" if torch.cuda.is_available() and not interpreter_on() else "cpu"
INTERPRETED = DEVICE == "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not interpreter_on(),
                                reason="the fused kernels need a CUDA GPU or TRITON_INTERPRET=1")
U = 2.0 ** -24      # float32 unit roundoff


# --------------------------------------------------------------------------------------------------
# The loss kernel alone, on logits given exactly


def _regime(name, g, shape):
    """Fresh logits [M, B, P] of one regime, with labels [M, B]."""
    M, B, P = shape
    labels = torch.randint(0, P, (M, B), generator=g)
    if name == "positive large":            # s = x + 1: S of order P * 1e4
        logits = 100 + 1e4 * torch.rand(shape, generator=g)
    elif name == "negative large":          # s = 1 / (1 - x): tiny, s' = s^2 tinier
        logits = -(100 + 1e4 * torch.rand(shape, generator=g))
    elif name == "mixed":
        logits = 30 * torch.randn(shape, generator=g)
    elif name == "near zero":               # every s ~ 1, the loss ~ log P
        logits = 1e-3 * torch.randn(shape, generator=g)
    else:                                   # confident: the label far above, the rest far below (loss ~1e-7)
        logits = -(1e3 + 1e3 * torch.rand(shape, generator=g))
        logits.scatter_(2, labels.unsqueeze(-1), 1e4 + 1e4 * torch.rand((M, B, 1), generator=g))
    return logits, labels


def _reference(logits, labels):
    """Per-example loss log1p(R / s_y) and dlogits of the mean loss, float64, without cancellation."""
    l64 = logits.double()
    s = stablemax_s(l64)
    is_y = torch.zeros_like(s, dtype=torch.bool).scatter_(2, labels.unsqueeze(-1), True)
    s_y = s.gather(2, labels.unsqueeze(-1)).squeeze(-1)
    R = torch.where(is_y, 0.0, s).sum(-1)
    loss = torch.log1p(R / s_y)
    grad = torch.where(is_y, -R.unsqueeze(-1), s) / (s_y + R).unsqueeze(-1) / (1 + l64.abs()) / labels.shape[1]
    return loss, grad


REGIMES = ["positive large", "negative large", "mixed", "near zero", "confident"]


@pytest.mark.parametrize("regime", REGIMES)
def test_stablemax_loss_kernel_matches_float64(regime):
    """Both loss kernels (logits in memory; logits formed on chip as x @ I, exact products) against float64 on
    the same float32 logits. P = 13 is padded to BLOCK_P 16: a padded class counted as s(0) = 1 would move
    every loss. Bounds (unembed_loss's docstring, BLOCK_P 16, u = 2^-24): per-example loss within
    (log2 16 + 30) u = 34 u relative (measured <= 2.8 u), every dlogits element within (2 log2 16 + 16) u = 24 u
    relative (measured <= 4.8 u). The float64 formula is checked against autograd of stablemax_cross_entropy64
    where that does not cancel (all but the confident regime)."""
    g = torch.Generator().manual_seed(REGIMES.index(regime))
    M, B, P = 2, 24, 13
    logits, labels = _regime(regime, g, (M, B, P))
    ref_loss, ref_grad = _reference(logits, labels)
    if regime != "confident":
        z = logits.double().requires_grad_()
        for m in range(M):
            want = stablemax_cross_entropy64(z[m], labels[m])
            assert abs(want.item() - ref_loss[m].mean().item()) <= 1e-12 * want.item()
            want.backward()
        assert ((z.grad - ref_grad).abs() <= 1e-12 * ref_grad.abs().amax()).all()
    else:
        assert ref_loss.max() < 2e-6        # float32 log S - log s_y (ulp 1e-6 at log 1e4) would lose these
    for fused_unembed in (False, True):
        loss_ex = torch.full((M, B), float("nan"), device=DEVICE)
        correct = torch.full((M, B), -1, dtype=torch.int32, device=DEVICE)
        dlog = torch.full((M, B, P), float("nan"), device=DEVICE)
        if fused_unembed:
            eye = torch.eye(P).expand(M, P, P).contiguous().to(DEVICE)
            unembed_cross_entropy(logits.to(DEVICE), eye, None, labels.to(DEVICE), loss_ex, correct, dlog,
                                  loss="stablemax")
        else:
            cross_entropy(logits.to(DEVICE), labels.to(DEVICE), loss_ex, correct, dlog, loss="stablemax")
        loss_ex, correct, dlog = loss_ex.cpu().double(), correct.cpu(), dlog.cpu().double()
        assert ((loss_ex - ref_loss).abs() <= 34 * U * ref_loss).all(), ((loss_ex - ref_loss).abs() / ref_loss).max()
        assert ((dlog - ref_grad).abs() <= 24 * U * ref_grad.abs()).all(), \
            ((dlog - ref_grad).abs() / ref_grad.abs()).max()
        assert torch.equal(correct, (logits.argmax(-1) == labels).int())


def test_a_bad_loss_name_is_one_line_before_any_work():
    cfg = ModelConfig(d_model=16, n_heads=2, d_head=8, d_mlp=32, n_ctx=3, d_vocab=8, d_vocab_out=7)
    flat = torch.full((1, ParamLayout(cfg).numel), float("nan"), device=DEVICE)
    tokens, labels = torch.zeros(4, 3, dtype=torch.long, device=DEVICE), torch.zeros(4, dtype=torch.long, device=DEVICE)
    for call in (fb.loss_and_grads_flat, fb.eval_flat):
        with pytest.raises(KernelConfigError, match="loss must be one of ce, stablemax, got 'softmax'") as e:
            call(cfg, flat, tokens, labels, loss="softmax")
        assert "\n" not in str(e.value)
    assert not fb._CACHE            # no workspace was built


# --------------------------------------------------------------------------------------------------
# The whole forward/backward and evaluation


def test_fused_stablemax_loss_grads_and_eval_match_float64():
    """Two models in one launch (their own data), every split path taken: model 0 with O(1) logits, model 1
    with W_U x 40 (logits O(100), both signs). The mean loss within 1e-6 relative of float64 (the logits' float32
    error plus <= 34 u per example; measured <= 1.7e-7), every parameter's gradient within 1e-5 (norm-wise
    relative: float32 products as for cross-entropy, measured <= 9e-7); eval_flat's loss the same and its
    correct count exact."""
    cfg = ModelConfig(d_model=16, n_heads=2, d_head=8, d_mlp=32, n_ctx=3, d_vocab=12, d_vocab_out=11,
                      unembed_bias=True)
    models = [make_model(cfg, 1), make_model(cfg, 2, w_u_scale=40.0)]
    lay = ParamLayout(cfg)
    flat = torch.cat([lay.flatten(m.state_dict()) for m in models]).contiguous().to(DEVICE)
    g = torch.Generator().manual_seed(7)
    B = 37
    tokens = torch.randint(0, cfg.d_vocab, (2, B, cfg.n_ctx), generator=g)
    labels = torch.randint(0, cfg.d_vocab_out, (2, B), generator=g)
    loss = torch.full((2,), float("nan"), device=DEVICE)
    grad = torch.full_like(flat, float("nan"))
    ev_loss = torch.full((2,), float("nan"), device=DEVICE)
    ev_correct = torch.full((2,), -1, dtype=torch.int32, device=DEVICE)
    with mlp.split_thresholds(16):
        fb.loss_and_grads_flat(cfg, flat, tokens.to(DEVICE), labels.to(DEVICE), grad_out=grad, loss_out=loss,
                               loss="stablemax")
        fb.eval_flat(cfg, flat, tokens.to(DEVICE), labels.to(DEVICE), loss_out=ev_loss, correct_out=ev_correct,
                     loss="stablemax")
    assert torch.isfinite(grad).all()
    views = lay.views(grad.cpu())
    for m, model in enumerate(models):
        m64 = copy.deepcopy(model).double()
        ref_loss, ref_grads = loss_and_grads_reference(m64, tokens[m], labels[m], loss="stablemax")
        with torch.no_grad():
            logits = m64(tokens[m])
        if m == 1:
            assert logits.abs().max() > 50 and (logits < -10).any() and (logits > 10).any()
        for got in (loss[m], ev_loss[m]):
            assert abs(got.item() - ref_loss.item()) <= 1e-6 * ref_loss.item(), (got.item(), ref_loss.item())
        assert ev_correct[m].item() == (logits.argmax(-1) == labels[m]).sum().item()
        for name, g_ref in ref_grads.items():
            err = (views[name][m].double() - g_ref).norm()
            if name.endswith("attn.b_K"):     # exactly zero in exact arithmetic: rounding only
                assert err <= 1e-5 * ref_grads[name.replace("b_K", "W_K")].norm(), name
                continue
            assert err <= 1e-5 * g_ref.norm(), f"{name}: {err / g_ref.norm():.2e}"


@pytest.mark.skipif(not INTERPRETED, reason="reorders the Triton interpreter's programs")
@pytest.mark.parametrize("mode,seed", [("reversed", 0), ("shuffled", 3)])
def test_stablemax_loss_launches_keep_their_bits_in_any_program_order(mode, seed):
    """The loss launches with StableMax (training: loss, dlogits and dx = dlogits W_U^T; evaluation: loss and
    correct flags), 2 models x 3 example blocks, in reversed and shuffled program order give exactly the bits
    of grid order. (The rest of the step does not depend on the loss: test_kernels_paths reorders it.)"""
    from grokfast.kernels.interpret_order import program_order
    g = torch.Generator().manual_seed(seed)
    M, B, D, P = 2, 45, 16, 11
    x = (3 * torch.randn(M, B, D, generator=g)).to(DEVICE)
    W_U = (3 * torch.randn(M, D, P, generator=g)).to(DEVICE)
    b_U = torch.randn(M, P, generator=g).to(DEVICE)
    labels = torch.randint(0, P, (M, B), generator=g).to(DEVICE)

    def run():
        out = [torch.full((M, B), float("nan"), device=DEVICE), torch.full((M, B), -1, dtype=torch.int32, device=DEVICE),
               torch.full((M, B, P), float("nan"), device=DEVICE), torch.full((M, B, D), float("nan"), device=DEVICE)]
        unembed_cross_entropy(x, W_U, b_U, labels, out[0], out[1], out[2], dx=out[3], loss="stablemax")
        ev = [torch.full((M, B), float("nan"), device=DEVICE), torch.full((M, B), -1, dtype=torch.int32, device=DEVICE)]
        unembed_cross_entropy(x, W_U, b_U, labels, ev[0], ev[1], loss="stablemax")
        return out + ev

    base = run()
    with program_order(mode, seed):
        other = run()
    assert all(torch.isfinite(t.float()).all() for t in base)
    assert torch.equal(base[0], base[4]) and torch.equal(base[1], base[5])     # evaluation: the training launch's loss
    for a, b in zip(base, other):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------
# Training


def test_batched_stepper_trains_and_evaluates_on_its_loss():
    """M = 2 models in one launch trained on StableMax: the step's loss and evaluate()'s are StableMax's (float64
    reference within 1e-6 relative: float32 logits, measured <= 7.4e-8); models of different losses cannot share a
    launch, and sweeps group runs by loss. (A few fused training steps against float64: test_check's
    `grokfast check --loss stablemax --quick`.)"""
    from grokfast.kernels.batched import BatchedStepper
    from grokfast.sweep import batch_key, expand, SweepSpec
    task = grokfast.Task("x+y", 7, 0.6, seed=0)
    cfg = ModelConfig(d_model=16, n_heads=2, d_head=8, d_mlp=32).for_task(task)
    tcfgs = [TrainConfig(lr=lr, wd=1.0, warmup=0, loss="stablemax") for lr in (1e-3, 3e-3)]
    models = [grokfast.Transformer(cfg, seed=s, device=DEVICE) for s in (1, 2)]
    split = lambda s: (s.tokens.to(DEVICE), s.labels.to(DEVICE))          # noqa: E731
    st = BatchedStepper(models, tcfgs, split(task.train), split(task.test))
    step_loss = st.step().cpu()
    for m, model in enumerate(models):     # the step's loss: StableMax of the initial weights
        with torch.no_grad():
            want = stablemax_cross_entropy64(copy.deepcopy(model).cpu().double()(task.train.tokens), task.train.labels)
        assert abs(step_loss[m].item() - want.item()) <= 1e-6 * want.item()
    tr_loss, _, te_loss, _ = st.evaluate()
    lay = st.layout
    for m in range(2):
        model = grokfast.Transformer(cfg, seed=0).double()
        with torch.no_grad():
            for n, v in lay.views(st.flat).items():
                dict(model.named_parameters())[n].copy_(v[m].cpu())
            for got, s in ((tr_loss[m], task.train), (te_loss[m], task.test)):
                want = stablemax_cross_entropy64(model(s.tokens), s.labels).item()
                assert abs(got.item() - want) <= 1e-6 * want, (got.item(), want)
    mixed = [tcfgs[0], TrainConfig(lr=1e-3, wd=1.0, warmup=0)]
    with pytest.raises(KernelConfigError, match="must share loss"):
        BatchedStepper(models, mixed, split(task.train), split(task.test))
    runs = expand(SweepSpec(preset="small", grid={"loss": ["ce", "stablemax"]}, fixed={"steps": 10}))
    assert len({batch_key(r) for r in runs}) == 2
