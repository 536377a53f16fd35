"""Tasks: binary operations over Z_p (and S5), their token layouts, and a seeded train/test split.

An operation is written as the formula it computes, so every polynomial works, not only the
papers' list:

    x+y   x-y   x*y   x/y   x^2+xy+y^2+x   (x+y)^3   2x-3y   xy^2+y

``/`` is multiplication by the modular inverse (p must be prime; pairs whose divisor is 0 are left
out, which is Power et al.'s x/y over y != 0). Conditional operations follow Power et al.:
``x/y if y odd else x-y``, ``x+y if x even else x*y``. A domain restriction follows ``|``:
``x*y | y!=0`` (the Grokfast paper's task), ``x*y | x,y!=0`` (Furuta et al.'s non-zero
multiplication). ``s5``, ``s5:x.y.x^-1`` and ``s5:x.y.x`` compose permutations of S5 (120
elements, so p must be 120). A comma separates the operations of a multi-task mixture
(``x+y,x-y``), each with its own operation token.

Token ids: the numbers 0..p-1, then ``=`` (id p) when the layout has it, then one token per
operation when the layout has ``op``, then ``<|eos|>`` when the layout has ``eos``. Layouts: ``a b =``
(Nanda), ``a op b =`` (Power, Grokfast), ``eos a op b =`` (openai/grok's ``<|eos|> a op b =``), ``a op b``
(Furuta), ``a b`` (clock and pizza). The answer is predicted at the last position.
"""
from __future__ import annotations

import ast
import itertools
import math
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from .config import ConfigError

ALIASES = {
    "add": "x+y", "sub": "x-y", "mul": "x*y", "div": "x/y",
    "mul_nz": "x*y | x,y!=0", "mul_ynz": "x*y | y!=0",
    "s5": "s5:x.y",
}

# Every operation the papers list (Power et al. 2022, Furuta et al. 2024), as this module spells them.
PAPER_OPS = [
    "x+y", "x-y", "x*y", "x/y", "x*y | x,y!=0", "x*y | y!=0",
    "x^2+y", "x^3+y", "x^2+y^2", "x^2+xy+y^2", "x^2+xy+y^2+x", "x^3+xy", "x^3+xy^2+y",
    "x/y if y odd else x-y", "x+y if x even else x*y", "x+y if x even else x-y",
    "2x+y", "2x-y", "xy+y", "xy-y", "x^2-y", "2x+3y", "2x-3y", "x^3+2y", "x^3-2y", "x^2-y^2",
    "(x+y)^2", "(x-y)^2", "(x+y)^2+x+y", "(x+y)^3", "(x-y)^3", "(x+y)^4", "(x-y)^4", "xy+x+y", "xy+x-y",
    "s5:x.y", "s5:x.y.x^-1", "s5:x.y.x",
]

LAYOUTS = ("a b =", "a op b =", "eos a op b =", "a op b", "a b")
S5_ORDER = 120


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % k for k in range(2, int(n ** 0.5) + 1))


class _DivByZero(Exception):
    pass


