"""Sweeps: many runs over seeds and hyperparameters, one results table, resumable, spread over ranks.

    from grokfast.sweep import SweepSpec, run_sweep
    spec = SweepSpec(preset="small", grid={"lr": [1e-3, 3e-3], "wd": [0.5, 1.0]}, seeds=[0, 1],
                     fixed={"steps": 2000})
    result = run_sweep(spec, out="sweeps/lr-wd")        # 8 runs
    result.rows[0]["steps_to_grok"]                    # None: "did not grok" by the step limit
    run_sweep(resume="sweeps/lr-wd")                   # after a kill: finished runs are kept

A sweep is the Cartesian product of its grid axes and its seeds (``--random N`` samples N points
of the grid instead, each crossed with every seed). Every point becomes one run: a Task, a
ModelConfig and a TrainConfig built exactly as ``grokfast train`` builds them from the same
flags (the preset, then the fixed settings, then the point's values; ``seed`` seeds the model
init and, unless ``data_seed`` is given, the train/test split too).

Sweep directory:

    SWEEP_DIR/sweep.json            the spec (what --resume reads)
    SWEEP_DIR/runs/<run_id>/        one run directory per run (grokfast.rundir), plus result.json:
                                    its row of the table, written atomically when the run finishes
    SWEEP_DIR/results.json|.csv     the table: one row per finished run (config, steps and seconds
                                    to memorise and to grok, final accuracies), in run order
    SWEEP_DIR/phase.png             steps to grok over two swept axes ("did not grok" marked)
    SWEEP_DIR/curves.png            test (and train) accuracy of every run, overlaid

A run id is the swept values plus a hash of the run's full config, so it is the same in every
process and rank. A resumed sweep never repeats a run that has a result (in results.json or in
its result.json) and continues an unfinished run from its last checkpoint (train(resume=...)).

Work: by default a run stops at its first evaluation with test accuracy >= 99% (``after_grok``
steps more may be asked for, e.g. to watch clean-up). Executors turn a list of runs into result
rows; the sequential executor trains them one after another with grokfast.train (the reference
backend on a CPU). The batched executor (BatchedExecutor: M models in one launch on the fused
kernels, grokfast.kernels.make_batched_stepper) groups runs that share a model config and split
sizes, retires each run from its launch when it ends, and writes the same run directories; ``auto``
picks it on a CUDA GPU (runs it cannot batch go sequential), and says why not otherwise. On a CPU
``--executor batched`` runs only under TRITON_INTERPRET=1 with --backend fused (tests).

Under torchrun (WORLD_SIZE > 1) the runs still to do are dealt out round robin (rank r takes
the i-th remaining run when i % world == r); rows are gathered on rank 0 (gloo, which also
carries Python objects between GPU ranks), which writes the table.

One concern a module: ``spec`` (axes, SweepSpec, parsing --grid and --seeds), ``runs`` (the run list),
``memory``, ``sequential`` and ``batched`` (the executors), ``dist`` (torchrun), ``results`` (the table and
resume), ``run`` (plan and run_sweep), ``figures``. Everything is importable from ``grokfast.sweep``.
"""
from .. import rundir
from .batched import BatchedExecutor, batch_key, batchable, batched_status
from .dist import Dist, dist_from_env
from .figures import curves_data, draw_figures, phase_data, swept_axes
from .memory import _human, available_bytes, bytes_per_model, check_memory
from .results import (CONFIG_COLUMNS, RESULT_COLUMNS, TIME_COLUMNS, SweepResult, columns, load_results, result_row,
                      write_results)
from .run import plan, run_sweep
from .runs import RunSpec, expand
from .sequential import GROK_ACC, SequentialExecutor, train_one
from .spec import (AXES, BOOL_AXES, FILTER_USES, FLOAT_AXES, INT_AXES, MODEL_AXES, TASK_AXES, TRAIN_AXES, Range,
                   SweepSpec, parse_grid_arg, parse_seeds, parse_value)
