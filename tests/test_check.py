"""`grokfast check`: the quick CLI run passes on this machine (CPU: the Triton interpreter at small
shapes), and a corrupted gradient makes it fail with a non-zero status."""
import pytest

from grokfast.cli import main


def test_quick_check_passes(capsys):
    status = main(["check", "--quick", "--preset", "all"])
    out = capsys.readouterr().out
    assert status == 0, out
    for preset in ("nanda", "power", "pizza"):
        for what in ("eval loss", "loss", "grad embed.W_E", "grad unembed.W_U", "params after 1 step [none]",
                     "params after 4 steps [ema]", "params after 4 steps [ma]"):
            assert f"{preset:<7} {what}" in out, (preset, what)
    assert " 0 failed" in out and "FAIL" not in out


def test_quick_orthograd_check_passes(capsys):
    """`grokfast check --quick --orthograd` on one preset and filter (CI time; the full table passes on every
    preset and filter, see BOUNDS): its optimizer rows are orthograd's, within their bounds."""
    status = main(["check", "--quick", "--preset", "pizza", "--grokfast", "ma", "--orthograd"])
    out = capsys.readouterr().out
    assert status == 0, out
    for what in ("params after 1 step [ma, orthograd]", "params after 4 steps [ma, orthograd]"):
        assert f"pizza   {what}" in out, what
    assert " 0 failed" in out and "FAIL" not in out and "[ma]" not in out


def test_quick_stablemax_check_passes(capsys):
    """--loss stablemax: every row (evaluation, loss, gradients, parameters after 1 and 4 fused steps with
    Grokfast-EMA) against stablemax_cross_entropy64 in float64, within the StableMax bounds."""
    from grokfast.check import BOUNDS
    status = main(["check", "--quick", "--preset", "nanda", "--grokfast", "ema", "--loss", "stablemax"])
    out = capsys.readouterr().out
    assert status == 0, out
    for what in ("eval loss", "loss", "grad embed.W_E", "grad unembed.W_U", "params after 1 step [ema]",
                 "params after 4 steps [ema]"):
        assert f"nanda   {what}" in out, what
    assert " 0 failed" in out and "FAIL" not in out
    assert {"loss stablemax", "grad stablemax", "params@1 stablemax", "params@S stablemax"} <= set(BOUNDS)


def test_corrupted_gradient_fails(monkeypatch, capsys):
    """The largest gradient element of W_in with its sign flipped: the check must notice (its gradient
    row, and the trained parameters: AdamW's update of that element changes direction) and exit 1.
    (A small change of magnitude would show only in the gradient row: AdamW's first step is sign(g).)"""
    from grokfast.kernels import forward_backward as fb, ParamLayout

    real = fb.loss_and_grads_flat

    def corrupted(cfg, flat, tokens, labels, **kw):
        loss_out, grad_out = real(cfg, flat, tokens, labels, **kw)
        w_in = ParamLayout(cfg).views(grad_out)["blocks.0.mlp.W_in"]
        flat_w = w_in.reshape(w_in.shape[0], -1)
        i = flat_w[0].abs().argmax()
        flat_w[:, i] = -flat_w[:, i]
        return loss_out, grad_out

    monkeypatch.setattr(fb, "loss_and_grads_flat", corrupted)
    status = main(["check", "--quick", "--preset", "pizza", "--grokfast", "none"])
    out = capsys.readouterr().out
    assert status == 1, out
    fails = [l for l in out.splitlines() if l.rstrip().endswith("FAIL") or " FAIL " in l]
    assert any("grad blocks.0.mlp.W_in" in l for l in fails), out
    assert any("params after" in l for l in fails), out
    assert not any("grad unembed.W_U" in l for l in fails), out


def test_bad_preset_is_a_usage_error(capsys):
    assert main(["check", "--preset", "gpt2"]) == 2
    assert "--preset must be one of" in capsys.readouterr().err
