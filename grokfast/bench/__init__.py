"""Benchmarks that tell the truth: every backend side by side on the same work, in one process.

What is measured (``run_report`` writes all of it; ``grokfast bench`` is its command line):

- Step time. One full-batch training step (forward, float64 loss, backward, Grokfast filter, AdamW) on
  each backend of ``BACKENDS``, from the same initial weights: ``warmup`` untimed steps (compilation,
  CUDA-graph capture and caches stay out of the numbers), then ``timed`` steps, each timed alone
  (CUDA events around every step on a GPU; ``time.perf_counter`` on a CPU). Reported: median, p10,
  p90, min, mean, steps/s (1 / median, and the wall-clock rate of the whole timed loop), the speed-up
  against the reference in eager PyTorch, and the raw per-step times.
- The floor (``step_cost``): the floating-point operations the step must do when it exploits the
  structure of the problem, and the fewest bytes it must move; over the device's peak rates (datasheet
  and measured: ``measure_ceilings``) they give the time no implementation can beat; each measured
  step reports ``floor / median`` (1.0 would be at the floor).
- Time to grok: ``grokfast.train`` with ``stop_at_grok`` on the trainer's backends (reference, fused):
  steps and wall seconds until test accuracy first reaches 95% and 99%.
- Scaling: step time against p, train fraction, d_model and the model batch M.
- GPU telemetry (nvidia-ml-py) read before and after each timed region: the total-energy counter
  (energy per step, mean power), SM clock, utilisation, temperature, memory used.

A backend that cannot run is reported ``not available`` with the reason, never left out or faked.

One concern a module: ``workload`` (what one point does), ``steppers`` (the backends and their steppers),
``timing``, ``floor`` (FLOPs, bytes, peak rates, launches), ``telemetry`` (GPU readings and the
environment), ``plan``, ``measure`` (step-time rows), ``grok`` (time to grok), ``report`` and ``markdown``
(the report files), ``throughput`` (sweep throughput). Everything is importable from ``grokfast.bench``.
"""
from .floor import (DATASHEET, datasheet_ceilings, datasheet_for, floors, fused_launches, measure_ceilings,
                    step_cost)
from .grok import time_to_grok
from .markdown import render_markdown
from .measure import attach_ratios_and_floor, measure_backend
from .plan import SCALING_AXES, GrokSpec, Plan, make_plan, scaling_points
from .report import run_report, write_report
from .steppers import (BACKENDS, COMPILE_MODES, EAGER, TRAIN_BACKENDS, CompiledReferenceStepper, backend_status,
                       filter_adamw_, make_steppers)
from .telemetry import Telemetry, environment, git_commit
from .throughput import SWEEP_MS, render_sweep_throughput, sweep_throughput
from .timing import percentile, synchronize, time_stats, time_steps
from .workload import Workload, make_workload