class _Expr:
    """A polynomial-with-division formula in x and y, evaluated exactly in Z_p on Python ints."""

    def __init__(self, text: str, op_name: str):
        src = text.strip().replace("^", "**")
        # implicit multiplication: 2x, xy, x(…), )x, )( and 2(…)
        src = re.sub(r"(?<=[0-9xy)])\s*(?=[xy(])", "*", src)
        try:
            tree = ast.parse(src, mode="eval")
        except SyntaxError:
            raise ConfigError(f"cannot parse operation {op_name!r}: write a formula in x and y such as 'x^2+xy+y'") from None
        self.has_div = False
        self._check(tree.body, op_name)
        self.tree = tree.body

    def _check(self, node, op_name):
        if isinstance(node, ast.BinOp):
            if isinstance(node.op, ast.Pow):
                if not (isinstance(node.right, ast.Constant) and isinstance(node.right.value, int) and node.right.value >= 0):
                    raise ConfigError(f"operation {op_name!r}: exponents must be non-negative integer constants")
            elif isinstance(node.op, ast.Div):
                self.has_div = True
            elif not isinstance(node.op, (ast.Add, ast.Sub, ast.Mult)):
                raise ConfigError(f"operation {op_name!r}: only + - * / ^ are allowed")
            self._check(node.left, op_name)
            self._check(node.right, op_name)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            self._check(node.operand, op_name)
        elif isinstance(node, ast.Name):
            if node.id not in ("x", "y"):
                raise ConfigError(f"operation {op_name!r}: unknown variable {node.id!r}; use x and y")
        elif isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            pass
        else:
            raise ConfigError(f"unknown operation {op_name!r}: write a formula in x and y (e.g. 'x+y', 'x^2+xy'), "
                              f"or one of: {', '.join(ALIASES)}")

    def __call__(self, x: int, y: int, p: int) -> int:
        return self._eval(self.tree, x, y, p) % p

    def _eval(self, node, x, y, p):
        if isinstance(node, ast.BinOp):
            if isinstance(node.op, ast.Pow):
                return pow(self._eval(node.left, x, y, p), node.right.value, p)
            a, b = self._eval(node.left, x, y, p), self._eval(node.right, x, y, p)
            if isinstance(node.op, ast.Add):
                return (a + b) % p
            if isinstance(node.op, ast.Sub):
                return (a - b) % p
            if isinstance(node.op, ast.Mult):
                return (a * b) % p
            if b % p == 0:
                raise _DivByZero
            return (a * pow(b, -1, p)) % p
        if isinstance(node, ast.UnaryOp):
            v = self._eval(node.operand, x, y, p)
            return (-v) % p if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.Name):
            return x if node.id == "x" else y
        return node.value % p


@lru_cache(maxsize=None)
def s5_elements():
    """The 120 permutations of (0..4) in lexicographic order; element i is token i."""
    return list(itertools.permutations(range(5)))


class Operation:
    """One binary operation: name, the pairs it is defined on, and its value on each pair."""

    def __init__(self, name: str):
        self.name = ALIASES.get(name.strip(), name.strip())
        text = self.name
        self.nonzero = ()
        self.s5 = None
        if text.startswith("s5:"):
            self.s5 = text[3:].replace(" ", "")
            if self.s5 not in ("x.y", "x.y.x^-1", "x.y.x"):
                raise ConfigError(f"unknown S5 operation {name!r}; use s5:x.y, s5:x.y.x^-1 or s5:x.y.x")
            self.needs_prime = False
            return
        if "|" in text:
            text, cond = text.split("|", 1)
            m = re.fullmatch(r"\s*([xy](?:\s*,\s*[xy])*)\s*!=\s*0\s*", cond)
            if not m:
                raise ConfigError(f"operation {name!r}: a domain restriction reads '| y!=0' or '| x,y!=0'")
            self.nonzero = tuple(sorted(set(v.strip() for v in m.group(1).split(","))))
        m = re.fullmatch(r"(.+?)\s+if\s+([xy])\s+(odd|even)\s+else\s+(.+)", text.strip())
        if m:
            self.cond = (m.group(2), m.group(3))
            self.branches = (_Expr(m.group(1), name), _Expr(m.group(4), name))
        else:
            self.cond = None
            self.branches = (_Expr(text, name),)
        self.needs_prime = any(b.has_div for b in self.branches)

    def value(self, x: int, y: int, p: int):
        """The answer for (x, y), or None where the operation is undefined (division by 0, domain)."""
        if self.s5 is not None:
            e = s5_elements()
            a, b = e[x], e[y]
            comp = lambda f, g: tuple(f[g[i]] for i in range(5))  # (f o g)(i) = f(g(i))
            if self.s5 == "x.y":
                r = comp(a, b)
            elif self.s5 == "x.y.x":
                r = comp(comp(a, b), a)
            else:
                inv = tuple(sorted(range(5), key=lambda i: a[i]))
                r = comp(comp(a, b), inv)
            return e.index(r)
        if ("x" in self.nonzero and x % p == 0) or ("y" in self.nonzero and y % p == 0):
            return None
        expr = self.branches[0]
        if self.cond is not None:
            v = x if self.cond[0] == "x" else y
            take_first = (v % 2 == 1) if self.cond[1] == "odd" else (v % 2 == 0)
            expr = self.branches[0] if take_first else self.branches[1]
        try:
            return expr(x, y, p)
        except _DivByZero:
            return None

    def table(self, p: int):
        """(pairs [N, 2], answers [N]) over every pair where the operation is defined, in (x, y) order."""
        xs, ys, cs = [], [], []
        for x in range(p):
            for y in range(p):
                c = self.value(x, y, p)
                if c is not None:
                    xs.append(x)
                    ys.append(y)
                    cs.append(c)
        return np.array([xs, ys], dtype=np.int64).T.reshape(-1, 2), np.array(cs, dtype=np.int64)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 on uint64 arrays: the same numbers on every machine and library version."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def seeded_permutation(n: int, seed: int) -> np.ndarray:
    """A permutation of range(n) that depends only on (n, seed): argsort of splitmix64 hashes."""
    keys = _splitmix64(np.arange(n, dtype=np.uint64) ^ _splitmix64(np.array([seed], dtype=np.uint64))[0])
    return np.argsort(keys, kind="stable")


