"""The fused Grokfast + AdamW kernel against the reference formulas (grokfast.optim) run in float64.

Both sides get the same float32 gradient sequence (fresh random each step, elements spread over
six orders of magnitude, some exactly zero, plus a slow component so the filters matter); M models
with different lr, wd, alpha, lamb train in one launch. Bounds, per model:
  - parameters: max|theta_fused - theta_ref| / max|theta_ref| <= 1e-4 after 100 steps (the brief's bound);
    Tighter, from float32 storage: <= 1e-6 after 1 step (one rounding of theta, ~6e-8 relative, measured
    7e-8) and <= 2e-5 after 100 (the roundings accumulate; measured 2e-6).
  - AdamW moments and the EMA state: <= 2e-5 relative to their max (measured 1e-6 after 100 steps).
State the kernel must overwrite before reading (EMA before the first step, the MA ring before it
fills) starts as NaN, and a NaN guard region after every buffer must survive (masking past N).
The kernels run on DEVICE: a CUDA GPU when there is one, else the CPU under TRITON_INTERPRET=1 (see
conftest.py). Random inputs are drawn on the CPU and moved; references and comparisons run on the CPU.
"""
import math

import pytest
import torch

from grokfast.backends import interpreter_on
from grokfast.config import TrainConfig
from grokfast.optim import AdamW, GrokfastFilter

from grokfast.kernels.optimizer import BLOCK, SCALARS, FusedOptimizer

N = BLOCK + 477          # two programs per model, the second one partial
GUARD = 37
HYPER = dict(lr=[1e-3, 3e-3, 1e-2], wd=[1.0, 0.0, 0.1], alpha=[0.98, 0.9, 0.5], lamb=[2.0, 5.0, 0.5])

# Where the kernels run: the GPU when there is one (and the interpreter is off), else the CPU.
DEVICE = "cuda" if torch.cuda.is_available() and not interpreter_on() else "cpu"


def guarded(shape, fill):
    """A contiguous tensor of `shape` followed by a NaN guard region in the same storage."""
    n = math.prod(shape)
    store = torch.full((n + GUARD,), float("nan"), dtype=torch.float32, device=DEVICE)
    t = store[:n].view(*shape)
    t.fill_(fill)
    return t, store[n:]


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def gradients(steps, M, gen):
    scale = torch.exp(torch.empty(M, N).uniform_(math.log(1e-6), 0.0, generator=gen))
    scale[:, ::97] = 0.0                                   # some parameters never get a gradient
    slow = torch.randn(M, N, generator=gen)
    for _ in range(steps):
        yield ((0.5 * slow + torch.randn(M, N, generator=gen)) * scale).float()


