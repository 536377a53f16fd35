"""`grokfast import FORMAT FILE --out RUN_DIR`: a model released with a paper as a run directory."""
from __future__ import annotations

from .config import ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "import", help="turn a released model (pizza repo, TransformerLens) into a run directory",
        description="Convert a saved model into a run directory that `grokfast analyze` reads, and check it by "
                    "its accuracy on every pair. pizza: fjzzq2002/pizza's code/save/model_<id>.pt with "
                    "config_<id>.json beside it; transformer_lens: a HookedTransformer state_dict() saved with "
                    "torch.save (its config JSON with --config, or --op/--p/--layout/--act).")
    p.add_argument("format", metavar="FORMAT", choices=["pizza", "transformer_lens"], help="pizza | transformer_lens")
    p.add_argument("file", metavar="FILE", help="the saved model")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="the run directory to write (must be new)")
    p.add_argument("--config", metavar="JSON", help="the model's config (pizza: default config_<id>.json beside FILE)")
    p.add_argument("--op", help="transformer_lens: the operation (default x+y)")
    p.add_argument("--p", type=int, help="transformer_lens: the modulus (default: the number of outputs)")
    p.add_argument("--layout", help="transformer_lens: the token layout (default from n_ctx: 'a b', 'a b =', 'a op b =')")
    p.add_argument("--act", choices=["relu", "gelu"], help="transformer_lens: the activation (default: the config's, else relu)")
    p.set_defaults(func=cmd_import)


def cmd_import(args) -> int:
    from . import importers, measures as M

    kw = {k: getattr(args, k) for k in ("op", "p", "layout", "act") if getattr(args, k) is not None}
    if args.format == "pizza" and kw:
        raise ConfigError(f"the pizza format reads its settings from its config JSON: drop "
                          f"{' '.join('--' + k for k in kw)}")
    model, task, acc, out = importers.import_model(args.format, args.file, args.out, args.config, **kw)
    print(f"imported {args.format} model: {task.op} mod {task.p}, {model.cfg.n_layers} layer(s), d_model "
          f"{model.cfg.d_model}, attention rate {model.cfg.attn_alpha:g}")
    print(f"accuracy on every pair: {acc:.5f}")
    if args.format == "pizza" and task.op in ("x+y", "x-y"):
        z = M.zhong_notebook_measures(model, task)
        print("as Zhong et al.'s notebook computes them: " + ", ".join(f"{k.replace('_', ' ')} {v:.5f}" for k, v in z.items()))
    print(f"run: {out} (grokfast analyze {out})")
    return 0