@dataclass
class Split:
    tokens: torch.Tensor   # [N, n_ctx] int64
    labels: torch.Tensor   # [N] int64

    def __len__(self):
        return self.labels.shape[0]

    def __iter__(self):  # tokens, labels = task.train
        return iter((self.tokens, self.labels))


class Task:
    """A modular-arithmetic task with a seeded train/test split, held as token tensors on a device.

    Task(op, p, frac, seed) -- op is one formula or a comma-separated mixture (see module doc).
    ``task.train`` / ``task.test`` are Splits with ``tokens`` [N, n_ctx] and ``labels`` [N].
    The split is stratified by operation in a mixture (each operation keeps ``frac`` of its pairs).
    """

    def __init__(self, op: str = "x+y", p: int = 113, frac: float = 0.3, seed: int = 0,
                 layout: str = "a b =", device="cpu"):
        if isinstance(op, (list, tuple)):
            op = ",".join(op)
        names = [s for s in (t.strip() for t in str(op).split(",")) if s]
        if not names:
            raise ConfigError("--op is empty: name an operation such as 'x+y'")
        if not isinstance(p, (int, np.integer)) or isinstance(p, bool) or p < 2:
            raise ConfigError(f"--p must be an integer >= 2, got {p!r}")
        p = int(p)
        if not (0.0 < float(frac) < 1.0):
            raise ConfigError(f"--frac must lie strictly between 0 and 1, got {frac}")
        layout = " ".join(str(layout).split())
        if layout not in LAYOUTS:
            raise ConfigError(f"unknown layout {layout!r}; choose one of: {', '.join(repr(l) for l in LAYOUTS)}")
        self.ops = [Operation(n) for n in names]
        if len(set(o.name for o in self.ops)) != len(self.ops):
            raise ConfigError(f"operation listed twice in {op!r}")
        if len(self.ops) > 1 and "op" not in layout:
            raise ConfigError(f"a mixture of {len(self.ops)} operations needs an operation token: "
                              f"use layout 'a op b =' or 'a op b' (got {layout!r})")
        for o in self.ops:
            if o.s5 is not None and p != S5_ORDER:
                raise ConfigError(f"operation {o.name!r} works on the 120 permutations of S5: pass --p 120")
            if o.needs_prime and not is_prime(p):
                raise ConfigError(f"operation {o.name!r} divides, so p must be prime; {p} is not (try 97 or 113)")
        self.op = ",".join(o.name for o in self.ops)
        self.p, self.frac, self.seed, self.layout = p, float(frac), int(seed), layout
        self.device = torch.device(device)

        slots = layout.split()
        self.n_ctx = len(slots)
        self.d_vocab_out = p
        self.eq_token = p if "=" in slots else None
        first_op = p + (1 if "=" in slots else 0)
        self.op_tokens = [first_op + i for i in range(len(self.ops))] if "op" in slots else []
        self.d_vocab = p + (1 if "=" in slots else 0) + len(self.op_tokens)
        self.eos_token = self.d_vocab if "eos" in slots else None
        self.d_vocab += 1 if "eos" in slots else 0

        self.split_kind = "hash"
        train_rows, test_rows = [], []
        for i, o in enumerate(self.ops):
            rows = self._rows(i)
            n = len(rows)
            perm = seeded_permutation(n, self.seed * 1000003 + i)
            n_train = math.floor(self.frac * n + 1e-9)  # floor, as Nanda et al. (3830 of 12769 at 30%)
            if n_train < 1 or n_train >= n:
                raise ConfigError(f"--frac {frac} leaves an empty train or test set for {o.name!r} ({n} pairs)")
            train_rows.append(rows[perm[:n_train]])
            test_rows.append(rows[perm[n_train:]])
        self._set_split(np.concatenate(train_rows), np.concatenate(test_rows))

    def _rows(self, op_index: int) -> np.ndarray:
        """[n, n_ctx + 1]: the tokens of every defined pair of one operation in (x, y) order, then the answer."""
        pairs, answers = self.ops[op_index].table(self.p)
        rows = np.zeros((len(answers), self.n_ctx + 1), dtype=np.int64)
        for j, s in enumerate(self.layout.split()):
            if s == "a":
                rows[:, j] = pairs[:, 0]
            elif s == "b":
                rows[:, j] = pairs[:, 1]
            elif s == "=":
                rows[:, j] = self.eq_token
            elif s == "eos":
                rows[:, j] = self.eos_token
            else:
                rows[:, j] = self.op_tokens[op_index]
        rows[:, -1] = answers
        return rows

    def _set_split(self, tr: np.ndarray, te: np.ndarray) -> None:
        self.train = Split(torch.from_numpy(tr[:, :-1]).to(self.device), torch.from_numpy(tr[:, -1]).to(self.device))
        self.test = Split(torch.from_numpy(te[:, :-1]).to(self.device), torch.from_numpy(te[:, -1]).to(self.device))

    def n_pairs(self) -> int:
        """Examples in the whole table (train + test)."""
        return len(self.train) + len(self.test)

    def split_by(self, perm: torch.Tensor, seed: int) -> "Task":
        """This task re-split by ``perm``, a permutation of the whole table (each operation's pairs in (x, y)
        order, one operation after another, unstratified): train is perm's first floor(frac n) rows in perm's
        order, test the rest, as `torch.randperm(n).split(n // 2)` splits in ironjr/grokfast's main.py.
        ``seed`` is recorded as the task's seed (TrainConfig.rng "stream": the run's seed drew perm)."""
        rows = np.concatenate([self._rows(i) for i in range(len(self.ops))])
        perm = perm.cpu().numpy()
        if sorted(perm.tolist()) != list(range(len(rows))):
            raise ConfigError(f"split_by needs a permutation of the task's {len(rows)} pairs, got {len(perm)} indices")
        n_train = math.floor(self.frac * len(rows) + 1e-9)
        t = object.__new__(Task)
        t.__dict__.update(self.__dict__)
        t.seed, t.split_kind = int(seed), "stream"
        t._set_split(rows[perm[:n_train]], rows[perm[n_train:]])
        return t

    @classmethod
    def from_spec(cls, spec, seed: int = 0, device="cpu") -> "Task":
        return cls(spec.op, spec.p, spec.frac, seed, spec.layout, device)

    def spec(self) -> dict:
        """What rebuilds this task: Task(**spec) for a hash split; a "stream" split (split_by) is redrawn
        by grokfast.stream from the run's seed and model."""
        s = {"op": self.op, "p": self.p, "frac": self.frac, "seed": self.seed, "layout": self.layout}
        if self.split_kind != "hash":
            s["split"] = self.split_kind
        return s

    def all_pairs(self, op_index: int = 0) -> Split:
        """Every defined (x, y) of one operation in (x, y) order, as tokens: for analysis over the full table."""
        o = self.ops[op_index]
        pairs, answers = o.table(self.p)
        slots = self.layout.split()
        toks = np.zeros((len(answers), self.n_ctx), dtype=np.int64)
        for j, s in enumerate(slots):
            toks[:, j] = {"a": pairs[:, 0], "b": pairs[:, 1], "eos": self.eos_token}.get(
                s, self.eq_token if s == "=" else (self.op_tokens[op_index] if self.op_tokens else 0))
        return Split(torch.from_numpy(toks).to(self.device), torch.from_numpy(answers).to(self.device))

    def to(self, device) -> "Task":
        device = torch.device(device)
        if device == self.device:
            return self
        t = object.__new__(Task)
        t.__dict__.update(self.__dict__)
        t.device = device
        t.train = Split(self.train.tokens.to(device), self.train.labels.to(device))
        t.test = Split(self.test.tokens.to(device), self.test.labels.to(device))
        return t

    def __repr__(self):
        return (f"Task(op={self.op!r}, p={self.p}, frac={self.frac}, seed={self.seed}, layout={self.layout!r}, "
                f"train={len(self.train)}, test={len(self.test)})")
