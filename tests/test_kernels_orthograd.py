"""Orthograd in the fused optimizer (kernels/optimizer.py: the sums pass + the element kernel's ORTHO
variant) against grokfast.optim.orthogonalize + GrokfastFilter + AdamW run in float64.

The flat buffer holds tensors of sizes SEGMENTS: tiny ones (2 and 3 elements), one that straddles a
block boundary (BLOCK + 5: two blocks, the second starting off a multiple of BLOCK), and one whose gradient
is nearly parallel to its weights (sin of the angle about 2e-3: the cancellation the three-sum form of
|g' - c w| must survive).
M = 2 models with their own lr, wd, alpha, lamb in one launch; fresh random weights and gradients (elements
spread over four orders of magnitude, some exactly zero). State the kernels must write before reading
starts as NaN: the EMA state, the MA ring and window sum, and orthograd's partial sums.
Kernels run under TRITON_INTERPRET=1 on the CPU (conftest.py) or on a CUDA GPU when there is one.
"""
import hashlib
import math

import pytest
import torch

from grokfast.backends import interpreter_on
from grokfast.config import TrainConfig
from grokfast.optim import AdamW, GrokfastFilter
from grokfast.kernels import KernelConfigError
from grokfast.kernels.optimizer import BLOCK, FusedOptimizer, step_launches

DEVICE = "cuda" if torch.cuda.is_available() and not interpreter_on() else "cpu"
SEGMENTS = [3, BLOCK + 5, 2, 700]
PARALLEL = 3                       # the tensor whose gradient is nearly parallel to its weights
N = sum(SEGMENTS)
OFFS = [sum(SEGMENTS[:i]) for i in range(len(SEGMENTS) + 1)]
HYPER = dict(lr=[1e-2, 3e-3], wd=[0.5, 0.0], alpha=[0.9, 0.6], lamb=[2.0, 5.0])


def pieces(x):
    """{t<i>: x[..., tensor i]} for the reference's per-tensor dicts."""
    return {f"t{i}": x[..., OFFS[i]:OFFS[i + 1]] for i in range(len(SEGMENTS))}


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def gradient(theta, gen):
    """Fresh random float32 gradients [M, N]; tensor PARALLEL's is 3 w + noise of 2e-3 * 3 |w| (theta: w, the
    initial weights in the tests that step more than once: the current ones would make the test's own input
    depend on the float32 roundings of earlier steps, amplified by 1 / sin)."""
    M = theta.shape[0]
    scale = torch.exp(torch.empty(M, N).uniform_(math.log(1e-4), 0.0, generator=gen))
    g = torch.randn(M, N, generator=gen) * scale
    g[:, ::53] = 0.0
    a, b = OFFS[PARALLEL], OFFS[PARALLEL + 1]
    w = theta[:, a:b].cpu()
    noise = torch.randn(M, b - a, generator=gen)
    g[:, a:b] = 3 * w + 6e-3 * noise * w.norm(dim=1, keepdim=True) / noise.norm(dim=1, keepdim=True)
    return g.float()


def make(kind, M, window, gen):
    hp = {k: v[:M] for k, v in HYPER.items()}
    opt = FusedOptimizer(M, N, **hp, beta1=0.9, beta2=0.98, eps=1e-8, warmup=3, grokfast=kind, window=window,
                         orthograd=True, segments=SEGMENTS, device=DEVICE)
    # poison what the kernels must write before they read
    if opt.ema is not None:
        opt.ema.fill_(float("nan"))
    if opt.ring is not None:
        opt.ring.fill_(float("nan"))
        opt.ma_sum.fill_(float("nan"))
    opt._part.fill_(float("nan"))
    theta = torch.randn(M, N, generator=gen).to(DEVICE)
    return opt, theta, hp


