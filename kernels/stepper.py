"""FusedStepper: the fused training step behind the trainer's ``backend="fused"``.

One step = the forward/backward kernels (kernels/forward_backward.py: loss and every gradient of
the flat [1, N] parameters) + the fused Grokfast/AdamW kernel (kernels/optimizer.py; with orthograd
its sums pass first, over the parameter tensors of ParamLayout). Nothing in
it synchronises with the host; on a CUDA device the step is captured as a CUDA graph after a few
eager warm-up steps and replayed from then on.

The model's nn.Parameters are views into the flat buffer (``param.data = view``), so the trainer's
``evaluate(model, ...)`` sees the live weights, and ``state_dict()`` has exactly the reference
stepper's keys ("model.<name>", "opt.m.<name>", "opt.v.<name>", "opt.t", "filter.ema.<name>",
"filter.ring.<name>", "filter.count"): checkpoints do not depend on the backend.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import os

import torch

from .errors import KernelConfigError
from .layout import ParamLayout
from .optimizer import FusedOptimizer

WARMUP_STEPS = 2   # eager steps before capture: they compile every kernel (no compilation while capturing)
BATCH_SEED_OFFSET = 7919   # the minibatch seed is the run's seed + this (grokfast/batches.py, same value)


def _fb():
    """The forward/backward kernel module, or None while it does not exist."""
    if importlib.util.find_spec(__package__ + ".forward_backward") is None:
        return None
    return importlib.import_module(__package__ + ".forward_backward")


def unsupported_reason(cfg) -> str | None:
    """None when the fused kernels handle this ModelConfig, else one line saying why not."""
    fb = _fb()
    if fb is None:
        return "the fused forward/backward kernels are not built yet (kernels/forward_backward.py)"
    return fb.supported(cfg)


def _require(cfg):
    why = unsupported_reason(cfg)
    if why:
        raise KernelConfigError(f"the fused backend cannot run this model: {why}; use --backend reference")


def loss_and_grads(model, tokens: torch.Tensor, labels: torch.Tensor, loss: str = "ce"):
    """(mean loss as a float64 scalar, {param name: gradient}) through the fused kernels; the same
    contract as grokfast.model.loss_and_grads_reference (loss "ce" or "stablemax"). The model's
    parameters are not changed."""
    cfg = model.cfg
    _require(cfg)
    layout = ParamLayout(cfg)
    flat = layout.flatten({n: p.detach() for n, p in model.named_parameters()})
    out, grad = _fb().loss_and_grads_flat(cfg, flat, tokens.contiguous(), labels.contiguous(), loss=loss)
    return out[0].double(), {n: v[0] for n, v in layout.views(grad).items()}


def _graphs_wanted(device: torch.device, cuda_graph: bool | None) -> bool:
    if cuda_graph is None:
        cuda_graph = os.environ.get("GROKFAST_CUDA_GRAPH", "1") != "0"
    return device.type == "cuda" and bool(cuda_graph)


class GraphCaptureError(RuntimeError):
    """The step could not be captured as a CUDA graph. Eager steps would be several times slower (the
    step is launch-bound), so this is an error rather than a silent fallback: fix the cause, or ask for
    eager steps (cuda_graph=False, GROKFAST_CUDA_GRAPH=0)."""


def capture_graph(run, device) -> "torch.cuda.CUDAGraph":
    """Record ``run()`` (kernel launches, no host sync) as a CUDA graph on a side stream and return it;
    nothing runs until ``graph.replay()``. Unlike ``torch.cuda.graph``, a failure inside ``run`` leaves
    the process on the stream it was on (torch.cuda.graph's exit ends the capture first, and when that
    raises it never restores the stream, so later work would run on the dead capture's stream and
    allocate from its pool). Raises GraphCaptureError with the cause."""
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    try:
        with torch.cuda.stream(side):        # the caller's stream comes back however the block ends
            graph.capture_begin()
            try:
                run()
            except BaseException:
                try:
                    graph.capture_end()
                except Exception:            # the capture is already invalid: the first error is the one to report
                    pass
                raise
            graph.capture_end()
    except Exception as e:
        torch.cuda.synchronize(device)
        raise GraphCaptureError(f"CUDA graph capture of the fused step failed ({type(e).__name__}: {e}); "
                                "set GROKFAST_CUDA_GRAPH=0 to train with eager launches (slower)") from e
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    return graph


class FusedStepper:
    """One optimizer step of the fused backend. ``step(tokens, labels)`` returns the loss (a float64
    device tensor, no sync). On a GPU the step is a CUDA graph after WARMUP_STEPS eager steps unless
    cuda_graph=False (or, when cuda_graph is None, the environment has GROKFAST_CUDA_GRAPH=0). A CPU
    run never touches CUDA APIs."""

    name = "fused"

    def __init__(self, model, tcfg, cuda_graph: bool | None = None):
        cfg = model.cfg
        _require(cfg)
        if tcfg.batch_size is not None and tcfg.batch_size < 1:
            raise KernelConfigError(f"--batch-size must be >= 1, got {tcfg.batch_size}")
        self.model, self.cfg, self.tcfg = model, cfg, tcfg
        self.layout = ParamLayout(cfg)
        params = dict(model.named_parameters())
        if set(params) != set(self.layout.shapes):
            raise KernelConfigError("the model's parameters do not match its config: build it with grokfast.Transformer(cfg)")
        if any(p.dtype != torch.float32 for p in params.values()):
            raise KernelConfigError("the fused backend trains float32 parameters: build the model in float32")
        self.device = next(iter(params.values())).device
        with torch.no_grad():
            self.flat = self.layout.flatten({n: p.detach() for n, p in params.items()})   # [1, N]
        for n, view in self.layout.views(self.flat).items():
            params[n].data = view[0]
        self.grad = torch.zeros_like(self.flat)
        self.loss = torch.zeros(1, dtype=torch.float32, device=self.device)
        # the first step (1-based) whose loss was NaN or inf, -1 while none: set inside the step (optimizer TRACK)
        self.first_bad = torch.full((1,), -1, dtype=torch.int64, device=self.device)
        self._bound = None         # (tokens, labels) of the split bound for train_step, contiguous
        self._batches = None       # minibatches: {Bs: (tokens [Bs, T], labels [Bs], (perm, starts))} gathered on the device
        self._ring = None          # minibatches "epoch": the device ring of epoch orders (batch_draw.EpochRing)
        self._bound_graphs = {}    # train_step's CUDA graphs by batch size (the epoch's short last batch has its own)
        self._bound_eager = {}     # eager train_steps by batch size: each size warms up before its capture
        self._keep_bound = {}      # by batch size: the workspace, split buffers and index its graph reads
        self._check_counter = False   # compare the optimizer's device step counter with train_step's step once
        self.opt = FusedOptimizer.from_configs([tcfg], self.layout.numel, device=self.device,
                                               segments=self.layout.sizes())
        self._filter_seen = 0      # host mirror of the filter count: which state_dict keys exist
        self._eager_steps = 0
        self._graph = None         # torch.cuda.CUDAGraph once captured
        self._static = None        # (tokens, labels) buffers the graph reads
        self._src = None           # (tokens, labels, their _version) last copied into the buffers
        self._contig = None        # contiguous copy of a strided batch, for eager steps
        self._use_graph = _graphs_wanted(self.device, cuda_graph)

    # -- the step ---------------------------------------------------------------------------------

    def _contiguous(self, tokens, labels):
        """The kernels read contiguous batches; a strided one (a Task split is a view) is copied once
        and the copy reused while the same, unmodified tensors come back."""
        if tokens.is_contiguous() and labels.is_contiguous():
            return tokens, labels
        key = (tokens, labels, tokens._version, labels._version)
        c = self._contig
        if c is None or c[0] is not tokens or c[1] is not labels or c[2:4] != key[2:]:
            self._contig = c = (*key, tokens.contiguous(), labels.contiguous())
        return c[4], c[5]

    def _run(self, tokens, labels, index=None):
        tokens, labels = self._contiguous(tokens, labels)
        _fb().loss_and_grads_flat(self.cfg, self.flat, tokens, labels, grad_out=self.grad, loss_out=self.loss,
                                  precision=self.tcfg.precision, flush_tasks=(self.opt.scalars_task(),), index=index,
                                  loss=getattr(self.tcfg, "loss", "ce"))
        # its scalars ran in the pass's last launch; it also records a NaN/inf loss in first_bad
        self.opt.step(self.flat, self.grad, scalars=False, track=(self.loss, self.first_bad))

    # -- training on a bound split: the trainer's step, no host work between graph replays ----------

    def bind(self, tokens: torch.Tensor, labels: torch.Tensor, epochs=None, epochs_ahead: int | None = None) -> None:
        """The training split (tokens [n, n_ctx], labels [n] int64 on the stepper's device) that ``train_step``
        trains on: all of it per step (full batch); with tcfg.batch_size and minibatches "draw" a batch drawn
        on the device inside the step (kernels/batch_draw.py: a function of the batch seed tcfg.seed + 7919
        and the optimizer's step counter, so a resumed run draws the same batches); with minibatches "epoch"
        batch k of epoch e of the orders ``epochs`` gives ((first, count) -> [count, n] integers: the host's
        permutations of those epochs, grokfast.batches.epoch_orders), copied to the device ``epochs_ahead`` epochs
        at a time (batch_draw.EpochRing; default from its memory budget) and gathered inside the step. Checks
        the token range once (a host sync)."""
        from .forward_backward import check_token_range
        tokens, labels = tokens.contiguous(), labels.contiguous()
        check_token_range(self.cfg, tokens, labels)
        bs, mode = self.tcfg.batch_size, self.tcfg.minibatches
        if bs is not None and mode == "epoch" and epochs is None:
            raise KernelConfigError("minibatches \"epoch\": bind needs the epochs' orders (epochs=, "
                                    "grokfast.batches.epoch_orders)")
        if self._bound_graphs:
            raise KernelConfigError("this stepper's graphs read the split bound first: make a new stepper to bind another")
        self._bound, self._batches, self._ring = (tokens, labels), None, None
        self._check_counter = True
        if bs is None:
            return
        if mode == "epoch":
            from .batch_draw import EpochRing
            self._ring = EpochRing(tokens.shape[0], bs, epochs, self.device, epochs_ahead)
            sizes = sorted({bs, self._ring.rows(self._ring.K - 1)})
        else:
            sizes = [bs]
        T, V = tokens.shape[1], self.cfg.d_vocab
        dev = self.device
        self._batches = {b: (torch.zeros((b, T), dtype=torch.int64, device=dev), torch.zeros(b, dtype=torch.int64, device=dev),
                             (torch.zeros((1, T, b), dtype=torch.int32, device=dev),
                              torch.zeros((1, T, V + 1), dtype=torch.int32, device=dev))) for b in sizes}

    def _run_bound(self, rows: int):
        if self._batches is None:
            self._run(*self._bound)
            return
        from .batch_draw import draw_batch, gather_epoch_batch
        tok, lab, index = self._batches[rows]
        if self._ring is not None:
            gather_epoch_batch(*self._bound, tok, lab, index, self.opt.counters, self._ring.ring, self.tcfg.batch_size,
                               self.cfg.d_vocab)
        else:
            draw_batch(*self._bound, tok, lab, index, self.opt.counters, self.tcfg.seed + BATCH_SEED_OFFSET,
                       self.cfg.d_vocab)
        self._run(tok, lab, index)

    def train_step(self, step: int | None = None) -> None:
        """One optimizer step on the bound split (``bind``); ``step``: steps done before it, which the optimizer's
        device counter (the batch's number on the device) equals. The draw and full batch do not read it; minibatches
        "epoch" need it: it says which graph to replay (the short last batch of an epoch has its own) and when the
        next epochs' orders are due on the device. Returns nothing and, once the step is a CUDA graph, runs no torch
        operation on the host on steps that copy no epochs: the loss stays in ``self.loss``, a NaN/inf loss is
        recorded in ``self.first_bad`` on the device."""
        if self._bound is None:
            raise KernelConfigError("train_step needs the training split: call bind(tokens, labels) first")
        if self._graph is not None and self._static is not None:
            raise KernelConfigError("this stepper's graph trains the batches fed to step(): keep using step()")
        rows = self._bound[0].shape[0]
        if self._ring is not None:
            if step is None:
                raise KernelConfigError("minibatches \"epoch\": train_step(step) needs the steps done")
            if self._check_counter:      # once after bind or load_state_dict (a host sync), never per step
                if int(self.opt.counters[0]) != step:
                    raise KernelConfigError(f"train_step({step}) but the optimizer has done {int(self.opt.counters[0])} "
                                            "steps: pass the steps done (a resumed run: its checkpoint's step)")
                self._check_counter = False
            self._ring.ensure(step)
            rows = self._ring.rows(step)
        elif self._batches is not None:
            rows = self.tcfg.batch_size
        graph = self._bound_graphs.get(rows)
        if graph is None and self._use_graph and self._bound_eager.get(rows, 0) >= WARMUP_STEPS:
            graph = self._capture_bound(rows)
        if graph is not None:
            graph.replay()
        else:
            self._run_bound(rows)
            self._bound_eager[rows] = self._bound_eager.get(rows, 0) + 1
        if self.tcfg.grokfast != "none":
            self._filter_seen += 1

    def _capture_bound(self, rows: int):
        batch = self._batches[rows] if self._batches is not None else None
        tokens = batch[0] if batch is not None else self._bound[0]
        ws = _fb()._workspace(self.cfg, 1, tokens.shape[0], self.device, True)
        index = batch[2] if batch is not None else _fb().token_index(self.cfg, tokens)
        graph = self._bound_graphs[rows] = capture_graph(lambda: self._run_bound(rows), self.device)
        self._keep_bound[rows] = (ws, ws.deferred.held(), index)
        return graph

    def step(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One optimizer step on this batch; returns the loss (a float64 device tensor, no sync). For a
        stepper trained with train_step (a graph of the bound split), an error: one graph per stepper."""
        if self._bound_graphs:
            raise KernelConfigError("this stepper's graph trains the bound split: use train_step(), not step()")
        if self._use_graph and self._eager_steps >= WARMUP_STEPS and self._graph_ready(tokens, labels):
            self._feed(tokens, labels)
            self._graph.replay()
        else:
            self._run(tokens, labels)
            self._eager_steps += 1
        if self.tcfg.grokfast != "none":
            self._filter_seen += 1
        return self.loss[0].double()   # a fresh tensor: the graph overwrites self.loss on the next replay

    def _feed(self, tokens, labels):
        """Copy the batch into the graph's input buffers unless it is the batch already there (the
        same tensors, not modified since: full-batch training passes the same tensors every step)."""
        src = self._src
        if src is not None and src[0] is tokens and src[1] is labels and src[2] == (tokens._version, labels._version):
            return
        self._static[0].copy_(tokens)
        self._static[1].copy_(labels)
        _fb().token_index(self.cfg, self._static[0])     # the graph's scatter index, rebuilt where it lies
        self._src = (tokens, labels, (tokens._version, labels._version))

    def _graph_ready(self, tokens, labels) -> bool:
        """Capture on first use (GraphCaptureError if it fails); False (run eagerly) for a batch of
        another shape than the captured one."""
        if self._graph is not None:
            st, sl = self._static
            return tokens.shape == st.shape and labels.shape == sl.shape and tokens.dtype == st.dtype
        static = (tokens.contiguous().clone(), labels.contiguous().clone())
        # The graph replays into the forward/backward workspace and reads its split buffers and
        # descriptor table: hold them, so that the kernels' caches can never free memory the graph uses.
        ws = _fb()._workspace(self.cfg, 1, static[0].shape[0], self.device, True)
        index = _fb().token_index(self.cfg, static[0])     # built here, not inside the capture
        self._graph = capture_graph(lambda: self._run(*static), self.device)
        self._keep = (ws, ws.deferred.held(), index)
        self._static = static
        self._src = (tokens, labels, (tokens._version, labels._version))
        return True

    @property
    def mode(self) -> str:
        """How the steps run now: "cuda-graph" (captured and replayed) or "eager" (launch by launch)."""
        return "cuda-graph" if self._graph is not None or self._bound_graphs else "eager"

    # -- checkpoints --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        lay, opt = self.layout, self.opt
        s = {f"model.{n}": v[0] for n, v in lay.views(self.flat).items()}
        s.update({f"opt.m.{n}": v[0] for n, v in lay.views(opt.mom).items()})
        s.update({f"opt.v.{n}": v[0] for n, v in lay.views(opt.vel).items()})
        s["opt.t"] = opt.counters[0].clone()
        if self._filter_seen > 0 and opt.ema is not None:
            s.update({f"filter.ema.{n}": v[0] for n, v in lay.views(opt.ema).items()})
        if self._filter_seen > 0 and opt.ring is not None:
            W = opt.window
            for n, shape in lay.shapes.items():
                o, k = lay.offsets[n], math.prod(shape)
                s[f"filter.ring.{n}"] = opt.ring[0, :, o:o + k].reshape(W, *shape).clone()
        s["filter.count"] = opt.counters[1].clone()
        return s

    def load_state_dict(self, s: dict[str, torch.Tensor]) -> None:
        lay, opt = self.layout, self.opt
        count = int(s["filter.count"])
        with torch.no_grad():
            for prefix, buf in (("model.", self.flat), ("opt.m.", opt.mom), ("opt.v.", opt.vel)):
                for n, v in lay.views(buf).items():
                    v[0].copy_(s[prefix + n])
            opt.counters[0].copy_(torch.as_tensor(s["opt.t"]))
            opt.counters[1].copy_(torch.as_tensor(s["filter.count"]))
            for kind, buf in (("ema", opt.ema), ("ring", opt.ring)):
                if buf is None or count == 0:
                    continue
                missing = [n for n in lay.shapes if f"filter.{kind}.{n}" not in s]
                if missing:
                    raise KernelConfigError(f"checkpoint has filter.count {count} but no filter.{kind}.{missing[0]}: "
                                      "it was written with another --grokfast setting")
                for n, shape in lay.shapes.items():
                    t = s[f"filter.{kind}.{n}"]
                    if kind == "ema":
                        lay.views(buf)[n][0].copy_(t)
                    else:
                        o = lay.offsets[n]
                        buf[0, :, o:o + t[0].numel()].copy_(t.reshape(opt.window, -1))
            if opt.ring is not None and count > 0:
                opt.rebuild_ma_sum()   # derived from the ring, not a checkpoint key
        self._filter_seen = count
        self._check_counter = True