@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("kind", ["none", "ema", "ma"])
def test_matches_reference_formulas(kind, M):
    gen = torch.Generator().manual_seed(1234 + M)
    hp = {k: torch.tensor(v[:M], dtype=torch.float32) for k, v in HYPER.items()}
    window = 3
    opt = FusedOptimizer(M, N, lr=hp["lr"], wd=hp["wd"], alpha=hp["alpha"], lamb=hp["lamb"], beta1=0.9,
                         beta2=0.98, eps=1e-8, warmup=10, grokfast=kind, window=window, device=DEVICE)
    # poison: state the kernel must write before it reads
    theta, guard = guarded((M, N), 0.0)
    theta.copy_(torch.randn(M, N, generator=gen))
    guards = [guard]
    for name in ("mom", "vel"):
        t, g = guarded((M, N), 0.0)
        setattr(opt, name, t)
        guards.append(g)
    if kind == "ema":
        opt.ema, g = guarded((M, N), float("nan"))
        guards.append(g)
    if kind == "ma":
        opt.ring, g = guarded((M, window, N), float("nan"))
        guards.append(g)
        opt.ma_sum = torch.full((M, N), float("nan"), dtype=torch.float64, device=DEVICE)
    theta0 = theta.clone()

    refs = []
    for m in range(M):
        cfg = TrainConfig(lr=hp["lr"][m].item(), wd=hp["wd"][m].item(), alpha=hp["alpha"][m].item(),
                          lamb=hp["lamb"][m].item(), beta1=0.9, beta2=0.98, eps=1e-8, warmup=10,
                          grokfast=kind, window=window)
        p = {"x": theta0[m].double().cpu().clone()}
        refs.append((p, AdamW(p, cfg), GrokfastFilter.from_config(cfg)))

    grads_f32 = torch.empty(M, N, device=DEVICE)
    for step, g in enumerate(gradients(100, M, gen), start=1):
        grads_f32.copy_(g)
        opt.step(theta, grads_f32)
        for m, (p, adam, filt) in enumerate(refs):
            adam.step(filt.apply({"x": g[m].double()}))
        if step in (1, 100):
            for m, (p, adam, filt) in enumerate(refs):
                assert not torch.isnan(theta[m]).any()
                assert rel(theta[m], p["x"]) <= 1e-4, (step, m)
                assert rel(theta[m], p["x"]) <= (1e-6 if step == 1 else 2e-5), (step, m)
                assert rel(opt.mom[m], adam.m["x"]) <= 2e-5, (step, m)
                assert rel(opt.vel[m], adam.v["x"]) <= 2e-5, (step, m)
                if kind == "ema":
                    assert rel(opt.ema[m], filt.ema["x"]) <= 2e-5, (step, m)
            assert opt.counters.tolist() == [step, 0 if kind == "none" else step]
    for g in guards:
        assert torch.isnan(g).all(), "the kernel wrote past the end of a buffer"
    # the run actually moved the parameters, differently per model
    assert (theta - theta0).abs().max() > 1e-3


def test_different_hyperparameters_are_independent():
    """Model 1 of a 2-model launch equals a 1-model launch with model 1's settings, bit for bit."""
    gen = torch.Generator().manual_seed(7)
    theta0 = torch.randn(2, N, generator=gen).to(DEVICE)
    gs = [g.to(DEVICE) for g in gradients(5, 2, gen)]
    both = FusedOptimizer(2, N, lr=[1e-3, 5e-3], wd=[0.5, 2.0], alpha=[0.9, 0.8], lamb=[1.0, 3.0], grokfast="ema",
                          device=DEVICE)
    one = FusedOptimizer(1, N, lr=5e-3, wd=2.0, alpha=0.8, lamb=3.0, grokfast="ema", device=DEVICE)
    a, b = theta0.clone(), theta0[1:].clone()
    for g in gs:
        both.step(a, g.contiguous())
        one.step(b, g[1:].contiguous())
    assert torch.equal(a[1], b[0])
    assert not torch.equal(a[0], a[1])


def test_bad_input_is_one_clear_error():
    from grokfast.kernels import KernelConfigError
    with pytest.raises(KernelConfigError, match="one per model"):
        FusedOptimizer(3, 10, lr=[1e-3, 2e-3], wd=1.0)
    with pytest.raises(KernelConfigError, match="grokfast"):
        FusedOptimizer(1, 10, lr=1e-3, wd=1.0, grokfast="sma")
    with pytest.raises(KernelConfigError, match="betas"):
        FusedOptimizer(1, 10, lr=1e-3, wd=1.0, beta2=1.0)
    with pytest.raises(KernelConfigError, match="share"):
        FusedOptimizer.from_configs([TrainConfig(), TrainConfig(window=5)], 10)
    opt = FusedOptimizer(1, 10, lr=1e-3, wd=1.0)
    with pytest.raises(ValueError, match=r"\[1, 10\]"):
        opt.step(torch.zeros(1, 11), torch.zeros(1, 11))


