"""The trainer: full batch by default (minibatches as an option), Grokfast filters, AdamW, evaluation
every k steps, atomic checkpoints, resume, and the run directory (see grokfast.rundir).

    run = grokfast.train(grokfast.Task("x+y", p=31, frac=0.7), grokfast.ModelConfig.preset("small"),
                         steps=3000, lr=3e-3, grokfast="ema", out="runs/p31")
    run.summary["steps_to_grok"], run.history[-1]["test_acc"]
"""
from __future__ import annotations

import dataclasses
import os
import platform
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from . import rundir
from .backends import make_stepper, resolve_backend
from .batches import epoch_batch, epoch_orders, epoch_rows  # noqa: F401  (epoch_batch: tests import it from here)
from .config import ConfigError, ModelConfig, TrainConfig, TaskSpec, preset as get_preset
from .data import Task
from .model import Transformer, loss_fn

THRESHOLDS = (0.95, 0.99)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


class Interrupted(KeyboardInterrupt):
    """Training stopped by SIGINT/SIGTERM after saving a checkpoint at ``step``."""

    def __init__(self, step: int, run_dir):
        super().__init__(f"interrupted at step {step}; checkpoint saved, continue with: grokfast train --resume {run_dir}")
        self.step, self.run_dir = step, run_dir


@dataclass
class Run:
    """A finished (or resumed and finished) training run."""

    dir: Optional[Path]
    model: Transformer
    task: Task
    model_config: ModelConfig
    train_config: TrainConfig
    history: list = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    backend: str = "reference"

    def __repr__(self):
        s = self.summary
        return (f"Run(dir={str(self.dir)!r}, steps={s.get('steps_done')}, train_acc={s.get('final_train_acc')}, "
                f"test_acc={s.get('final_test_acc')}, steps_to_grok={s.get('steps_to_grok')})")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device=None) -> torch.device:
    """A torch.device from a name ("cpu", "cuda", "cuda:1"), a device, or None (cuda if available);
    ConfigError for anything that is not a usable CPU or CUDA device here."""
    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device {device!r} is not a device: use cpu or cuda") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {dev} is not supported: use cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA GPU is visible: use --device cpu")
    return dev


def default_preset_name(device=None) -> str:
    """nanda on a GPU; on a CPU the small preset, which groks in well under a minute."""
    device = torch.device(device) if device is not None else default_device()
    return "nanda" if device.type == "cuda" else "small"


@torch.no_grad()
def evaluate(model: Transformer, tokens: torch.Tensor, labels: torch.Tensor, chunk: int | None = None,
             loss: str = "ce"):
    """(mean float64 loss, accuracy) over a split, in chunks (default 32768 rows on a GPU; 1024 on a CPU,
    where activations that fit in cache make the grokfast preset's evaluation 1.7x faster than one chunk);
    both stay on the device. ``loss``: TrainConfig.loss, the one the run trains on ("ce" or "stablemax")."""
    fn = loss_fn(loss)
    chunk = chunk or (32768 if tokens.is_cuda else 1024)
    total = torch.zeros((), dtype=torch.float64, device=tokens.device)
    correct = torch.zeros((), dtype=torch.int64, device=tokens.device)
    n = labels.shape[0]
    for i in range(0, n, chunk):
        logits = model(tokens[i:i + chunk])
        total += fn(logits, labels[i:i + chunk]) * logits.shape[0]
        correct += (logits.argmax(-1) == labels[i:i + chunk]).sum()
    return total / n, correct.double() / n


def summarize(history: list[dict], steps_done: int, wall: float) -> dict:
    """Steps and seconds until train accuracy (memorise) and test accuracy (grok) first reach 99% (and 95%)."""
    s = {"steps_done": steps_done, "wall_seconds": round(wall, 3)}
    for thr in THRESHOLDS:
        tag = "" if thr == 0.99 else f"_{int(thr * 100)}"
        for what, key in (("memorize", "train_acc"), ("grok", "test_acc")):
            row = next((r for r in history if r[key] >= thr), None)
            s[f"steps_to_{what}{tag}"] = None if row is None else row["step"]
            s[f"seconds_to_{what}{tag}"] = None if row is None else row["wall"]
    s["grokked"] = s["steps_to_grok"] is not None
    if history:
        last = history[-1]
        for k in ("train_loss", "test_loss", "train_acc", "test_acc"):
            s[f"final_{k}"] = last[k]
    return s


