"""Models released with papers, as run directories that `grokfast analyze` reads: `grokfast import`.

    import_model("pizza", "code/save/model_p99zdpze5l.pt", "runs/pizza_A")   # config_p99zdpze5l.json beside it
    import_model("transformer_lens", "model.pt", "runs/tl", config="cfg.json", op="x+y")

Formats:
- "pizza": fjzzq2002/pizza's code/save (Zhong et al. 2023): ``model_<id>.pt``, a torch state dict of their
  Transformer (W_E [d_model, d_vocab], W_Q/W_K/W_V [heads, d_head, d_model], W_O [d_model, heads * d_head],
  W_in [d_mlp, d_model], W_out [d_model, d_mlp], W_U [d_model, d_vocab]), and ``config_<id>.json`` with
  C (p), funcs (the operation), attn_coeff (the attention rate alpha), act_fn, n_layers, eqn_sign,
  diff_vocab, frac, lr, weight_decay, epoch. Their models attend without a mask; at the last position of a
  one-layer model that is the same function as ours (which is causal), so one-layer models import; deeper
  ones, their linear models (model_type) and diff_vocab (b's tokens shifted by p) are refused with a reason.
- "transformer_lens": a HookedTransformer ``state_dict()`` saved with torch.save (or a dict holding it under
  "state_dict" or "model", with its config under "config" or "cfg"), and optionally its config as JSON
  (HookedTransformerConfig.to_dict()). Names and shapes are ours already; shapes give the sizes, the config
  (or the arguments) the activation, the operation and the layout. Zero attention and unembedding biases are
  dropped; non-zero ones switch on ModelConfig.attn_bias / unembed_bias.

The run directory gets config.json (with an "imported" record: format, file, its sha256, the accuracy over
every pair, and split_known false: the paper's train split is not known, so the analysis reads accuracy over
every pair), one checkpoint at the paper's step count, and no metrics. The conversion is checked by the
accuracy over every pair, which import_model returns.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch

from . import rundir
from .config import ConfigError, ModelConfig, TrainConfig

FORMATS = ("pizza", "transformer_lens")


def _load_torch(file) -> dict:
    file = Path(file)
    if not file.is_file():
        raise ConfigError(f"{file} is not a file: pass the saved model (a torch state dict)")
    try:
        obj = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with code in it, or not a torch file at all
        raise ConfigError(f"{file} is not a torch state dict that loads with weights_only=True ({type(e).__name__})")
    if not isinstance(obj, dict):
        raise ConfigError(f"{file} holds a {type(obj).__name__}, not a state dict")
    return obj


def _sha256(file) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- pizza (Zhong et al.)

_FUNC = re.compile(r"^lambda x: *\(x\[0\] *([+\-*]) *x\[1\]\) *% *(\d+)$")


def pizza_config_path(file) -> Path:
    """config_<id>.json beside model_<id>.pt."""
    file = Path(file)
    m = re.match(r"model_(.+)\.pt$", file.name)
    if not m:
        raise ConfigError(f"{file.name} is not named model_<id>.pt: pass its config JSON with --config")
    return file.with_name(f"config_{m.group(1)}.json")


def read_pizza(file, config=None):
    """(state dict under our names, ModelConfig, Task, TrainConfig, the paper's config) of a pizza-repo model."""
    from .data import Task

    cpath = Path(config) if config is not None else pizza_config_path(file)
    if not cpath.is_file():
        raise ConfigError(f"no config {cpath}: pass the model's config_<id>.json with --config")
    c = json.loads(cpath.read_text())
    if "model_type" in c or c.get("use_linear"):
        raise ConfigError(f"{cpath.name} describes one of their linear models (model_type {c.get('model_type')}), "
                          "not a transformer: only their Transformer checkpoints import")
    if c.get("diff_vocab"):
        raise ConfigError(f"{cpath.name} has diff_vocab (b's tokens shifted by p), a layout grokfast has not")
    L = int(c.get("n_layers", 1))
    if L != 1:
        raise ConfigError(f"{cpath.name} has {L} layers: their code attends both ways at every position and grokfast's "
                          "Transformer is causal, the same function only for 1 layer; import a 1-layer model")
    acts = {"ReLU": "relu", "GeLU": "gelu"}
    if c.get("act_fn", "ReLU") not in acts:
        raise ConfigError(f"act_fn {c.get('act_fn')!r} in {cpath.name}: grokfast has ReLU and GeLU only")
    m = _FUNC.match(str(c.get("funcs", "")).strip())
    if not m or int(m.group(2)) != int(c["C"]):
        raise ConfigError(f"funcs {c.get('funcs')!r} in {cpath.name} is not (x[0] op x[1]) % C with op + - *")
    op, p = f"x{m.group(1)}y", int(c["C"])
    eq = bool(c.get("eqn_sign"))
    task = Task(op, p, float(c.get("frac", 0.8)), 0, "a b =" if eq else "a b")

    sd = _load_torch(file)
    need = ["embed.W_E", "pos_embed.W_pos", "blocks.0.attn.W_Q", "blocks.0.attn.W_K", "blocks.0.attn.W_V",
            "blocks.0.attn.W_O", "blocks.0.mlp.W_in", "blocks.0.mlp.b_in", "blocks.0.mlp.W_out", "blocks.0.mlp.b_out",
            "unembed.W_U"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise ConfigError(f"{Path(file).name} lacks {missing}: not a state dict of the pizza repo's Transformer")
    H, Dh, D = sd["blocks.0.attn.W_Q"].shape
    V = sd["embed.W_E"].shape[1]
    if V != task.d_vocab:
        raise ConfigError(f"W_E has {V} tokens but {op} mod {p} with layout '{task.layout}' has {task.d_vocab}")
    g = lambda k: sd[k].detach().to(torch.float32)
    ours = {"embed.W_E": g("embed.W_E").T, "pos_embed.W_pos": g("pos_embed.W_pos"),
            "blocks.0.attn.W_Q": g("blocks.0.attn.W_Q").transpose(1, 2),
            "blocks.0.attn.W_K": g("blocks.0.attn.W_K").transpose(1, 2),
            "blocks.0.attn.W_V": g("blocks.0.attn.W_V").transpose(1, 2),
            "blocks.0.attn.W_O": g("blocks.0.attn.W_O").T.reshape(H, Dh, D),
            "blocks.0.mlp.W_in": g("blocks.0.mlp.W_in").T, "blocks.0.mlp.b_in": g("blocks.0.mlp.b_in"),
            "blocks.0.mlp.W_out": g("blocks.0.mlp.W_out").T, "blocks.0.mlp.b_out": g("blocks.0.mlp.b_out"),
            "unembed.W_U": g("unembed.W_U")}
    cfg = ModelConfig(n_layers=1, d_model=D, n_heads=H, d_head=Dh, d_mlp=ours["blocks.0.mlp.W_in"].shape[1],
                      act=acts[c.get("act_fn", "ReLU")], attn_alpha=float(c["attn_coeff"]), init="pizza",
                      unembed_all_tokens=eq).for_task(task)
    if ours["unembed.W_U"].shape[1] != cfg.d_vocab_out:
        raise ConfigError(f"W_U has {ours['unembed.W_U'].shape[1]} outputs, expected {cfg.d_vocab_out}")
    tcfg = TrainConfig(steps=int(c.get("epoch", 20000)), lr=float(c.get("lr", 1e-3)),
                       wd=float(c.get("weight_decay", 2.0)), warmup=10, warmup_schedule="lambdalr")
    return ours, cfg, task, tcfg, c


# ----------------------------------------------------------------------------- TransformerLens

_TL_BUFFERS = re.compile(r"^blocks\.\d+\.attn\.(mask|IGNORE)$")


def read_transformer_lens(file, config=None, op: str = "x+y", p: int | None = None, layout: str | None = None,
                          act: str | None = None, frac: float = 0.3):
    """(state dict, ModelConfig, Task, TrainConfig, the TL config or {}) of a HookedTransformer state dict."""
    from .data import Task

    obj = _load_torch(file)
    tl_cfg = {}
    sd = obj
    for k in ("state_dict", "model"):
        if isinstance(obj.get(k), dict):
            sd = obj[k]
            tl_cfg = obj.get("config") or obj.get("cfg") or {}
            break
    if config is not None:
        tl_cfg = json.loads(Path(config).read_text())
    if not isinstance(tl_cfg, dict):
        raise ConfigError("the TransformerLens config must be a dict (HookedTransformerConfig.to_dict())")
    for key, ok in (("positional_embedding_type", ("standard",)), ("normalization_type", (None, "LN")),
                    ("attn_only", (False,)), ("gated_mlp", (False,)), ("use_attn_scale", (True,)),
                    ("original_architecture", (None,))):
        if key in tl_cfg and tl_cfg[key] not in ok:
            raise ConfigError(f"{key} = {tl_cfg[key]!r} in the TransformerLens config: grokfast's Transformer has {ok[0]!r}")
    if "embed.W_E" not in sd:
        raise ConfigError(f"{Path(file).name} has no embed.W_E: not a HookedTransformer state dict")
    layers = [int(m.group(1)) for k in sd for m in [re.match(r"blocks\.(\d+)\.", k)] if m]
    if not layers or "blocks.0.attn.W_Q" not in sd or "unembed.W_U" not in sd:
        raise ConfigError(f"{Path(file).name} has no blocks.0.attn.W_Q or unembed.W_U: not a HookedTransformer state dict")
    L = 1 + max(layers)
    if tl_cfg.get("attention_dir", "causal") != "causal" and L > 1:
        raise ConfigError("bidirectional attention with more than one layer: grokfast's Transformer is causal")
    V, D = sd["embed.W_E"].shape
    H, _, Dh = sd["blocks.0.attn.W_Q"].shape
    V_out = sd["unembed.W_U"].shape[1]
    ln = "blocks.0.ln1.w" in sd
    if tl_cfg.get("normalization_type") == "LN" and not ln:
        raise ConfigError("normalization_type LN but no blocks.0.ln1.w: a folded LayerNorm (LNPre) does not import")
    a = act or {"relu": "relu", "gelu": "gelu"}.get(str(tl_cfg.get("act_fn", "relu")))
    if a is None:
        raise ConfigError(f"act_fn {tl_cfg.get('act_fn')!r}: grokfast has relu and gelu (exact) only")
    p = int(p if p is not None else tl_cfg.get("d_vocab_out", V_out))
    n_ctx = sd["pos_embed.W_pos"].shape[0]
    layout = layout or {2: "a b", 3: "a b =", 4: "a op b ="}.get(n_ctx)
    if layout is None:
        raise ConfigError(f"n_ctx {n_ctx}: pass --layout")
    task = Task(op, p, frac, 0, layout)
    if task.d_vocab != V or task.n_ctx != n_ctx:
        raise ConfigError(f"the state dict has {V} tokens and n_ctx {n_ctx}; {op} mod {p} with layout '{layout}' has "
                          f"{task.d_vocab} and {task.n_ctx}: pass --p, --op or --layout")
    if V_out not in (p, task.d_vocab):
        raise ConfigError(f"W_U has {V_out} outputs: expected p = {p} (or {task.d_vocab}, every token)")
    ours, unknown = {}, []
    zero = lambda k: k not in sd or not bool(sd[k].abs().gt(0).any())
    attn_bias = not all(zero(f"blocks.{l}.attn.b_{n}") for l in range(L) for n in "QKVO")
    unembed_bias = not zero("unembed.b_U")
    for k, v in sd.items():
        leaf = k.rsplit(".", 1)[-1]
        if _TL_BUFFERS.match(k):
            continue
        if (leaf in ("b_Q", "b_K", "b_V", "b_O") and not attn_bias) or (k == "unembed.b_U" and not unembed_bias):
            continue
        ours[k] = v.detach().to(torch.float32)
    cfg = ModelConfig(n_layers=L, d_model=D, n_heads=H, d_head=Dh, d_mlp=sd["blocks.0.mlp.W_in"].shape[1], act=a,
                      layernorm=ln, attn_bias=attn_bias, unembed_bias=unembed_bias,
                      ln_eps=float(tl_cfg.get("eps", 1e-5)), unembed_all_tokens=V_out != p).for_task(task)
    unknown = sorted(set(ours) - set(cfg.param_shapes()))
    if unknown:
        raise ConfigError(f"{Path(file).name} has parameters grokfast's Transformer lacks: {unknown[:4]}")
    return ours, cfg, task, TrainConfig(), tl_cfg


# ----------------------------------------------------------------------------- the run directory

def write_run_dir(out, model, task, train_config: TrainConfig | None = None, step: int = 0,
                  imported: dict | None = None) -> Path:
    """A run directory holding one checkpoint of ``model`` at ``step``: config.json (with ``imported``
    when given) and checkpoints/step_*.safetensors. Refuses a directory that already holds a run."""
    out = Path(out)
    if (out / "config.json").exists() or rundir.list_checkpoints(out):
        raise ConfigError(f"{out} already holds a run: pass a new --out directory")
    cfg = {"model": model.cfg.to_dict(), "task": task.spec(), "train": (train_config or TrainConfig()).to_dict()}
    if imported is not None:
        cfg["imported"] = imported
    out.mkdir(parents=True, exist_ok=True)
    rundir.write_json(out / "config.json", cfg)
    rundir.save_checkpoint(out, step, {f"model.{k}": v for k, v in model.state_dict().items()},
                           {"step": step, "wall": 0.0})
    return out


@torch.no_grad()
def accuracy_all_pairs(model, task) -> float:
    """The share of every defined pair of the task's first operation that the model answers right."""
    allp = task.all_pairs()
    return float((model(allp.tokens).argmax(-1) == allp.labels).double().mean())


def import_model(fmt: str, file, out, config=None, **kw):
    """Read a released model, check it, write a run directory; returns (Transformer, Task, accuracy over
    every pair, the run directory). kw go to the format's reader (transformer_lens: op, p, layout, act)."""
    from .model import Transformer

    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if fmt == "pizza":
        if kw:
            raise ConfigError(f"the pizza format takes its settings from its config JSON, not {sorted(kw)}")
        state, cfg, task, tcfg, paper = read_pizza(file, config)
    else:
        state, cfg, task, tcfg, paper = read_transformer_lens(file, config, **kw)
    model = Transformer(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    bad = [k for k, v in state.items() if tuple(v.shape) != shapes.get(k)]
    if bad or set(state) != set(shapes):
        raise ConfigError(f"the converted weights do not fit the model: shapes differ at {bad[:3]}, missing "
                          f"{sorted(set(shapes) - set(state))[:3]}")
    model.load_state_dict(state)
    model.eval()
    acc = accuracy_all_pairs(model, task)
    imported = {"format": fmt, "file": str(Path(file).resolve()), "sha256": _sha256(file),
                "accuracy_all_pairs": acc, "split_known": False, "paper_config": paper}
    write_run_dir(out, model, task, tcfg, step=tcfg.steps if fmt == "pizza" else 0, imported=imported)
    return model, task, acc, Path(out)