@pytest.mark.parametrize("betas", [(0.9, 0.98), (0.0, 0.999)])
def test_bias_corrections_are_exact_in_float64(betas):
    """At t = 1, 2, 10, 1000 (warm-up 3, two models): the step size lr_t / (1 - beta1^t) and 1 - beta2^t
    that the kernel uses are the float64 formula (with the float32 lr it stores) rounded once to
    float32: <= 2^-24 relative. The update itself, from theta = 0, wd = 0, no filter, is
    -step * mom / (sqrt(vel / (1 - beta2^t)) + eps) with mom, vel the kernel's own new moments: per
    element <= 4e-7 relative (a chain of at most six float32 roundings of 2^-24 each, the square root
    halving two of them; measured 2.0e-7), and the step size fitted by least squares over all elements
    (the per-element roundings average out) <= 1e-7 (2^-24 from rounding the step size, 2^-25 from
    rounding 1 - beta2^t under the square root; measured 5.3e-8). beta1 = 0 gives 1 - 0^t = 1.
    The old float32 1 - exp2(t log2 beta) fails all three at t = 1: 1 - beta2^t off by 9.5e-7 (0.98)
    and 1.3e-5 (0.999), the fitted step by 7e-7 and 6.4e-6."""
    gen = torch.Generator().manual_seed(99)
    M, warmup, b1, b2 = 2, 3, *betas
    lrs = [1e-3, 3e-2]
    opt = FusedOptimizer(M, N, lr=lrs, wd=0.0, beta1=b1, beta2=b2, eps=1e-8, warmup=warmup, device=DEVICE)
    for t in (1, 2, 10, 1000):
        theta, guard = guarded((M, N), 0.0)
        mom0 = 0.1 * torch.randn(M, N, generator=gen)
        vel0 = torch.empty(M, N).uniform_(0.5, 2.0, generator=gen)
        g = torch.randn(M, N, generator=gen)
        opt.mom, mom_guard = guarded((M, N), 0.0)
        opt.vel, vel_guard = guarded((M, N), 0.0)
        opt.mom.copy_(mom0)
        opt.vel.copy_(vel0)
        opt._scal.fill_(float("nan"))                       # the scalar kernel's outputs: poisoned
        opt._snap.fill_(-1)
        opt.counters.copy_(torch.tensor([t - 1, 0]))
        opt.step(theta, g.to(DEVICE))
        assert opt.counters.tolist() == [t, 0] and opt._snap.tolist() == [t, 0]
        for gd in (guard, mom_guard, vel_guard):
            assert torch.isnan(gd).all()
        bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t                 # Python floats: float64
        scal = opt._scal.double().cpu()
        assert abs(scal[4].item() / bc2 - 1) <= 2 ** -24, (t, scal[4].item(), bc2)
        assert scal[:4].tolist() == torch.tensor([b1, 1 - b1, b2, 1 - b2]).tolist()   # float32 roundings
        mom_ref = b1 * mom0.double() + (1 - b1) * g.double()
        vel_ref = b2 * vel0.double() + (1 - b2) * g.double() ** 2
        assert rel(opt.mom, mom_ref) <= 3e-7 and rel(opt.vel, vel_ref) <= 3e-7, t
        for m in range(M):
            lr = torch.tensor(lrs[m], dtype=torch.float32).item()    # the stored hyperparameter is float32
            step_ref = lr * min(1.0, t / warmup) / bc1
            step_k = scal[SCALARS + 2 * m].item()
            assert abs(step_k / step_ref - 1) <= 2 ** -24, (t, m, step_k, step_ref)
            assert scal[SCALARS + 2 * m + 1].item() == 1.0                            # wd = 0: no decay
            r = opt.mom[m].double().cpu() / ((opt.vel[m].double().cpu() / bc2).sqrt() + 1e-8)
            new = theta[m].double().cpu()
            assert ((new + step_ref * r).abs() <= 4e-7 * (step_ref * r).abs()).all(), (t, m)
            fitted = -(new * r).sum() / (r * r).sum()
            assert abs(fitted.item() / step_ref - 1) <= 1e-7, (t, m, fitted.item() / step_ref - 1)


