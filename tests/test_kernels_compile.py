"""Every fused kernel compiles ahead of time for sm_80 and sm_90 on this GPU-less machine, at the
presets' shapes (nanda, power, pizza; M = 1 and 64), specialised as the JIT specialises the launch's values
(integers equal to 1, 16-divisible integers, aligned pointers), and none spills registers to local memory.

The compilation runs in a subprocess without TRITON_INTERPRET (the interpreter, which conftest
turns on for the other tests, replaces kernels with uncompilable interpreted functions)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from grokfast import aot as presets_aot
from grokfast.kernels import aot


@pytest.fixture(scope="module")
def result():
    return presets_aot.compile_presets_in_subprocess()


def test_every_kernel_compiles_without_spills(result):
    print("\n" + aot.format_table(result))
    archs = {(r["kernel"], r["arch"]) for r in result["rows"]}
    for kind in ("none", "ema", "ma"):
        for arch in ("sm_80", "sm_90"):
            assert (f"grokfast_adamw[{kind}]", arch) in archs
    if importlib.util.find_spec("grokfast.kernels.forward_backward") is not None:
        fb_rows = [r for r in result["rows"] if not r["kernel"].startswith("grokfast_adamw")]
        assert fb_rows or result["skipped"], "forward_backward exists but gave no kernel to compile"
        for name in presets_aot.PRESETS:
            assert any(r["shapes"].startswith(name) for r in fb_rows) or any(
                s.startswith(name) for s in result["skipped"]), name
    for arch in ("sm_80", "sm_90"):        # StableMax (loss "stablemax"): the loss kernel's LOSS_MODE 1, with and without grad
        sm = [r for r in result["rows"] if r["arch"] == arch and "LOSS_MODE=1" in r["kernel"]]
        assert {"GRAD=True" in r["kernel"] for r in sm} == {True, False}, arch
    for r in result["rows"]:
        assert r["regs"] > 0 and r["regs"] <= 255, r
        assert r["shared"] <= (163 if r["arch"] == "sm_80" else 227) * 1024, r
    assert aot.spills(result) == [], "register spills:\n" + aot.format_table(
        {"rows": aot.spills(result), "skipped": []})


def test_a_register_starved_kernel_is_reported_as_spilling():
    """The check can fail: the MA optimizer kernel squeezed into 24 registers spills, and the row says so."""
    code = ("import json; from grokfast.kernels import aot, optimizer; "
            "print(json.dumps(aot.compile_spec(dict(optimizer.aot_specs()[2], maxnreg=24), 90)))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    row = dict(json.loads(out.strip().splitlines()[-1]), shapes="any")
    assert row["regs"] <= 24 and row["spill_stores"] > 0, row
    assert aot.spills({"rows": [row], "skipped": []}) == [row]


def test_optimizer_compiles_to_ieee_sqrt_and_division():
    """On a GPU, tl.sqrt and float32 '/' compile to approximate instructions (sqrt.approx flushes subnormal
    second moments to zero; div.full is off by up to 2 ulp); the optimizer's AdamW update uses sqrt_rn and
    div_rn, so the PTX must hold the IEEE-rounded forms only."""
    code = ("import json; from grokfast.kernels import aot, optimizer; import triton; "
            "from triton.backends.compiler import GPUTarget; from triton.compiler import ASTSource; "
            "s = optimizer.aot_specs()[1]; "
            "k = triton.compile(ASTSource(fn=s['fn'], signature=s['signature'], constexprs=s['constexprs'], "
            "attrs=s['attrs']), target=GPUTarget('cuda', 90, 32), options={'num_warps': s['num_warps']}); "
            "print(json.dumps(k.asm['ptx']))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    ptx = json.loads(out.strip().splitlines()[-1])
    assert "sqrt.rn.f32" in ptx and "div.rn.f32" in ptx
    assert "sqrt.approx" not in ptx and "div.full" not in ptx and "div.approx" not in ptx
