"""TF32 and 3xTF32 dots under the Triton interpreter, so that the opt-in precisions mean on a CPU what
they mean on a GPU (and one compatibility fix for older interpreters, ``_install_index_fix``).

Triton's interpreter (TRITON_INTERPRET=1) multiplies every float32 ``tl.dot`` in float32 whatever its
``input_precision``, so without this module ``--precision tf32`` would look exact on a CPU. ``install()``
wraps the interpreter's dot so that, for float32 operands:

    tf32(x)   = x rounded to 10 explicit mantissa bits, to nearest with ties away from zero (what
                cvt.rna.tf32.f32 does on an NVIDIA GPU); exponent range unchanged
    "tf32"    acc + tf32(a) @ tf32(b)
    "tf32x3"  a = a_hi + a_lo with a_hi = tf32(a), a_lo = tf32(a - a_hi) (same for b), then
              acc + a_lo @ b_hi + a_hi @ b_lo + a_hi @ b_hi   (the small terms first, a_lo @ b_lo dropped),
              the order Triton's NVIDIA backend uses
    "ieee"    unchanged (float32 products, float32 sums)

Products of two TF32 numbers are exact in float32 (11 x 11 significant bits); the sums are float32
(numpy's matmul). A tensor core's internal accumulation order and rounding are not modelled, so this is
an emulation that predicts the size of the TF32 errors, not the GPU's bits: only a GPU run of
``grokfast check --precision tf32x3`` can show that the GPU meets the bounds.
"""
from __future__ import annotations

import numpy as np

_installed = False


def tf32(x: np.ndarray) -> np.ndarray:
    """float32 array -> float32 array rounded to TF32 (10 mantissa bits, ties away from zero).
    Infinities and NaNs pass through (adding half an ulp to the magnitude bits cannot change them
    into finite numbers, and the masked bits of a NaN payload do not matter)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32)
    special = (u & np.uint32(0x7F800000)) == np.uint32(0x7F800000)
    r = ((u + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)
    return np.where(special, x, r)


def emulated_dot(a: np.ndarray, b: np.ndarray, acc: np.ndarray, precision: str) -> np.ndarray:
    """acc + a @ b with float32 operands as a GPU computes it at ``precision`` (module docstring)."""
    if precision == "tf32":
        return np.matmul(tf32(a), tf32(b), dtype=np.float32) + acc
    if precision == "tf32x3":
        a_hi, b_hi = tf32(a), tf32(b)
        a_lo, b_lo = tf32(a - a_hi), tf32(b - b_hi)
        out = acc + np.matmul(a_lo, b_hi, dtype=np.float32)
        out = out + np.matmul(a_hi, b_lo, dtype=np.float32)
        return out + np.matmul(a_hi, b_hi, dtype=np.float32)
    return np.matmul(a, b, dtype=np.float32) + acc


def _mode(input_precision) -> str:
    name = str(getattr(input_precision, "name", input_precision)).split(".")[-1].lower()
    return {"tf32": "tf32", "tf32x3": "tf32x3"}.get(name, "ieee")


def _install_index_fix(interpreter) -> None:
    """Triton 3.6's interpreter converts a tensor used as a Python index (a ``range`` bound computed from
    ``tl.program_id``) with ``int(data)`` on a one-element 1-D array, which NumPy >= 2.4 refuses ("only
    0-dimensional arrays can be converted to Python scalars"); later Tritons squeeze first. Patch the
    same conversion in, so the kernels run under the interpreter of either version."""
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "_grokfast_index_fix", False):
        return

    def _patch_lang_tensor(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0])
                       if np.asarray(self.handle.data).size == 1 else int(self.handle.data))

    _patch_lang_tensor._grokfast_index_fix = True
    interpreter._patch_lang_tensor = _patch_lang_tensor


def install() -> bool:
    """Wrap the interpreter's dot (once), and make its tensor-to-index conversion work with NumPy >= 2.4
    on older Tritons. Returns False when this Triton has no interpreter dot to wrap (then the precisions
    stay exact under the interpreter, as before)."""
    global _installed
    if _installed:
        return True
    try:
        from triton.runtime import interpreter as _interp
        _install_index_fix(_interp)
    except ImportError:
        pass
    try:
        from triton.runtime import interpreter
        builder = interpreter.InterpreterBuilder
        orig = builder.create_dot
    except (ImportError, AttributeError):
        return False

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        mode = _mode(input_precision)
        if mode == "ieee" or a.data.dtype != np.float32 or b.data.dtype != np.float32:
            return orig(self, a, b, d, input_precision, max_num_imprecise_acc)
        out = emulated_dot(a.data, b.data, d.data.astype(np.float32), mode)
        return interpreter.TensorHandle(out.astype(d.data.dtype), d.dtype.scalar)

    builder.create_dot = create_dot
    _installed = True
    return True