def test_a_step_is_two_launches(monkeypatch):
    """FusedOptimizer.step launches exactly LAUNCHES Triton kernels, the scalar kernel first; it advances
    the counters (t always, c with a filter), with no host-side add."""
    from grokfast.kernels import optimizer as O
    calls = []

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            calls.append(self.kernel.fn.__name__)
            return self.kernel[grid]
    for name in ("adamw_scalars_kernel", "grokfast_adamw_kernel"):
        monkeypatch.setattr(O, name, Spy(getattr(O, name)))
    for kind, advance in (("ema", 1), ("none", 0)):
        calls.clear()
        opt = FusedOptimizer(1, 10, lr=1e-3, wd=1.0, grokfast=kind, device=DEVICE)
        opt.step(torch.zeros(1, 10, device=DEVICE), torch.ones(1, 10, device=DEVICE))
        assert calls == ["adamw_scalars_kernel", "grokfast_adamw_kernel"] and len(calls) == O.LAUNCHES
        assert opt.counters.tolist() == [1, advance]


def _snapshot(opt: FusedOptimizer) -> FusedOptimizer:
    """A new optimizer with opt's checkpointed state (what the steppers save: moments, ring, counters),
    its MA sum poisoned and then rebuilt from the ring, as the steppers' load_state_dict does."""
    new = FusedOptimizer(opt.M, opt.N, lr=opt.lr, wd=opt.wd, alpha=opt.alpha, lamb=opt.lamb, beta1=opt.beta1,
                         beta2=opt.beta2, eps=opt.eps, warmup=opt.warmup, grokfast=opt.kind, window=opt.window,
                         device=DEVICE)
    for name in ("mom", "vel", "ring", "counters"):
        getattr(new, name).copy_(getattr(opt, name))
    new.ma_sum.fill_(float("nan"))
    new.rebuild_ma_sum()
    return new


@pytest.mark.parametrize("window", [7, 1])
def test_ma_running_window_sum(window):
    """Grokfast MA with the running window sum over 25 steps (3.5 windows of 7), two models, against
    GrokfastFilter + AdamW in float64 on the same float32 gradients. The ring and the sum start as NaN
    (the kernel writes them before it reads them). Bounds: the ring equals the reference's last W
    gradients exactly; the window sum S (float64 sums of float32 values) <= 1e-12 relative to its max
    (float64 roundings at most; measured 0: exact at these gradients; a float32 S measures 2e-8);
    parameters <= 1e-6 after the first full window and <= 5e-6 after 25 steps, AdamW moments <= 5e-6
    (float32 storage of theta, m, v as in test_matches_reference_formulas; measured 1.6e-7, 4.9e-7 and
    3.1e-7). A resume from the checkpointed state after 11 steps (mid-cycle: the next slot is 4 of 7)
    with S rebuilt from the ring continues bit-identically for 6 more steps (with a float32 S the
    rebuilt sum differs from the running one in 2/3 of the elements, and so do some parameters)."""
    gen = torch.Generator().manual_seed(4321 + window)
    M, steps = 2, 25
    hp = dict(lr=[3e-3, 1e-2], wd=[0.5, 0.0], lamb=[2.0, 5.0])
    opt = FusedOptimizer(M, N, **hp, beta1=0.9, beta2=0.98, warmup=4, grokfast="ma", window=window,
                         device=DEVICE)
    opt.ring, ring_guard = guarded((M, window, N), float("nan"))
    opt.ma_sum = torch.full((M, N), float("nan"), dtype=torch.float64, device=DEVICE)
    theta0 = torch.randn(M, N, generator=gen)
    theta, guard = guarded((M, N), 0.0)
    theta.copy_(theta0)
    refs = []
    for m in range(M):
        cfg = TrainConfig(lr=hp["lr"][m], wd=hp["wd"][m], lamb=hp["lamb"][m], beta1=0.9, beta2=0.98, warmup=4,
                          grokfast="ma", window=window)
        p = {"x": theta0[m].double().clone()}
        refs.append((p, AdamW(p, cfg), GrokfastFilter.from_config(cfg)))
    resumed = None
    for step, g in enumerate(gradients(steps, M, gen), start=1):
        gd = g.to(DEVICE)
        opt.step(theta, gd)
        if resumed is not None:
            resumed[0].step(resumed[1], gd)
            assert torch.equal(resumed[1], theta), step
            assert torch.equal(resumed[0].ma_sum, opt.ma_sum), step
        if step == 11:
            resumed = (_snapshot(opt), theta.clone())
            assert torch.equal(resumed[0].ma_sum, opt.ma_sum)      # the rebuilt sum is the running one
        elif step == 17:
            resumed = None
        for m, (p, adam, filt) in enumerate(refs):
            adam.step(filt.apply({"x": g[m].double()}))
            if step >= window:
                assert torch.equal(opt.ring[m].double().cpu(), filt.ring["x"]), (step, m)
                assert rel(opt.ma_sum[m], filt.ring["x"].sum(0)) <= 1e-12, (step, m)
            if step == window:
                assert rel(theta[m], p["x"]) <= 1e-6, (step, m)
            if step == steps:
                assert rel(theta[m], p["x"]) <= 5e-6, (step, m)
                assert rel(opt.mom[m], adam.m["x"]) <= 5e-6 and rel(opt.vel[m], adam.v["x"]) <= 5e-6, m
    assert opt.counters.tolist() == [steps, steps]
    assert torch.isnan(guard).all() and torch.isnan(ring_guard).all()
    assert (theta.cpu() - theta0).abs().max() > 1e-3


