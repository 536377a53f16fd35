"""ironjr/grokfast (Lee et al. 2024, main.py and grokfast.py at 93b2248) restated for the tests: its Decoder and
its training loop, written here in a few lines from reading the public code (not copied).

What the loop does, in their order: torch.manual_seed(seed); build the Decoder (its modules draw from the global
generator); data = every (x, y) with x in 0..p-1, y in 1..p-1 in x-major order, rows [x, op, y, =, x*y mod p]; one
torch.randperm(n) split into halves, train first; torch.optim.Adam(all parameters, coupled L2 weight decay, betas
(0.9, 0.98)); LambdaLR(u -> 1 if u > 10 else u / 10), stepped after each update. Each epoch: train_data is
shuffled in place by one torch.randperm (the shuffles compose), cut into batches of 512 (the last one short);
per batch: logits at the last input position, F.cross_entropy, zero_grad, backward, the Grokfast filter on
p.grad, optimizer.step(), scheduler.step(), i += 1. After the epoch's training, validation accuracy over the
other half (in batches of 512, in eval mode, no update) is logged against `its` = i.
"""
import math
from collections import deque

import torch
import torch.nn as nn
import torch.nn.functional as F


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


def grokfast_paper_to_ours(theirs: GrokfastPaperDecoder, cfg) -> dict:
    """Their parameters (or any dict of tensors keyed and shaped like them, such as Grokfast filter state)
    under our parameter names and shapes."""
    t = dict(theirs.named_parameters()) if isinstance(theirs, nn.Module) else theirs
    H, Dh, D = cfg.n_heads, cfg.d_head, cfg.d_model
    s = {"embed.W_E": t["token_embeddings.weight"], "pos_embed.W_pos": t["position_embeddings.weight"][:cfg.n_ctx]}
    for l in range(cfg.n_layers):
        b, P = f"blocks.{l}.", f"layers.{l}."
        Wq, Wk, Wv = t[P + "attn.in_proj_weight"].chunk(3)     # each [H*Dh, D]: q = x W^T + b
        bq, bk, bv = t[P + "attn.in_proj_bias"].chunk(3)
        s.update({b + "ln1.w": t[P + "ln_1.weight"], b + "ln1.b": t[P + "ln_1.bias"],
                  b + "ln2.w": t[P + "ln_2.weight"], b + "ln2.b": t[P + "ln_2.bias"]})
        for name, W, bias in (("Q", Wq, bq), ("K", Wk, bk), ("V", Wv, bv)):
            s[b + f"attn.W_{name}"] = W.reshape(H, Dh, D).transpose(1, 2)
            s[b + f"attn.b_{name}"] = bias.reshape(H, Dh)
        s[b + "attn.W_O"] = t[P + "attn.out_proj.weight"].T.reshape(H, Dh, D)
        s[b + "attn.b_O"] = t[P + "attn.out_proj.bias"]
        s[b + "mlp.W_in"], s[b + "mlp.b_in"] = t[P + "mlp.0.weight"].T, t[P + "mlp.0.bias"]
        s[b + "mlp.W_out"], s[b + "mlp.b_out"] = t[P + "mlp.2.weight"].T, t[P + "mlp.2.bias"]
    s["ln_final.w"], s["ln_final.b"] = t["ln_f.weight"], t["ln_f.bias"]
    s["unembed.W_U"] = t["head.weight"].T
    return {k: v.detach().clone() for k, v in s.items()}


def paper_data(p=97):
    """[5, N]: rows x, op, y, =, x*y mod p over x in 0..p-1, y in 1..p-1 (x-major); op token p + 1, = token p."""
    x, y = torch.cartesian_prod(torch.arange(p), torch.arange(1, p)).T
    return torch.stack([x, torch.full_like(x, p + 1), y, torch.full_like(x, p), x * y % p])


def gradfilter_ema(model, grads, alpha, lamb):
    if grads is None:   # the first call starts the average at the first gradient (and then mixes it in once more)
        grads = {n: p.grad.detach() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        grads[n] = grads[n] * alpha + p.grad.detach() * (1 - alpha)
        p.grad = p.grad + grads[n] * lamb
    return grads


def gradfilter_ma(model, grads, window, lamb):
    if grads is None:
        grads = {n: deque(maxlen=window) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        grads[n].append(p.grad.detach())                       # the raw gradient (p.grad is replaced below)
        if len(grads[n]) == window:                            # applied once the window is full
            p.grad = p.grad + sum(grads[n]) / len(grads[n]) * lamb
    return grads


def paper_training(seed, filt="ema", alpha=0.98, lamb=2.0, window=100, wd=0.005, lr=1e-3, p=97, batch_size=512,
                   dtype=torch.float64):
    """Their main() as a generator over optimizer steps, on the global torch generator (call it inside
    torch.random.fork_rng()). Yields after each step: ("step", i, model, filter state, batch [5, b]); after each
    epoch's training: ("val", i, validation accuracy). Starts by yielding ("start", model, train_data, valid_data)."""
    torch.manual_seed(seed)
    model = GrokfastPaperDecoder(tokens=p + 2).to(dtype)
    data = paper_data(p)
    train_idx, valid_idx = torch.randperm(data.shape[1]).split(data.shape[1] // 2)
    train_data, valid_data = data[:, train_idx], data[:, valid_idx]
    yield ("start", model, train_data, valid_data)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: 1 if u > 10 else u / 10)
    grads, i = None, 0
    while True:
        train_data = train_data[:, torch.randperm(train_data.shape[1])]
        model.train()
        for batch in torch.split(train_data, batch_size, dim=1):
            loss = F.cross_entropy(model(batch[:-1])[-1], batch[-1])
            model.zero_grad()
            loss.backward()
            if filt == "ema":
                grads = gradfilter_ema(model, grads, alpha, lamb)
            elif filt == "ma":
                grads = gradfilter_ma(model, grads, window, lamb)
            opt.step()
            sched.step()
            i += 1
            yield ("step", i, model, grads, batch)
        model.eval()
        with torch.no_grad():
            correct = sum((model(b[:-1])[-1].argmax(-1) == b[-1]).sum().item()
                          for b in torch.split(valid_data, batch_size, dim=1))
        yield ("val", i, correct / valid_data.shape[1])