class _StopFlag:
    """SIGINT/SIGTERM set a flag that the loop reads between steps, so the state is never torn."""

    def __init__(self):
        self.signum = None
        self.old = {}

    def __enter__(self):
        if hasattr(signal, "SIGTERM") and threading_main():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.old[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.signum is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, h in self.old.items():
            signal.signal(sig, h)
        return False


def threading_main() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _version(module: str):
    try:
        return __import__(module).__version__
    except Exception:
        return None


def _environment() -> dict:
    """What made the run: versions, the CPU thread count and MKL's reproducibility mode (see
    grokfast/__init__.py), and the GPU."""
    env = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
           "torch_threads": torch.get_num_threads(), "mkl_cbwr": os.environ.get("MKL_CBWR"),
           "numpy": _version("numpy")}
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def train(task: Task | None = None, model_config: ModelConfig | None = None,
          train_config: TrainConfig | None = None, *, preset: str | None = None, out=None, resume=None,
          device=None, progress: bool = True, figures: bool = True, log: Callable[[str], None] | None = None,
          on_step: Callable[[int], None] | None = None, **overrides) -> Run:
    """Train one model and return its Run.

    task / model_config / train_config default to the preset's (``preset`` defaults to nanda on a GPU,
    small on a CPU); keyword overrides go to TrainConfig (``steps=..., lr=..., grokfast="ema"``).
    ``out``: run directory to write (None: nothing is written). ``resume``: a run directory to continue
    from its last checkpoint (its config is used; ``steps`` may be raised). ``on_step(step)`` is called
    after every step (for tests and tools). ``figures=False`` skips drawing grokking.png (sweeps).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    device = resolve_device(device)

    start_tensors, start_meta = None, {}
    if resume is not None:
        cfg = rundir.load_config(resume)
        if task is not None or model_config is not None or train_config is not None or preset is not None:
            raise ConfigError("--resume continues a run with its own config: drop --preset/--op/--p and model options")
        model_config = cfg["model"]
        tcfg_d = cfg["train"].to_dict()
        allowed = {"steps", "eval_every", "checkpoint_every", "measure_every", "backend", "stop_at_grok"}
        bad = set(overrides) - allowed
        if bad:
            raise ConfigError(f"--resume cannot change {sorted(bad)}; only {sorted(allowed)} may change")
        tcfg_d.update(overrides)
        train_config = TrainConfig.from_dict(tcfg_d)
        t = cfg["task"]
        task = Task(t["op"], t["p"], t["frac"], t["seed"], t["layout"], device=device)
        out = Path(resume)
        ckpts = rundir.list_checkpoints(out)
        if ckpts:
            start_tensors, start_meta = rundir.load_checkpoint(ckpts[-1][1])
    else:
        pre = get_preset(preset or default_preset_name(device))
        if task is None:
            task = Task.from_spec(pre.task, seed=overrides.get("seed", 0), device=device)
        if model_config is None:
            model_config = pre.model
        if train_config is None:
            train_config = pre.train
        if overrides:
            train_config = dataclasses.replace(train_config, **overrides)
        if out is not None:
            out = Path(out)
            if (out / "config.json").exists() or rundir.list_checkpoints(out):
                raise ConfigError(f"{out} already holds a run: continue it with --resume {out}, or pick another --out")
    task = task.to(device)
    model_config = model_config.for_task(task)
    tcfg = train_config
    backend, reason = resolve_backend(tcfg.backend, model_config, device, tcfg)

    epoch_order = None
    if tcfg.rng == "stream":   # init, split and batches from one generator, in the papers' scripts' order
        from . import stream
        model, task, batch_gen = stream.start(model_config, task, tcfg.seed, device)
        if tcfg.batch_size is not None and tcfg.minibatches == "epoch":
            epoch_order = stream.EpochOrder(len(task.train), tcfg.batch_size, batch_gen.get_state())
    else:
        model = Transformer(model_config, seed=tcfg.seed, device=device)
    if tcfg.batch_size is not None and tcfg.batch_size > len(task.train):
        raise ConfigError(f"--batch-size {tcfg.batch_size} exceeds the {len(task.train)} training examples; "
                          f"lower it or omit it for full batch")
    log(f"backend: {backend} ({reason}); device: {device}; task: {task}")
    stepper = make_stepper(backend, model, tcfg)
    step, wall0 = 0, 0.0
    history: list[dict] = []
    if start_tensors is not None:
        # (a checkpoint's "rng.batch", the host generator of versions before 2026-12-02, is not read: batches
        # are a function of the step now, grokfast.batches)
        stepper.load_state_dict({k: v.to(device) for k, v in start_tensors.items() if k != "rng.batch"})
        step, wall0 = int(start_meta["step"]), float(start_meta["wall"])
        log(f"resuming {out} from step {step}")
    if out is not None:
        history = [r for r in rundir.read_metrics(out) if r["step"] <= step]
        rundir.write_json(out / "config.json", {
            "model": model_config.to_dict(), "task": task.spec(), "train": tcfg.to_dict(),
            "backend": backend, "device": str(device), "environment": _environment(),
        })
        _rewrite_metrics(out, history)

    def save(at_step: int, wall: float):
        if out is None:
            return
        tensors = dict(stepper.state_dict())
        rundir.save_checkpoint(out, at_step, tensors, {"step": at_step, "wall": wall, "backend": backend})

    def finish(at_step: int, wall: float) -> dict:
        summary = summarize(history, at_step, wall)
        summary.update(backend=backend, device=str(device),
                       step_mode=getattr(stepper, "mode", "eager"),   # fused on a GPU: "cuda-graph" once captured
                       steps_per_second=round(at_step / wall, 2) if wall > 0 else None)
        if out is not None:
            rundir.write_json(out / "summary.json", summary)
        if out is not None and figures:
            try:
                from .plots import grokking_figure
                grokking_figure(history, out / "grokking.png", title=_title(task, model_config, tcfg))
            except Exception as e:  # a figure must never cost the run
                log(f"warning: could not draw the figure: {e}")
        return summary

    train_t, train_l = task.train.tokens, task.train.labels
    n_train = len(task.train)
    # eval_train False: [loss sum, correct, examples] over the training steps since the last evaluation,
    # from the steps' own forward passes (the reference stepper's `correct`), as the papers' code logs them
    on_the_fly = [0.0, 0, 0] if not tcfg.eval_train and hasattr(stepper, "correct") else None
    # The stepper holds the split and train_step() takes the step's batch itself: the full batch, a draw, or with
    # minibatches "epoch" batch k of the epoch's order, the orders handed over a chunk of epochs at a time (torch's
    # CPU permutations, epoch_orders). On a GPU the fused step is then one graph replay with no host work (but for
    # the copy of the next epochs' orders every few hundred epochs); it records a NaN/inf loss in stepper.first_bad.
    epochs = None
    if tcfg.batch_size is not None and tcfg.minibatches == "epoch":
        epochs = epoch_orders(n_train, tcfg, epoch_order)
        stepper.bind(train_t, train_l, epochs=epochs)
    else:
        stepper.bind(train_t, train_l)
    metrics_file = open(out / "metrics.jsonl", "a") if out is not None else None

    def do_eval(at_step: int) -> dict:
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t_start
        if on_the_fly is not None and on_the_fly[2] > 0:   # eval_train False: the steps' own numbers
            tr_loss, tr_acc = on_the_fly[0] / on_the_fly[2], on_the_fly[1].double() / on_the_fly[2]
            on_the_fly[:] = [0.0, 0, 0]
        else:
            tr_loss, tr_acc = evaluate(model, train_t, train_l, loss=tcfg.loss)
        te_loss, te_acc = evaluate(model, task.test.tokens, task.test.labels, loss=tcfg.loss)
        row = {"step": at_step, "train_loss": float(tr_loss), "test_loss": float(te_loss),
               "train_acc": float(tr_acc), "test_acc": float(te_acc), "wall": round(wall, 4)}
        if tcfg.measure_every and at_step % tcfg.measure_every == 0:
            from .measures import cheap_measures
            row.update(cheap_measures(model, task))
        return row

    def check_finite(at_step: int):
        bad = int(stepper.first_bad)
        if bad >= 0:
            last = rundir.list_checkpoints(out)[-1][0] if out is not None and rundir.list_checkpoints(out) else None
            where = f"; the last good checkpoint is step {last} in {out}" if last is not None else ""
            raise TrainingDiverged(f"loss became NaN or inf at step {bad}{where}: lower --lr or --lamb")

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=tcfg.steps, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr)

    t_start = time.perf_counter() - wall0
    if not history and step == 0:
        row = do_eval(0)
        history.append(row)
        _append_metric(metrics_file, row)
    try:
        with _StopFlag() as stop:
            while step < tcfg.steps:
                loss = stepper.train_step(step)
                if on_the_fly is not None:
                    rows = n_train if tcfg.batch_size is None else (
                        epoch_rows(n_train, tcfg.batch_size, step) if epochs is not None else tcfg.batch_size)
                    on_the_fly[0] = on_the_fly[0] + loss * rows
                    on_the_fly[1] = on_the_fly[1] + stepper.correct
                    on_the_fly[2] += rows
                step += 1
                if on_step is not None:
                    on_step(step)
                if bar is not None:
                    bar.update(1)
                last = step == tcfg.steps
                grokked = False
                if step % tcfg.eval_every == 0 or last:
                    check_finite(step)
                    row = do_eval(step)
                    history.append(row)
                    _append_metric(metrics_file, row)
                    if bar is not None:
                        bar.set_postfix(train_acc=f"{row['train_acc']:.3f}", test_acc=f"{row['test_acc']:.3f}",
                                        loss=f"{row['train_loss']:.2e}", refresh=False)
                    grokked = tcfg.stop_at_grok and row["test_acc"] >= tcfg.stop_acc
                if step % tcfg.checkpoint_every == 0 or last or grokked or stop.signum is not None:
                    check_finite(step)
                    save(step, time.perf_counter() - t_start)
                if stop.signum is not None:
                    raise Interrupted(step, out)
                if grokked:
                    log(f"test accuracy {row['test_acc']:.4f} >= {tcfg.stop_acc:g} at step {step}: stopping (--stop-at-grok)")
                    break
    except Interrupted:
        if bar is not None:
            bar.close()
        finish(step, time.perf_counter() - t_start)
        raise
    finally:
        if metrics_file is not None:
            metrics_file.close()
        if bar is not None:
            bar.close()
    wall = time.perf_counter() - t_start
    if not history or history[-1]["step"] != step:
        # resumed at the end, or no eval happened at the final step
        check_finite(step)
        row = do_eval(step)
        history.append(row)
        if out is not None:
            with open(out / "metrics.jsonl", "a") as f:
                _append_metric(f, row)
    summary = finish(step, wall)
    return Run(out, model, task, model_config, tcfg, history, summary, backend)


def _append_metric(f, row: dict) -> None:
    if f is None:
        return
    import json
    f.write(json.dumps(row) + "\n")
    f.flush()


def _rewrite_metrics(out: Path, rows: list[dict]) -> None:
    import json
    rundir.write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def _title(task: Task, mcfg: ModelConfig, tcfg: TrainConfig) -> str:
    gf = "" if tcfg.grokfast == "none" else f", Grokfast-{tcfg.grokfast.upper()}"
    gf += ", orthograd" if tcfg.orthograd else ""
    gf += ", StableMax" if tcfg.loss == "stablemax" else ""
    gf += f", Muon lr {tcfg.muon_lr:g}" if tcfg.optimizer == "muon" else ""
    gf += f", lr x{1 + tcfg.lamb:g} (matched)" if tcfg.lr_matched else ""
    return (f"{task.op} mod {task.p}, {int(round(task.frac * 100))}% train; {mcfg.n_layers}L d{mcfg.d_model}, "
            f"lr {tcfg.lr:g}, wd {tcfg.wd:g}{gf}")
