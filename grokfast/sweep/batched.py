"""The batched executor: runs that share a model config and split sizes trained M at a time in one launch
on the fused kernels (``BatchedExecutor``), with ``batchable`` and ``batched_status`` saying which runs
and devices can use it, and why not."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

from .. import rundir
from ..config import ConfigError
from .memory import available_bytes, bytes_per_model
from .results import result_row
from .runs import RunSpec
from .sequential import GROK_ACC, SequentialExecutor, _first_grok


def batchable(r: RunSpec, device) -> Optional[str]:
    """None when run ``r`` can train in a batched launch on ``device``, else why not (one line)."""
    from ..backends import resolve_backend

    if r.train.batch_size is not None:
        return "it trains on minibatches (the batched stepper is full batch)"
    if not r.train.eval_train:
        return "--no-eval-train takes train numbers from each step's forward (the reference stepper's)"
    if r.train.rng == "stream":
        return "--rng stream draws its init and split from one generator per run (trained in turn)"
    try:
        backend, why = resolve_backend(r.train.backend, r.model, device, r.train)
    except ConfigError as e:
        return str(e)
    if backend != "fused":
        return f"its backend is {backend} ({why})"
    return None


def batched_status(device, runs: Optional[list] = None, explicit: bool = False) -> tuple[bool, str]:
    """(usable, reason) for the batched fused executor (M models per launch).

    On a CPU it is usable only when asked for (``explicit``, i.e. --executor batched) under
    TRITON_INTERPRET=1 for runs with --backend fused (tests), as grokfast.backends does for the fused
    backend. With ``runs``, at least one of them must be batchable (see ``batchable``)."""
    import torch

    from ..backends import interpreter_on

    try:
        from grokfast import kernels
    except Exception as e:
        return False, f"grokfast.kernels cannot be imported ({type(e).__name__}: {e})"
    if getattr(kernels, "make_batched_stepper", None) is None:
        return False, "grokfast.kernels has no batched stepper (make_batched_stepper)"
    if torch.device(device).type != "cuda" and not (explicit and interpreter_on()):
        return False, ("it needs a CUDA GPU (this sweep runs on the CPU; under TRITON_INTERPRET=1, "
                       "--executor batched --backend fused runs it slowly in the Triton interpreter)")
    if runs:
        whys = [batchable(r, device) for r in runs]
        n = sum(w is None for w in whys)
        if n == 0:
            return False, f"no run can use it: {runs[0].run_id}: {whys[0]}"
        if n < len(runs):
            return True, f"{n} of {len(runs)} runs batched on the fused kernels; the rest run one by one"
    if torch.device(device).type != "cuda":
        return True, "Triton interpreter on the CPU (TRITON_INTERPRET=1): correct but slow, for tests"
    return True, "fused kernels on a CUDA GPU, runs grouped by model config and shape"


def batch_key(r: RunSpec) -> tuple:
    """Runs with equal keys can train in one launch: one ModelConfig, equal split sizes, the shared
    optimizer settings (beta1, beta2, eps, warm-up, filter kind and window), the same loss (one loss
    launch for all), the same dot precision and the same evaluation and checkpoint schedule. Seeds, data
    seeds, lr, wd, alpha, lamb and steps may differ."""
    t = r.train
    return (json.dumps(r.model.to_dict(), sort_keys=True), r.n_train, r.n_test, t.beta1, t.beta2, t.eps,
            t.warmup, t.grokfast, t.window, t.eval_every, t.checkpoint_every, getattr(t, "measure_every", None),
            t.stop_at_grok, t.precision, getattr(t, "loss", "ce"))


class BatchedExecutor:
    """Trains runs M at a time in one launch on the fused kernels (grokfast.kernels.make_batched_stepper).

    Runs are grouped by ``batch_key`` and by the step they start from (0, or the last checkpoint of a
    run continued after a kill): all models of one launch share the optimizer's step counter, so a
    resumed sweep trains each group of runs checkpointed at the same step together. In a batched sweep
    every unfinished run of a launch checkpoints at the same steps, so after a kill the runs of a
    launch normally form one group again (two only if the kill fell between two runs' checkpoint
    writes). Groups are cut into launches of at most ``models_per_launch`` (default: as many as fit
    in 80% of the free device memory, see bytes_per_model).

    Every run keeps its own run directory with the files a single run writes (config.json,
    metrics.jsonl, summary.json, checkpoints with the single steppers' keys, result.json), evaluated
    and checkpointed on its own TrainConfig's schedule, so `grokfast analyze` and `grokfast train
    --resume` work on it. A run stops costing work when it ends: when it groks (stop_at_grok, plus
    ``after_grok`` steps), reaches its steps, or diverges, the launch is compacted to the runs still
    training (BatchedStepper.compact). Runs that cannot be batched (see ``batchable``), and continued
    runs that had already grokked, go to the sequential executor.

    Differences from a single run, by construction: losses are evaluated in float32 by the fused
    kernels (the trainer evaluates the reference model in float64; they agree to float32 rounding, so
    a threshold crossing can move only if an accuracy lands within rounding of 99%, which needs a
    logit tie); "wall" is the launch's clock (shared by its runs) plus the run's time before a resume.
    """

    name = "batched"

    def __init__(self, device, after_grok: int = 0, log: Callable[[str], None] | None = None,
                 models_per_launch: Optional[int] = None, cuda_graph: Optional[bool] = None):
        self.device, self.after_grok = device, after_grok
        self.log = log or (lambda s: None)
        self.models_per_launch, self.cuda_graph = models_per_launch, cuda_graph

    def _start_step(self, r: RunSpec, run_dir: Path) -> Optional[int]:
        """The step a run continues from (0 for a new one), or None when the sequential path must take it
        (it grokked or reached its steps before the kill: train_one finishes it)."""
        if not (run_dir / "config.json").exists():
            return 0
        ckpts = rundir.list_checkpoints(run_dir)
        at = ckpts[-1][0] if ckpts else 0
        if at >= r.train.steps or (r.train.stop_at_grok and _first_grok(run_dir, at) is not None):
            return None
        return at

    def plan_launches(self, runs: list[RunSpec], sweep_dir: Path) -> tuple[list[tuple[int, list]], list]:
        """([(start step, runs of one launch)], runs for the sequential executor)."""
        groups: dict = {}
        rest = []
        for r in runs:
            start = self._start_step(r, Path(sweep_dir) / "runs" / r.run_id)
            if start is None or batchable(r, self.device) is not None:
                rest.append(r)
                continue
            groups.setdefault((batch_key(r), start), []).append(r)
        launches = []
        for (key, start), rs in groups.items():
            cap = self.models_per_launch
            if cap is None:
                need = bytes_per_model(rs[0].model, rs[0].train, rs[0].n_train, rs[0].n_test)
                cap = max(1, int(0.8 * available_bytes(self.device) // max(1, need)))
            for i in range(0, len(rs), cap):
                launches.append((start, rs[i:i + cap]))
        return launches, rest

    def run(self, runs: list[RunSpec], sweep_dir: Path, on_row: Callable[[dict], None]) -> None:
        launches, rest = self.plan_launches(runs, sweep_dir)
        for start, rs in launches:
            self._launch(rs, start, Path(sweep_dir), on_row)
        if rest:
            self.log(f"{len(rest)} runs cannot be batched here: training them one by one")
            SequentialExecutor(self.device, self.after_grok, self.log).run(rest, sweep_dir, on_row)

    def _launch(self, runs: list[RunSpec], start: int, sweep_dir: Path, on_row) -> None:
        import time

        import torch

        from grokfast import kernels
        from ..data import Task
        from ..model import Transformer
        from ..train import Interrupted, _StopFlag, _environment, _rewrite_metrics, _title, summarize

        device = torch.device(self.device)
        M = len(runs)
        dirs = [sweep_dir / "runs" / r.run_id for r in runs]
        tasks = [Task(**r.task, device=device) for r in runs]
        models = [Transformer(r.model, seed=r.train.seed, device=device) for r in runs]
        st = kernels.make_batched_stepper(models, [r.train for r in runs],
                                          ([t.train.tokens for t in tasks], [t.train.labels for t in tasks]),
                                          ([t.test.tokens for t in tasks], [t.test.labels for t in tasks]),
                                          cuda_graph=self.cuda_graph)
        wall0 = [0.0] * M
        hist: list[list[dict]] = [[] for _ in range(M)]
        for i, d in enumerate(dirs):
            if start > 0:
                tensors, meta = rundir.load_checkpoint(rundir.checkpoint_path(d, start))
                st.load_state_dict(i, {k: v.to(device) for k, v in tensors.items()})
                wall0[i] = float(meta["wall"])
                hist[i] = [row for row in rundir.read_metrics(d) if row["step"] <= start]
            rundir.write_json(d / "config.json", {
                "model": runs[i].model.to_dict(), "task": tasks[i].spec(), "train": runs[i].train.to_dict(),
                "backend": "fused", "device": str(device), "environment": _environment()})
            _rewrite_metrics(d, hist[i])
        self.log(f"batched launch: {M} runs on the fused kernels from step {start} ({runs[0].model.d_model}-wide "
                 f"model, {runs[0].n_train} training examples each)")
        end = [r.train.steps for r in runs]       # the step each run stops at (moved at grokking)
        grokked = [False] * M
        measure = getattr(runs[0].train, "measure_every", None)
        scratch = Transformer(runs[0].model, device=device) if measure else None
        t_start = time.perf_counter()

        def wall(i):
            return wall0[i] + (time.perf_counter() - t_start)

        def eval_rows(step, rows_wanted):
            """{model: metrics row} for the rows (batch positions) in rows_wanted; one host read."""
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            vals = torch.stack([v.double() for v in st.evaluate()]).cpu()   # [4, M']
            out = {}
            for row in rows_wanted:
                i = int(st.ids[row])
                tr_l, tr_a, te_l, te_a = (float(x) for x in vals[:, row])
                out[i] = {"step": step, "train_loss": tr_l, "test_loss": te_l, "train_acc": tr_a,
                          "test_acc": te_a, "wall": round(wall(i), 4)}
                if measure and step % measure == 0:
                    from ..measures import cheap_measures
                    with torch.no_grad():
                        for n, v in st.layout.views(st.flat).items():
                            dict(scratch.named_parameters())[n].copy_(v[row])
                    out[i].update(cheap_measures(scratch, tasks[i]))
            return out

        def append(i, row):
            hist[i].append(row)
            with open(dirs[i] / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

        def save(row, step):
            i = int(st.ids[row])
            tensors = st.state_dict(row)
            rundir.save_checkpoint(dirs[i], step, tensors, {"step": step, "wall": wall(i), "backend": "fused"})

        def finish(i, step, outcome=None):
            if outcome is None:
                summary = summarize(hist[i], step, wall(i))
                w = summary["wall_seconds"]
                summary.update(backend="fused", device=str(device),
                               steps_per_second=round(step / w, 2) if w > 0 else None)
                rundir.write_json(dirs[i] / "summary.json", summary)
                try:
                    from ..plots import grokking_figure
                    grokking_figure(hist[i], dirs[i] / "grokking.png",
                                    title=_title(tasks[i], runs[i].model, runs[i].train))
                except Exception as e:  # a figure must never cost the run
                    self.log(f"warning: could not draw the figure: {e}")
            else:
                summary = {}
            on_row(result_row(runs[i], dirs[i], summary, outcome))

        step = start
        if start == 0:
            for i, row in eval_rows(0, range(st.M)).items():
                append(i, row)
        eval_every, ckpt_every = runs[0].train.eval_every, runs[0].train.checkpoint_every
        ids = st.ids.tolist()
        min_end = min(end)
        with _StopFlag() as stop:
            while st.M > 0:
                st.step()
                step += 1
                if step % eval_every and step % ckpt_every and step < min_end and stop.signum is None:
                    continue  # nothing to read or write at this step: no host work per model
                rows = range(st.M)
                is_end = [end[i] == step for i in ids]
                evals = [k for k in rows if step % eval_every == 0 or is_end[k]]
                ckpts = [k for k in rows if step % ckpt_every == 0 or is_end[k] or stop.signum is not None]
                if not evals and not ckpts:
                    continue
                bad = st.first_bad.cpu()
                diverged = {}
                for k in sorted(set(evals) | set(ckpts)):
                    if int(bad[k]) >= 0:
                        i = ids[k]
                        c = rundir.list_checkpoints(dirs[i])
                        where = f"; the last good checkpoint is step {c[-1][0]} in {dirs[i]}" if c else ""
                        diverged[k] = (f"diverged: loss became NaN or inf at step {int(bad[k])}{where}: "
                                       f"lower --lr or --lamb")
                done, just_grokked = set(diverged), set()
                wanted = [k for k in evals if k not in diverged]
                for i, row in (eval_rows(step, wanted) if wanted else {}).items():
                    append(i, row)
                    if runs[i].train.stop_at_grok and not grokked[i] and row["test_acc"] >= GROK_ACC:
                        grokked[i] = True
                        just_grokked.add(i)
                        end[i] = min(step + self.after_grok, runs[i].train.steps)
                        if end[i] == step:
                            self.log(f"{runs[i].run_id}: test accuracy {row['test_acc']:.4f} >= 0.99 at step "
                                     f"{step}: stopping (--stop-at-grok)")
                for k in rows:
                    i = ids[k]
                    if k in diverged:
                        continue
                    if k in ckpts or end[i] == step or i in just_grokked:
                        save(k, step)
                    if end[i] == step:
                        done.add(k)
                for k in sorted(done):
                    i = ids[k]
                    finish(i, step, diverged.get(k))
                if stop.signum is not None:
                    raise Interrupted(step, sweep_dir)
                if done:
                    keep = [k for k in rows if k not in done]
                    if not keep:
                        break
                    st.compact(keep)
                    ids = st.ids.tolist()
                min_end = min(end[i] for i in ids)
