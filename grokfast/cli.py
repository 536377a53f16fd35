"""The `grokfast` command line. Errors in the arguments print one line and exit with status 2,
before any work starts."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from .config import ConfigError, usage_errors

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, status 2
        self.exit(EXIT_USAGE, f"grokfast: error: {message} (see {self.prog} --help)\n")


def add_model_flags(g) -> None:
    """Model overrides shared by `train` and `sweep` (ModelConfig fields)."""
    g.add_argument("--n-layers", type=int)
    g.add_argument("--d-model", type=int)
    g.add_argument("--n-heads", type=int)
    g.add_argument("--d-head", type=int)
    g.add_argument("--d-mlp", type=int)
    g.add_argument("--act", choices=["relu", "gelu"])
    g.add_argument("--layernorm", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--attn-alpha", type=float, help="attention rate (clock and pizza): 1 softmax, 0 constant")


def add_training_flags(g) -> None:
    """Optimizer and filter flags shared by `train` and `sweep` (TrainConfig fields)."""
    g.add_argument("--steps", type=int, help="step limit")
    g.add_argument("--lr", type=float)
    g.add_argument("--wd", type=float, help="weight decay (decoupled for adamw, coupled L2 for --optimizer adam)")
    g.add_argument("--beta1", type=float)
    g.add_argument("--beta2", type=float)
    g.add_argument("--warmup", type=int, help="linear learning-rate warm-up steps (0: none)")
    g.add_argument("--batch-size", type=int, help="minibatch size (default: full batch, or the preset's)")
    g.add_argument("--grokfast", choices=["ema", "ma", "none"], help="Grokfast gradient filter")
    g.add_argument("--alpha", type=float, help="Grokfast-EMA momentum (0.98)")
    g.add_argument("--lamb", type=float, help="Grokfast amplification (EMA 2.0, MA 5.0 in the paper)")
    g.add_argument("--window", type=int, help="Grokfast-MA window (100)")
    g.add_argument("--loss", choices=["ce", "stablemax"],
                   help="ce: cross-entropy (default); stablemax: Prieto et al.'s StableMax cross-entropy (either backend)")
    g.add_argument("--orthograd", action=argparse.BooleanOptionalAction, default=None,
                   help="make each tensor's gradient orthogonal to its weights, rescaled to its norm, before the "
                        "optimizer (Prieto et al. 2025; reference backend)")
    g.add_argument("--muon-lr", type=float, help="--optimizer muon: the hidden matrices' learning rate (0.02)")
    g.add_argument("--muon-momentum", type=float, help="--optimizer muon: momentum (0.95)")
    g.add_argument("--lr-matched", action=argparse.BooleanOptionalAction, default=None,
                   help="no Grokfast filter but AdamW at lr * (1 + lamb): the step a filter with --lamb gives a "
                        "constant gradient (the 'is it just a larger learning rate' control)")
    g.add_argument("--precision", choices=["ieee", "tf32x3", "tf32"],
                   help="the fused kernels' float32 products: ieee (default, exact float32), tf32x3 (three TF32 "
                        "tensor-core products, near float32), tf32 (one, ~1e-3 relative)")


def add_paper_optimizer_flags(g) -> None:
    """The papers' optimizer semantics (TrainConfig.optimizer, warmup_schedule, minibatches, eval_train, rng),
    shared by `train` and `sweep` (where each is also a --grid axis)."""
    g.add_argument("--optimizer", choices=["adamw", "adam", "muon"],
                   help="adamw (decoupled weight decay; default), adam (torch.optim.Adam: coupled L2, as ironjr/grokfast) "
                        "or muon (Newton-Schulz orthogonalised momentum for the hidden matrices, AdamW for the rest; "
                        "reference backend)")
    g.add_argument("--warmup-schedule", choices=["linear", "lambdalr"],
                   help="linear: lr*min(1, t/warmup); lambdalr: lr*min(1, (t-1)/warmup), torch's LambdaLR as the "
                        "papers' code steps it (first step lr 0)")
    g.add_argument("--minibatches", choices=["draw", "epoch"],
                   help="draw: independent draws each step; epoch: shuffled epochs cut in order, short last batch")
    g.add_argument("--rng", choices=["independent", "stream"],
                   help="independent: init, split (--data-seed) and batches from their own seeded generators; stream: "
                        "one torch generator seeded with --seed draws the init, then the split, then the batches, as a "
                        "script calling torch.manual_seed once (ironjr/grokfast; the grokfast preset's default)")
    g.add_argument("--eval-train", action=argparse.BooleanOptionalAction, default=None,
                   help="evaluate the train split at each evaluation (default); --no-eval-train: train loss and "
                        "accuracy from the training steps themselves, as the papers' code logs them")


# The settings `sweep` and `compare` fix for all their runs (argparse names; each a sweep axis), in the order
# add_fixed_flags adds them; PAPER_OPTIMIZER_FIXED: those of add_paper_optimizer_flags, which compare leaves out.
FIXED_SETTINGS = ("op", "p", "frac", "layout", "data_seed", "n_layers", "d_model", "n_heads", "d_head", "d_mlp",
                  "act", "layernorm", "attn_alpha", "steps", "lr", "wd", "beta1", "beta2", "warmup", "batch_size",
                  "grokfast", "alpha", "lamb", "window", "eval_every", "checkpoint_every", "backend", "precision",
                  "optimizer", "warmup_schedule", "minibatches", "eval_train", "rng",
                  "loss", "orthograd", "muon_lr", "muon_momentum", "lr_matched")
PAPER_OPTIMIZER_FIXED = ("optimizer", "warmup_schedule", "minibatches", "eval_train", "rng")


def add_fixed_flags(g, paper_optimizer: bool = True) -> None:
    """The settings `sweep` and `compare` fix for all their runs over the preset: the preset, the task, the
    model and training flags (with the papers' optimizer semantics unless ``paper_optimizer`` is False),
    evaluation and checkpoint schedule, backend."""
    g.add_argument("--preset", help="nanda | power | pizza | small (default: nanda on a GPU, small on a CPU)")
    g.add_argument("--op", help="operation formula, e.g. 'x+y', 'x*y | y!=0'")
    g.add_argument("--p", type=int, help="modulus")
    g.add_argument("--frac", type=float, help="train fraction, in (0, 1)")
    g.add_argument("--layout", help="token layout: 'a b =', 'a op b =', 'a op b' or 'a b'")
    g.add_argument("--data-seed", type=int, help="one train/test split for every run (default: each run's seed)")
    add_model_flags(g)
    add_training_flags(g)
    if paper_optimizer:
        add_paper_optimizer_flags(g)
    g.add_argument("--eval-every", type=int)
    g.add_argument("--checkpoint-every", type=int)
    g.add_argument("--backend", choices=["auto", "fused", "reference"])


def check_resume_or_out(args, kind: str, flags: tuple, also_given: list, dir_name: str, out_for: str) -> None:
    """`sweep` and `compare`: --resume takes no setting (``flags``: argument names, given when not None;
    ``also_given``: flag texts the caller found changed), and without --resume, --out DIR_NAME is needed."""
    if args.resume:
        given = [f"--{k.replace('_', '-')}" for k in flags if getattr(args, k) is not None] + list(also_given)
        if given:
            raise ConfigError(f"--resume continues a {kind} with its own spec: drop {' '.join(given)}")
    elif not args.out:
        raise ConfigError(f"--out {dir_name} is needed: {out_for}")


def _add_train(sub):
    p = sub.add_parser("train", help="train one model and write a run directory",
                       description="Train one model. Defaults: the nanda preset on a GPU, the small preset "
                                   "(x-y mod 31, groks in under a minute) on a CPU.")
    g = p.add_argument_group("task")
    g.add_argument("--preset", help="nanda | power | grokfast | pizza | small (default: nanda on a GPU, small on a CPU)")
    g.add_argument("--op", help="operation formula, e.g. 'x+y', 'x/y', 'x^2+xy+y^2', 'x*y | y!=0', "
                                "'x/y if y odd else x-y', 's5'; a comma-separated list is a multi-task mixture")
    g.add_argument("--p", type=int, help="modulus (the number of classes)")
    g.add_argument("--frac", type=float, help="fraction of all pairs used for training, in (0, 1)")
    g.add_argument("--layout", help="token layout: 'a b =', 'a op b =', 'eos a op b =' (openai/grok's <|eos|> first), 'a op b' or 'a b'")
    g.add_argument("--seed", type=int, help="model init and minibatch seed (default 0)")
    g.add_argument("--data-seed", type=int, help="train/test split seed (default: --seed)")
    add_model_flags(p.add_argument_group("model (override the preset)"))
    g = p.add_argument_group("training")
    add_training_flags(g)
    add_paper_optimizer_flags(g)
    g.add_argument("--full-batch", action="store_true", help="full batch even where the preset has minibatches")
    g.add_argument("--stop-at-grok", action=argparse.BooleanOptionalAction, default=None,
                   help="stop at the first evaluation with test accuracy >= 99%%")
    g = p.add_argument_group("run")
    g.add_argument("--backend", choices=["auto", "fused", "reference"])
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--out", help="run directory to write (default: runs/<time>-<preset>)")
    g.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    g.add_argument("--eval-every", type=int)
    g.add_argument("--checkpoint-every", type=int)
    g.add_argument("--measure-every", type=int, help="record the cheap progress measures (sum of squared weights, "
                                                     "Fourier Gini, ...) in metrics.jsonl every k steps")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from . import config as C
    from .data import Task
    from .train import train, default_preset_name, resolve_device, TrainingDiverged, Interrupted

    device = resolve_device(args.device)

    train_over = {k: getattr(args, k) for k in ("steps", "lr", "wd", "optimizer", "warmup_schedule", "minibatches", "eval_train", "rng",
                                                "beta1", "beta2", "warmup", "batch_size",
                                                "grokfast", "alpha", "lamb", "window", "seed", "eval_every",
                                                "checkpoint_every", "measure_every", "backend", "stop_at_grok", "precision",
                                                "loss", "orthograd", "muon_lr", "muon_momentum", "lr_matched")
                  if getattr(args, k) is not None}
    if args.full_batch:
        if args.batch_size is not None:
            raise ConfigError("--full-batch and --batch-size contradict each other: pass one")
        train_over["batch_size"] = None

    if args.resume:
        given = [f"--{k.replace('_', '-')}" for k in ("preset", "op", "p", "frac", "layout", "data_seed", "n_layers",
                                                      "d_model", "n_heads", "d_head", "d_mlp", "act", "layernorm",
                                                      "attn_alpha", "out") if getattr(args, k) is not None]
        if given:
            raise ConfigError(f"--resume continues a run with its own config: drop {' '.join(given)}")
        run = _run_train(train, dict(resume=args.resume, device=device, progress=not args.no_progress, **train_over),
                         TrainingDiverged, Interrupted)
        return run

    name = args.preset or default_preset_name(device)
    pre = C.preset(name)
    if args.preset is None:
        print(f"preset: {name} (default on {device.type}; pass --preset to choose)", file=sys.stderr)
    spec = pre.task
    op = args.op if args.op is not None else spec.op
    layout = args.layout if args.layout is not None else spec.layout
    if args.op is not None and args.layout is None and "," in args.op and "op" not in layout:
        layout = "a op b ="  # a mixture needs operation tokens
    seed = args.seed if args.seed is not None else pre.train.seed
    if args.data_seed is not None and (args.rng or pre.train.rng) == "stream":
        raise ConfigError("--data-seed does nothing with --rng stream (the split is drawn from --seed's generator): "
                          "drop it, or pass --rng independent")
    data_seed = args.data_seed if args.data_seed is not None else seed
    task = Task(op, args.p if args.p is not None else spec.p, args.frac if args.frac is not None else spec.frac,
                data_seed, layout, device=device)
    model_over = {k: getattr(args, k) for k in ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "act",
                                                "layernorm", "attn_alpha") if getattr(args, k) is not None}
    mcfg = dataclasses.replace(pre.model, **model_over).for_task(task)
    tcfg = dataclasses.replace(pre.train, **train_over)
    out = Path(args.out) if args.out else Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}"
    return _run_train(train, dict(task=task, model_config=mcfg, train_config=tcfg, out=out, device=device,
                                  progress=not args.no_progress), TrainingDiverged, Interrupted)


def _run_train(train, kwargs, TrainingDiverged, Interrupted) -> int:
    try:
        run = train(**kwargs)
    except TrainingDiverged as e:
        print(f"grokfast: error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"grokfast: {e}", file=sys.stderr)
        return 130
    s = run.summary
    def fmt(steps, secs):
        return "not reached" if steps is None else f"step {steps} ({secs:.1f} s)"
    print(f"run: {run.dir}")
    print(f"memorised (train acc >= 99%): {fmt(s['steps_to_memorize'], s['seconds_to_memorize'])}")
    print(f"grokked   (test acc >= 99%):  {fmt(s['steps_to_grok'], s['seconds_to_grok'])}")
    print(f"final: train acc {s['final_train_acc']:.4f}, test acc {s['final_test_acc']:.4f}, "
          f"{s['steps_done']} steps in {s['wall_seconds']:.1f} s on {run.backend}")
    print(f"figure: {run.dir / 'grokking.png'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="grokfast", description="Grokking on modular arithmetic, fast.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    sub.required = True
    _add_train(sub)
    # The other verbs live in their own modules: each has add_parser(sub) that adds its sub-parser and
    # sets func (a function of the parsed args returning the exit status).
    for mod in ("check_cli", "bench_cli", "analyze_cli", "sweep_cli", "reproduce_cli", "import_cli", "compare_cli"):
        try:
            m = __import__(f"grokfast.{mod}", fromlist=["add_parser"])
        except ModuleNotFoundError as e:
            if e.name != f"grokfast.{mod}":
                raise
            continue
        m.add_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except usage_errors() as e:
        print(f"grokfast: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
