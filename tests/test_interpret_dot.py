"""The TF32 / 3xTF32 emulation of the Triton interpreter's dot (kernels/interpret_dot.py), and that the
fused step's precision setting reaches every dot: under the interpreter, --precision tf32 must break the
float32 bounds (so the setting is not silently ignored) and tf32x3 must keep them (the emulated
prediction for the GPU, which only a GPU run can confirm)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from grokfast.backends import interpreter_on
from grokfast.kernels import _common, interpret_dot
from grokfast.kernels import forward_backward as fb
from grokfast.model import Transformer, loss_and_grads_reference
from grokfast.kernels.layout import ParamLayout
from grokfast.config import ModelConfig


def test_tf32_rounding():
    # exactly representable in TF32: unchanged; 1 + 2^-11 is a tie (rounds away from zero, both signs);
    # just below a tie rounds down; inf and nan pass through; the exponent range is float32's
    x = np.array([1.0, 1.5, -3.25, 1 + 2 ** -10, 1 + 2 ** -11, -(1 + 2 ** -11), 1 + 2 ** -12, 1e-38, 3e38,
                  np.inf, -np.inf, np.nan], dtype=np.float32)
    r = interpret_dot.tf32(x)
    assert r.dtype == np.float32
    assert r[:4].tolist() == [1.0, 1.5, -3.25, 1 + 2 ** -10]
    assert r[4] == 1 + 2 ** -10 and r[5] == -(1 + 2 ** -10) and r[6] == 1.0
    assert np.isfinite(r[7:9]).all() and abs(r[7] / 1e-38 - 1) < 2 ** -10 and abs(r[8] / 3e38 - 1) < 2 ** -10
    assert r[9] == np.inf and r[10] == -np.inf and np.isnan(r[11])
    g = np.random.default_rng(0).standard_normal(10000).astype(np.float32)
    t = interpret_dot.tf32(g)
    assert (np.abs(t - g) <= 2.0 ** -11 * np.abs(g) * (1 + 1e-6)).all()            # half a TF32 ulp at most
    assert (t.view(np.uint32) & np.uint32(0x1FFF) == 0).all()                       # 13 low bits cleared


def test_emulated_dot_errors_against_float64():
    """Relative errors of acc + a @ b (K = 512, O(1) operands) against float64: TF32 ~1e-4..1e-3 (10
    mantissa bits); 3xTF32 within 4x of float32's own error (the dropped a_lo b_lo term is ~2^-22)."""
    g = np.random.default_rng(1)
    a = g.standard_normal((64, 512)).astype(np.float32)
    b = g.standard_normal((512, 48)).astype(np.float32)
    acc = g.standard_normal((64, 48)).astype(np.float32)
    ref = acc.astype(np.float64) + a.astype(np.float64) @ b.astype(np.float64)

    def err(mode):
        out = interpret_dot.emulated_dot(a, b, acc, mode)
        assert out.dtype == np.float32
        return np.linalg.norm(out - ref) / np.linalg.norm(ref)
    e_ieee, e_x3, e_tf32 = err("ieee"), err("tf32x3"), err("tf32")
    assert e_ieee < 1e-6
    assert e_x3 <= 4 * e_ieee + 1e-7
    assert 1e-5 < e_tf32 < 3e-3


@pytest.mark.skipif(not interpreter_on(), reason="the emulation is for the Triton interpreter (a CPU run)")
@pytest.mark.parametrize("precision,ok", [("tf32x3", True), ("tf32", False)])
def test_fused_gradients_at_each_precision(precision, ok):
    """Every gradient of a tiny 2-layer LayerNorm model against float64: within the float32 bound
    (1e-5, as tests/test_kernels_model.py) at emulated tf32x3; far outside it at tf32 (the setting
    reaches the dots)."""
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=2, d_head=16, d_mlp=64, n_ctx=3, d_vocab=12,
                      d_vocab_out=11, layernorm=True, act="gelu")
    model = Transformer(cfg, seed=3)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, cfg.d_vocab, (40, cfg.n_ctx), generator=g)
    labels = torch.randint(0, cfg.d_vocab_out, (40,), generator=g)
    lay = ParamLayout(cfg)
    flat = lay.flatten(model.state_dict())
    grad = torch.full_like(flat, float("nan"))
    fb.loss_and_grads_flat(cfg, flat, tokens, labels, grad_out=grad, precision=precision)
    _, ref = loss_and_grads_reference(model.double(), tokens, labels)
    worst = max(((v[0].double() - ref[n]).norm() / ref[n].norm()).item() for n, v in lay.views(grad).items())
    assert (worst <= 1e-5) == ok, worst
    assert _common.DOT_PRECISION == "ieee"     # the precision applied to that call only


def test_index_fix_for_older_interpreters():
    """Triton 3.6's interpreter turns a tensor into a Python index with int() of a one-element 1-D array,
    which NumPy >= 2.4 refuses; the installed patch converts through the single element instead."""
    import types

    class Scope:
        def set_attr(self, obj, name, value):
            setattr(obj, name, value)

    class Tensor:
        def __init__(self, data):
            self.handle = types.SimpleNamespace(data=data)

    def old_patch(tensor, scope):                   # what Triton 3.6 installs
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))

    fake = types.SimpleNamespace(_patch_lang_tensor=old_patch)
    interpret_dot._install_index_fix(fake)
    fake._patch_lang_tensor(Tensor, Scope())
    assert list(range(Tensor(np.array([2], dtype=np.int32)), 5)) == [2, 3, 4]
    assert Tensor(np.array(7)).__index__() == 7
    interpret_dot._install_index_fix(fake)          # idempotent: not wrapped twice
    assert fake._patch_lang_tensor._grokfast_index_fix
