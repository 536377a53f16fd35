"""The fused kernels under the conditions a GPU run has and tiny interpreter shapes lack.

- Split paths: real shapes split long contractions (split-K partial sums reduced in a fixed order,
  several split problems in one grouped launch, deferred to one launch per pass); tiny shapes do not
  unless mlp.split_thresholds lowers the threshold. LayerNorm also runs at a real size (16384 rows).
- Program order: a GPU runs the programs of a launch in any order, the interpreter in grid order;
  kernels.interpret_order runs them reversed and shuffled, and every result must keep its bits.
- Capture discipline: a CUDA graph replays the launches it recorded with the addresses it recorded. After
  the warm-up steps a step must build no descriptor table, keep every workspace address and make no
  host-device copy or sync; a graph of the step, replayed, must give the eager step's bits. On a CPU the
  graph is modelled by recording the step's launches once and replaying them (RecordedGraph).
- Integer widths: the Grokfast-MA ring is addressed past 2^31 elements once window x N >= 2^31.

Kernels run on the GPU when there is one, else under the Triton interpreter (conftest.py); references
are float64 on the CPU. Bounds are written next to each comparison.
"""
from __future__ import annotations

import copy

import pytest
import torch

from grokfast.backends import interpreter_on
from grokfast.config import ModelConfig, TrainConfig
from grokfast.kernels import _common, mlp, stepper as stepper_mod
from grokfast.kernels import forward_backward as fb
from grokfast.kernels.layernorm import layernorm_backward, layernorm_forward
from grokfast.kernels.layout import ParamLayout
from grokfast.kernels.optimizer import FusedOptimizer, grokfast_adamw_kernel
from grokfast.model import Transformer

DEVICE = "cuda" if torch.cuda.is_available() and not interpreter_on() else "cpu"
INTERPRETED = DEVICE == "cpu"

pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not interpreter_on(),
                                reason="the fused kernels need a CUDA GPU or TRITON_INTERPRET=1")
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="reorders the Triton interpreter's programs")


