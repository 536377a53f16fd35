"""The fused forward + backward of the model for M models at once, and evaluation, on flat parameters.

Given flat [M, N] parameters (kernels.layout.ParamLayout), tokens and labels, ``loss_and_grads_flat``
computes each model's mean loss (cross-entropy, or StableMax cross-entropy with loss="stablemax":
unembed_loss) and the gradient of every parameter with Triton kernels
(no host synchronisation, deterministic: no float atomics); ``eval_flat`` computes the mean loss and
the number of correct argmax predictions over a split without copying logits to the host.

How the work is laid out (DESIGN.md, "The fused training step"), T = n_ctx, V = d_vocab:
  forward   X0[t * V + v] = W_E[v] + W_pos[t]                       table, T * V rows
            layer 0: LN1, Q/K/V on the table rows; attention per example reads them by token;
                     z W_O + b_O + residual and LN2 of it; the MLP at every position (2 layers) or at the
                     last position only (1 layer)
            layer 1: LN1 and Q/K/V per example and position, attention of the last position,
                     its MLP at the last position
            LN_final, logits = xf W_U + b_U and the loss in one launch: per-example loss and dlogits
            (accurate on confident data) from logits that never reach memory
  backward  mirrors it: GEMMs for every weight gradient (a fixed-order sum over examples), the
            attention backward per example into G = [dq | dk | dv | dresid] rows, G summed into the
            (position, token) tables for layer 0 by a segmented sum over the examples sorted by token
            (token_index: built once per tokens tensor), then the table gradients flow to W_Q, W_K, W_V
            (table-sized products), LN1, and dW_E, dW_pos.
Launches: independent products share one launch (mlp.gemm_launch: {dX, dW, db} of each linear map, and
weight gradients that nothing reads in later launches' free slots), everything nothing in the pass reads
waits for its last launch (flush.flush_kernel via mlp.Deferred: split-K sums, the LayerNorms' weight-gradient
partials, loss mean, embedding gradients, the optimizer's scalars), X0 is formed by its first reader, the unembedding is fused with the
loss and dxf (unembed_loss.unembed_cross_entropy), z W_O with the attention forward and dz with the
attention backward, and a LayerNorm runs inside a launch whose programs hold whole rows (the final one's
forward and backward in the unembedding, LN2's forward in the attention forward and its backward in the
attention backward; LN1 keeps its own launches: its rows feed a GEMM tiled over columns), so a step's
forward + backward is 11 launches for the nanda and pizza presets and 23 for power (the optimizer adds
optimizer.STEP_LAUNCHES = 1, or 2 with orthograd: optimizer.step_launches; tests/test_kernels_model.py::test_launches_per_step keeps these as ceilings;
executed_flops counts each launch's dot work).
One departure from DESIGN.md's sketch: there is no value-output table VO = x0 W_V W_O; attention
sums V rows (d_head wide) and z W_O is one GEMM over the examples, because the backward would
otherwise scatter n_heads x d_model wide gradients into the VO table (n_heads times more work).
The reference model (grokfast/model.py) is the specification; tests/test_kernels_model.py checks
every gradient against it in float64.

Limits (``supported``): 1 or 2 layers, d_model <= 256, d_mlp <= 1024, 1 to 8 heads, d_head <= 256,
d_vocab_out <= 512, n_ctx 1 to 8, d_vocab <= 4096. Tokens and labels are not range-checked on the
device (that would need a sync): call ``check_token_range`` once per data set.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch.utils.weak import WeakIdKeyDictionary

from . import _common, mlp
from ._common import check, record_launches, specialization
from .embed_attn import attn_backward, attn_forward, embed_backward, token_index as _build_index, token_scatter
from .layernorm import layernorm_backward, layernorm_forward
from .errors import KernelConfigError
from .layout import ParamLayout
from .mlp import Deferred, colsum_plan, gemm, gemm_launch, gemm_plan, mlp_backward, mlp_forward
from .unembed_loss import loss_mode, mean_reduce, unembed_cross_entropy


MAX_M_HEADS = 65535  # grid axis limit: M * max(3 n_heads, n_ctx) programs along one axis


def supported(cfg) -> str | None:
    """None if the fused kernels handle this ModelConfig, else a one-line reason naming the limit."""
    limits = [
        (cfg.n_layers in (1, 2), f"n_layers={cfg.n_layers}: the fused kernels handle 1 or 2 layers"),
        (cfg.d_model <= 256, f"d_model={cfg.d_model}: the fused kernels handle d_model <= 256"),
        (cfg.d_mlp <= 1024, f"d_mlp={cfg.d_mlp}: the fused kernels handle d_mlp <= 1024"),
        (1 <= cfg.n_heads <= 8, f"n_heads={cfg.n_heads}: the fused kernels handle 1 to 8 heads"),
        (cfg.d_head <= 256, f"d_head={cfg.d_head}: the fused kernels handle d_head <= 256"),
        (cfg.d_vocab_out <= 512, f"d_vocab_out={cfg.d_vocab_out}: the fused kernels handle at most 512 classes"),
        (1 <= cfg.n_ctx <= 8, f"n_ctx={cfg.n_ctx}: the fused kernels handle 1 to 8 positions"),
        (cfg.d_vocab <= 4096, f"d_vocab={cfg.d_vocab}: the fused kernels handle d_vocab <= 4096"),
        (cfg.act in ("relu", "gelu"), f"act={cfg.act!r}: the fused kernels handle relu and gelu"),
        (not getattr(cfg, "resid_after_ln1", False),
         "resid_after_ln1 (ironjr/grokfast's residual after the first LayerNorm): the fused kernels compute "
         "pre-LayerNorm blocks"),
        (getattr(cfg, "pos_embed", True) is not False,
         "pos_embed False (frt03/grok_mod_poly's model has no positional embedding): the fused kernels need W_pos"),
        (getattr(cfg, "pos_embed", True) is True,
         "pos_embed 'sinusoidal' (openai/grok's fixed positions): the fused kernels need a learned W_pos"),
        (getattr(cfg, "ln_position", "pre") == "pre",
         "ln_position 'post' (openai/grok's LayerNorm after each residual add): the fused kernels compute "
         "pre-LayerNorm blocks"),
        (getattr(cfg, "mlp_bias", True),
         "mlp_bias False (frt03/grok_mod_poly's MLP has no biases): the fused kernels need b_in and b_out"),
    ]
    for ok, why in limits:
        if not ok:
            return why
    return None


# ----------------------------------------------------------------------------------------------
# Workspace: every activation the backward needs, allocated once per (config, M, B, device).


class _Layer:
    pass


class Workspace:
    """Activation and gradient buffers for M models and B examples (float32, contiguous)."""

    def __init__(self, cfg, M: int, B: int, device, grads: bool):
        T, V, D, H, Dh, F, P = cfg.n_ctx, cfg.d_vocab, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp, cfg.d_vocab_out
        HD, L, LN = H * Dh, cfg.n_layers, cfg.layernorm

        def e(*shape, dtype=torch.float32):
            t = torch.empty(shape, dtype=dtype, device=device)
            if POISON_WORKSPACE and t.device.type != "meta":
                t.fill_(float("nan") if dtype == torch.float32 else -(2**30))
            return t

        self.X0 = e(M, T * V, D)
        self.layers = []
        for l in range(L):
            a = _Layer()
            a.table = l == 0
            a.TQ = 1 if l == L - 1 else T
            a.R_in = T * V if a.table else B * T
            Ro = B * a.TQ
            if LN:
                a.hn, a.mu1, a.rs1 = e(M, a.R_in, D), e(M, a.R_in), e(M, a.R_in)
                a.hn2, a.mu2, a.rs2 = e(M, Ro, D), e(M, Ro), e(M, Ro)
            a.qkv = e(M, a.R_in, 3 * HD)
            a.z, a.sm, a.mid = e(M, Ro, HD), e(M, Ro * H * T), e(M, Ro, D)
            a.pre, a.post, a.out = e(M, Ro, F), e(M, Ro, F), e(M, Ro, D)
            if grads:
                a.dpre, a.dmid = e(M, Ro, F), e(M, Ro, D)
                a.dh2 = e(M, Ro, D) if LN else None
                a.G = e(M, B * T, 3 * HD + D)
                a.Gtab = e(M, T * V, 3 * HD + D) if a.table else None
                a.dhn = e(M, a.R_in, D) if LN else None
                a.dx = e(M, a.R_in, D)
            self.layers.append(a)
        self.xf = e(M, B, D) if LN else None      # LayerNorm_final's output, formed by the unembedding
        self.loss_ex, self.correct_ex = e(M, B), e(M, B, dtype=torch.int32)
        self.correct = e(M, dtype=torch.int32)
        if grads:
            self.deferred = Deferred()       # the weight gradients' split-K sums, done in one launch
            self.dlogits = e(M, B, P)
            self.dxf = None if LN else e(M, B, D)
            self.dres = e(M, B, D) if LN else None

    @staticmethod
    def floats_per_example(cfg, grads: bool) -> int:
        """About how many floats the workspace holds per (model, example): sizes the eval chunks."""
        T, D, HD, F, P = cfg.n_ctx, cfg.d_model, cfg.n_heads * cfg.d_head, cfg.d_mlp, cfg.d_vocab_out
        n = 0
        for l in range(cfg.n_layers):
            TQ = 1 if l == cfg.n_layers - 1 else T
            n += TQ * (2 * F + HD + cfg.n_heads * T + 5 * D) + (0 if l == 0 else T * (3 * HD + 2 * D))
            if grads:
                n += TQ * (F + 3 * D) + T * (3 * HD + D) + (0 if l == 0 else 2 * T * D)
        return n + 3 * P + 4 * D + 4


# Tests set this to fill new workspaces with NaN (float) / -2^30 (int): a kernel that reads an entry
# nobody wrote then poisons the result instead of passing by luck.
POISON_WORKSPACE = False

_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 6


def _workspace(cfg, M, B, device, grads) -> Workspace:
    key = (cfg, M, B, str(device), grads)
    ws = _CACHE.get(key)
    if ws is None:
        ws = Workspace(cfg, M, B, device, grads)
        _CACHE[key] = ws
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return ws


# ----------------------------------------------------------------------------------------------
# The two passes


def _span(flat, lay: ParamLayout, first: str, numel: int):
    """flat[:, offset(first):offset(first) + numel]: consecutive parameters as one view."""
    o = lay.offsets[first]
    return flat[:, o:o + numel]


def _forward(cfg, lay, flat, tokens, ws: Workspace):
    M = flat.shape[0]
    D, H, Dh = cfg.d_model, cfg.n_heads, cfg.d_head
    HD, LN = H * Dh, cfg.layernorm
    p = lay.views(flat)
    embed = (p["embed.W_E"], p["pos_embed.W_pos"])    # X0 = W_E[v] + W_pos[t], formed by layer 0's first reader
    x_in = ws.X0
    for l, a in enumerate(ws.layers):
        n = f"blocks.{l}."
        R = a.R_in
        if LN:
            layernorm_forward(x_in, p[n + "ln1.w"], p[n + "ln1.b"], a.hn, a.mu1, a.rs1, cfg.ln_eps,
                              embed=embed if l == 0 else None)
        hn = a.hn if LN else x_in
        W_qkv = _span(flat, lay, n + "attn.W_Q", 3 * H * D * Dh).view(M, 3 * H, D, Dh)
        b_qkv = _span(flat, lay, n + "attn.b_Q", 3 * HD).view(M, 3 * H, Dh) if cfg.attn_bias else None
        # qkv[r, j * Dh + e] = sum_d hn[r, d] W_{Q|K|V}[h, d, e] (+ b), j = which * H + h: one launch
        gemm(hn.unsqueeze(1).unsqueeze(3).expand(M, 3 * H, R, 1, D), W_qkv.unsqueeze(2),
             a.qkv.view(M, R, 3 * H, Dh).permute(0, 2, 1, 3), bias=b_qkv,
             embed=embed if l == 0 and not LN else None)
        # attention, z W_O + b_O and the residual in one launch
        # (and LayerNorm 2 of its output rows: one program holds whole rows)
        attn_forward(a.qkv, tokens, x_in, p[n + "attn.W_O"], p[n + "attn.b_O"] if cfg.attn_bias else None,
                     a.z, a.sm, a.mid, H, Dh, a.TQ, a.table, cfg.attn_alpha,
                     ln=(p[n + "ln2.w"], p[n + "ln2.b"], cfg.ln_eps, a.hn2, a.mu2, a.rs2) if LN else None)
        mlp_forward(a.hn2 if LN else a.mid, p[n + "mlp.W_in"], p[n + "mlp.b_in"], p[n + "mlp.W_out"],
                    p[n + "mlp.b_out"], a.mid, a.pre, a.post, a.out, cfg.act)
        x_in = a.out
    return x_in     # the final LayerNorm and the unembedding run fused with the loss (_loss_head)


def _loss_head(cfg, lay, flat, x, labels, loss_ex, correct_ex, ws, grads=False, grad_out=None, loss="ce"):
    """Per-example loss ("ce" or "stablemax") and correct flags of logits = xf W_U (+ b_U), xf = LayerNorm_final(x) (written to
    ws.xf) or x, in one launch: the logits never reach memory (unembed_loss.unembed_cross_entropy). grads:
    also ws.dlogits and the gradient of x (ws.dres through the LayerNorm, whose weight gradients go into
    grad_out via ws.deferred, or ws.dxf). Returns xf."""
    p = lay.views(flat)
    LN = cfg.layernorm
    ln = (p["ln_final.w"], p["ln_final.b"], cfg.ln_eps, ws.xf) if LN else None
    ln_grads = None
    if grads and LN:
        g = lay.views(grad_out)
        ln_grads = (g["ln_final.w"], g["ln_final.b"], ws.deferred)
    unembed_cross_entropy(x, p["unembed.W_U"], p["unembed.b_U"] if cfg.unembed_bias else None, labels,
                          loss_ex, correct_ex, ws.dlogits if grads else None,
                          dx=(ws.dres if LN else ws.dxf) if grads else None, ln=ln, ln_grads=ln_grads, loss=loss)
    return ws.xf if LN else x


_launch = mlp.launch_filled      # gemm_launch with free slots filled from the spare weight-gradient products


def _backward(cfg, lay, flat, tokens, index, ws: Workspace, xf, grad_out):
    M = flat.shape[0]
    T, D, H, Dh = cfg.n_ctx, cfg.d_model, cfg.n_heads, cfg.d_head
    HD, LN = H * Dh, cfg.layernorm
    p, g = lay.views(flat), lay.views(grad_out)
    d = ws.deferred      # weight gradients are outputs only: their split-K sums wait for the last launch
    # dxf (and the final LayerNorm's backward: dres) came with the loss (_loss_head); dW_U and db_U ride in
    # later launches' free slots (_launch)
    spare = [gemm_plan(xf.transpose(1, 2), ws.dlogits, g["unembed.W_U"], defer=d),
             *([colsum_plan(ws.dlogits, g["unembed.b_U"], defer=d)] if cfg.unembed_bias else [])]
    dout = ws.dres if LN else ws.dxf                    # dL / d(output of the current block)
    for l in reversed(range(cfg.n_layers)):
        a = ws.layers[l]
        n = f"blocks.{l}."
        R = a.R_in
        x_in = ws.X0 if l == 0 else ws.layers[l - 1].out
        hn = a.hn if LN else x_in
        # MLP, then (LayerNorm 2 and) the residual: dmid = dout + d(MLP input)
        mlp_backward(dout, a.hn2 if LN else a.mid, a.pre, a.post, p[n + "mlp.W_in"], p[n + "mlp.W_out"],
                     a.dpre, a.dh2 if LN else a.dmid, g[n + "mlp.W_in"], g[n + "mlp.b_in"],
                     g[n + "mlp.W_out"], g[n + "mlp.b_out"], cfg.act, dh_res=None if LN else dout, defer=d,
                     spare=spare)
        # output projection: dz = dmid W_O^T is formed inside the attention backward; dW_O, db_O ride later
        spare += [gemm_plan(a.z.transpose(1, 2), a.dmid, g[n + "attn.W_O"].reshape(M, HD, D), defer=d),
                  *([colsum_plan(a.dmid, g[n + "attn.b_O"], defer=d)] if cfg.attn_bias else [])]
        # attention per example (with LayerNorm 2's backward forming dmid = LN2 backward of dh2 + dout: one program
        # holds whole rows), then into the (position, token) tables for layer 0
        attn_backward(a.qkv, tokens, a.sm, p[n + "attn.W_O"], a.dmid, a.G, H, Dh, a.TQ, a.table, cfg.attn_alpha,
                      ln=(a.mid, p[n + "ln2.w"], a.mu2, a.rs2, a.dh2, dout, g[n + "ln2.w"], g[n + "ln2.b"], d)
                      if LN else None)
        # (dq and dres are exactly zero at non-query positions: the scatter skips them)
        src = token_scatter(a.G, index, a.Gtab, zero=(T - a.TQ, HD, 3 * HD)) if a.table else a.G   # [M, R, 3 HD + D]
        dqkv, dres = src[:, :, :3 * HD], src[:, :, 3 * HD:]
        W_qkv = _span(flat, lay, n + "attn.W_Q", 3 * H * D * Dh).view(M, 3 * H, D, Dh)
        gW_qkv = _span(grad_out, lay, n + "attn.W_Q", 3 * H * D * Dh).view(M, 3 * H, D, Dh)
        # dW_{Q|K|V}[h] = hn^T dqkv[:, block j] (and db_{Q|K|V}), and
        # dhn[r, d] = sum_{j, e} dqkv[r, j * Dh + e] W[j, d, e]: contraction over (heads x d_head); one launch
        a_op = dqkv.view(M, R, 3 * H, Dh).unsqueeze(1)
        b_op = W_qkv.permute(0, 1, 3, 2).unsqueeze(1)
        _launch(spare, gemm_plan(hn.transpose(1, 2).unsqueeze(1).unsqueeze(3).expand(M, 3 * H, D, 1, R),
                                 dqkv.view(M, R, 3 * H, Dh).permute(0, 2, 1, 3).unsqueeze(2), gW_qkv, defer=d),
                *([colsum_plan(dqkv, _span(grad_out, lay, n + "attn.b_Q", 3 * HD), defer=d)]
                  if cfg.attn_bias else []),
                gemm_plan(a_op, b_op, a.dhn) if LN else gemm_plan(a_op, b_op, a.dx, res=dres))
        if LN:
            layernorm_backward(x_in, p[n + "ln1.w"], a.mu1, a.rs1, a.dhn, a.dx, g[n + "ln1.w"], g[n + "ln1.b"],
                               res=dres, defer=d)
        dout = a.dx
    if spare:
        gemm_launch(*spare)
    embed_backward(ws.layers[0].dx, g["embed.W_E"], g["pos_embed.W_pos"], d)


# ----------------------------------------------------------------------------------------------
# Public entry points


def _check_cfg(cfg):
    why = supported(cfg)
    if why:
        raise KernelConfigError(f"the fused kernels cannot run this model: {why}")


def _check_flat(cfg, flat, lay):
    check("flat", flat, torch.float32, dims=2)
    if flat.shape[1] != lay.numel or not flat.is_contiguous():
        raise ValueError(f"flat must be a contiguous [M, {lay.numel}] float32 tensor (ParamLayout(cfg)), "
                         f"got {list(flat.shape)}")
    M = flat.shape[0]
    per_model = max(3 * cfg.n_heads, cfg.n_ctx)
    if M < 1 or M * per_model > MAX_M_HEADS:
        raise ValueError(f"M={M} models: need 1 <= M <= {MAX_M_HEADS // per_model} for this config "
                         f"(a grid axis holds M * max(3 n_heads, n_ctx) programs)")
    if flat.device.type == "cpu" and not _common.INTERPRET:
        raise ValueError("flat is on the CPU: the Triton kernels need a CUDA tensor "
                         "(or TRITON_INTERPRET=1 set before triton is imported)")
    return M


def _norm_data(cfg, M, tokens, labels, device):
    """tokens [B, T] or [M, B, T] -> [1 or M, B, T]; labels [B] or [M, B] -> [1 or M, B]."""
    check("tokens", tokens, torch.int64, device=device)
    check("labels", labels, torch.int64, device=device)
    T = cfg.n_ctx
    if tokens.dim() == 2:
        tokens = tokens.unsqueeze(0)
    if tokens.dim() != 3 or tokens.shape[0] not in (1, M) or tokens.shape[2] != T:
        raise ValueError(f"tokens must be int64 [B, {T}] or [{M}, B, {T}], got {list(tokens.shape)}")
    B = tokens.shape[1]
    if labels.dim() == 1:
        labels = labels.unsqueeze(0)
    if labels.dim() != 2 or labels.shape[0] not in (1, M) or labels.shape[1] != B:
        raise ValueError(f"labels must be int64 [{B}] or [{M}, {B}] to match tokens, got {list(labels.shape)}")
    if B < 1:
        raise ValueError("need at least one example")
    if not tokens.is_contiguous() or not labels.is_contiguous():
        raise ValueError("tokens and labels must be contiguous (call .contiguous() once, outside the step)")
    return tokens, labels, B


def _out(name, t, shape, dtype, device):
    if t is None:
        return torch.empty(shape, dtype=dtype, device=device)
    check(name, t, dtype, shape=shape, device=device)
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return t


def check_token_range(cfg, tokens, labels) -> None:
    """Raise ValueError unless every token lies in [0, d_vocab) and every label in [0, d_vocab_out).
    Reads the values (a host sync): call it once per data set, not per step."""
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= cfg.d_vocab):
        raise ValueError(f"tokens must lie in [0, {cfg.d_vocab}) (d_vocab), got [{int(tokens.min())}, {int(tokens.max())}]")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= cfg.d_vocab_out):
        raise ValueError(f"labels must lie in [0, {cfg.d_vocab_out}) (d_vocab_out), "
                         f"got [{int(labels.min())}, {int(labels.max())}]")


_TOKEN_INDEX = WeakIdKeyDictionary()    # tokens tensor -> (its _version, shape, d_vocab, (perm, starts))


def token_index(cfg, tokens):
    """The layer-0 token scatter's index of ``tokens`` ([B, n_ctx] or [M, B, n_ctx] int64, as passed to
    loss_and_grads_flat): embed_attn.token_index, built on the first step that sees this tensor and kept
    while the tensor lives, so a step with the same, unmodified tokens does no host work for it. A tensor
    modified in place (its _version moved: a training step feeding a new batch into a captured graph's
    buffer) has its index rebuilt into the same buffers, whose addresses a captured graph keeps; such a
    caller calls this after each feed, before the replay. Returns (perm, starts)."""
    norm = tokens.unsqueeze(0) if tokens.dim() == 2 else tokens
    key = (tokens._version, tuple(norm.shape), cfg.d_vocab, str(tokens.device))
    hit = _TOKEN_INDEX.get(tokens)
    if hit is not None and hit[0] == key:
        return hit[1]
    if hit is not None and hit[0][1:] == key[1:]:
        index = _build_index(norm, cfg.d_vocab, out=hit[1])
    else:
        index = _build_index(norm, cfg.d_vocab)
    _TOKEN_INDEX[tokens] = (key, index)
    return index


def _prepare(cfg, flat, tokens, labels, loss="ce"):
    """The checks both entry points make: (layout, M, tokens [1 or M, B, T], labels [1 or M, B], B)."""
    loss_mode(loss)       # a bad loss name: one line, before any work
    _check_cfg(cfg)
    lay = ParamLayout(cfg)
    M = _check_flat(cfg, flat, lay)
    tokens, labels, B = _norm_data(cfg, M, tokens, labels, flat.device)
    return lay, M, tokens, labels, B


def _step(cfg, lay, flat, tokens, index, labels, ws, grad_out, loss_out, flush_tasks=(), loss="ce"):
    """The launches of one forward + backward; the last one (ws.deferred's flush) also carries the loss
    mean, the embedding gradients, the weight gradients' split-K sums and ``flush_tasks``."""
    d = ws.deferred
    d.start()
    x = _forward(cfg, lay, flat, tokens, ws)
    xf = _loss_head(cfg, lay, flat, x, labels, ws.loss_ex, ws.correct_ex, ws, grads=True, grad_out=grad_out,
                    loss=loss)
    mean_reduce(ws.loss_ex, ws.correct_ex, loss_out, ws.correct, defer=d)
    _backward(cfg, lay, flat, tokens, index, ws, xf, grad_out)
    for task in flush_tasks:
        d.add_task(*task)
    d.flush()
    return x


def loss_and_grads_flat(cfg, flat, tokens, labels, grad_out=None, loss_out=None, precision=None, flush_tasks=(),
                        index=None, loss="ce"):
    """flat [M, N] float32 contiguous (ParamLayout(cfg)); tokens [B, n_ctx] int64 (shared by all M models) or
    [M, B, n_ctx]; labels [B] or [M, B] int64. Writes grad_out [M, N] float32 (every entry; the mean-loss gradient)
    and loss_out [M] float32 (the mean loss per model: cross-entropy, or StableMax cross-entropy with
    loss="stablemax"; the model batch shares one loss); allocates them if None; returns (loss_out, grad_out).
    No host synchronisation (capturable in a CUDA graph once buffers are allocated). precision: the
    float32 dot mode (_common.PRECISIONS; None: the current default, "ieee" unless changed). flush_tasks:
    (kind, fields, programs) tasks of flush.flush_kernel to run in the step's last launch (the optimizer's
    scalars: FusedOptimizer.scalars_task). index: the tokens' token-scatter index when the caller keeps it
    current itself (batch_draw.draw_batch writes it with the batch); None: token_index(cfg, tokens)."""
    lay, M, tokens3, labels, B = _prepare(cfg, flat, tokens, labels, loss)
    if index is None:
        index = token_index(cfg, tokens)      # cached per tokens tensor: no work while it is unchanged
    tokens = tokens3
    grad_out = _out("grad_out", grad_out, (M, lay.numel), torch.float32, flat.device)
    loss_out = _out("loss_out", loss_out, (M,), torch.float32, flat.device)
    with _common.dot_precision(precision):
        ws = _workspace(cfg, M, B, flat.device, True)
        _step(cfg, lay, flat, tokens, index, labels, ws, grad_out, loss_out, flush_tasks, loss)
    return loss_out, grad_out


EVAL_CHUNK_FLOATS = 1 << 26   # activations per evaluation chunk (256 MiB of float32)


def eval_flat(cfg, flat, tokens, labels, loss_out=None, correct_out=None, precision=None, loss="ce"):
    """Mean loss [M] float32 and number of correct argmax predictions [M] int32 over a split, no host copy of logits.

    tokens/labels as in loss_and_grads_flat. Large splits run in chunks of examples (a Python loop
    over chunks, no sync) so the activations stay under EVAL_CHUNK_FLOATS floats. precision as in
    loss_and_grads_flat. loss: "ce" or "stablemax", the loss the run trains on."""
    lay, M, tokens, labels, B = _prepare(cfg, flat, tokens, labels, loss)
    loss_out = _out("loss_out", loss_out, (M,), torch.float32, flat.device)
    correct_out = _out("correct_out", correct_out, (M,), torch.int32, flat.device)
    chunk = max(64, EVAL_CHUNK_FLOATS // (M * Workspace.floats_per_example(cfg, False)))
    chunk = min(B, chunk)
    loss_ex = torch.empty((M, B), dtype=torch.float32, device=flat.device)
    correct_ex = torch.empty((M, B), dtype=torch.int32, device=flat.device)
    with _common.dot_precision(precision):
        for c0 in range(0, B, chunk):
            c1 = min(B, c0 + chunk)
            tk = tokens[:, c0:c1] if tokens.shape[0] == 1 else tokens[:, c0:c1].contiguous()
            lb = labels[:, c0:c1] if labels.shape[0] == 1 else labels[:, c0:c1].contiguous()
            ws = _workspace(cfg, M, c1 - c0, flat.device, False)
            x = _forward(cfg, lay, flat, tk, ws)
            _loss_head(cfg, lay, flat, x, lb, loss_ex[:, c0:c1], correct_ex[:, c0:c1], ws, loss=loss)
    mean_reduce(loss_ex, correct_ex, loss_out, correct_out)
    return loss_out, correct_out


def loss_and_grads(model, tokens, labels, loss="ce"):
    """(mean loss as a float64 scalar, {param name: gradient}) for one grokfast.Transformer via the
    fused kernels: the unit `grokfast check` compares with grokfast.model.loss_and_grads_reference.
    loss: "ce" or "stablemax"."""
    cfg = model.cfg
    lay = ParamLayout(cfg)
    flat = lay.flatten({k: v.detach().float() for k, v in model.state_dict().items()})
    loss, grad = loss_and_grads_flat(cfg, flat, tokens, labels, loss=loss)
    views = lay.views(grad)
    return loss[0].double(), {name: views[name][0] for name in lay.shapes}


def _recorded_step(cfg, M: int, B: int, eval_variant: bool = False, loss: str = "ce") -> list:
    """The launches of one loss_and_grads_flat at M models and B examples, recorded instead of run
    (the orchestration runs on ``meta`` tensors; no GPU needed): [(kernel, grid, args, constexprs,
    num_warps)]. eval_variant adds eval_flat's loss launch (no gradient) and its mean_reduce launch.
    loss: the loss ("ce" or "stablemax") the loss launches compute."""
    _check_cfg(cfg)
    lay = ParamLayout(cfg)
    dev = torch.device("meta")
    flat = torch.empty((M, lay.numel), dtype=torch.float32, device=dev)
    tokens = torch.empty((1, B, cfg.n_ctx), dtype=torch.int64, device=dev)
    labels = torch.empty((1, B), dtype=torch.int64, device=dev)
    with record_launches() as rec:
        ws = Workspace(cfg, M, B, dev, True)
        x = _step(cfg, lay, flat, tokens, _build_index(tokens, cfg.d_vocab), labels, ws, torch.empty_like(flat),
                  torch.empty((M,), device=dev), loss=loss)
        if eval_variant:
            _loss_head(cfg, lay, flat, x, labels, ws.loss_ex, ws.correct_ex, ws, loss=loss)
            mean_reduce(ws.loss_ex, ws.correct_ex, torch.empty((M,), device=dev), ws.correct)
    return rec


def launches_per_step(cfg, M: int, B: int) -> dict[str, int]:
    """{kernel name: launches} of one training step's forward + backward (loss_and_grads_flat) for M
    models and B examples, counted without a GPU; the optimizer adds optimizer.STEP_LAUNCHES (its
    element kernel: the steppers run its scalars in this pass's last launch), or with orthograd
    optimizer.step_launches(True) = 2 (its sums pass, then the element pass)."""
    counts: dict[str, int] = {}
    for kernel, *_ in _recorded_step(cfg, M, B):
        counts[kernel.__name__] = counts.get(kernel.__name__, 0) + 1
    return counts


def executed_flops(cfg, M: int, B: int) -> list[dict]:
    """The tl.dot work of one training step's forward + backward at M models and B examples, per launch
    in launch order, counted from the recorded launches (no GPU): [{"kernel", "problems" (GEMM problems
    in the launch), "dot_flops" (executed: every program's padded tiles, 2 per multiply-add), "useful"
    (the products' own 2 R N K), "core_flops" (products done as elementwise multiply-adds instead: the
    attention backward's dz = dmid W_O^T, padding included)}]. Kernels without tl.dot (attention,
    LayerNorm, the scatter, the reductions) count 0 dot FLOPs; the optimizer has none."""
    from . import embed_attn, gemm_group, mlp, unembed_loss
    grouped = {mlp.gemm_kernel: [""], **{k: [str(g) for g in range(n)] for n, k in gemm_group.KERNELS.items()}}
    rows = []
    for kernel, grid, args, cx, *_ in _recorded_step(cfg, M, B):
        if kernel in grouped:
            parts = [mlp.dot_flops(args, cx, g) for g in grouped[kernel]]
        elif kernel is unembed_loss.unembed_ce_kernel:
            parts = [unembed_loss.dot_flops(grid, args, cx)]
        elif kernel is embed_attn.attn_fwd_kernel:      # z W_O: one [BB, BDH] x [BDH, BN] dot per head
            BB, BDH, BN = cx["BLOCK_B"], cx["BLOCK_DH"], cx["BLOCK_N"]
            n_rows = args["B"] * cx["TQ"] * grid[2]
            parts = [(2 * BB * BDH * BN * args["NH"] * grid[0] * grid[1] * grid[2],
                      2 * n_rows * args["NH"] * cx["DH"] * args["D"])]
        else:
            parts = []
        core = 0
        if kernel is embed_attn.attn_bwd_kernel:     # dz[b, qi, h] = dmid[b * TQ + qi] W_O[h]^T, 16 columns a step
            core = (2 * grid[0] * grid[1] * cx["TQ"] * cx["BLOCK_B"] * cx["BLOCK_DH"] * 16
                    * -(-args["D"] // 16))
        rows.append({"kernel": kernel.__name__, "problems": len(parts), "dot_flops": sum(p[0] for p in parts),
                     "useful": sum(p[1] for p in parts), "core_flops": core})
    return rows


def aot_specs(cfg, M: int, B: int, loss: str = "ce") -> list[dict]:
    """Every kernel this module launches for loss_and_grads_flat and eval_flat at M models and B
    examples, as {"name", "fn" (JITFunction), "signature" (arg -> triton type, "constexpr" for
    constexpr args, in declaration order), "constexprs", "attrs", "num_warps"}: what triton.compile needs
    (with GPUTarget) to build each one ahead of time, specialised as the JIT specialises these values
    (_common.specialization: integers equal to 1, 16-divisible integers, aligned pointers). Distinct
    compilations only. loss: "ce" or "stablemax", the loss launches' LOSS_MODE (the other kernels do not
    depend on it)."""
    rec = _recorded_step(cfg, M, B, eval_variant=True, loss=loss)
    specs, seen = [], set()
    for kernel, grid, args, cx, num_warps, num_stages in rec:
        sp = specialization(kernel, args, cx)
        key = (kernel.__name__, tuple(sorted(sp["constexprs"].items())), tuple(sp["signature"].items()),
               tuple(sorted(sp["attrs"])), num_warps, num_stages)
        if key in seen:
            continue
        seen.add(key)
        tag = ",".join(f"{k}={v}" for k, v in cx.items())
        specs.append(dict(name=f"{kernel.__name__}[{tag}]", fn=kernel, num_warps=num_warps, num_stages=num_stages, **sp))
    return specs
