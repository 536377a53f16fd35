"""Ahead-of-time compilation of every fused kernel for sm_80 and sm_90 on a machine with no GPU, and
the resources each one uses: registers per thread, shared memory, local memory, and spills.

Each kernel is compiled as ``triton.compile(ASTSource(fn, signature, constexprs, attrs),
target=GPUTarget("cuda", arch, 32))`` at the presets' shapes (the forward/backward kernels'
constexprs depend on the model and batch, so each preset and M gives its own specs). Then:
  - registers, shared and local bytes: ``cuobjdump --dump-resource-usage`` on the cubin;
  - spills: ptxas -v on the kernel's PTX ("N bytes spill stores, N bytes spill loads"), the same
    ptxas triton uses for that architecture (both tools ship inside the triton wheel).
A spill is a failure: the kernels are small enough to live in registers and shared memory.

The shapes come from the caller as (label, ModelConfig, B) triples: this module knows no presets
(grokfast/aot.py builds them from the presets and holds the command line, ``python -m grokfast.aot``).
The interpreter (TRITON_INTERPRET=1) replaces @triton.jit functions with interpreted ones that
cannot be compiled: compile in a process without that variable.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

from ._common import FP_FUSION

MODEL_BATCH = (1, 64)
ARCHS = (80, 90)


def collect_specs(shapes, model_batch=MODEL_BATCH, arch: int | None = None):
    """([(where, spec)], [skipped reasons]): every kernel to compile, duplicates removed. shapes: a
    sequence of (label, ModelConfig, B): the model and the examples per step. A spec is a dict(name,
    fn, signature, constexprs) with optional attrs, num_warps, num_stages. arch (80, 90): the GEMMs are
    planned with that architecture's tile table (mlp.TILES), as they are on such a GPU."""
    from . import mlp, optimizer
    if arch is not None:
        with mlp.tile_table(f"sm_{arch}" if f"sm_{arch}" in mlp.TILES else "default"):
            return collect_specs(shapes, model_batch)

    specs, skipped, seen = [], [], set()

    def add(where, spec):
        key = (spec["fn"].__name__, repr(sorted(spec["signature"].items())),
               repr(sorted(spec["constexprs"].items())), repr(sorted((spec.get("attrs") or {}).items())),
               spec.get("num_warps"), spec.get("num_stages"))
        if key not in seen:
            seen.add(key)
            specs.append((where, spec))

    for spec in optimizer.aot_specs():
        add("any", spec)
    from . import batch_draw
    for spec in batch_draw.aot_specs():          # minibatches "draw" and "epoch" (the power preset's split and batch)
        add("power batches", spec)
    from . import forward_backward as fb
    from ._common import dot_precision
    for k, (name, cfg, B) in enumerate(shapes):
        why = fb.supported(cfg)
        if why:
            skipped.append(f"{name}: {why}")
            continue
        for M in model_batch:
            for spec in fb.aot_specs(cfg, M, B):
                add(f"{name} M={M} B={B}", spec)
            # loss "stablemax" changes only the loss launches (LOSS_MODE 1); their tiles depend on the shape
            for spec in fb.aot_specs(cfg, M, B, loss="stablemax"):
                add(f"{name} M={M} B={B} stablemax", spec)
        if k == 0:
            # the opt-in tensor-core precision changes only the dot: compile it at one shape to show it builds
            with dot_precision("tf32x3"):
                for spec in fb.aot_specs(cfg, 1, B):
                    if "PRECISION" in str(spec["constexprs"]):
                        add(f"{name} M=1 B={B} tf32x3", spec)
    return specs, skipped


