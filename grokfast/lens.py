"""Export to TransformerLens: ``grokfast.to_hooked_transformer(model)``.

    ht = grokfast.to_hooked_transformer(model)            # a HookedTransformer with the same weights
    logits, cache = ht.run_with_cache(tokens)            # logits [B, n_ctx, d_vocab_out]; ours is logits[:, -1]

Our parameter names and shapes are TransformerLens' (DESIGN.md), so the state dict loads as it is; the biases
a preset leaves out are zeros there. The attention rate of Zhong et al. (attn_alpha < 1) has no
HookedTransformer setting: it is added as a permanent hook on each ``hook_pattern`` that mixes the softmax
pattern with constant attention over the causal positions, alpha * pattern + (1 - alpha), as our model does.
``resid_after_ln1`` (ironjr/grokfast's quirk) has no equivalent and is refused.

HookedTransformer is in transformer_lens up to 3.x (checked with 3.9.0); 4.0 removed it (in favour of
TransformerBridge). It is an optional extra: ``pip install -e '.[lens]'``.
"""
from __future__ import annotations

from .config import ConfigError

NEED = "transformer_lens 3.x (3.9.0 checked; 4.0 removed HookedTransformer): pip install -e '.[lens]'"


def _hooked_transformer_classes():
    try:
        import transformer_lens
    except ImportError:
        raise ConfigError(f"to_hooked_transformer needs {NEED}") from None
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError:
        from importlib.metadata import PackageNotFoundError, version
        try:
            v = version("transformer_lens")
        except PackageNotFoundError:
            v = getattr(transformer_lens, "__version__", "(unknown version)")
        raise ConfigError(f"transformer_lens {v} has no HookedTransformer: install {NEED}") from None
    return HookedTransformer, HookedTransformerConfig


def to_hooked_transformer(model, dtype=None):
    """A TransformerLens HookedTransformer computing the same function as ``model`` (a grokfast.Transformer),
    with its weights copied (in ``dtype``, default the model's). Its forward returns logits at every
    position, [B, n_ctx, d_vocab_out]; the last position's are ours."""
    import torch

    HookedTransformer, HookedTransformerConfig = _hooked_transformer_classes()
    c = model.cfg
    if c.resid_after_ln1:
        raise ConfigError("resid_after_ln1 (ironjr/grokfast's residual after ln1) has no HookedTransformer equivalent")
    if getattr(c, "ln_position", "pre") != "pre" or getattr(c, "pos_embed", True) == "sinusoidal":
        raise ConfigError("openai/grok's post-LayerNorm blocks and fixed sinusoidal positions have no "
                          "HookedTransformer equivalent here: convert a pre-LayerNorm model with learned positions")
    sd = model.state_dict()
    dtype = dtype or next(iter(sd.values())).dtype
    ht_cfg = HookedTransformerConfig(
        n_layers=c.n_layers, d_model=c.d_model, n_ctx=c.n_ctx, d_head=c.d_head, n_heads=c.n_heads, d_mlp=c.d_mlp,
        d_vocab=c.d_vocab, d_vocab_out=c.d_vocab_out, act_fn=c.act, normalization_type="LN" if c.layernorm else None,
        eps=c.ln_eps, attention_dir="causal", positional_embedding_type="standard", default_prepend_bos=False,
        init_weights=False, dtype=dtype, device="cpu")
    ht = HookedTransformer(ht_cfg)
    target = ht.state_dict()
    state = {}
    for k, v in target.items():
        if k in sd:
            if tuple(sd[k].shape) != tuple(v.shape):
                raise ConfigError(f"{k}: shape {tuple(sd[k].shape)} here, {tuple(v.shape)} in HookedTransformer")
            state[k] = sd[k].detach().to(dtype).cpu()
        elif k.rsplit(".", 1)[-1] in ("b_Q", "b_K", "b_V", "b_O", "b_U"):
            state[k] = torch.zeros_like(v)        # a bias this model does not have
        else:
            state[k] = v                          # buffers: the causal mask, IGNORE
    extra = sorted(set(sd) - set(target))
    if extra:
        raise ConfigError(f"HookedTransformer has no place for {extra[:4]}")
    ht.load_state_dict(state)
    if c.attn_alpha != 1.0:
        alpha = float(c.attn_alpha)

        def mix(pattern, hook):                   # pattern [B, H, q, k]: alpha * softmax + (1 - alpha) * causal
            q, k = pattern.shape[-2:]
            allowed = torch.ones(q, k, dtype=pattern.dtype, device=pattern.device).tril(k - q)
            return alpha * pattern + (1.0 - alpha) * allowed

        for l in range(c.n_layers):
            ht.add_hook(f"blocks.{l}.attn.hook_pattern", mix, is_permanent=True)
    return ht.eval()