# ---- FusedStepper: the fused backend in the trainer ---------------------------------------------

import dataclasses
import importlib.util
import types

import grokfast
from grokfast.config import ModelConfig
from grokfast.data import Task
from grokfast.model import Transformer, loss_and_grads_reference
from grokfast.backends import ReferenceStepper
from grokfast.kernels import stepper as stepper_mod

HAVE_FB = importlib.util.find_spec("grokfast.kernels.forward_backward") is not None


def _standin_fb():
    """Until kernels/forward_backward.py exists: its interface computed by the reference model (float32,
    autograd), so the stepper's plumbing (views, optimizer, state) is tested on its own."""
    def loss_and_grads_flat(cfg, flat, tokens, labels, grad_out=None, loss_out=None):
        model = Transformer(cfg)
        lay = stepper_mod.ParamLayout(cfg)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(lay.views(flat)[n][0])
        loss, grads = loss_and_grads_reference(model, tokens, labels)
        g = lay.flatten(grads)
        grad_out = g if grad_out is None else grad_out.copy_(g)
        loss_out = loss.float().reshape(1) if loss_out is None else loss_out.copy_(loss.float().reshape(1))
        return loss_out, grad_out
    return types.SimpleNamespace(supported=lambda cfg: None, loss_and_grads_flat=loss_and_grads_flat)


@pytest.fixture
def fb(monkeypatch):
    if not HAVE_FB:
        standin = _standin_fb()
        monkeypatch.setattr(stepper_mod, "_fb", lambda: standin)
    return stepper_mod._fb()


def tiny(layout="a b =", p=7, **kw):
    task = Task("x+y", p, 0.5, 0, layout)
    cfg = dataclasses.replace(ModelConfig(d_model=32, n_heads=2, d_head=16, d_mlp=64, **kw)).for_task(task)
    return task, cfg


def _fused_supported(cfg):
    why = stepper_mod.unsupported_reason(cfg)
    if why:
        pytest.skip(f"fused kernels do not support this config: {why}")


