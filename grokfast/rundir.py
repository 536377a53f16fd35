"""The run directory: config.json, metrics.jsonl, summary.json, checkpoints/, figures.

    RUN_DIR/config.json                 {"model": ModelConfig, "task": Task.spec(), "train": TrainConfig, ...}
    RUN_DIR/metrics.jsonl               one JSON line per evaluation: step, train/test loss and accuracy, wall
    RUN_DIR/summary.json                steps and seconds to memorise (train acc >= 99%) and to grok (test acc >= 99%)
    RUN_DIR/checkpoints/step_0001000.safetensors
                                        "model.<param>" weights, "opt.*" AdamW state, "filter.*" Grokfast
                                        state, "rng.*" generator states; metadata {"step", "wall", ...}
    RUN_DIR/grokking.png                train and test accuracy and loss against a log step axis

A sweep or a comparison is a directory of run directories with its spec file (sweep.json, compare.json)
on top: ``open_spec_dir`` starts a new one or opens one to continue.

Every file is written atomically (a temporary file in the same directory, fsync, rename), so a
kill at any moment leaves either the old file or the new one, never a torn one.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file, load_file
from safetensors import safe_open

from .config import ConfigError, ModelConfig, TrainConfig

CKPT_RE = re.compile(r"step_(\d+)\.safetensors$")


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), fsync it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, obj) -> None:
    def w(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    atomic_write(path, w)


def write_text(path: Path, text: str) -> None:
    def w(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, w)


def read_json(path: Path):
    with open(path) as f:
        return json.load(f)


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a torn last line from a kill mid-write: everything before it is good
    return rows


def checkpoint_path(run_dir, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}.safetensors"


def list_checkpoints(run_dir) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint in the run directory, by step."""
    d = Path(run_dir) / "checkpoints"
    if not d.is_dir():
        return []
    out = []
    for f in d.iterdir():
        m = CKPT_RE.search(f.name)
        if m:
            out.append((int(m.group(1)), f))
    return sorted(out)


def save_checkpoint(run_dir, step: int, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    path = checkpoint_path(run_dir, step)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"grokfast": json.dumps(meta)}))
    return path


def load_checkpoint(path) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("grokfast", "{}"))
    return tensors, meta


def model_weights(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's state_dict from a checkpoint's tensors (keys without the "model." prefix)."""
    return {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}


def open_spec_dir(spec, out, resume, spec_file: str, spec_cls, *, command: str, kind: str, needs: str,
                  drop: str) -> tuple:
    """(spec, directory) of a new many-run directory (``spec`` written to ``out`` by the caller once it is
    checked) or of one to continue (``resume``: its ``spec_file`` read as ``spec_cls.from_dict``).

    command: the verb that writes it (`grokfast sweep`), kind: what it holds ("sweep", "comparison"),
    needs: what a new one needs besides --out ("a spec"), drop: what --resume refuses ("the grid").
    ConfigError, one line, before any work: a resume given a spec or --out, a resume of a folder without
    the spec file, a new one without both, a new one over an existing one."""
    dir_name = f"{command.upper()}_DIR"
    if resume is not None:
        if spec is not None or out is not None:
            raise ConfigError(f"--resume continues a {kind} with its own spec: drop {drop} and --out")
        d = Path(resume)
        if not (d / spec_file).exists():
            raise ConfigError(f"{d} is not a {command} directory (no {spec_file}): pass the folder that "
                              f"`grokfast {command} --out` wrote")
        return spec_cls.from_dict(read_json(d / spec_file)), d
    if spec is None or out is None:
        raise ConfigError(f"a {kind} needs {needs} and --out {dir_name} (or --resume {dir_name})")
    d = Path(out)
    if (d / spec_file).exists():
        raise ConfigError(f"{d} already holds a {kind}: continue it with --resume {d}, or pick another --out")
    return spec, d


def load_config(run_dir) -> dict:
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise ConfigError(f"{run_dir} is not a run directory (no config.json): pass the folder that `grokfast train --out` wrote")
    d = read_json(path)
    d["model"] = ModelConfig.from_dict(d["model"])
    d["train"] = TrainConfig.from_dict(d["train"])
    return d


def load_model(run_dir, step: int | None = None, device="cpu"):
    """(Transformer with the weights of checkpoint ``step`` (the last one if None), Task, step)."""
    from .data import Task
    from .model import Transformer

    cfg = load_config(run_dir)
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise ConfigError(f"{run_dir} has no checkpoints yet")
    if step is None:
        step, path = ckpts[-1]
    else:
        found = dict(ckpts)
        if step not in found:
            raise ConfigError(f"no checkpoint at step {step} in {run_dir}; steps saved: {[s for s, _ in ckpts]}")
        path = found[step]
    tensors, _ = load_checkpoint(path)
    model = Transformer(cfg["model"], device=device)
    model.load_state_dict(model_weights(tensors))
    t = cfg["task"]
    task = Task(t["op"], t["p"], t["frac"], t["seed"], t["layout"], device=device)
    if cfg["train"].rng == "stream":   # the split was drawn after the init, from the run's one generator
        from .stream import start
        task = start(cfg["model"], task, cfg["train"].seed)[1].to(device)
    return model, task, step