def _tool(name: str, arch: int) -> str:
    import triton
    if name == "ptxas":
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(arch).path
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def resource_usage(cubin: bytes, ptx: str, arch: int) -> dict:
    """{regs, shared, local, stack, spill_stores, spill_loads} of a compiled kernel (bytes, per thread
    for local/stack/spills, per block for shared)."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    with tempfile.TemporaryDirectory() as d:
        cub, src = os.path.join(d, "k.cubin"), os.path.join(d, "k.ptx")
        with open(cub, "wb") as f:
            f.write(cubin)
        with open(src, "w") as f:
            f.write(ptx)
        dump = subprocess.run([_tool("cuobjdump", arch), "--dump-resource-usage", cub],
                              capture_output=True, text=True, check=True).stdout
        log = subprocess.run([_tool("ptxas", arch), "-v", f"--gpu-name={sm_arch_from_capability(arch)}", src,
                              "-o", os.path.join(d, "again.cubin")], capture_output=True, text=True, check=True)
    usage = {}
    for key, field in (("regs", "REG"), ("stack", "STACK"), ("shared", "SHARED"), ("local", "LOCAL")):
        m = re.search(rf"\b{field}:(\d+)", dump)
        if m is None:
            raise RuntimeError(f"cuobjdump printed no {field}: {dump!r}")
        usage[key] = int(m.group(1))
    text = log.stdout + log.stderr
    stores = [int(x) for x in re.findall(r"(\d+) bytes spill stores", text)]
    loads = [int(x) for x in re.findall(r"(\d+) bytes spill loads", text)]
    if not stores:
        raise RuntimeError(f"ptxas -v printed no spill counts: {text!r}")
    usage["spill_stores"], usage["spill_loads"] = sum(stores), sum(loads)
    return usage


def compile_spec(spec: dict, arch: int) -> dict:
    """Compile one spec for sm_<arch> and return its row: kernel, arch, regs, shared, local, spills."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("TRITON_INTERPRET is set: compile in a subprocess (compile_all_in_subprocess)")
    src = ASTSource(fn=spec["fn"], signature=spec["signature"], constexprs=spec["constexprs"],
                    attrs=spec.get("attrs"))
    options = {k: spec[k] for k in ("num_warps", "num_stages", "maxnreg") if spec.get(k) is not None}
    options["enable_fp_fusion"] = FP_FUSION          # as every launch pins it (_common.launch)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    usage = resource_usage(kernel.asm["cubin"], kernel.asm["ptx"], arch)
    usage["shared"] = max(usage["shared"], int(kernel.metadata.shared))  # dynamic shared memory too
    return dict(kernel=spec["name"], arch=f"sm_{arch}", num_warps=kernel.metadata.num_warps, **usage)


_SPECS: list = []   # the specs being compiled, inherited by forked workers (JITFunctions do not pickle)


def _compile_job(job):
    i, arch = job
    where, spec = _SPECS[i]
    return dict(compile_spec(spec, arch), shapes=where)


def compile_all(shapes, archs=ARCHS, model_batch=MODEL_BATCH, workers: int | None = None) -> dict:
    """Compile every spec of collect_specs(shapes, model_batch, arch) for its arch, on ``workers`` processes
    (default: one per CPU core); {"rows": one per (spec, arch), arch by arch in spec order, "skipped": reasons}."""
    global _SPECS
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("TRITON_INTERPRET is set: compile in a process without it")
    specs, skipped, jobs = [], [], []
    for arch in archs:                 # each architecture's own tiles: its own specs
        arch_specs, skipped = collect_specs(shapes, model_batch, arch)
        jobs += [(len(specs) + i, arch) for i in range(len(arch_specs))]
        specs += arch_specs
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    _SPECS = specs
    try:
        if workers == 1:
            rows = [_compile_job(j) for j in jobs]
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
                rows = list(pool.map(_compile_job, jobs))
    finally:
        _SPECS = []
    return {"rows": rows, "skipped": skipped}


def spills(result: dict) -> list[dict]:
    return [r for r in result["rows"] if r["spill_stores"] or r["spill_loads"] or r["local"]]


def format_table(result: dict) -> str:
    w = max([len(r["kernel"]) for r in result["rows"]] + [6])
    head = f"{'kernel':<{w}} {'shapes':<24} {'arch':<6} {'warps':>5} {'regs':>5} {'shared B':>9} {'local B':>8} {'spill st/ld':>12}"
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        lines.append(f"{r['kernel']:<{w}} {r['shapes']:<24} {r['arch']:<6} {r['num_warps']:>5} {r['regs']:>5} "
                     f"{r['shared']:>9} {r['local']:>8} {str(r['spill_stores']) + '/' + str(r['spill_loads']):>12}")
    for s in result["skipped"]:
        lines.append(f"skipped: {s}")
    return "\n".join(lines)