@pytest.mark.parametrize("kind", ["none", "ema", "ma"])
def test_matches_float64_reference(kind):
    """Parameters, AdamW moments after 1 and 5 steps, per model. Bounds (relative to the max of each tensor):
      - first moment after step 1: m = (1 - beta1) g'', so this is g'' itself: <= 1e-6 per tensor with no filter
        (float64 sums and formula, rounded once to float32, then one float32 product: measured 6e-8, the nearly
        parallel tensor included). With a filter the kernel forms g' in float32 (one or two roundings, 2^-24
        each) where the reference runs in float64, and the nearly parallel tensor amplifies that by 1/sin ~ 500:
        <= 1e-4 there (measured 3.6e-5; the second moment 6.7e-5 against twice the bound), <= 1e-6 elsewhere
        (measured 1.4e-7);
      - after 5 steps (MA window 3: fills, recomputes, moves) moments <= 2e-5 (tests/test_kernels_optimizer.py's
        float32 storage bound; measured 3.5e-7) and parameters <= 2e-5 (measured 1.6e-7), tensor PARALLEL left
        out: there the two runs' weights differ by their float32 roundings and g' - c w amplifies a change
        of w or g' by c / sin (~500), and AdamW's m / sqrt(v) amplifies it again on the elements where g'' is
        small: that measures the problem's conditioning, not the kernel (measured up to 1e-3 on its moments);
      - parameters <= 1e-6 after 1 step (one rounding of theta; measured 5e-8)."""
    gen = torch.Generator().manual_seed({"none": 1, "ema": 2, "ma": 3}[kind])
    M, window = 2, 3
    opt, theta, hp = make(kind, M, window, gen)
    refs = []
    for m in range(M):
        cfg = TrainConfig(lr=hp["lr"][m], wd=hp["wd"][m], alpha=hp["alpha"][m], lamb=hp["lamb"][m], beta1=0.9,
                          beta2=0.98, eps=1e-8, warmup=3, grokfast=kind, window=window, orthograd=True)
        p = {k: v.double().cpu().clone() for k, v in pieces(theta[m]).items()}
        refs.append((p, AdamW(p, cfg), GrokfastFilter.from_config(cfg)))
    theta0 = theta.clone()
    for step in range(1, 6):
        g = gradient(theta0, gen)
        opt.step(theta, g.to(DEVICE))
        for m, (p, adam, filt) in enumerate(refs):
            adam.step(filt.apply({k: v.double() for k, v in pieces(g[m]).items()}))
        if step not in (1, 5):
            continue
        for m, (p, adam, filt) in enumerate(refs):
            got_p, got_m, got_v = pieces(theta[m]), pieces(opt.mom[m]), pieces(opt.vel[m])
            for i, k in enumerate(p):
                if step == 1:
                    bound = 1e-4 if i == PARALLEL and kind != "none" else 1e-6
                elif i == PARALLEL:
                    continue
                else:
                    bound = 2e-5
                assert rel(got_m[k], adam.m[k]) <= bound, (step, m, k, rel(got_m[k], adam.m[k]))
                assert rel(got_v[k], adam.v[k]) <= 2 * bound, (step, m, k)
            keep = [k for i, k in enumerate(p) if step == 1 or i != PARALLEL]
            ref = torch.cat([p[k] for k in keep])
            got = torch.cat([got_p[k] for k in keep])
            assert rel(got, ref) <= (1e-6 if step == 1 else 2e-5), (step, m, rel(got, ref))
    assert not torch.isnan(theta).any()
    assert (theta - theta0).abs().max() > 1e-3


def test_orthogonal_and_rescaled():
    """What orthograd is, checked on the kernel's own output: after one step with beta1 = 0 and no weight
    decay the first moment is g'' itself, and per tensor g'' . w = 0 (<= 1e-6 |g''| |w|: float32 storage
    of g'') and |g''| = |g| (<= 1e-6 relative); tensor PARALLEL's raw gradient was far from orthogonal."""
    gen = torch.Generator().manual_seed(11)
    opt = FusedOptimizer(2, N, lr=1e-3, wd=0.0, beta1=0.0, orthograd=True, segments=SEGMENTS, device=DEVICE)
    theta = torch.randn(2, N, generator=gen).to(DEVICE)
    w0 = theta.clone().double().cpu()
    g = gradient(theta, gen)
    opt.step(theta, g.to(DEVICE))
    for m in range(2):
        for i, (gpp, w, graw) in enumerate(zip(pieces(opt.mom[m].double().cpu()).values(), pieces(w0[m]).values(),
                                               pieces(g[m].double()).values())):
            assert abs(gpp @ w) <= 1e-6 * gpp.norm() * w.norm(), i
            assert abs(gpp.norm() / graw.norm() - 1) <= 1e-6, i
        w, graw = pieces(w0[m])[f"t{PARALLEL}"], pieces(g[m].double())[f"t{PARALLEL}"]
        assert abs(graw @ w) > 0.99 * graw.norm() * w.norm()


