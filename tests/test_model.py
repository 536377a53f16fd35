"""The reference transformer: parameter contract, init, and the function it computes."""
import dataclasses
import math

import pytest
import torch

import grokfast
from grokfast.config import ConfigError, ModelConfig
from grokfast.model import Transformer, cross_entropy64, loss_and_grads_reference


def naive_logits(sd, cfg: ModelConfig, tokens):
    """Every position through every layer, head by head, in float64 -- then the last position.
    Written independently of grokfast.model (no last-position shortcut, no fused head matmuls)."""
    sd = {k: v.double() for k, v in sd.items()}
    B, T = tokens.shape

    def ln(x, w, b):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + cfg.ln_eps) * w + b

    x = sd["embed.W_E"][tokens] + sd["pos_embed.W_pos"][None]
    for l in range(cfg.n_layers):
        pre = f"blocks.{l}."
        h = ln(x, sd[pre + "ln1.w"], sd[pre + "ln1.b"]) if cfg.layernorm else x
        attn = torch.zeros_like(x)
        for head in range(cfg.n_heads):
            q = h @ sd[pre + "attn.W_Q"][head]
            k = h @ sd[pre + "attn.W_K"][head]
            v = h @ sd[pre + "attn.W_V"][head]
            if cfg.attn_bias:
                q, k, v = q + sd[pre + "attn.b_Q"][head], k + sd[pre + "attn.b_K"][head], v + sd[pre + "attn.b_V"][head]
            s = q @ k.transpose(1, 2) / math.sqrt(cfg.d_head)
            mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
            s = s.masked_fill(~mask, -math.inf)
            pat = cfg.attn_alpha * torch.softmax(s, -1) + (1 - cfg.attn_alpha) * mask.double()
            attn = attn + (pat @ v) @ sd[pre + "attn.W_O"][head]
        if cfg.attn_bias:
            attn = attn + sd[pre + "attn.b_O"]
        x = x + attn
        h = ln(x, sd[pre + "ln2.w"], sd[pre + "ln2.b"]) if cfg.layernorm else x
        pre_act = h @ sd[pre + "mlp.W_in"] + sd[pre + "mlp.b_in"]
        post = torch.relu(pre_act) if cfg.act == "relu" else 0.5 * pre_act * (1 + torch.erf(pre_act / math.sqrt(2)))
        x = x + post @ sd[pre + "mlp.W_out"] + sd[pre + "mlp.b_out"]
    if cfg.layernorm:
        x = ln(x, sd["ln_final.w"], sd["ln_final.b"])
    logits = x @ sd["unembed.W_U"]
    if cfg.unembed_bias:
        logits = logits + sd["unembed.b_U"]
    return logits[:, -1]


CONFIGS = [
    dict(),
    dict(n_layers=2, layernorm=True, act="gelu", n_ctx=4),
    dict(n_ctx=2, attn_alpha=0.0),
    dict(n_ctx=5, attn_alpha=0.3, n_heads=3, d_head=8),
    dict(n_layers=2, attn_bias=True, unembed_bias=True, n_heads=1, d_head=16),
    dict(n_layers=3, layernorm=True, n_ctx=3, n_heads=2, d_head=12),
]


def small(**kw):
    base = dict(d_model=24, n_heads=2, d_head=12, d_mlp=40, d_vocab=14, d_vocab_out=11, n_ctx=3)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("kw", CONFIGS)
def test_forward_matches_naive_full_sequence_model(kw):
    cfg = small(**kw)
    torch.manual_seed(0)
    model = Transformer(cfg, seed=1).double()
    with torch.no_grad():  # random biases and LayerNorm weights too, so they are all exercised
        for n, p in model.named_parameters():
            if not n.rsplit(".", 1)[-1].startswith("W_"):
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if n.endswith(".w") else 0.0))
    tokens = torch.randint(0, cfg.d_vocab, (37, cfg.n_ctx))
    got = model(tokens)
    want = naive_logits(model.state_dict(), cfg, tokens)
    assert got.shape == (37, cfg.d_vocab_out)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(grokfast.PRESETS))
def test_parameter_names_and_shapes_follow_the_contract(name):
    cfg = ModelConfig.preset(name)
    model = Transformer(cfg)
    sd = model.state_dict()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == list(cfg.param_shapes().items())
    assert sum(v.numel() for v in sd.values()) == cfg.n_params()
    assert all(v.dtype == torch.float32 for v in sd.values())