def rel(a, b) -> float:
    return ((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm()).item()


def _assert_step_matches_float64(model, lay, tokens, labels, loss, grad):
    """A fused step's loss within 1e-6 and every parameter's gradient within 1e-5 of the float64 reference (float32
    sums: ~1e-7..1e-6; attn.b_K, exactly zero in exact arithmetic, against W_K's norm); returns the reference loss."""
    from grokfast.model import loss_and_grads_reference
    loss_ref, grads_ref = loss_and_grads_reference(copy.deepcopy(model).double(), tokens.cpu(), labels.cpu())
    assert abs(loss.item() - loss_ref.item()) <= 1e-6 * abs(loss_ref.item())
    views = lay.views(grad.cpu())
    for name, g_ref in grads_ref.items():
        if name.endswith("attn.b_K"):      # exactly zero in exact arithmetic: rounding only
            assert (views[name][0].double() - g_ref).norm() <= 1e-5 * grads_ref[name.replace("b_K", "W_K")].norm()
            continue
        assert rel(views[name][0], g_ref) <= 1e-5, name
    return loss_ref


def every_path_cfg(**kw) -> ModelConfig:
    """Two layers with LayerNorm, GELU, attention and unembedding biases: every kernel of the step."""
    base = dict(n_layers=2, layernorm=True, act="gelu", attn_bias=True, unembed_bias=True, d_model=16,
                n_heads=2, d_head=8, d_mlp=32, n_ctx=4, d_vocab=12, d_vocab_out=11)
    base.update(kw)
    return ModelConfig(**base)


def model_and_data(cfg, B, seed):
    model = Transformer(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1] in ("b", "b_in", "b_out", "b_Q", "b_K", "b_V", "b_O", "b_U"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    tokens = torch.randint(0, cfg.d_vocab, (B, cfg.n_ctx), generator=g)
    labels = torch.randint(0, cfg.d_vocab_out, (B,), generator=g)
    return model, tokens.to(DEVICE), labels.to(DEVICE)


# --------------------------------------------------------------------------------------------------
# Real sizes and split paths


def test_layernorm_backward_at_real_size_with_deferred_splits():
    """16384 rows of d_model 128 (the power preset's full batch x positions in a sweep): the weight and bias
    gradients' partial sums over 1024 row blocks are split-K partials summed by the deferred flush (no
    launch of their own; without defer, two split column sums in one launch). Bound: 1e-5 relative against float64 (float32 sums of 16384 O(1) terms in a fixed order:
    ~sqrt(n) eps ~ 1e-6); dw and db are different quantities, so a shared split buffer fails by O(1)."""
    M, R, D = 1, 16384, 128
    g = torch.Generator().manual_seed(3)
    x = torch.randn(M, R, D, generator=g)
    w = 1 + 0.3 * torch.randn(M, D, generator=g)
    b = 0.3 * torch.randn(M, D, generator=g)
    dy = torch.randn(M, R, D, generator=g)
    dev = {k: v.to(DEVICE) for k, v in dict(x=x, w=w, b=b, dy=dy).items()}
    y = torch.full((M, R, D), float("nan"), device=DEVICE)
    mean, rstd = torch.full((M, R), float("nan"), device=DEVICE), torch.full((M, R), float("nan"), device=DEVICE)
    layernorm_forward(dev["x"], dev["w"], dev["b"], y, mean, rstd, 1e-5)
    with fb.record_launches() as rec:
        layernorm_backward(dev["x"], dev["w"], mean, rstd, dev["dy"], torch.empty_like(y),
                           torch.empty(M, D, device=DEVICE), torch.empty(M, D, device=DEVICE), defer=mlp.Deferred())
    assert [k.__name__ for k, *_ in rec] == ["ln_bwd_kernel"]
    with fb.record_launches() as rec:
        layernorm_backward(dev["x"], dev["w"], mean, rstd, dev["dy"], torch.empty_like(y),
                           torch.empty(M, D, device=DEVICE), torch.empty(M, D, device=DEVICE))
    assert [k.__name__ for k, *_ in rec] == ["ln_bwd_kernel", "gemm2_kernel"] + ["split_sum_kernel"] * 2
    assert rec[1][3]["SPLIT0"] and rec[1][3]["SPLIT1"], "the real size should split both column sums"

    x64 = x.double().requires_grad_()
    w64, b64 = w.double().requires_grad_(), b.double().requires_grad_()
    y64 = torch.nn.functional.layer_norm(x64, (D,), w64[0], b64[0], 1e-5)
    y64.backward(dy.double())
    assert rel(y, y64.detach()) <= 1e-5
    for defer in (mlp.Deferred(), None):
        dx = torch.full((M, R, D), float("nan"), device=DEVICE)
        dw, db = (torch.full((M, D), float("nan"), device=DEVICE) for _ in range(2))
        if defer is not None:
            defer.start()
        layernorm_backward(dev["x"], dev["w"], mean, rstd, dev["dy"], dx, dw, db, defer=defer)
        if defer is not None:
            defer.flush()
        assert rel(dx, x64.grad) <= 1e-5
        assert rel(dw, w64.grad) <= 1e-5, "dw"
        assert rel(db, b64.grad) <= 1e-5, "db"


def test_unembedding_with_the_final_layernorm_at_the_power_shape():
    """unembed_cross_entropy with the final LayerNorm in front at the power preset's step (512 examples,
    d_model 128, 97 classes: 16 row blocks of weight-gradient partials, eight 16-column passes) against float64:
    loss, xf, the input gradient through the LayerNorm and its weight and bias gradients (summed by the deferred
    flush) within 1e-5 relative (float32 sums of <= 512 O(1) terms: ~1e-6), from NaN-poisoned outputs; reversed
    program order gives the same bits."""
    from grokfast.kernels.interpret_order import program_order
    from grokfast.kernels.unembed_loss import unembed_cross_entropy
    M, B, D, P = 1, 512, 128, 97
    g = torch.Generator().manual_seed(9)
    x = 2 + 1.5 * torch.randn(M, B, D, generator=g)
    w = 1 + 0.3 * torch.randn(M, D, generator=g)
    b = 0.3 * torch.randn(M, D, generator=g)
    W_U = torch.randn(M, D, P, generator=g) / D ** 0.5
    labels = torch.randint(0, P, (1, B), generator=g)
    dev = {k: v.to(DEVICE) for k, v in dict(x=x, w=w, b=b, W_U=W_U, labels=labels).items()}

    def run():
        nan = lambda *shape: torch.full(shape, float("nan"), device=DEVICE)
        out = dict(loss=nan(M, B), xf=nan(M, B, D), dlog=nan(M, B, P), dx=nan(M, B, D), dw=nan(M, D), db=nan(M, D))
        correct = torch.full((M, B), -1, dtype=torch.int32, device=DEVICE)
        defer = mlp.Deferred()
        defer.start()
        unembed_cross_entropy(dev["x"], dev["W_U"], None, dev["labels"], out["loss"], correct, out["dlog"],
                              dx=out["dx"], ln=(dev["w"], dev["b"], 1e-5, out["xf"]),
                              ln_grads=(out["dw"], out["db"], defer))
        defer.flush()
        return out

    base = run()
    if INTERPRETED:
        with program_order("reversed"):
            again = run()
        assert all(torch.equal(base[k], again[k]) for k in base)
    x64, w64, b64 = (t.double().requires_grad_() for t in (x, w, b))
    xf64 = torch.nn.functional.layer_norm(x64, (D,), w64[0], b64[0], 1e-5)
    loss64 = torch.nn.functional.cross_entropy((xf64 @ W_U.double())[0], labels[0], reduction="none")
    loss64.mean().backward()
    assert rel(base["loss"], loss64.detach().unsqueeze(0)) <= 1e-5
    assert rel(base["xf"], xf64.detach()) <= 1e-5
    assert rel(base["dx"], x64.grad) <= 1e-5
    assert rel(base["dw"], w64.grad) <= 1e-5, "dw"
    assert rel(base["db"], b64.grad) <= 1e-5, "db"


def test_fused_layernorms_at_real_width_match_float64_and_keep_their_bits_in_any_order():
    """The LayerNorms fused into other launches (LayerNorm 2 in the attention forward and backward, the final
    one in the unembedding) on rows wider than one 16-column pass: d_model 48 (three passes in the attention
    backward's dz and in the unembedding's two dxf passes, which d_model 16 runs once; padded to BLOCK_D 64, as
    no preset width is), and every split path. The power preset's width (128, eight passes) gives the same
    result but takes 3 minutes here. Loss within 1e-6 and every gradient within 1e-5 of float64 (relative, per
    parameter: float32 kernels land near 1e-7..1e-6), from a NaN-poisoned workspace; reversed program order
    gives the same bits."""
    from grokfast.kernels.interpret_order import program_order
    cfg = every_path_cfg(d_model=48, n_heads=2, d_head=16, d_mlp=32)
    model, tokens, labels = model_and_data(cfg, 20, seed=8)
    lay = ParamLayout(cfg)
    flat = lay.flatten(model.state_dict()).to(DEVICE)
    counts = fb.launches_per_step(cfg, 1, 20)
    assert counts["ln_fwd_kernel"] == 2 and counts["ln_bwd_kernel"] == 2, counts   # LayerNorm 1 only
    outs = []
    with mlp.split_thresholds(16):
        for mode in (["forward", "reversed"] if INTERPRETED else ["forward"]):
            fb._CACHE.clear()
            fb.POISON_WORKSPACE = True
            try:
                loss = torch.full((1,), float("nan"), device=DEVICE)
                grad = torch.full_like(flat, float("nan"))
                with program_order(mode) if INTERPRETED else _no_order():
                    fb.loss_and_grads_flat(cfg, flat, tokens, labels, grad_out=grad, loss_out=loss)
            finally:
                fb.POISON_WORKSPACE = False
                fb._CACHE.clear()
            outs.append((loss, grad))
    assert all(torch.equal(outs[0][0], o[0]) and torch.equal(outs[0][1], o[1]) for o in outs[1:])
    loss_ref = _assert_step_matches_float64(model, lay, tokens, labels, *outs[0])
    eval_loss, _ = fb.eval_flat(cfg, flat, tokens, labels)      # the unembedding's LayerNorm without gradients
    assert abs(eval_loss.item() - loss_ref.item()) <= 1e-6 * abs(loss_ref.item())


def _no_order():
    import contextlib
    return contextlib.nullcontext()


def test_split_problems_of_one_launch_get_their_own_buffers():
    """Two split-K problems of one grouped launch with equal shapes must not share a partial-sum buffer
    (Deferred hands buffers out per request, not per finished reduction)."""
    d = mlp.Deferred()
    d.start()
    a, b = d.buffer((2, 1, 1, 16), DEVICE), d.buffer((2, 1, 1, 16), DEVICE)
    assert a.data_ptr() != b.data_ptr()
    d.flush()
    d.start()
    assert d.buffer((2, 1, 1, 16), DEVICE) is a and d.buffer((2, 1, 1, 16), DEVICE) is b


def test_split_step_matches_reference_and_builds_its_table_once():
    """The whole forward/backward with every split path taken (threshold lowered to 16 examples): gradients
    within 1e-5 of float64 (relative, per parameter: float32 kernels land near 1e-7..1e-6); three passes
    build one descriptor table and keep every split buffer and the table at the same address."""
    cfg = every_path_cfg()
    model, tokens, labels = model_and_data(cfg, 45, seed=4)
    lay = ParamLayout(cfg)
    flat = lay.flatten(model.state_dict()).to(DEVICE)
    grad, loss = torch.empty_like(flat), torch.empty(1, device=DEVICE)
    fb._CACHE.clear()
    with mlp.split_thresholds(16):
        fb.loss_and_grads_flat(cfg, flat, tokens, labels, grad_out=grad, loss_out=loss)
        ws = fb._workspace(cfg, 1, 45, flat.device, True)
        held = ws.deferred.held()
        assert len(held[0]) >= 4, "the threshold should make several weight gradients split"
        first = grad.clone()
        for _ in range(2):
            fb.loss_and_grads_flat(cfg, flat, tokens, labels, grad_out=grad, loss_out=loss)
        assert ws.deferred.tables_built == 1
        again = ws.deferred.held()
        assert [t.data_ptr() for t in again[0]] == [t.data_ptr() for t in held[0]]
        assert again[1][0] is held[1][0]
    assert torch.equal(grad, first)
    _assert_step_matches_float64(model, lay, tokens, labels, loss, grad)


# --------------------------------------------------------------------------------------------------
# Program order


@needs_interpreter
@pytest.mark.parametrize("mode,seed", [("reversed", 0), ("shuffled", 1)])
def test_every_kernel_of_the_step_gives_the_same_bits_in_any_program_order(mode, seed):
    """Forward, backward (every split path), evaluation and the optimizer (EMA and MA) in reversed and shuffled
    program order give exactly the bits of grid order."""
    from grokfast.kernels.interpret_order import program_order
    cfg = every_path_cfg()
    model, tokens, labels = model_and_data(cfg, 45, seed=5)
    lay = ParamLayout(cfg)
    flat0 = lay.flatten(model.state_dict()).to(DEVICE)

    def run():
        fb._CACHE.clear()
        flat = flat0.clone()
        outs = list(fb.loss_and_grads_flat(cfg, flat, tokens, labels))
        outs += list(fb.eval_flat(cfg, flat, tokens, labels))
        for kind in ("ema", "ma"):
            opt = FusedOptimizer(1, lay.numel, lr=1e-2, wd=0.5, grokfast=kind, window=2, device=DEVICE)
            p = flat.clone()
            for _ in range(3):            # MA: window fills, recomputes, then moves
                opt.step(p, outs[1])
            outs.append(p)
        return outs

    with mlp.split_thresholds(16):
        base = run()
        with program_order(mode, seed):
            other = run()
    for a, b in zip(base, other):
        assert torch.equal(a, b)


@needs_interpreter
@pytest.mark.parametrize("arch", ["sm_90"])
def test_other_architectures_tiles_meet_the_bounds_and_keep_their_bits_in_any_order(arch):
    """The tile table of another architecture (mlp.TILES: sm_90's 64 x 64 x 32 IEEE tiles) sums every contraction
    in another order than the default tiles: the whole forward/backward with every split path still lands within
    1e-5 of float64 per parameter (float32 sums: ~1e-7..1e-6), and shuffled program order keeps its bits."""
    from grokfast.kernels.interpret_order import program_order
    cfg = every_path_cfg()
    model, tokens, labels = model_and_data(cfg, 45, seed=7)
    lay = ParamLayout(cfg)
    flat = lay.flatten(model.state_dict()).to(DEVICE)
    outs = []
    with mlp.tile_table(arch), mlp.split_thresholds(16):
        for mode in ("forward", "shuffled"):
            fb._CACHE.clear()
            loss = torch.full((1,), float("nan"), device=DEVICE)
            grad = torch.full_like(flat, float("nan"))
            with program_order(mode, seed=2):
                fb.loss_and_grads_flat(cfg, flat, tokens, labels, grad_out=grad, loss_out=loss)
            outs.append((loss, grad))
        rec = fb._recorded_step(cfg, 1, 45)
    blocks = {v for *_, cx, _, _ in rec for k, v in cx.items() if k.startswith("BLOCK_K")}
    assert mlp.TILES[arch]["ieee"].k in blocks, blocks        # the table's tiles were planned
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    _assert_step_matches_float64(model, lay, tokens, labels, *outs[0])


@needs_interpreter
def test_program_order_mode_can_see_a_race():
    """The reordering is real: a kernel in which every program writes the same address ends with another
    value in reversed order (so the test above could fail)."""
    import triton
    import triton.language as tl
    from grokfast.kernels.interpret_order import program_order

    @triton.jit
    def last_writer(X):
        tl.store(X, tl.program_id(0))

    seen = []
    for mode in ("forward", "reversed"):
        x = torch.zeros(1, dtype=torch.int32)
        with program_order(mode):
            last_writer[(5,)](x)
        seen.append(int(x))
    assert seen == [4, 0]
    with pytest.raises(ValueError, match="program order"):
        with program_order("backwards"):
            pass


# --------------------------------------------------------------------------------------------------
# Capture discipline


class RecordedGraph:
    """A CPU stand-in for a CUDA graph: capturing records the launches the step makes (nothing runs);
    replay launches them again with the very arguments (addresses, sizes) recorded."""

    def __init__(self, run):
        with _common.record_launches() as rec:
            run()
        self.launches = rec

    def replay(self):
        for kernel, grid, args, cx, num_warps, num_stages in self.launches:
            _common.launch(kernel, grid, args, cx, num_warps, num_stages)    # (marked as a launch: HostWork skips its copies)


class HostWork(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every aten op a step makes outside kernel launches (inside a launch the interpreter copies
    the kernel's arguments, which a GPU launch does not)."""

    COPIES = {"aten._to_copy.default", "aten.lift_fresh.default", "aten._local_scalar_dense.default",
              "aten.copy_.default", "aten.item.default"}

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not _common.in_launch():
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


B_STEP = 33      # examples per step: > 2 x 16, so the lowered threshold splits the example sums


def _tables_built() -> int:
    return sum(ws.deferred.tables_built for ws in fb._CACHE.values() if getattr(ws, "deferred", None) is not None)


def _graphs(monkeypatch, graph: bool) -> None:
    """Steppers made after this capture their step (graph True) or stay eager. On a CPU a RecordedGraph stands
    in for the CUDA graph, and a capture that builds a descriptor table (a host-to-device copy) fails."""
    monkeypatch.setattr(stepper_mod, "_graphs_wanted", lambda device, cuda_graph: graph)
    if graph and INTERPRETED:
        def fake_capture(run, device):
            before = _tables_built()
            g = RecordedGraph(run)
            assert _tables_built() == before, "capture built a descriptor table (a host-to-device copy)"
            return g
        monkeypatch.setattr(stepper_mod, "capture_graph", fake_capture)


def _stepper(cfg, kind, monkeypatch, graph: bool):
    _graphs(monkeypatch, graph)
    model, tokens, labels = model_and_data(cfg, B_STEP, seed=6)
    tcfg = TrainConfig(lr=1e-2, wd=0.5, grokfast=kind, window=3, warmup=2)
    return stepper_mod.FusedStepper(model.to(DEVICE), tcfg), tokens, labels


@pytest.mark.parametrize("kind", ["ema", "ma"])
def test_captured_step_replays_the_eager_steps_bits(kind, monkeypatch):
    """After WARMUP_STEPS eager steps the step is captured once and replayed: five steps give the same
    parameters and optimizer state, bit for bit, as five eager steps (split paths on; one layer: the
    two-layer step's kernels are the subject of the other tests here)."""
    cfg = every_path_cfg(n_layers=1, layernorm=False, n_ctx=3)
    results = []
    with mlp.split_thresholds(16):
        for graph in (False, True):
            fb._CACHE.clear()
            st, tokens, labels = _stepper(cfg, kind, monkeypatch, graph)
            losses = [st.step(tokens, labels).item() for _ in range(5)]
            assert st.mode == ("cuda-graph" if graph else "eager")
            results.append((losses, {k: v.clone() for k, v in st.state_dict().items()}))
            if graph and INTERPRETED and kind == "ema":
                # the graph reads the descriptor table it was captured with: the stepper holds it, so calls with
                # other outputs that push it out of the kernels' table cache cannot free it
                tab = next(a["TAB"] for k, g, a, *_ in st._graph.launches if k.__name__ == "flush_kernel")
                ws = fb._workspace(cfg, 1, B_STEP, torch.device(DEVICE), True)
                outs = [torch.empty_like(st.flat) for _ in range(mlp.Deferred.TABLE_CACHE + 1)]   # alive: new addresses
                for out in outs:
                    fb.loss_and_grads_flat(cfg, st.flat, tokens, labels, grad_out=out)
                assert all(hit[0] is not tab for hit in ws.deferred._tables.values())
                assert st._keep[1][1][0] is tab
    (l0, s0), (l1, s1) = results
    assert l0 == l1
    assert s0.keys() == s1.keys() and all(torch.equal(s0[k], s1[k]) for k in s0)


def test_captured_step_fed_new_batches_uses_their_token_index(monkeypatch):
    """Minibatch training: a captured step fed other batches of the same shape replays with each batch's
    token-scatter index (rebuilt in place when the batch is copied into the graph's buffer, so the graph's
    addresses hold): the same losses and parameters, bit for bit, as eager steps on the same batches."""
    cfg = every_path_cfg(n_layers=1, layernorm=False, n_ctx=3)
    results = []
    for graph in (False, True):
        fb._CACHE.clear()
        st, tokens, labels = _stepper(cfg, "ema", monkeypatch, graph)
        g = torch.Generator().manual_seed(9)
        batches = [(tokens, labels)] * stepper_mod.WARMUP_STEPS + [
            (torch.randint(0, cfg.d_vocab, tuple(tokens.shape), generator=g).to(DEVICE), labels) for _ in range(2)]
        losses = [st.step(t, lab).item() for t, lab in batches]
        assert st.mode == ("cuda-graph" if graph else "eager")
        results.append((losses, st.flat.clone()))
    assert results[0][0] == results[1][0] and torch.equal(results[0][1], results[1][1])


def test_steps_after_warm_up_make_no_table_no_copy_and_keep_addresses(monkeypatch):
    """Eager steps after the warm-up (what a capture records): no descriptor table built, no host-to-device
    copy, no read of a device value (aten ops outside kernel launches), every workspace buffer where it was."""
    cfg = every_path_cfg()
    with mlp.split_thresholds(16):
        fb._CACHE.clear()
        st, tokens, labels = _stepper(cfg, "ma", monkeypatch, graph=False)
        for _ in range(stepper_mod.WARMUP_STEPS):
            st.step(tokens, labels)
        ws = fb._workspace(cfg, 1, B_STEP, torch.device(DEVICE), True)
        tables = ws.deferred.tables_built
        addresses = {k: v.data_ptr() for k, v in vars(ws).items() if isinstance(v, torch.Tensor)}
        bufs = [b.data_ptr() for b in ws.deferred.held()[0]]
        with HostWork() as hw:
            for _ in range(2):
                st._run(tokens, labels)     # the step a graph records (step() adds the returned loss's copy)
        assert ws.deferred.tables_built == tables
        assert {k: v.data_ptr() for k, v in vars(ws).items() if isinstance(v, torch.Tensor)} == addresses
        assert [b.data_ptr() for b in ws.deferred.held()[0]] == bufs
    copies = sorted({op for op in hw.ops if op in HostWork.COPIES})
    assert copies == [], f"host work in the step: {copies}"


def test_epoch_minibatches_gathered_in_the_graph_are_the_hosts_batches_and_resume_exactly(monkeypatch):
    """Minibatches "epoch" on the device (kernels/batch_draw.py gather_epoch_batch from an EpochRing of E = 2 epochs):
    29 examples in batches of 12, 12 and a short 5, over 9 steps (three epochs, two chunks; graphs captured for both
    sizes). Every step's gathered tokens and labels equal, bit for bit, the batch grokfast.batches.epoch_batch gives;
    a stepper resumed from step 7's checkpoint (mid-epoch, mid-chunk) gathers the same batches and ends with the same
    state, bit for bit; the float64 reference stepper on the same orders gives each step's loss within 1e-4 relative
    (float32 against float64, as tests/test_fused_step.py). (rng "stream" differs only in the host's orders:
    tests/test_batch_draw.py checks them against EpochOrder through the ring, and the train-loop test runs them.)"""
    from grokfast.backends import ReferenceStepper
    from grokfast.batches import epoch_batch, epoch_orders
    cfg = every_path_cfg(n_layers=1, layernorm=False, n_ctx=3)
    n, bs, steps, resume_at = 29, 12, 9, 7
    tcfg = TrainConfig(lr=1e-2, wd=0.5, grokfast="ema", warmup=2, batch_size=bs, minibatches="epoch", seed=4)

    def orders():      # a fresh host source per stepper, as a resumed run makes one
        return epoch_orders(n, tcfg)
    expected = lambda s: epoch_batch(n, tcfg, s)      # noqa: E731
    _graphs(monkeypatch, True)
    fb._CACHE.clear()
    model, tokens, labels = model_and_data(cfg, n, seed=6)
    ref = ReferenceStepper(copy.deepcopy(model).double(), tcfg)
    ref.bind(tokens.cpu(), labels.cpu(), epochs=orders())

    def run(st, first, last):
        for s in range(first, last):
            st.train_step(s)
            rows = st._ring.rows(s)
            tok, lab, _ = st._batches[rows]
            idx = expected(s).to(DEVICE)
            assert rows == idx.numel() and torch.equal(tok, tokens[idx]) and torch.equal(lab, labels[idx]), s
            yield s, st.loss[0].item()

    st = stepper_mod.FusedStepper(model.to(DEVICE), tcfg)
    st.bind(tokens, labels, epochs=orders(), epochs_ahead=2)
    at_resume = None
    for s, loss in run(st, 0, steps):
        l64 = ref.train_step(s).item()
        assert abs(loss - l64) <= 1e-4 * l64, (s, loss, l64)
        if s + 1 == resume_at:
            at_resume = {k: v.clone() for k, v in st.state_dict().items()}
    assert st.mode == "cuda-graph" and sorted(st._bound_graphs) == [5, 12] and st._ring.uploads == 3

    resumed = stepper_mod.FusedStepper(Transformer(cfg, seed=1).to(DEVICE), tcfg)
    resumed.load_state_dict(at_resume)
    resumed.bind(tokens, labels, epochs=orders(), epochs_ahead=2)
    list(run(resumed, resume_at, steps))
    a, b = st.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_epoch_minibatches_refuse_a_missing_order_or_step_before_any_launch():
    """One line each, before any kernel runs: bind without the epochs' orders (both steppers), train_step without
    the step or with a step the optimizer's counter is not at (a resume that passed the wrong step), orders that
    do not index the split."""
    from grokfast.backends import ReferenceStepper
    from grokfast.batches import epoch_orders
    from grokfast.config import ConfigError
    from grokfast.kernels.errors import KernelConfigError
    cfg = every_path_cfg(n_layers=1, layernorm=False, n_ctx=3)
    tcfg = TrainConfig(batch_size=12, minibatches="epoch")
    model, tokens, labels = model_and_data(cfg, 29, seed=6)
    with pytest.raises(ConfigError, match="bind needs the epochs' orders"):
        ReferenceStepper(copy.deepcopy(model), tcfg).bind(tokens, labels)
    st = stepper_mod.FusedStepper(model.to(DEVICE), tcfg)
    with pytest.raises(KernelConfigError, match="bind needs the epochs' orders"):
        st.bind(tokens, labels)
    st.bind(tokens, labels, epochs=epoch_orders(29, tcfg))
    with pytest.raises(KernelConfigError, match="train_step\\(step\\) needs the steps done"):
        st.train_step()
    with pytest.raises(KernelConfigError, match="train_step\\(3\\) but the optimizer has done 0 steps"):
        st.train_step(3)
    st.bind(tokens, labels, epochs=lambda first, count: epoch_orders(29, tcfg)(first, count) + 1)
    with pytest.raises(KernelConfigError, match="must index the 29 examples, got values in \\[1, 29\\]"):
        st.train_step(0)
    assert int(st.opt.counters[0]) == 0 and st.mode == "eager"


def _train_fused(tmp_path, preset_name, graph: bool, monkeypatch, hook=None, **train):
    """grokfast.train as `grokfast train --preset P --backend fused` runs it (the preset's training settings:
    warm-up, minibatches; progress bar, run directory, evaluations and checkpoints), on a model and task
    sized for the interpreter; on a CPU a RecordedGraph stands in for the CUDA graph. hook: on_step."""
    import dataclasses
    import grokfast
    from grokfast.config import preset as get_preset
    _graphs(monkeypatch, graph)
    pre = get_preset(preset_name)
    task = grokfast.Task(pre.task.op, 7, 0.7, 0, pre.task.layout, device=DEVICE)
    cfg = dataclasses.replace(pre.model, d_model=16, n_heads=2, d_head=8, d_mlp=32).for_task(task)
    tcfg = dataclasses.replace(pre.train, **{**dict(steps=10, eval_every=5, checkpoint_every=10, backend="fused",
                                                    batch_size=16 if pre.train.batch_size else None), **train})
    fb._CACHE.clear()
    return grokfast.train(task, cfg, tcfg, out=tmp_path / f"{preset_name}-{graph}", device=DEVICE,
                          on_step=hook, log=lambda m: None, figures=False)


def _host_ops_per_step(tmp_path, preset_name, monkeypatch, **train):
    """(run, {s: the aten ops HostWork saw from the end of step s - 1 to the end of step s (1-based), the
    evaluation and checkpoint after step s - 1 included}, {steps after which the loop evaluates or saves})
    of the graph-captured fused trainer (_train_fused)."""
    marks = []
    with HostWork() as hw:
        run = _train_fused(tmp_path, preset_name, True, monkeypatch, hook=lambda step: marks.append((step, len(hw.ops))),
                           **train)
    assert run.summary["step_mode"] == "cuda-graph"
    tc = run.train_config
    busy = {s for s in range(tc.steps + 1) if s % tc.eval_every == 0 or s % tc.checkpoint_every == 0}
    return run, {s: hw.ops[before:after] for (s0, before), (s, after) in zip(marks, marks[1:])}, busy


@pytest.mark.parametrize("preset_name", ["nanda", "power"])
def test_train_loop_makes_no_host_op_between_replays(preset_name, tmp_path, monkeypatch):
    """The fused trainer on a GPU: after the warm-up and the capture, a step that neither evaluates nor saves
    (nor follows one that did) runs no torch operation on the host, only the graph's replay (HostWork counts
    every aten op outside kernel launches and replays). Full batch (nanda) and minibatches drawn inside the
    step (power: batch 16 of 29), whose run keeps the bits of the same run with eager steps (full batch: see
    test_captured_step_replays_the_eager_steps_bits)."""
    from grokfast.rundir import list_checkpoints, load_checkpoint
    run, per_step, busy = _host_ops_per_step(tmp_path, preset_name, monkeypatch)
    quiet = [s for s in per_step if s > stepper_mod.WARMUP_STEPS + 1 and s - 1 not in busy]
    assert len(quiet) >= 4, quiet
    assert {s: per_step[s] for s in quiet} == {s: [] for s in quiet}
    assert any(per_step[s] for s in per_step if s - 1 in busy)          # HostWork sees the evaluations' ops
    if run.train_config.batch_size is None:
        return
    eager = _train_fused(tmp_path, preset_name, False, monkeypatch)
    assert eager.summary["step_mode"] == "eager"
    assert [{k: v for k, v in r.items() if k != "wall"} for r in run.history] == \
           [{k: v for k, v in r.items() if k != "wall"} for r in eager.history]
    a, b = (load_checkpoint(list_checkpoints(r.dir)[-1][1])[0] for r in (run, eager))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_loop_with_epoch_minibatches_makes_no_host_op_between_uploads(tmp_path, monkeypatch):
    """Minibatches "epoch" (rng "stream", the grokfast preset's batch order): 34 examples in batches of 20 and a
    short 14, K = 2 steps an epoch; the orders of E = 2 epochs go to the device in one copy, at steps 0 (two chunks),
    4, 8. The full batch's graph is captured at step 4 (0-based), the short one's at step 5 (each after two eager
    steps of its size); from then on a step that neither copies orders nor follows an evaluation or a checkpoint
    runs no torch operation on the host, and a step that copies does (HostWork sees the copy)."""
    from grokfast.kernels import batch_draw
    monkeypatch.setattr(batch_draw, "RING_BYTES", 2 * 2 * 4 * 34)      # E = 2 epochs of 34 int32 per chunk
    run, per_step, busy = _host_ops_per_step(tmp_path, "nanda", monkeypatch, batch_size=20, minibatches="epoch",
                                             rng="stream", steps=12, eval_every=6, checkpoint_every=12)
    assert len(run.task.train) == 34
    uploads = {0, 4, 8}                                                  # 0-based steps that copy a chunk
    quiet = [s for s in per_step if s - 1 > 5 and s - 1 not in busy and s - 1 not in uploads]
    assert quiet == [8, 10, 11, 12]
    assert {s: per_step[s] for s in quiet} == {s: [] for s in quiet}
    assert "aten.copy_.default" in per_step[9]                          # step 8 copies chunk 3 (epochs 6, 7)


def test_capture_failure_raises_and_restores_the_stream(monkeypatch):
    """capture_graph with a step that fails while capturing: GraphCaptureError naming the cause, the
    capture ended, and the caller back on its own stream (torch.cuda.graph would leave it on the
    capture's side stream). Modelled with a fake torch.cuda on a CPU."""
    events, current = [], ["default"]

    class FakeGraph:
        def capture_begin(self):
            events.append("begin")

        def capture_end(self):
            events.append("end")
            raise RuntimeError("operation not permitted when stream is capturing")

    class FakeStream:
        def __init__(self, device=None):
            self.name = "side"

        def wait_stream(self, other):
            pass

    class StreamCtx:
        def __init__(self, s):
            self.s = s

        def __enter__(self):
            self.prev = current[0]
            current[0] = self.s.name

        def __exit__(self, *a):
            current[0] = self.prev

    fake = type("cuda", (), dict(CUDAGraph=FakeGraph, Stream=FakeStream, stream=staticmethod(StreamCtx),
                                 synchronize=staticmethod(lambda device=None: None),
                                 current_stream=staticmethod(lambda device=None: FakeStream())))
    monkeypatch.setattr(stepper_mod.torch, "cuda", fake)

    def bad_step():
        assert current[0] == "side"
        raise RuntimeError("cudaMemcpy while capturing")

    with pytest.raises(stepper_mod.GraphCaptureError, match="cudaMemcpy while capturing.*GROKFAST_CUDA_GRAPH=0"):
        stepper_mod.capture_graph(bad_step, "cuda:0")
    assert events == ["begin", "end"] and current[0] == "default"


# --------------------------------------------------------------------------------------------------
# Integer widths


@needs_interpreter
def test_ma_ring_addresses_past_two_to_the_31():
    """The MA recompute reads ring slot w at ring + (m W + w) N + i: with W = 33 and N = 2^26, slot 32 starts
    at 2^31 elements. One program (i < 1024) of the element kernel on a ring that is virtual memory (never
    touched pages cost nothing): the window sum must see the value planted in slot 32, exactly."""
    N, W, BLOCK = 1 << 26, 33, 1024
    ring = torch.empty(W * N, dtype=torch.float32)
    for w in range(W):
        ring[w * N:w * N + BLOCK] = float(w + 1)          # touches one page per slot
    small = lambda dtype=torch.float32: torch.zeros(BLOCK, dtype=dtype)   # noqa: E731
    param, grad, mom, vel, ma_sum = small(), small(), small(), small(), small(torch.float64)
    grad.fill_(float(W))                                  # enters slot W - 1 = 32 (replacing its old value)
    scal = torch.zeros(5 + 2, dtype=torch.float32)
    scal[:5] = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0])    # beta1 0, beta2 0, bias correction 1: p -= g / (|g| + eps)
    scal[5:] = torch.tensor([0.0, 1.0])                   # step size 0: the parameters stay; the sum is the check
    snap = torch.tensor([1, W - 1], dtype=torch.int64)    # count c = W - 1: the once-per-window exact recompute
    lamb = torch.ones(1)
    _common.launch(grokfast_adamw_kernel, (1, 1),
                   dict(param_ptr=param, grad_ptr=grad, mom_ptr=mom, vel_ptr=vel, ema_ptr=mom, ring_ptr=ring,
                        sum_ptr=ma_sum, alpha_ptr=lamb, lamb_ptr=lamb, scal_ptr=scal, snap_ptr=snap, loss_ptr=scal,
                        bad_ptr=snap, tab_ptr=torch.zeros(4, dtype=torch.int32), part_ptr=ma_sum, N=N, NB=1,
                        window=W, eps=1e-8),
                   dict(FILTER=2, SCALARS=5, BLOCK=BLOCK, TRACK=0, ORTHO=0, SUMS=0, PBLOCK=64))
    assert torch.equal(ma_sum, torch.full((BLOCK,), float(sum(range(1, W + 1))), dtype=torch.float64))


@needs_interpreter
def test_whole_fused_step_gives_the_same_bits_in_shuffled_order(monkeypatch):
    """The stepper's own launches (the flush launch that also forms the optimizer's scalars, then the element
    update) over three steps with Grokfast-MA: shuffled program order gives grid order's bits."""
    from grokfast.kernels.interpret_order import program_order
    cfg = every_path_cfg()
    states = []
    with mlp.split_thresholds(16):
        for mode in ("forward", "shuffled"):
            fb._CACHE.clear()
            st, tokens, labels = _stepper(cfg, "ma", monkeypatch, graph=False)
            with program_order(mode, seed=3):
                for _ in range(3):
                    st.step(tokens, labels)
            states.append({k: v.clone() for k, v in st.state_dict().items()})
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
