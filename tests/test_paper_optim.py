"""The papers' optimizer semantics beside the project's defaults: Adam with coupled L2 weight decay
(torch.optim.Adam, as ironjr/grokfast runs it), the LambdaLR warm-up whose first step has lr 0, and
epoch-shuffled minibatches with a short last batch; each in config.json, each refused by the fused
path rather than silently computed as AdamW."""
import importlib
import json
import math

import pytest
import torch

import grokfast
from grokfast import rundir
from grokfast.backends import make_stepper, resolve_backend
from grokfast.cli import main
from grokfast.config import ConfigError, ModelConfig, TrainConfig
from grokfast.optim import AdamW, GrokfastFilter, lr_at
from grokfast.train import epoch_batch

TINY = ModelConfig(d_model=32, n_heads=2, d_head=16, d_mlp=64)


def grads_sequence(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [{"a": torch.randn(3, 4, generator=g, dtype=torch.float64),
             "b": torch.randn(5, generator=g, dtype=torch.float64)} for _ in range(n)]


@pytest.mark.parametrize("filt", ["none", "ema"])
def test_adam_coupled_l2_and_lambdalr_match_torch_as_the_paper_code_steps_them(filt):
    """ironjr/grokfast: p.grad <- Grokfast filter; torch.optim.Adam(weight_decay=wd).step();
    LambdaLR(lambda u: 1 if u > 10 else u / 10).step(). Same numbers at 1e-12."""
    cfg = TrainConfig(lr=3e-3, wd=0.05, warmup=10, optimizer="adam", warmup_schedule="lambdalr", grokfast=filt)
    g = torch.Generator().manual_seed(3)
    start = {"a": torch.randn(3, 4, generator=g, dtype=torch.float64), "b": torch.randn(5, generator=g, dtype=torch.float64)}
    mine = {k: v.clone() for k, v in start.items()}
    theirs = [torch.nn.Parameter(v.clone()) for v in start.values()]
    opt, filt_mine = AdamW(mine, cfg), GrokfastFilter.from_config(cfg)
    topt = torch.optim.Adam(theirs, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.wd,
                            foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(topt, lambda u: 1 if u > 10 else u / 10)
    ema = None
    for grads in grads_sequence(25, seed=4):
        opt.step(filt_mine.apply(grads))
        for p, k in zip(theirs, grads):
            p.grad = grads[k].clone()
            if filt == "ema":  # the paper's gradfilter_ema, restated
                ema = {} if ema is None else ema
                ema[k] = p.grad.clone() if k not in ema else ema[k]
                ema[k] = ema[k] * cfg.alpha + p.grad * (1 - cfg.alpha)
                p.grad = p.grad + ema[k] * cfg.lamb
        topt.step()
        sched.step()
        for p, k in zip(theirs, start):
            assert torch.allclose(mine[k], p.data, rtol=1e-12, atol=1e-14)
    assert not torch.equal(mine["a"], start["a"])


def test_adam_differs_from_adamw_when_wd_is_set():
    a = {"w": torch.ones(4, dtype=torch.float64)}
    b = {"w": torch.ones(4, dtype=torch.float64)}
    AdamW(a, TrainConfig(wd=0.5, warmup=0)).step({"w": torch.full((4,), 0.1, dtype=torch.float64)})
    AdamW(b, TrainConfig(wd=0.5, warmup=0, optimizer="adam")).step({"w": torch.full((4,), 0.1, dtype=torch.float64)})
    assert not torch.allclose(a["w"], b["w"])


def test_lambdalr_first_step_has_lr_zero():
    cfg = TrainConfig(lr=1e-3, warmup=10, warmup_schedule="lambdalr")
    assert [lr_at(cfg, t) for t in (1, 2, 11, 12)] == [0.0, pytest.approx(1e-4), 1e-3, 1e-3]
    p = {"w": torch.ones(3, dtype=torch.float64)}
    opt = AdamW(p, replace_cfg(cfg, wd=1.0))
    opt.step({"w": torch.ones(3, dtype=torch.float64)})
    assert torch.equal(p["w"], torch.ones(3, dtype=torch.float64)) and opt.t == 1 and opt.v["w"].abs().sum() > 0


def replace_cfg(cfg, **kw):
    import dataclasses
    return dataclasses.replace(cfg, **kw)


def test_epoch_minibatches_cover_each_epoch_once_with_a_short_last_batch():
    cfg = TrainConfig(batch_size=4, minibatches="epoch", seed=2)
    n = 10                                   # ceil(10 / 4) = 3 steps an epoch: 4, 4, 2
    cache = {}
    batches = [epoch_batch(n, cfg, s, cache) for s in range(6)]
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2]
    for e in range(2):
        assert sorted(torch.cat(batches[3 * e:3 * e + 3]).tolist()) == list(range(n))
    assert not torch.equal(torch.cat(batches[:3]), torch.cat(batches[3:]))   # a fresh shuffle each epoch
    assert torch.equal(epoch_batch(n, cfg, 4), batches[4])                  # a function of the step alone


def test_epoch_minibatches_resume_bit_identical(tmp_path):
    task = grokfast.Task("x+y", p=11, frac=0.5, seed=0)               # 60 train examples, 16 a batch: 4 steps an epoch
    kw = dict(steps=30, lr=3e-3, wd=1.0, eval_every=5, checkpoint_every=10, progress=False, log=lambda m: None,
              batch_size=16, minibatches="epoch", optimizer="adam", warmup_schedule="lambdalr")

    def run(out, **extra):
        return grokfast.train(task, TINY.for_task(task), TrainConfig(), out=out, **kw, **extra)
    full = run(tmp_path / "full")

    def crash(step):
        if step == 17:
            raise RuntimeError("simulated crash")
    with pytest.raises(RuntimeError):
        run(tmp_path / "cut", on_step=crash)
    resumed = grokfast.train(resume=tmp_path / "cut", progress=False, log=lambda m: None)
    assert [r["test_loss"] for r in resumed.history] == [r["test_loss"] for r in full.history]
    for k, v in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    saved = rundir.load_config(tmp_path / "full")["train"]
    assert (saved.optimizer, saved.warmup_schedule, saved.minibatches) == ("adam", "lambdalr", "epoch")


def test_cli_flags_land_in_config_json(tmp_path):
    argv = ["train", "--op", "x+y", "--p", "11", "--frac", "0.5", "--d-model", "32", "--n-heads", "2", "--d-head",
            "16", "--d-mlp", "64", "--steps", "3", "--no-progress", "--backend", "reference", "--batch-size", "16",
            "--optimizer", "adam", "--warmup-schedule", "lambdalr", "--minibatches", "epoch", "--out", str(tmp_path / "r")]
    assert main(argv) == 0
    train = json.loads((tmp_path / "r" / "config.json").read_text())["train"]
    assert (train["optimizer"], train["warmup_schedule"], train["minibatches"]) == ("adam", "lambdalr", "epoch")


@pytest.mark.parametrize("kw,msg", [(dict(optimizer="adam"), "optimizer='adam'"),
                                    (dict(warmup_schedule="lambdalr"), "warmup_schedule='lambdalr'")])
def test_fused_refuses_what_its_optimizer_does_not_compute(kw, msg):
    tcfg = TrainConfig(**kw)
    with pytest.raises(ConfigError, match=msg):
        resolve_backend("fused", TINY, "cpu", tcfg)
    backend, why = resolve_backend("auto", TINY, "cpu", tcfg)
    assert backend == "reference"
    with pytest.raises(ConfigError, match=msg):
        make_stepper("fused", grokfast.Transformer(TINY), tcfg)
    from grokfast.kernels import KernelConfigError
    from grokfast.kernels.optimizer import FusedOptimizer   # the sweep's path into the kernels
    with pytest.raises(KernelConfigError, match=msg):
        FusedOptimizer.from_configs([tcfg], 8)


@pytest.mark.parametrize("flag,value", [("--optimizer", "sgd"), ("--minibatches", "random"),
                                        ("--warmup-schedule", "cosine")])
def test_cli_bad_values_exit_2(tmp_path, flag, value):
    with pytest.raises(SystemExit) as e:
        main(["train", flag, value, "--out", str(tmp_path / "x")])
    assert e.value.code == 2


def test_bad_values_are_config_errors():
    for kw in (dict(optimizer="sgd"), dict(minibatches="x"), dict(warmup_schedule="cosine")):
        with pytest.raises(ConfigError, match="must be"):
            TrainConfig(**kw)


def test_no_eval_train_takes_train_numbers_from_the_steps(monkeypatch):
    """eval_train False: the train split is evaluated only at step 0; later rows carry the mean loss and
    the accuracy of the training steps since the previous evaluation (before each update)."""
    T = importlib.import_module("grokfast.train")   # the module (grokfast.train is its function)
    calls = []
    real = T.evaluate
    monkeypatch.setattr(T, "evaluate", lambda m, tok, lab, chunk=None, **kw: calls.append(len(lab)) or real(m, tok, lab, **kw))
    task = grokfast.Task("x+y", p=11, frac=0.5, seed=0)
    losses = []
    run = grokfast.train(task, TINY.for_task(task), TrainConfig(), steps=10, eval_every=5, eval_train=False,
                         batch_size=20, minibatches="epoch", progress=False, log=lambda m: None)
    n_train, n_test = len(task.train), len(task.test)
    assert calls == [n_train, n_test, n_test, n_test]
    for r in run.history[1:]:
        assert 0 <= r["train_acc"] <= 1 and math.isfinite(r["train_loss"])
    full = grokfast.train(task, TINY.for_task(task), TrainConfig(), steps=10, eval_every=5, batch_size=20,
                          minibatches="epoch", progress=False, log=lambda m: None)
    assert [r["test_loss"] for r in full.history] == [r["test_loss"] for r in run.history]   # the same training
    assert run.history[1]["train_loss"] != full.history[1]["train_loss"]


def test_adamw_with_lambdalr_matches_nanda_et_al_trainer():
    """progress-measures-paper transformers.py Trainer: optim.AdamW(lr 1e-3, wd 1, betas (0.9, 0.98)) and
    LambdaLR(lambda step: min(step / 10, 1)) stepped after each update, full batch: our AdamW with
    warmup_schedule "lambdalr" takes the same steps at 1e-12 (the linear schedule does not)."""
    cfg = TrainConfig(lr=1e-3, wd=1.0, warmup=10, warmup_schedule="lambdalr")
    for schedule, same in (("lambdalr", True), ("linear", False)):
        g = torch.Generator().manual_seed(5)
        start = {"a": torch.randn(3, 4, generator=g, dtype=torch.float64), "b": torch.randn(5, generator=g, dtype=torch.float64)}
        mine = {k: v.clone() for k, v in start.items()}
        theirs = [torch.nn.Parameter(v.clone()) for v in start.values()]
        opt = AdamW(mine, replace_cfg(cfg, warmup_schedule=schedule))
        topt = torch.optim.AdamW(theirs, lr=1e-3, weight_decay=1.0, betas=(0.9, 0.98), foreach=False)
        sched = torch.optim.lr_scheduler.LambdaLR(topt, lambda step: min(step / 10, 1))
        for grads in grads_sequence(15, seed=6):
            opt.step(grads)
            for p, k in zip(theirs, grads):
                p.grad = grads[k].clone()
            topt.step()
            sched.step()
        agree = all(torch.allclose(mine[k], p.data, rtol=1e-12, atol=1e-14) for p, k in zip(theirs, start))
        assert agree == same, schedule
