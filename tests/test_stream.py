"""TrainConfig.rng "stream" (grokfast/stream.py): one torch generator per run draws the init, then the split, then
the batches, as ironjr/grokfast's main.py consumes torch's global generator after torch.manual_seed(seed). With
the grokfast preset, `--seed S` then starts from their seed S's weights, train/validation split and batch order."""
import dataclasses
import json

import pytest
import torch

import grokfast
from grokfast import stream
from grokfast.backends import ReferenceStepper
from grokfast.cli import main
from grokfast.config import ModelConfig, TrainConfig
from grokfast.data import Task
from ironjr_grokfast import GrokfastPaperDecoder, grokfast_paper_to_ours, paper_data


def preset_start(seed):
    pre = grokfast.preset("grokfast")
    base = Task.from_spec(pre.task, seed=seed)
    return pre, base, pre.model.for_task(base)


@pytest.mark.parametrize("seed", [0, 2])
def test_seed_draws_the_paper_codes_weights_split_and_batch_order(seed):
    pre, base, cfg = preset_start(seed)
    assert pre.train.rng == "stream"
    model, task, g = stream.start(cfg, base, seed)
    order = stream.EpochOrder(len(task.train), pre.train.batch_size, g.get_state())
    with torch.random.fork_rng():
        torch.manual_seed(seed)                               # main.py: the seed, the model, the data, the split
        theirs = grokfast_paper_to_ours(GrokfastPaperDecoder(tokens=cfg.d_vocab), cfg)
        data = paper_data(97)
        train_idx, valid_idx = torch.randperm(data.shape[1]).split(data.shape[1] // 2)
        train_data, valid_data = data[:, train_idx], data[:, valid_idx]
        epochs = []
        for _ in range(3):                                    # each epoch shuffles the previous order in place
            train_data = train_data[:, torch.randperm(train_data.shape[1])]
            epochs.append(train_data)
    ours = model.state_dict()
    assert set(ours) == set(theirs)
    assert [k for k in theirs if not torch.equal(ours[k], theirs[k])] == []          # bit for bit
    assert torch.equal(task.train.tokens, data[:-1, train_idx].T)
    assert torch.equal(task.train.labels, data[-1, train_idx])
    assert torch.equal(task.test.tokens, valid_data[:-1].T) and torch.equal(task.test.labels, valid_data[-1])
    for e, want in enumerate(epochs):
        got = torch.cat([order.batch(10 * e + j) for j in range(10)])
        assert torch.equal(task.train.tokens[got], want[:-1].T) and torch.equal(task.train.labels[got], want[-1])
    assert [len(order.batch(s)) for s in range(10)] == [512] * 9 + [48]
    assert torch.equal(order.batch(3), torch.cat([order.batch(s) for s in range(10)])[3 * 512:4 * 512])  # rewinds
    # rng "independent" draws the same weights (Transformer(cfg, seed) starts a generator at the seed too) but
    # its own split, from the task's hash
    assert not torch.equal(base.train.tokens, task.train.tokens)


TINY = ModelConfig(n_layers=2, d_model=32, n_heads=2, d_head=16, d_mlp=64, act="gelu", layernorm=True,
                   attn_bias=True, init="torch")


def tiny_run(out, **over):
    task = Task("x*y | y!=0", p=11, frac=0.5, seed=0, layout="a op b =")           # 55 train, 3 batches of 20
    tcfg = TrainConfig(steps=12, lr=3e-3, wd=0.005, optimizer="adam", warmup_schedule="lambdalr", batch_size=20,
                       minibatches="epoch", grokfast="ema", eval_every=4, checkpoint_every=4, rng="stream", seed=3)
    return grokfast.train(task, TINY.for_task(task), tcfg, out=out, progress=False, log=lambda m: None, **over)


def test_train_uses_the_stream_and_resumes_bit_identical(tmp_path):
    full = tiny_run(tmp_path / "full")
    task = Task("x*y | y!=0", p=11, frac=0.5, seed=0, layout="a op b =")
    model, split, g = stream.start(TINY.for_task(task), task, 3)   # the same run, driven by hand
    order = stream.EpochOrder(len(split.train), 20, g.get_state())
    stepper = ReferenceStepper(model, full.train_config)
    for s in range(12):
        idx = order.batch(s)
        stepper.step(split.train.tokens[idx], split.train.labels[idx])
    for k, v in model.state_dict().items():
        assert torch.equal(full.model.state_dict()[k], v), k
    assert torch.equal(full.task.train.tokens, split.train.tokens)

    def crash(step):
        if step == 7:                                       # mid-epoch, after the checkpoint at 4
            raise RuntimeError("simulated crash")
    with pytest.raises(RuntimeError):
        tiny_run(tmp_path / "cut", on_step=crash)
    resumed = grokfast.train(resume=tmp_path / "cut", progress=False, log=lambda m: None)
    for k, v in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    cfg = json.loads((tmp_path / "full" / "config.json").read_text())
    assert cfg["train"]["rng"] == "stream" and cfg["task"]["split"] == "stream"
    _, loaded, _ = grokfast.load_model(tmp_path / "full")                 # analysis sees the run's split
    assert torch.equal(loaded.test.tokens, full.task.test.tokens)


def test_cli_rng_flag_and_data_seed_refused_under_stream(tmp_path):
    base = ["train", "--op", "x+y", "--p", "11", "--frac", "0.5", "--d-model", "32", "--n-heads", "2", "--d-head",
            "16", "--d-mlp", "64", "--steps", "2", "--no-progress", "--backend", "reference"]
    assert main(base + ["--rng", "stream", "--out", str(tmp_path / "r")]) == 0
    assert json.loads((tmp_path / "r" / "config.json").read_text())["train"]["rng"] == "stream"
    assert main(base + ["--rng", "stream", "--data-seed", "4", "--out", str(tmp_path / "s")]) == 2
    assert main(["train", "--preset", "grokfast", "--data-seed", "4", "--out", str(tmp_path / "t")]) == 2
    with pytest.raises(SystemExit) as e:
        main(base + ["--rng", "global", "--out", str(tmp_path / "u")])
    assert e.value.code == 2
    assert not (tmp_path / "s").exists() and not (tmp_path / "t").exists()
