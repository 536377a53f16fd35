"""Configuration: one model config type that flows from the command line to the kernels, and the
papers' presets as plain data.

A preset bundles three things: the model (``ModelConfig``), the task (operation, modulus, train
fraction, token layout) and the training hyperparameters (``TrainConfig``). Everything a preset sets
can be overridden; ``preset(name)`` returns fresh copies.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field, asdict, replace
from typing import Optional


class ConfigError(ValueError):
    """Bad user input: the message is one line that says what to change."""


def usage_errors() -> tuple:
    """The exception types that mean bad input (a one-line message, exit status 2 on the command line):
    ConfigError, and the fused kernels' own KernelConfigError once grokfast.kernels has been imported
    (the kernels know nothing of grokfast; grokfast imports them only for the fused backend)."""
    errors = sys.modules.get("grokfast.kernels.errors")
    return (ConfigError,) + ((errors.KernelConfigError,) if errors is not None else ())


# How the fused kernels multiply float32 operands (kernels/_common.py): IEEE float32 (default), three
# TF32 tensor-core products (tf32x3), or one (tf32). The reference backend always computes in float32/64.
PRECISIONS = ("ieee", "tf32x3", "tf32")


def default_precision() -> str:
    """GROKFAST_DOT_PRECISION when set (checked by TrainConfig.validate), else "ieee"."""
    return os.environ.get("GROKFAST_DOT_PRECISION", "ieee")


class _Dict:
    """to_dict / from_dict for the config dataclasses (config.json); unknown keys are an error."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


