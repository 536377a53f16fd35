"""pytest-benchmark: one full-batch training step per backend (`pytest bench/`).

Every backend of grokfast.bench.BACKENDS is a test: one that cannot run here is skipped with
'not available: <reason>' (never left out). On a GPU each benchmarked call runs STEPS_PER_CALL steps then
synchronises, so the figures are per call; `grokfast bench` times single steps with CUDA events and
writes the full report. CI runs this suite with --benchmark-disable (each step once, no timing)."""
from __future__ import annotations

import pytest

from grokfast import bench


@pytest.fixture(scope="module")
def workload(bench_device, bench_preset):
    return bench.make_workload(bench_preset, bench_device)


@pytest.mark.parametrize("backend", bench.BACKENDS)
def test_step(benchmark, backend, workload, bench_device, bench_compile):
    skip = None
    if backend in bench.COMPILE_MODES and bench_device.type == "cpu" and not bench_compile:
        skip = "torch.compile on a CPU takes tens of seconds per mode: pass --bench-compile to time it"
    ok, reason = bench.backend_status(backend, workload, bench_device, skip_reason=skip)
    if not ok:
        pytest.skip(f"not available: {reason}")
    (stepper,) = bench.make_steppers(backend, workload, bench_device)
    tok, lab = workload.task.train.tokens, workload.task.train.labels
    gpu = bench_device.type == "cuda"
    k = 10 if gpu else 1
    for _ in range(20 if gpu else 2):  # compilation, graph capture and caches stay out of the figures
        stepper.step(tok, lab)
    bench.synchronize(bench_device)

    def steps():
        for _ in range(k):
            loss = stepper.step(tok, lab)
        bench.synchronize(bench_device)
        return loss

    cost = bench.step_cost(workload.model, workload.train, tok, lab)
    benchmark.extra_info.update(backend=backend, reason=reason, device=str(bench_device),
                                workload=workload.describe(), steps_per_call=k,
                                step_flops=cost["flops"], step_min_bytes=cost["bytes"])
    loss = benchmark(steps)
    assert bool(loss.isfinite())
