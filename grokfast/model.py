"""The reference transformer: the specification the fused kernels are checked against.

A plain decoder-only transformer with TransformerLens parameter names and shapes. It computes only
what the loss needs: earlier layers run at every position; the last layer takes the query, the MLP
and the unembedding at the last position alone (the only position the loss reads), which is the
same function as running it everywhere and slicing.

Shapes: B examples, n_ctx positions T, H heads of d_head, d_model D, d_mlp F, V_out classes.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig


class Embed(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))


class PosEmbed(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.W_pos = nn.Parameter(torch.empty(cfg.n_ctx, cfg.d_model))


def sinusoidal_positions(n_ctx: int, d_model: int) -> torch.Tensor:
    """[n_ctx, d_model] float64: row t, column i = sin(t / 10000^(i / d)) for even i, cos(t / 10000^((i - 1) / d))
    for odd i (openai/grok's fixed position encoding; Vaswani et al.'s)."""
    t = torch.arange(n_ctx, dtype=torch.float64)[:, None]
    i = torch.arange(d_model)
    angle = t / 10000.0 ** ((i - i % 2).double() / d_model)
    return torch.where(i % 2 == 0, angle.sin(), angle.cos())


class LayerNorm(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.eps = cfg.ln_eps
        self.w = nn.Parameter(torch.ones(cfg.d_model))
        self.b = nn.Parameter(torch.zeros(cfg.d_model))

    def forward(self, x):
        # w and b applied outside F.layer_norm: its fused backward sums their gradients in per-thread
        # partial sums, so the bits depended on the thread count; autograd's sums over rows do not.
        return F.layer_norm(x, (x.shape[-1],), None, None, self.eps) * self.w + self.b


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, D, Dh = cfg.n_heads, cfg.d_model, cfg.d_head
        self.cfg = cfg
        self.W_Q = nn.Parameter(torch.empty(H, D, Dh))
        self.W_K = nn.Parameter(torch.empty(H, D, Dh))
        self.W_V = nn.Parameter(torch.empty(H, D, Dh))
        self.W_O = nn.Parameter(torch.empty(H, Dh, D))
        if cfg.attn_bias:
            self.b_Q = nn.Parameter(torch.zeros(H, Dh))
            self.b_K = nn.Parameter(torch.zeros(H, Dh))
            self.b_V = nn.Parameter(torch.zeros(H, Dh))
            self.b_O = nn.Parameter(torch.zeros(D))

    def forward(self, x, last_only: bool, cache=None, name=""):
        """x [B, T, D] -> [B, T, D], or [B, D] at the last position when last_only."""
        cfg = self.cfg
        B, T, D = x.shape
        H, Dh = cfg.n_heads, cfg.d_head
        xq = x[:, -1:] if last_only else x                                   # [B, Tq, D]
        Tq = xq.shape[1]
        # [H, D, Dh] -> [D, H*Dh]: one matmul for all heads
        q = (xq @ self.W_Q.permute(1, 0, 2).reshape(D, H * Dh)).view(B, Tq, H, Dh)
        k = (x @ self.W_K.permute(1, 0, 2).reshape(D, H * Dh)).view(B, T, H, Dh)
        v = (x @ self.W_V.permute(1, 0, 2).reshape(D, H * Dh)).view(B, T, H, Dh)
        if cfg.attn_bias:
            q, k, v = q + self.b_Q, k + self.b_K, v + self.b_V
        scores = torch.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(Dh)      # [B, H, Tq, T]
        qpos = torch.arange(T - Tq, T, device=x.device)
        allowed = qpos[:, None] >= torch.arange(T, device=x.device)[None, :]  # causal [Tq, T]
        scores = scores.masked_fill(~allowed, float("-inf"))
        pattern = scores.softmax(dim=-1)
        if cfg.attn_alpha != 1.0:
            pattern = cfg.attn_alpha * pattern + (1.0 - cfg.attn_alpha) * allowed.to(pattern.dtype)
        if cache is not None:
            cache[name + "pattern"] = pattern
        z = torch.einsum("bhqk,bkhe->bqhe", pattern, v)                      # [B, Tq, H, Dh]
        out = z.reshape(B, Tq, H * Dh) @ self.W_O.reshape(H * Dh, D)          # sum over heads
        if cfg.attn_bias:
            out = out + self.b_O
        return out[:, 0] if last_only else out


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.act = F.relu if cfg.act == "relu" else F.gelu
        self.bias = cfg.mlp_bias
        self.W_in = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp))
        if self.bias:
            self.b_in = nn.Parameter(torch.zeros(cfg.d_mlp))
        self.W_out = nn.Parameter(torch.empty(cfg.d_mlp, cfg.d_model))
        if self.bias:
            self.b_out = nn.Parameter(torch.zeros(cfg.d_model))

    def forward(self, x, cache=None, name=""):
        pre = x @ self.W_in
        post = self.act(pre + self.b_in if self.bias else pre)
        if cache is not None:
            cache[name + "post"] = post
        out = post @ self.W_out
        return out + self.b_out if self.bias else out


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layernorm, self.resid_after_ln1 = cfg.layernorm, cfg.resid_after_ln1
        self.post_ln = cfg.layernorm and cfg.ln_position == "post"
        if cfg.layernorm:
            self.ln1 = LayerNorm(cfg)
        self.attn = Attention(cfg)
        if cfg.layernorm:
            self.ln2 = LayerNorm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, last_only: bool, cache=None, name=""):
        if self.post_ln:  # openai/grok's DecoderBlock: x = ln1(x + attn(x)); x = ln2(x + mlp(x))
            x = self.ln1((x[:, -1] if last_only else x) + self.attn(x, last_only, cache, name + "attn."))
            return self.ln2(x + self.mlp(x, cache, name + "mlp."))
        h = self.ln1(x) if self.layernorm else x
        a = self.attn(h, last_only, cache, name + "attn.")
        if self.resid_after_ln1:  # ironjr/grokfast's Block: x = ln_1(x); x = x + attn(x)
            x = h
        x = (x[:, -1] if last_only else x) + a
        h = self.ln2(x) if self.layernorm else x
        return x + self.mlp(h, cache, name + "mlp.")


class Unembed(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.W_U = nn.Parameter(torch.empty(cfg.d_model, cfg.d_vocab_out))
        if cfg.unembed_bias:
            self.b_U = nn.Parameter(torch.zeros(cfg.d_vocab_out))


class Transformer(nn.Module):
    """tokens [B, n_ctx] (int64) -> logits at the last position [B, d_vocab_out] (float32).

    Init (Nanda et al.): every matrix randn / sqrt(d_model), W_U randn / sqrt(d_vocab); biases 0,
    LayerNorm weights 1; with cfg.init "pizza" the same but W_in randn / sqrt(d_mlp); with "furuta" W_E
    randn / sqrt(d_vocab) and W_U randn / sqrt(d_model); with "torch", PyTorch's module defaults, drawn in
    ironjr/grokfast's order (_init_torch_defaults); with "grok", PyTorch's defaults for openai/grok's modules
    (W_E N(0, 1), each matrix U(+-1 / sqrt(fan_in)); their distribution, not their draws). ``seed`` (or a ``generator`` to draw from) makes the
    init the same on every device.
    """

    def __init__(self, cfg: ModelConfig, seed: int = 0, device="cpu", generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        self.embed = Embed(cfg)
        if cfg.learned_pos:
            self.pos_embed = PosEmbed(cfg)
        elif cfg.pos_embed == "sinusoidal":   # fixed, not a parameter; moves and casts with the model
            self.register_buffer("W_pos_fixed", sinusoidal_positions(cfg.n_ctx, cfg.d_model), persistent=False)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        if cfg.layernorm and cfg.ln_position == "pre":
            self.ln_final = LayerNorm(cfg)
        self.unembed = Unembed(cfg)
        self.init_weights(seed, generator)
        self.to(device)

    @torch.no_grad()
    def init_weights(self, seed: int = 0, generator: torch.Generator | None = None) -> None:
        """Draws the initial weights from ``generator`` (advancing it: TrainConfig.rng "stream" goes on to
        draw the split and the batches from it), or from a fresh generator seeded with ``seed``."""
        g = generator if generator is not None else torch.Generator().manual_seed(int(seed))
        if self.cfg.init == "torch":
            return self._init_torch_defaults(g)
        for name, p in self.named_parameters():
            if self.cfg.init == "grok":   # PyTorch's defaults: nn.Embedding N(0, 1) (a learned W_pos too, as a
                leaf = name.rsplit(".", 1)[-1]  # table), bias-free nn.Linear U(+-1 / sqrt(fan_in)), fan_in its input width
                if leaf in ("W_E", "W_pos"):
                    p.copy_(torch.randn(p.shape, generator=g))
                elif leaf.startswith("W_"):
                    fan_in = p.shape[1] * p.shape[0] if leaf == "W_O" else p.shape[-2]
                    bound = 1 / math.sqrt(fan_in)
                    p.copy_(torch.rand(p.shape, generator=g) * (2 * bound) - bound)
                else:
                    p.fill_(1.0 if leaf == "w" else 0.0)
                continue
            leaf = name.rsplit(".", 1)[-1]
            if leaf.startswith("W_"):
                scale = self.cfg.d_vocab if leaf == "W_U" else self.cfg.d_model
                if leaf in ("W_E", "W_U") and self.cfg.init == "furuta":  # frt03/grok_mod_poly: scales swapped
                    scale = self.cfg.d_vocab if leaf == "W_E" else self.cfg.d_model
                if leaf == "W_in" and self.cfg.init == "pizza":  # Zhong et al.'s train script
                    scale = self.cfg.d_mlp
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(scale))
            elif leaf == "w":
                p.fill_(1.0)
            else:
                p.zero_()

    def _init_torch_defaults(self, g: torch.Generator) -> None:
        """PyTorch's module defaults, drawn as constructing ironjr/grokfast's Decoder draws them after
        torch.manual_seed(seed): the same calls, shapes and order, so one seed gives their weights.
        nn.Embedding W_E [d_vocab, D] and a position table of n_ctx + 1 rows (their seq_len 5 for 4 input
        positions; the last row is never read and is dropped here), both N(0, 1); per block, in
        nn.MultiheadAttention's order: out_proj as an nn.Linear [D, H d_head] (kaiming-uniform, U(+-1 /
        sqrt(H d_head)); its bias drawn, then zeroed), then the stacked in-projection [3 H d_head, D]
        xavier-uniform, U(+-sqrt(6 / (D + 3 H d_head))), attention biases 0; then the MLP's two
        nn.Linear, W_in [d_mlp, D] and b_in U(+-1 / sqrt(D)), W_out [D, d_mlp] and b_out U(+-1 /
        sqrt(d_mlp)); last the bias-free head [d_vocab_out, D], U(+-1 / sqrt(D)); LayerNorm weights 1,
        biases 0."""
        cfg = self.cfg
        H, Dh, D, F = cfg.n_heads, cfg.d_head, cfg.d_model, cfg.d_mlp
        init = nn.init

        def linear(n_out, n_in, bias=True):          # nn.Linear.reset_parameters, as [n_out, n_in]
            w = init.kaiming_uniform_(torch.empty(n_out, n_in), a=math.sqrt(5), generator=g)
            b = init.uniform_(torch.empty(n_out), -1 / math.sqrt(n_in), 1 / math.sqrt(n_in), generator=g) if bias else None
            return w, b

        for name, p in self.named_parameters():   # LayerNorm and the attention biases
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "w":
                p.fill_(1.0)
            elif not leaf.startswith("W_"):
                p.zero_()
        self.embed.W_E.copy_(init.normal_(torch.empty(cfg.d_vocab, D), generator=g))
        self.pos_embed.W_pos.copy_(init.normal_(torch.empty(cfg.n_ctx + 1, D), generator=g)[:cfg.n_ctx])
        for blk in self.blocks:
            a = blk.attn
            w_o, _ = linear(D, H * Dh)                                        # out_proj (bias then zeroed)
            w_in = init.xavier_uniform_(torch.empty(3 * H * Dh, D), generator=g)
            for W, chunk in zip((a.W_Q, a.W_K, a.W_V), w_in.chunk(3)):        # q = x chunk^T, per head
                W.copy_(chunk.view(H, Dh, D).transpose(1, 2))
            a.W_O.copy_(w_o.T.reshape(H, Dh, D))
            w1, b1 = linear(F, D)
            w2, b2 = linear(D, F)
            blk.mlp.W_in.copy_(w1.T), blk.mlp.b_in.copy_(b1)
            blk.mlp.W_out.copy_(w2.T), blk.mlp.b_out.copy_(b2)
        w_u, b_u = linear(cfg.d_vocab_out, D, bias=cfg.unembed_bias)
        self.unembed.W_U.copy_(w_u.T)
        if cfg.unembed_bias:
            self.unembed.b_U.copy_(b_u)

    def forward(self, tokens: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        """Logits at the last position. Pass a dict as ``cache`` to receive activations: attention
        patterns ``blocks.{l}.attn.pattern`` and MLP activations ``blocks.{l}.mlp.post`` (the last
        layer's at the last position only: [B, d_mlp]), and ``resid_final`` [B, d_model]."""
        # F.embedding, not W_E[tokens]: the indexing's backward (index_put_ with accumulate) adds rows in an
        # order that changes from call to call with several CPU threads; embedding's (index_add_) does not.
        x = F.embedding(tokens, self.embed.W_E)                                       # [B, T, D]
        if self.cfg.learned_pos:
            x = x + self.pos_embed.W_pos
        elif self.cfg.pos_embed == "sinusoidal":
            x = x + self.W_pos_fixed.to(x.dtype)   # kept in float64, rounded to the model's dtype here
        L = len(self.blocks)
        for l, block in enumerate(self.blocks):
            x = block(x, last_only=(l == L - 1), cache=cache, name=f"blocks.{l}.")
        if self.cfg.layernorm and self.cfg.ln_position == "pre":
            x = self.ln_final(x)
        if cache is not None:
            cache["resid_final"] = x
        logits = x @ self.unembed.W_U
        if self.cfg.unembed_bias:
            logits = logits + self.unembed.b_U
        return logits


def cross_entropy64(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy computed in float64 (the float32 softmax underflows once the model is confident)."""
    return F.cross_entropy(logits.double(), labels)


def stablemax_s(x: torch.Tensor) -> torch.Tensor:
    """StableMax's s(x) (Prieto et al. 2025): x + 1 for x >= 0, 1 / (1 - x) for x < 0. Positive, increasing,
    continuous with slope 1 at 0, and linear (not exponential) for large x. (Their code writes
    1 / (1 - x + 1e-30); the clamp below keeps the unused branch finite instead, so autograd never
    multiplies an infinity by zero where x = 1.)"""
    return torch.where(x >= 0, x + 1, 1 / (1 - x.clamp(max=0)))


def stablemax_cross_entropy64(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean StableMax cross-entropy in float64 (Prieto et al. 2025, their stablemax_cross_entropy):
    -mean_i log( s(z_i,y_i) / sum_c s(z_i,c) ), s as in stablemax_s, the logits cast to float64 first."""
    s = stablemax_s(logits.double())
    return -(s.gather(-1, labels[:, None]).squeeze(-1) / s.sum(-1)).log().mean()


LOSSES = {"ce": cross_entropy64, "stablemax": stablemax_cross_entropy64}


def loss_fn(name: str):
    """The loss of TrainConfig.loss: "ce" (cross_entropy64) or "stablemax" (stablemax_cross_entropy64)."""
    return LOSSES[name]


def loss_and_grads_reference(model: Transformer, tokens: torch.Tensor, labels: torch.Tensor, loss: str = "ce"):
    """(mean loss as a float64 scalar tensor, {param name: gradient}) for one batch, via autograd."""
    params = dict(model.named_parameters())
    loss = loss_fn(loss)(model(tokens), labels)
    grads = torch.autograd.grad(loss, list(params.values()))
    return loss.detach(), {n: g for n, g in zip(params, grads)}