@dataclass(frozen=True)
class ModelConfig(_Dict):
    """A decoder-only transformer with TransformerLens parameter names.

    d_vocab, d_vocab_out and n_ctx describe the task's token layout; ``for_task`` fills them in.
    attn_alpha is the attention rate of the clock-and-pizza paper:
    attention = alpha * softmax(QK^T / sqrt(d_head)) + (1 - alpha) over the causal positions,
    so 1.0 is ordinary attention and 0.0 constant (summing) attention.

    Quirks of a paper's code, off by default (the clean TransformerLens-style model):
    resid_after_ln1: the residual stream continues from ln1's output, x = ln1(x); x = x + attn(x), as
    in ironjr/grokfast's Block (needs layernorm). unembed_all_tokens: a logit for every input token
    (d_vocab_out = d_vocab, so `=` and the operation tokens compete in the softmax; labels stay 0..p-1),
    as ironjr/grokfast's head and Nanda et al.'s code have. pos_embed False: no positional embedding (no
    pos_embed.W_pos; attention tells positions apart by the causal mask alone), mlp_bias False: no b_in, b_out,
    extra_tokens: that many unused token ids after the task's (rows of W_E, and logits with
    unembed_all_tokens, that no input or label uses), all three as frt03/grok_mod_poly's model has them
    (Furuta et al.: its vocabulary is p + 5 tokens, = + - * /, whatever the operation; no positions, no
    biases). init: the initial distribution, "nanda"
    (every matrix randn / sqrt(d_model), W_U randn / sqrt(d_vocab), biases 0) or "torch" (PyTorch's
    module defaults as ironjr/grokfast's nn.Embedding, nn.MultiheadAttention and nn.Linear give them;
    see Transformer.init_weights) or "pizza" (nanda's, but W_in randn / sqrt(d_mlp), as Zhong et al.'s
    train script) or "furuta" (nanda's with the scales of W_E and W_U swapped: W_E randn / sqrt(d_vocab),
    W_U randn / sqrt(d_model), as frt03/grok_mod_poly's Embed and Unembed) or "grok" (PyTorch's module
    defaults as openai/grok's bias-free model has them: W_E N(0, 1), every other matrix U(+-1 / sqrt(fan_in)),
    LayerNorm 1 and 0; the same distribution, not the same draws).
    openai/grok's model (Power et al.) needs two more: ln_position "post" (x = ln1(x + attn(x)); x = ln2(x +
    mlp(x)); no ln_final; needs layernorm) and pos_embed "sinusoidal" (a fixed table added to the embedding,
    not a parameter: row t, column i is sin(t / 10000^(i / d_model)) for even i, cos(t / 10000^((i - 1) /
    d_model)) for odd i). pos_embed takes True or "learned" (stored as True), False or "none" (stored as
    False), or "sinusoidal".
    """

    n_layers: int = 1
    d_model: int = 128
    n_heads: int = 4
    d_head: int = 32
    d_mlp: int = 512
    act: str = "relu"            # "relu" or "gelu" (exact, erf form)
    layernorm: bool = False      # pre-LayerNorm blocks and ln_final, as in TransformerLens
    attn_bias: bool = False      # b_Q, b_K, b_V [n_heads, d_head], b_O [d_model]
    unembed_bias: bool = False   # b_U [d_vocab_out]
    attn_alpha: float = 1.0
    ln_eps: float = 1e-5
    resid_after_ln1: bool = False
    unembed_all_tokens: bool = False
    pos_embed: object = True     # True (learned W_pos; "learned" accepted) | False (none; "none") | "sinusoidal"
    ln_position: str = "pre"     # pre | post (openai/grok: x = LN(x + attn(x)); x = LN(x + mlp(x)), no ln_final)
    mlp_bias: bool = True
    extra_tokens: int = 0
    init: str = "nanda"          # nanda | torch | pizza | furuta | grok
    n_ctx: int = 3
    d_vocab: int = 114
    d_vocab_out: int = 113

    def __post_init__(self):
        # "learned" and "none" are stored as True and False, so config.json files and sweep run ids written
        # before pos_embed took a string stay as they were
        if isinstance(self.pos_embed, str) and self.pos_embed in ("learned", "none"):
            object.__setattr__(self, "pos_embed", self.pos_embed == "learned")
        self.validate()

    @property
    def learned_pos(self) -> bool:
        """A trained pos_embed.W_pos parameter (pos_embed True)."""
        return self.pos_embed is True

    def validate(self) -> None:
        def need(cond, msg):
            if not cond:
                raise ConfigError(msg)

        for name in ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "n_ctx", "d_vocab", "d_vocab_out"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                 f"{name} must be a positive integer, got {v!r}")
        need(self.act in ("relu", "gelu"), f"act must be 'relu' or 'gelu', got {self.act!r}")
        need(0.0 <= float(self.attn_alpha) <= 1.0, f"attn_alpha must lie in [0, 1], got {self.attn_alpha}")
        need(self.ln_eps > 0, f"ln_eps must be positive, got {self.ln_eps}")
        need(self.init in ("nanda", "torch", "pizza", "furuta", "grok"),
             f"init must be nanda, torch, pizza, furuta or grok, got {self.init!r}")
        need(isinstance(self.pos_embed, bool) or self.pos_embed == "sinusoidal",
             f"pos_embed must be learned, none or sinusoidal, got {self.pos_embed!r}")
        need(self.ln_position in ("pre", "post"), f"ln_position must be 'pre' or 'post', got {self.ln_position!r}")
        need(self.ln_position == "pre" or self.layernorm,
             "ln_position 'post' puts a LayerNorm after each residual add: it needs layernorm on (--layernorm)")
        need(not (self.resid_after_ln1 and self.ln_position == "post"),
             "resid_after_ln1 is a pre-LayerNorm quirk: use it with ln_position 'pre'")
        need(self.init != "torch" or self.learned_pos,
             "init 'torch' draws ironjr/grokfast's learned position table: it needs pos_embed learned")
        need(isinstance(self.extra_tokens, int) and not isinstance(self.extra_tokens, bool) and self.extra_tokens >= 0,
             f"extra_tokens must be a non-negative integer, got {self.extra_tokens!r}")
        need(not self.resid_after_ln1 or self.layernorm,
             "resid_after_ln1 takes the residual after ln1: it needs layernorm on (--layernorm)")

    @staticmethod
    def preset(name: str) -> "ModelConfig":
        return preset(name).model

    def for_task(self, task) -> "ModelConfig":
        """This config with d_vocab, d_vocab_out and n_ctx taken from a Task."""
        vocab = task.d_vocab + self.extra_tokens
        out = vocab if self.unembed_all_tokens else task.d_vocab_out
        return replace(self, d_vocab=vocab, d_vocab_out=out, n_ctx=task.n_ctx)

    def param_shapes(self) -> dict:
        """Parameter name -> shape, in the order of the parameter contract (DESIGN.md)."""
        H, D, Dh, F = self.n_heads, self.d_model, self.d_head, self.d_mlp
        s = {"embed.W_E": (self.d_vocab, D)}
        if self.learned_pos:
            s["pos_embed.W_pos"] = (self.n_ctx, D)
        for l in range(self.n_layers):
            b = f"blocks.{l}."
            if self.layernorm:
                s[b + "ln1.w"], s[b + "ln1.b"] = (D,), (D,)
            s[b + "attn.W_Q"], s[b + "attn.W_K"], s[b + "attn.W_V"] = (H, D, Dh), (H, D, Dh), (H, D, Dh)
            s[b + "attn.W_O"] = (H, Dh, D)
            if self.attn_bias:
                s[b + "attn.b_Q"], s[b + "attn.b_K"], s[b + "attn.b_V"] = (H, Dh), (H, Dh), (H, Dh)
                s[b + "attn.b_O"] = (D,)
            if self.layernorm:
                s[b + "ln2.w"], s[b + "ln2.b"] = (D,), (D,)
            s[b + "mlp.W_in"] = (D, F)
            if self.mlp_bias:
                s[b + "mlp.b_in"] = (F,)
            s[b + "mlp.W_out"] = (F, D)
            if self.mlp_bias:
                s[b + "mlp.b_out"] = (D,)
        if self.layernorm and self.ln_position == "pre":
            s["ln_final.w"], s["ln_final.b"] = (D,), (D,)
        s["unembed.W_U"] = (D, self.d_vocab_out)
        if self.unembed_bias:
            s["unembed.b_U"] = (self.d_vocab_out,)
        return s

    def n_params(self) -> int:
        n = 0
        for shape in self.param_shapes().values():
            k = 1
            for d in shape:
                k *= d
            n += k
        return n