def test_nanda_contract_by_name():
    sd = Transformer(ModelConfig.preset("nanda")).state_dict()
    expect = {
        "embed.W_E": (114, 128), "pos_embed.W_pos": (3, 128),
        "blocks.0.attn.W_Q": (4, 128, 32), "blocks.0.attn.W_K": (4, 128, 32), "blocks.0.attn.W_V": (4, 128, 32),
        "blocks.0.attn.W_O": (4, 32, 128), "blocks.0.mlp.W_in": (128, 512), "blocks.0.mlp.b_in": (512,),
        "blocks.0.mlp.W_out": (512, 128), "blocks.0.mlp.b_out": (128,), "unembed.W_U": (128, 113),
    }
    assert {k: tuple(v.shape) for k, v in sd.items()} == expect


def test_power_preset_has_layernorm_and_two_layers():
    sd = Transformer(ModelConfig.preset("power")).state_dict()
    for k in ("blocks.1.ln1.w", "blocks.1.ln2.b", "ln_final.w", "ln_final.b", "blocks.1.attn.W_O"):
        assert k in sd
    assert ModelConfig.preset("pizza").n_ctx == 2


def test_init_is_seeded_and_scaled():
    cfg = ModelConfig.preset("nanda")
    a, b, c = Transformer(cfg, seed=3), Transformer(cfg, seed=3), Transformer(cfg, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.embed.W_E, c.embed.W_E)
    assert abs(a.blocks[0].mlp.W_in.std().item() - 1 / math.sqrt(128)) < 0.003
    assert abs(a.unembed.W_U.std().item() - 1 / math.sqrt(114)) < 0.003
    assert a.blocks[0].mlp.b_in.abs().sum() == 0


@pytest.mark.parametrize("name", ["nanda", "small", "pizza"])
def test_loss_at_init_is_near_log_p(name):
    pre = grokfast.preset(name)
    task = grokfast.Task.from_spec(pre.task)
    model = Transformer(pre.model.for_task(task), seed=0)
    loss = cross_entropy64(model(task.train.tokens), task.train.labels).item()
    assert abs(loss - math.log(task.p)) < 0.15 * math.log(task.p), (loss, math.log(task.p))


def test_loss_is_float64_and_survives_confident_logits():
    logits = torch.tensor([[20.0, 0.0, 0.0]])
    loss = cross_entropy64(logits, torch.tensor([0]))
    assert loss.dtype == torch.float64
    assert torch.nn.functional.cross_entropy(logits, torch.tensor([0])).item() == 0.0  # float32 underflows
    assert abs(loss.item() / (2 * math.exp(-20)) - 1) < 1e-5


def test_loss_and_grads_reference_matches_finite_differences():
    cfg = small(n_layers=2, layernorm=True, act="gelu")
    model = Transformer(cfg, seed=2).double()
    tokens = torch.randint(0, cfg.d_vocab, (9, cfg.n_ctx))
    labels = torch.randint(0, cfg.d_vocab_out, (9,))
    loss, grads = loss_and_grads_reference(model, tokens, labels)
    assert set(grads) == set(cfg.param_shapes())
    h = 1e-6
    g = torch.Generator().manual_seed(0)
    for name in ("embed.W_E", "blocks.0.attn.W_K", "blocks.1.mlp.W_in", "ln_final.w", "unembed.W_U"):
        p = dict(model.named_parameters())[name]
        d = torch.randn(p.shape, generator=g, dtype=torch.float64)
        with torch.no_grad():
            p += h * d
            up = cross_entropy64(model(tokens), labels).item()
            p -= 2 * h * d
            down = cross_entropy64(model(tokens), labels).item()
            p += h * d
        fd = (up - down) / (2 * h)
        assert abs(fd - (grads[name] * d).sum().item()) < 1e-6 * max(1.0, abs(fd)), name


def test_cache_exposes_last_layer_neurons():
    cfg = small()
    model = Transformer(cfg)
    cache = {}
    tokens = torch.randint(0, cfg.d_vocab, (5, cfg.n_ctx))
    logits = model(tokens, cache=cache)
    assert cache["blocks.0.mlp.post"].shape == (5, cfg.d_mlp)
    assert cache["resid_final"].shape == (5, cfg.d_model)
    assert torch.allclose(cache["resid_final"] @ model.unembed.W_U, logits)


@pytest.mark.parametrize("kw,msg", [(dict(act="tanh"), "act"), (dict(attn_alpha=1.5), "attn_alpha"),
                                    (dict(d_model=0), "d_model"), (dict(n_heads=2.5), "n_heads")])
def test_bad_model_config_is_one_clear_error(kw, msg):
    with pytest.raises(ConfigError) as e:
        small(**kw)
    assert msg in str(e.value)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset"):
        ModelConfig.preset("gpt5")