@pytest.mark.parametrize("kind", ["ema", "ma"])   # "none" runs in test_state_dict_keys_and_resume and check
def test_trainer_fused_matches_reference_and_is_deterministic(fb, kind):
    """grokfast.train(backend="fused") vs backend="reference" after 4 steps: every parameter within
    max|fused - ref| / max|ref| <= 1e-4 (both float32; they differ by the gradients' and the optimizer's
    rounding: measured 1.3e-6 with the real kernels); the train loss within 1e-5 relative; two fused runs
    are bit-identical (checked for one filter: the interpreter is slow)."""
    task, cfg = tiny()
    _fused_supported(cfg)
    kw = dict(steps=4, lr=3e-3, wd=1.0, warmup=2, grokfast=kind, window=2, eval_every=4, progress=False,
              log=lambda msg: None)
    backends = ["fused", "reference"] + (["fused"] if kind == "ma" else [])
    # fused on DEVICE (on a GPU: eager steps, then CUDA-graph replays); the reference on the CPU as always
    runs = [grokfast.train(task, cfg, backend=b, device=DEVICE if b == "fused" else "cpu", **kw) for b in backends]
    assert runs[0].backend == "fused" and runs[1].backend == "reference"
    fused, ref = (dict(r.model.named_parameters()) for r in runs[:2])
    for n in ref:
        assert rel(fused[n], ref[n]) <= 1e-4, (n, rel(fused[n], ref[n]))
        assert not torch.equal(ref[n].cpu(), Transformer(cfg).state_dict()[n]) or n.endswith(".b_in"), n
    lf, lr_ = runs[0].history[-1]["train_loss"], runs[1].history[-1]["train_loss"]
    assert abs(lf - lr_) <= 1e-5 * lr_
    if len(runs) == 3:
        again = dict(runs[2].model.named_parameters())
        for n in fused:
            assert torch.equal(fused[n], again[n]), n


@pytest.mark.parametrize("kind", ["none", "ema", "ma"])
def test_state_dict_keys_and_resume(fb, kind):
    """Same keys and shapes as the reference stepper; a reload continues the run bit for bit (for MA
    mid-cycle after the first window: saved at c = 4 with W = 3, so the next step moves the window sum
    rebuilt from the ring); the model's parameters are live views of the flat buffer."""
    task, cfg = tiny()
    _fused_supported(cfg)
    pre = 4 if kind == "ma" else 2
    tcfg = grokfast.TrainConfig(lr=1e-2, warmup=0, grokfast=kind, window=3)
    tok, lab = task.train.tokens, task.train.labels
    tok_d, lab_d = tok.to(DEVICE), lab.to(DEVICE)
    ref = ReferenceStepper(Transformer(cfg, seed=1), tcfg)          # the reference on the CPU
    model = Transformer(cfg, seed=1, device=DEVICE)
    fused = stepper_mod.FusedStepper(model, tcfg)
    for st, (t, l) in ((ref, (tok, lab)), (fused, (tok_d, lab_d))):
        for _ in range(pre):
            st.step(t, l)
    rs, fs = ref.state_dict(), fused.state_dict()
    assert sorted(rs) == sorted(fs)
    for k in rs:
        assert rs[k].shape == fs[k].shape and rs[k].dtype == fs[k].dtype, k
    assert int(fs["opt.t"]) == pre and int(fs["filter.count"]) == int(rs["filter.count"])
    # live views: the trainer's evaluate() reads the weights the kernels write
    assert model.embed.W_E.data_ptr() == fused.flat.data_ptr()
    saved = {k: v.clone() for k, v in fs.items()}
    fused.step(tok_d, lab_d)
    after3 = {k: v.clone() for k, v in fused.state_dict().items()}
    again = stepper_mod.FusedStepper(Transformer(cfg, seed=5, device=DEVICE), tcfg)
    again.load_state_dict(saved)
    again.step(tok_d, lab_d)
    resumed = again.state_dict()
    for k in after3:
        assert torch.equal(after3[k], resumed[k]), k
    # and a fused checkpoint loads into the reference stepper
    ref2 = ReferenceStepper(Transformer(cfg, seed=5), tcfg)
    ref2.load_state_dict({k: v.cpu() for k, v in saved.items()})
    assert torch.equal(ref2.model.embed.W_E, saved["model.embed.W_E"].cpu())