@dataclass(frozen=True)
class TrainConfig(_Dict):
    """How to train. lr warm-up is linear over ``warmup`` steps: at optimizer step t = 1, 2, ...
    lr_t = lr * min(1, t / warmup) (warmup_schedule "linear"), or lr * min(1, (t - 1) / warmup)
    ("lambdalr": torch's LambdaLR stepped after each update, as the papers' code does, so the first
    step has lr 0 and only fills Adam's moments).

    optimizer: "adamw" (decoupled weight decay, theta *= 1 - lr_t wd) or "adam" (torch.optim.Adam:
    weight decay as coupled L2, g += wd theta after the Grokfast filter, as ironjr/grokfast runs).
    grokfast: "none", "ema" (alpha, lamb) or "ma" (window, lamb), exactly as Lee et al. define them
    (see grokfast.optim). batch_size None means full batch.

    The other ways to grok faster (formulas in grokfast.optim and grokfast.model; `grokfast compare` runs
    them side by side): optimizer "muon" (Newton-Schulz orthogonalised momentum at muon_lr with
    muon_momentum for the hidden weight matrices, AdamW at lr for the rest); orthograd (Prieto et al.
    2025: each tensor's gradient made orthogonal to its weights, rescaled to its norm, before the
    optimizer); loss "stablemax" (their StableMax cross-entropy: float64 on the reference backend, the
    fused loss kernel's float32 on the fused one) instead of "ce"; lr_matched
    (plain AdamW at lr * (1 + lamb), the step a Grokfast filter with this lamb gives a constant
    gradient, with no filter: grokfast.optim.lr_gain). minibatches: "draw" (each step draws
    batch_size examples without replacement, independently of other steps) or "epoch" (each epoch
    is a fresh shuffle cut into consecutive batches, the last one short: ceil(N / batch_size) steps).
    """

    steps: int = 10000
    lr: float = 1e-3
    wd: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-8
    warmup: int = 10
    batch_size: Optional[int] = None
    optimizer: str = "adamw"        # adamw | adam (coupled L2 weight decay) | muon
    warmup_schedule: str = "linear"  # linear | lambdalr (first step lr 0)
    minibatches: str = "draw"       # draw | epoch (shuffled epochs, short last batch)
    # independent: init, split (the Task's hash, its data seed) and batches from their own seeded generators;
    # stream: one torch generator seeded with `seed` draws the init, then the split, then the batches, in the
    # order of a script that calls torch.manual_seed(seed) once (ironjr/grokfast's main.py; grokfast/stream.py)
    rng: str = "independent"
    grokfast: str = "none"
    alpha: float = 0.98
    lamb: float = 2.0
    window: int = 100
    loss: str = "ce"                # ce | stablemax (Prieto et al. 2025)
    orthograd: bool = False         # gradient made orthogonal to the weights, per tensor (Prieto et al. 2025)
    muon_lr: float = 0.02           # optimizer "muon": its hidden matrices' lr and momentum (Muon's defaults)
    muon_momentum: float = 0.95
    lr_matched: bool = False        # no filter, lr * (1 + lamb): the Grokfast filter's gain, as a learning rate
    seed: int = 0
    eval_every: int = 100
    checkpoint_every: int = 1000
    measure_every: int = 0          # record grokfast.measures.cheap_measures every k steps (0: never)
    stop_at_grok: bool = False
    stop_acc: float = 0.99          # the test accuracy at which stop_at_grok stops (reproductions use 0.95)
    # False: evaluations measure the test split only; train loss and accuracy are those of the training steps
    # since the previous evaluation, before each update, as the papers' code logs them (reference backend)
    eval_train: bool = True
    backend: str = "auto"
    # the fused kernels' float32 products: ieee | tf32x3 | tf32 (kernels/_common.py); the default is
    # GROKFAST_DOT_PRECISION when set (so `grokfast bench` and sweeps can be switched), else ieee
    precision: str = field(default_factory=default_precision)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def need(cond, msg):
            if not cond:
                raise ConfigError(msg)

        need(isinstance(self.steps, int) and self.steps >= 0, f"--steps must be >= 0, got {self.steps}")
        need(self.lr > 0, f"--lr must be positive, got {self.lr}")
        need(self.wd >= 0, f"--wd must be >= 0, got {self.wd}")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"betas must lie in [0, 1), got ({self.beta1}, {self.beta2})")
        need(self.eps > 0, f"eps must be positive, got {self.eps}")
        need(self.warmup >= 0, f"--warmup must be >= 0, got {self.warmup}")
        need(self.batch_size is None or self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        need(self.optimizer in ("adamw", "adam", "muon"), f"--optimizer must be adamw, adam or muon, got {self.optimizer!r}")
        need(self.warmup_schedule in ("linear", "lambdalr"),
             f"--warmup-schedule must be linear or lambdalr, got {self.warmup_schedule!r}")
        need(self.minibatches in ("draw", "epoch"), f"--minibatches must be draw or epoch, got {self.minibatches!r}")
        need(self.rng in ("independent", "stream"), f"--rng must be independent or stream, got {self.rng!r}")
        need(self.grokfast in ("none", "ema", "ma"), f"--grokfast must be ema, ma or none, got {self.grokfast!r}")
        need(0 <= self.alpha < 1, f"--alpha must lie in [0, 1), got {self.alpha}")
        need(self.lamb >= 0, f"--lamb must be >= 0, got {self.lamb}")
        need(self.window >= 1, f"--window must be >= 1, got {self.window}")
        need(self.loss in ("ce", "stablemax"), f"--loss must be ce or stablemax, got {self.loss!r}")
        need(isinstance(self.orthograd, bool), f"orthograd must be true or false, got {self.orthograd!r}")
        need(self.muon_lr > 0, f"--muon-lr must be positive, got {self.muon_lr}")
        need(0 <= self.muon_momentum < 1, f"--muon-momentum must lie in [0, 1), got {self.muon_momentum}")
        need(not self.lr_matched or self.grokfast == "none",
             f"--lr-matched is plain AdamW at lr * (1 + lamb) in place of a Grokfast filter: drop --grokfast "
             f"{self.grokfast}")
        need(not self.lr_matched or self.optimizer == "adamw",
             f"--lr-matched matches AdamW's step to a Grokfast run: use --optimizer adamw, not {self.optimizer}")
        need(0 < self.stop_acc <= 1, f"stop_acc must lie in (0, 1], got {self.stop_acc}")
        need(self.eval_every >= 1, f"--eval-every must be >= 1, got {self.eval_every}")
        need(self.checkpoint_every >= 1, f"--checkpoint-every must be >= 1, got {self.checkpoint_every}")
        need(self.measure_every >= 0 and (self.measure_every == 0 or self.measure_every % self.eval_every == 0),
             f"--measure-every must be 0 or a multiple of --eval-every ({self.eval_every}), got {self.measure_every}")
        need(self.backend in ("auto", "fused", "reference"),
             f"--backend must be auto, fused or reference, got {self.backend!r}")
        need(self.precision in PRECISIONS,
             f"--precision (or GROKFAST_DOT_PRECISION) must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")



@dataclass(frozen=True)
class TaskSpec:
    """The data a preset trains on (see grokfast.data.Task)."""

    op: str = "x+y"
    p: int = 113
    frac: float = 0.3
    layout: str = "a b ="


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    model: ModelConfig
    task: TaskSpec
    train: TrainConfig


def _presets() -> dict:
    nanda = Preset(
        "nanda",
        "Nanda et al. 2023: 1 layer, d_model 128, 4x32 heads, d_mlp 512, ReLU, x+y mod 113, 30% train, wd 1",
        ModelConfig(),
        TaskSpec("x+y", 113, 0.3, "a b ="),
        TrainConfig(steps=25000, lr=1e-3, wd=1.0, warmup=10, eval_every=100, checkpoint_every=1000),
    )
    power = Preset(
        "power",
        "Power et al.'s sizes on the Grokfast paper's task: 2 layers, LayerNorm, GELU, x*y mod 97 (y != 0), 50% train, "
        "batch 512; the clean pre-LayerNorm model, not openai/grok's code (post-LayerNorm, no biases, fixed sinusoidal "
        "positions, logits over its whole vocabulary: that is the grok preset); for the Grokfast paper's code use the "
        "grokfast preset",
        ModelConfig(n_layers=2, act="gelu", layernorm=True, n_ctx=4, d_vocab=99, d_vocab_out=97),
        TaskSpec("x*y | y!=0", 97, 0.5, "a op b ="),
        TrainConfig(steps=100000, lr=1e-3, wd=0.0, warmup=10, batch_size=512, eval_every=100,
                    checkpoint_every=5000),
    )
    # Faithful to the code behind the Grokfast paper's headline run (ironjr/grokfast main.py with its README's
    # Grokfast-EMA command), quirks included; tests/test_paper_presets.py restates that model and checks both.
    grokfast = Preset(
        "grokfast",
        "Lee et al. 2024 as ironjr/grokfast runs it: 2 layers, LayerNorm with the residual after ln1 (their quirk), "
        "attention biases, GELU, 99 output classes, torch init; x*y mod 97 (y != 0), 50% train; Adam with coupled "
        "L2 wd 0.005, LambdaLR warm-up, shuffled epochs of 512; Grokfast-EMA alpha 0.98 lamb 2; validated every epoch, "
        "train accuracy from the training steps; --seed S draws their seed S's weights, split and batch order (--rng stream)",
        ModelConfig(n_layers=2, act="gelu", layernorm=True, attn_bias=True, resid_after_ln1=True,
                    unembed_all_tokens=True, init="torch", n_ctx=4, d_vocab=99, d_vocab_out=99),
        TaskSpec("x*y | y!=0", 97, 0.5, "a op b ="),
        TrainConfig(steps=5000, lr=1e-3, wd=0.005, optimizer="adam", warmup=10, warmup_schedule="lambdalr",
                    batch_size=512, minibatches="epoch", grokfast="ema", alpha=0.98, lamb=2.0, eval_every=10,
                    eval_train=False, checkpoint_every=1000, rng="stream"),
    )
    pizza = Preset(
        "pizza",
        "Zhong et al. 2023 (clock and pizza): 1 layer, [a, b], x+y mod 59, 80% train, wd 2, attention rate alpha; "
        "their train script's function and init (W_in randn / sqrt(d_mlp)) and 10-step warm-up (linear here; "
        "theirs is LambdaLR, one step later: --warmup-schedule lambdalr, reference backend)",
        ModelConfig(attn_alpha=1.0, init="pizza", n_ctx=2, d_vocab=59, d_vocab_out=59),
        TaskSpec("x+y", 59, 0.8, "a b"),
        TrainConfig(steps=20000, lr=1e-3, wd=2.0, warmup=10, eval_every=100, checkpoint_every=1000),
    )
    # Faithful to frt03/grok_mod_poly (Furuta et al. 2024), train_emb.py with config_add_transformer_emb.py;
    # tests/test_paper_presets.py restates that model and checks both.
    furuta = Preset(
        "furuta",
        "Furuta et al. 2024 as frt03/grok_mod_poly runs it: 1 layer, d_model 128, 4x32 heads, d_mlp 512, ReLU, no "
        "LayerNorm, no positional embedding, no MLP biases, 102 tokens and logits (p + 5: = + - * /), their init "
        "(W_E randn / sqrt(d_vocab), W_U randn / sqrt(d_model)); x+y mod 97 as [x, op, y] (their code drops the =), "
        "30% train over operands 0..96 (their train_emb.py draws operands from 0..101, the special tokens' ids "
        "included; not reproduced); full batch, AdamW lr 1e-3, betas (0.9, 0.98), wd 1, no warm-up, 1e5 steps; "
        "reference backend (the fused kernels need W_pos and the MLP biases)",
        ModelConfig(pos_embed=False, mlp_bias=False, unembed_all_tokens=True, extra_tokens=4, init="furuta",
                    n_ctx=3, d_vocab=102, d_vocab_out=102),
        TaskSpec("x+y", 97, 0.3, "a op b"),
        TrainConfig(steps=100000, lr=1e-3, wd=1.0, warmup=0, eval_every=100, checkpoint_every=5000),
    )
    # Faithful to openai/grok (Power et al. 2022): grok/transformer.py's model with training.py's defaults;
    # tests/test_paper_presets.py restates that model and checks both.
    grok = Preset(
        "grok",
        "Power et al. 2022 as openai/grok runs it: 2 layers, d_model 128, 4x32 heads, d_mlp 512, ReLU, post-LayerNorm "
        "blocks (no ln_final), no bias in any linear map, fixed sinusoidal positions, 239 tokens with a logit each "
        "(<|eos|>, =, 20 operators, 97 numbers, 120 S5 permutations: 139 unused here), PyTorch's default init; "
        "x/y mod 97 (y != 0) as <|eos|> a op b =, 50% train; AdamW (their CustomAdamW with weight decay 'to_zero' "
        "is AdamW's decoupled form) lr 1e-3, betas (0.9, 0.98), wd 0, LambdaLR 10-step warm-up (first step lr 0), "
        "shuffled epochs of 512; loss on the answer only (theirs also scores the <|eos|> after it); reference backend",
        ModelConfig(n_layers=2, act="relu", layernorm=True, ln_position="post", pos_embed="sinusoidal", mlp_bias=False,
                    unembed_all_tokens=True, extra_tokens=139, init="grok", n_ctx=5, d_vocab=239, d_vocab_out=239),
        TaskSpec("x/y", 97, 0.5, "eos a op b ="),
        TrainConfig(steps=100000, lr=1e-3, wd=0.0, warmup=10, warmup_schedule="lambdalr", batch_size=512,
                    minibatches="epoch", eval_every=100, checkpoint_every=5000),
    )
    # Small enough to grok in well under a minute on a 2-core CPU with the reference backend.
    small = Preset(
        "small",
        "A CPU-sized nanda that groks visibly: x-y mod 31, 60% train, 1 layer d_model 128, lr 3e-3, wd 2, "
        "no Grokfast filter (memorises by step 50, test accuracy stays below 0.2 for 5-11x that, then rises)",
        ModelConfig(n_ctx=3, d_vocab=32, d_vocab_out=31),
        TaskSpec("x-y", 31, 0.6, "a b ="),
        TrainConfig(steps=3000, lr=3e-3, wd=2.0, warmup=10, grokfast="none", alpha=0.98, lamb=2.0,
                    eval_every=25, checkpoint_every=500),
    )
    return {p.name: p for p in (nanda, power, grokfast, pizza, furuta, grok, small)}


PRESETS = _presets()


def preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    pre = PRESETS[name]
    # a preset does not choose the dot precision: take the default as it is now (GROKFAST_DOT_PRECISION)
    return replace(pre, train=replace(pre.train, precision=default_precision()))
