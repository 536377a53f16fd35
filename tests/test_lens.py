"""grokfast.to_hooked_transformer: a TransformerLens HookedTransformer with the same weights computes the same
logits (float64, every input, every preset's architecture); without transformer_lens, one clear line."""
import dataclasses
import sys

import pytest
import torch

import grokfast
from grokfast import ModelConfig, Task, Transformer
from grokfast.config import ConfigError

TOL = 1e-10   # float64 on both sides, the same products in different orders


def need_hooked_transformer():
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError as e:
        pytest.skip(f"optional extra [lens] (transformer_lens<4, HookedTransformer) not installed: {e}"[:200])


def _random_model(cfg, seed):
    """Every parameter random (biases and LayerNorm too), float64, so a dropped or misplaced tensor shows."""
    m = Transformer(cfg, seed=seed).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for q in m.parameters():
            q.copy_(torch.randn(q.shape, generator=g, dtype=torch.float64) * 0.5)
    return m.eval()


CASES = {
    "nanda": (Task("x+y", 13, 0.5, 0), ModelConfig(d_model=24, n_heads=3, d_head=8, d_mlp=40)),
    "power": (Task("x*y", 11, 0.5, 0, layout="a op b ="),
              ModelConfig(n_layers=2, d_model=24, n_heads=2, d_head=12, d_mlp=32, act="gelu", layernorm=True)),
    "biases": (Task("x-y", 7, 0.5, 0), ModelConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=24,
                                                   attn_bias=True, unembed_bias=True, unembed_all_tokens=True)),
    "pizza": (Task("x+y", 11, 0.8, 0, layout="a b"), ModelConfig(d_model=16, n_heads=4, d_head=4, d_mlp=32, attn_alpha=0.0)),
    "alpha 0.3, 2 layers": (Task("x+y", 7, 0.8, 0), ModelConfig(n_layers=2, d_model=16, n_heads=2, d_head=8,
                                                                d_mlp=24, attn_alpha=0.3)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hooked_transformer_has_the_same_logits(case):
    need_hooked_transformer()
    task, mc = CASES[case]
    cfg = mc.for_task(task)
    m = _random_model(cfg, seed=len(case))
    ht = grokfast.to_hooked_transformer(m)
    tokens = task.all_pairs().tokens
    with torch.no_grad():
        want = m(tokens)
        got = ht(tokens)
    assert got.dtype == torch.float64 and got.shape == (len(tokens), cfg.n_ctx, cfg.d_vocab_out)
    err = (got[:, -1] - want).abs().max().item()
    assert err < TOL * max(1.0, want.abs().max().item()), err
    if cfg.attn_alpha != 1.0:   # the attention-rate hook is what makes it agree
        ht.reset_hooks(including_permanent=True)
        with torch.no_grad():
            assert (ht(tokens)[:, -1] - want).abs().max().item() > 1e-3
    _, cache = ht.run_with_cache(tokens[:4])      # the ecosystem's tools work on it
    assert f"blocks.{cfg.n_layers - 1}.mlp.hook_post" in cache


def test_resid_after_ln1_is_refused_with_one_line():
    need_hooked_transformer()
    pre = grokfast.preset("grokfast")
    m = Transformer(dataclasses.replace(pre.model, d_model=16, n_heads=2, d_head=8, d_mlp=16))
    with pytest.raises(ConfigError, match="resid_after_ln1"):
        grokfast.to_hooked_transformer(m)


@pytest.mark.parametrize("quirk,value", [("ln_position", "post"), ("pos_embed", "sinusoidal")])
def test_openai_grok_quirks_are_refused_with_one_line(quirk, value):
    need_hooked_transformer()
    small = dict(d_model=16, n_heads=2, d_head=8, d_mlp=16)
    m = Transformer(dataclasses.replace(grokfast.preset("power").model, **small, **{quirk: value}))
    with pytest.raises(ConfigError, match="post-LayerNorm blocks and fixed sinusoidal positions"):
        grokfast.to_hooked_transformer(m)


def test_missing_transformer_lens_names_the_version(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformer_lens", None)           # import fails as if not installed
    m = Transformer(ModelConfig(d_model=16, n_heads=2, d_head=8, d_mlp=16).for_task(Task("x+y", 7, 0.5, 0)))
    with pytest.raises(ConfigError) as e:
        grokfast.to_hooked_transformer(m)
    msg = str(e.value)
    assert "transformer_lens 3" in msg and "4.0 removed HookedTransformer" in msg and "\n" not in msg


def test_a_transformer_lens_without_hooked_transformer_names_the_version(monkeypatch):
    """transformer_lens 4.x installs but has no HookedTransformer: the error says which version to install."""
    import types

    fake = types.ModuleType("transformer_lens")
    fake.__version__ = "4.3.0"
    monkeypatch.setitem(sys.modules, "transformer_lens", fake)
    monkeypatch.setattr("importlib.metadata.version", lambda name: "4.3.0")
    m = Transformer(ModelConfig(d_model=16, n_heads=2, d_head=8, d_mlp=16).for_task(Task("x+y", 7, 0.5, 0)))
    with pytest.raises(ConfigError) as e:
        grokfast.to_hooked_transformer(m)
    msg = str(e.value)
    assert msg.startswith("transformer_lens 4.3.0 has no HookedTransformer") and "3.x" in msg and "\n" not in msg