def test_fused_on_cpu_needs_the_interpreter(monkeypatch):
    from grokfast.backends import resolve_backend
    task, cfg = tiny()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(grokfast.ConfigError, match="TRITON_INTERPRET"):
        resolve_backend("fused", cfg, "cpu")
    assert resolve_backend("auto", cfg, "cpu")[0] == "reference"


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU-only: steps a CPU model, which needs the Triton interpreter")
def test_cpu_step_never_touches_cuda(fb, monkeypatch):
    """cuda_graph=True on a CPU model: no CUDA API is called."""
    task, cfg = tiny()
    _fused_supported(cfg)

    def no_cuda(*a, **k):
        raise AssertionError("a CPU run called a CUDA API")
    for name in ("synchronize", "CUDAGraph", "graph"):
        monkeypatch.setattr(torch.cuda, name, no_cuda)
    st = stepper_mod.FusedStepper(Transformer(cfg), grokfast.TrainConfig(), cuda_graph=True)
    tok, lab = task.train.tokens, task.train.labels
    for _ in range(stepper_mod.WARMUP_STEPS + 1):
        loss = st.step(tok, lab)
    assert loss.dtype == torch.float64 and loss.dim() == 0 and torch.isfinite(loss)


def test_graph_inputs_are_fed_once(fb, monkeypatch):
    """The graph's input feeding (on DEVICE) copies a batch only when it is new or was modified in place
    (full batch: the same tensors every step, no copy)."""
    task, cfg = tiny()
    _fused_supported(cfg)
    st = stepper_mod.FusedStepper(Transformer(cfg, device=DEVICE), grokfast.TrainConfig(), cuda_graph=True)
    tok, lab = task.train.tokens.to(DEVICE), task.train.labels.to(DEVICE)

    copies = []
    st._static = (torch.zeros_like(tok), torch.zeros_like(lab))
    monkeypatch.setattr(st._static[0], "copy_", lambda t: copies.append(t) or torch.Tensor.copy_(st._static[0], t))
    st._src = None
    tok2, lab2 = tok.clone(), lab.clone()
    st._feed(tok2, lab2)
    st._feed(tok2, lab2)
    assert len(copies) == 1 and torch.equal(st._static[0], tok2)
    tok2[0, 0] = (tok2[0, 0] + 1) % cfg.d_vocab      # in place: must be copied again
    st._feed(tok2, lab2)
    assert len(copies) == 2 and torch.equal(st._static[0], tok2)
    st._feed(tok2.clone(), lab2)                      # another tensor: copied
    assert len(copies) == 3


def test_kernels_loss_and_grads_contract(fb):
    """grokfast.loss_and_grads(..., backend="fused"): a float64 scalar loss and a gradient per
    state_dict name, against the float64 reference: loss <= 1e-5, each gradient <= 1e-4 relative
    (max-abs error over max-abs value; float32 kernels, measured ~3e-7). Strided inputs are accepted."""
    task, cfg = tiny(layout="a b")
    _fused_supported(cfg)
    model = Transformer(cfg, seed=3, device=DEVICE)
    tok, lab = task.train.tokens, task.train.labels           # strided views of the [n, 3] examples
    if DEVICE != "cpu":   # .to() of a strided view is contiguous: the same strides on DEVICE
        tok, lab = (torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=DEVICE).copy_(t) for t in (tok, lab))
    assert not tok.is_contiguous() and not lab.is_contiguous()
    loss, grads = grokfast.loss_and_grads(model, tok, lab, backend="fused")
    ref_loss, ref_grads = loss_and_grads_reference(Transformer(cfg, seed=3).double(), task.train.tokens,
                                                   task.train.labels)
    assert loss.dtype == torch.float64 and loss.dim() == 0
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * ref_loss.item()
    assert sorted(grads) == sorted(model.state_dict())
    for n, g in ref_grads.items():
        assert rel(grads[n], g) <= 1e-4, n