def test_same_bits_in_any_program_order():
    """Two steps of EMA and three of MA (window 2: fills, recomputes, moves) with orthograd, two models: reversed
    and shuffled program order give exactly grid order's bits (parameters, moments, filter state)."""
    if not interpreter_on():
        pytest.skip("program order is chosen by the interpreter")
    from grokfast.kernels.interpret_order import program_order

    def run():
        out = []
        for kind, steps in (("ema", 2), ("ma", 3)):
            gen = torch.Generator().manual_seed(5)
            opt, theta, _ = make(kind, 2, 2, gen)
            theta0 = theta.clone()
            for _ in range(steps):
                opt.step(theta, gradient(theta0, gen))
            out += [theta, opt.mom, opt.vel, opt.ema if opt.ema is not None else opt.ma_sum]
        return out

    base = run()
    for mode, seed in (("reversed", 0), ("shuffled", 1)):
        with program_order(mode, seed):
            other = run()
        assert all(torch.equal(a, b) for a, b in zip(base, other)), mode


def test_zero_weights_leave_the_gradient_as_it_is():
    """With w = 0, c = 0 and r = 1 exactly: the tensor-blocked ORTHO pass gives the bits of the default pass
    (same filter, same AdamW), for every filter."""
    gen = torch.Generator().manual_seed(3)
    for kind in ("none", "ema", "ma"):
        a = FusedOptimizer(2, N, lr=[1e-2, 3e-3], wd=0.5, grokfast=kind, window=2, orthograd=True,
                           segments=SEGMENTS, device=DEVICE)
        b = FusedOptimizer(2, N, lr=[1e-2, 3e-3], wd=0.5, grokfast=kind, window=2, device=DEVICE)
        g = torch.randn(2, N, generator=gen).to(DEVICE)
        pa, pb = torch.zeros(2, N, device=DEVICE), torch.zeros(2, N, device=DEVICE)
        a.step(pa, g)
        b.step(pb, g)
        assert torch.equal(pa, pb) and torch.equal(a.mom, b.mom) and torch.equal(a.vel, b.vel), kind


# The default (no orthograd) path's bits before orthograd existed (commit ef26000, interpreter): sha256 of
# parameters, moments, filter state and the divergence flags after 3 steps, per (filter, TRACK).
BEFORE = {("none", 0): "44c18d6886e4410f", ("none", 1): "ac105c08ffdcffbd", ("ema", 0): "d1fe4eb2bf3ed420",
          ("ema", 1): "8d4350e0144c7bf7", ("ma", 0): "cbb4724f124526d8", ("ma", 1): "ee0fd1d2f5f07cc1"}


@pytest.mark.parametrize("kind", ["none", "ema", "ma"])
def test_default_path_has_the_bits_of_before(kind):
    if not interpreter_on() or DEVICE != "cpu":
        pytest.skip("the recorded digests are the interpreter's")
    for track in (0, 1):
        gen = torch.Generator().manual_seed(2026)
        M, n = 2, BLOCK + 301
        theta = torch.randn(M, n, generator=gen)
        opt = FusedOptimizer(M, n, lr=[1e-2, 3e-3], wd=[0.5, 0.1], alpha=[0.9, 0.8], lamb=[2.0, 5.0], warmup=2,
                             grokfast=kind, window=2)
        loss, bad = torch.tensor([1.0, float("nan")]), torch.full((M,), -1, dtype=torch.int64)
        for _ in range(3):
            g = torch.randn(M, n, generator=gen) * torch.rand(M, n, generator=gen)
            opt.step(theta, g, track=(loss, bad) if track else None)
        h = hashlib.sha256()
        for t in (theta, opt.mom, opt.vel, opt.ema, opt.ring, opt.ma_sum, bad):
            if t is not None:
                h.update(t.numpy().tobytes())
        assert h.hexdigest()[:16] == BEFORE[(kind, track)], (kind, track)


def test_launches_and_bad_input(monkeypatch):
    """A step with orthograd is three launches (scalars, sums, element), a training step's optimizer two;
    missing or wrong segments are one clear error before any work."""
    from grokfast.kernels import optimizer as O
    calls = []
    real = O.launch
    monkeypatch.setattr(O, "launch", lambda kernel, grid, args, cx, **k: (
        calls.append((kernel.fn.__name__, cx.get("SUMS"))), real(kernel, grid, args, cx, **k)))
    opt = FusedOptimizer(1, 10, lr=1e-3, wd=1.0, orthograd=True, segments=[4, 6], device=DEVICE)
    opt.step(torch.ones(1, 10, device=DEVICE), torch.ones(1, 10, device=DEVICE))
    assert calls == [("adamw_scalars_kernel", None), ("grokfast_adamw_kernel", 1), ("grokfast_adamw_kernel", 0)]
    assert step_launches(True) == 2 and step_launches(False) == 1
    for segs in (None, [4, 5], [0, 10]):
        with pytest.raises(KernelConfigError, match="orthograd needs segments"):
            FusedOptimizer(1, 10, lr=1e-3, wd=1.0, orthograd=True, segments=segs)
    with pytest.raises(KernelConfigError, match="share orthograd"):
        FusedOptimizer.from_configs([TrainConfig(orthograd=True), TrainConfig()], 10, segments=[10])


def test_bench_counts_the_sums_launch(monkeypatch):
    """grokfast bench's launch count (bench.fused_launches) adds the sums pass with orthograd and leaves the default
    count as it was (the forward/backward's own count stubbed: recording it is tested in test_kernels_model.py)."""
    from grokfast.bench import fused_launches, make_workload
    from grokfast.kernels import forward_backward as fb
    monkeypatch.setattr(fb, "launches_per_step", lambda *a: {"k": 11})
    monkeypatch.setattr(fb, "executed_flops", lambda *a: [])
    plain = fused_launches(make_workload("small", "cpu", p=7))
    ortho = fused_launches(make_workload("small", "cpu", p=7, orthograd=True))
    assert (plain["optimizer"], plain["total"]) == (1, 12) and (ortho["optimizer"], ortho["total"]) == (2, 13)


def test_step_is_capturable(monkeypatch):
    """What a CUDA graph needs, on a CPU: an orthograd step makes no host work outside its launches (no copy, no
    read of a device value; HostWork from test_kernels_paths.py), and replaying the recorded launches (the same
    buffers every step, RecordedGraph) gives the eager steps' bits."""
    from test_kernels_paths import HostWork, RecordedGraph
    gen = torch.Generator().manual_seed(8)
    opt, theta, _ = make("ema", 1, 2, gen)
    g = gradient(theta, gen).to(DEVICE)
    opt.step(theta, g)
    twin = FusedOptimizer(1, N, **{k: v[:1] for k, v in HYPER.items()}, warmup=3, grokfast="ema", orthograd=True,
                          segments=SEGMENTS, device=DEVICE)
    for name in ("mom", "vel", "ema", "counters"):
        getattr(twin, name).copy_(getattr(opt, name))
    theta2 = theta.clone()
    with HostWork() as hw:
        opt.step(theta, g)
    assert not {op for op in hw.ops if op in HostWork.COPIES}, hw.ops
    graph = RecordedGraph(lambda: twin.step(theta2, g))
    opt.step(theta, g)
    for _ in range(2):
        graph.replay()
    assert torch.equal(theta, theta2) and torch.equal(opt.mom, twin.mom) and torch.equal(opt.ema, twin.ema)
