"""Tasks: every operation against plain Python integers, the split, layouts, bad input."""
import numpy as np
import pytest
import torch

import grokfast
from grokfast.config import ConfigError
from grokfast.data import PAPER_OPS, Operation, Task, seeded_permutation, s5_elements

P = 13  # prime, odd, small: every operation is defined and the tables are cheap


def inv(b, p):
    return pow(b, p - 2, p)  # Fermat: independent of the module's pow(b, -1, p)


# The papers' operations written as plain Python: (x, y, p) -> answer, or None where undefined.
PLAIN = {
    "x+y": lambda x, y, p: (x + y) % p,
    "x-y": lambda x, y, p: (x - y) % p,
    "x*y": lambda x, y, p: (x * y) % p,
    "x/y": lambda x, y, p: None if y == 0 else (x * inv(y, p)) % p,
    "x*y | x,y!=0": lambda x, y, p: None if x == 0 or y == 0 else (x * y) % p,
    "x*y | y!=0": lambda x, y, p: None if y == 0 else (x * y) % p,
    "x^2+y": lambda x, y, p: (x * x + y) % p,
    "x^3+y": lambda x, y, p: (x ** 3 + y) % p,
    "x^2+y^2": lambda x, y, p: (x * x + y * y) % p,
    "x^2+xy+y^2": lambda x, y, p: (x * x + x * y + y * y) % p,
    "x^2+xy+y^2+x": lambda x, y, p: (x * x + x * y + y * y + x) % p,
    "x^3+xy": lambda x, y, p: (x ** 3 + x * y) % p,
    "x^3+xy^2+y": lambda x, y, p: (x ** 3 + x * y * y + y) % p,
    "x/y if y odd else x-y": lambda x, y, p: (x * inv(y, p)) % p if y % 2 == 1 else (x - y) % p,
    "x+y if x even else x*y": lambda x, y, p: (x + y) % p if x % 2 == 0 else (x * y) % p,
    "x+y if x even else x-y": lambda x, y, p: (x + y) % p if x % 2 == 0 else (x - y) % p,
    "2x+y": lambda x, y, p: (2 * x + y) % p,
    "2x-y": lambda x, y, p: (2 * x - y) % p,
    "xy+y": lambda x, y, p: (x * y + y) % p,
    "xy-y": lambda x, y, p: (x * y - y) % p,
    "x^2-y": lambda x, y, p: (x * x - y) % p,
    "2x+3y": lambda x, y, p: (2 * x + 3 * y) % p,
    "2x-3y": lambda x, y, p: (2 * x - 3 * y) % p,
    "x^3+2y": lambda x, y, p: (x ** 3 + 2 * y) % p,
    "x^3-2y": lambda x, y, p: (x ** 3 - 2 * y) % p,
    "x^2-y^2": lambda x, y, p: (x * x - y * y) % p,
    "(x+y)^2": lambda x, y, p: (x + y) ** 2 % p,
    "(x-y)^2": lambda x, y, p: (x - y) ** 2 % p,
    "(x+y)^2+x+y": lambda x, y, p: ((x + y) ** 2 + x + y) % p,
    "(x+y)^3": lambda x, y, p: (x + y) ** 3 % p,
    "(x-y)^3": lambda x, y, p: (x - y) ** 3 % p,
    "(x+y)^4": lambda x, y, p: (x + y) ** 4 % p,
    "(x-y)^4": lambda x, y, p: (x - y) ** 4 % p,
    "xy+x+y": lambda x, y, p: (x * y + x + y) % p,
    "xy+x-y": lambda x, y, p: (x * y + x - y) % p,
}


def _compose(f, g):
    return tuple(f[g[i]] for i in range(5))


def _s5(kind):
    from itertools import permutations
    el = list(permutations(range(5)))

    def fn(x, y, p):
        a, b = el[x], el[y]
        if kind == "x.y":
            r = _compose(a, b)
        elif kind == "x.y.x":
            r = _compose(_compose(a, b), a)
        else:
            ainv = [0] * 5
            for i, ai in enumerate(a):
                ainv[ai] = i
            r = _compose(_compose(a, b), tuple(ainv))
        return el.index(r)
    return fn


PLAIN.update({"s5:x.y": _s5("x.y"), "s5:x.y.x": _s5("x.y.x"), "s5:x.y.x^-1": _s5("x.y.x^-1")})


def test_every_paper_op_has_a_plain_twin():
    assert set(PAPER_OPS) == set(PLAIN)


@pytest.mark.parametrize("op", PAPER_OPS)
def test_operation_matches_plain_python(op):
    p = 120 if op.startswith("s5") else P
    pairs, answers = Operation(op).table(p)
    expected = {}
    for x in range(p):
        for y in range(p):
            c = PLAIN[op](x, y, p)
            if c is not None:
                expected[(x, y)] = c
    got = {(int(a), int(b)): int(c) for (a, b), c in zip(pairs, answers)}
    assert got == expected


def test_s5_composition_is_a_group_law():
    op = Operation("s5")
    e = s5_elements()
    ident = e.index((0, 1, 2, 3, 4))
    assert ident == 0
    for x in (0, 7, 55, 119):
        assert op.value(x, ident, 120) == x and op.value(ident, x, 120) == x


def test_free_form_formulas_and_aliases():
    assert Operation("add").name == "x+y"
    assert Operation("2(x+y)").value(3, 4, 11) == 14 % 11
    assert Operation("x y").value(3, 4, 11) == 12 % 11          # implicit product with a space
    assert Operation("-x+y^5").value(2, 3, 7) == (-2 + 3 ** 5) % 7
    assert Operation("(x+1)/(y+1)").value(3, 6, 7) is None       # divisor y+1 = 0 mod 7
    assert Operation("(x+1)/(y+1)").value(3, 1, 7) == (4 * inv(2, 7)) % 7


@pytest.mark.parametrize("bad", ["x**", "z+y", "x^y", "x%y", "exp(x)", "x^-1", "x+y | z!=0", "s5:y.x"])
def test_bad_operation_is_one_clear_error(bad):
    with pytest.raises(ConfigError) as e:
        Operation(bad)
    assert "\n" not in str(e.value)


def test_split_is_seeded_and_machine_independent():
    t1, t2 = Task("x+y", 31, 0.3, seed=5), Task("x+y", 31, 0.3, seed=5)
    assert torch.equal(t1.train.tokens, t2.train.tokens) and torch.equal(t1.test.labels, t2.test.labels)
    t3 = Task("x+y", 31, 0.3, seed=6)
    assert not torch.equal(t1.train.tokens, t3.train.tokens)
    # The permutation is plain integer arithmetic (splitmix64 hashes, sorted), so it is the same on every
    # machine and library version: check it against pure Python, then pin a few values.
    for n, seed in ((10, 0), (1000, 123456789)):
        assert seeded_permutation(n, seed).tolist() == _plain_permutation(n, seed)
    assert seeded_permutation(10, 0).tolist() == [1, 4, 5, 7, 6, 9, 0, 3, 2, 8]
    assert t1.train.tokens[:3].tolist() == [[18, 6, 31], [18, 4, 31], [2, 23, 31]]


def _plain_splitmix64(x):
    m = (1 << 64) - 1
    x = (x + 0x9E3779B97F4A7C15) & m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


def _plain_permutation(n, seed):
    s = _plain_splitmix64(seed)
    return sorted(range(n), key=lambda i: (_plain_splitmix64(i ^ s), i))


def test_split_partitions_all_pairs():
    t = Task("x-y", 17, 0.4, seed=1)
    tokens, labels = t.train
    assert tokens is t.train.tokens and labels is t.train.labels
    assert len(t.train) == int(0.4 * 289) and len(t.train) + len(t.test) == 289
    both = torch.cat([t.train.tokens, t.test.tokens])
    assert len({tuple(r) for r in both.tolist()}) == 289
    a, b = both[:, 0], both[:, 1]
    labels = torch.cat([t.train.labels, t.test.labels])
    assert torch.equal(labels, (a - b) % 17)


def test_nanda_split_sizes():
    t = Task("x+y", 113, 0.3, seed=0)
    assert (len(t.train), len(t.test)) == (3830, 8939)  # Nanda et al.: int(0.3 * 12769)
    assert t.d_vocab == 114 and t.d_vocab_out == 113 and t.n_ctx == 3
    assert (t.train.tokens[:, 2] == 113).all()


def test_grokfast_task_sizes():
    t = Task("x*y | y!=0", 97, 0.5, seed=0, layout="a op b =")
    assert len(t.train) + len(t.test) == 97 * 96 == 9312
    assert t.n_ctx == 4 and t.d_vocab == 99
    assert (t.train.tokens[:, 1] == 98).all() and (t.train.tokens[:, 3] == 97).all()
    assert not (t.train.tokens[:, 2] == 0).any()


@pytest.mark.parametrize("layout,n_ctx,d_vocab", [("a b =", 3, 12), ("a op b =", 4, 13), ("a op b", 3, 12), ("a b", 2, 11)])
def test_layouts(layout, n_ctx, d_vocab):
    t = Task("x+y", 11, 0.5, layout=layout)
    assert t.n_ctx == n_ctx and t.d_vocab == d_vocab and t.train.tokens.shape[1] == n_ctx
    slots = layout.split()
    toks = t.train.tokens
    labels = t.train.labels
    a, b = toks[:, slots.index("a")], toks[:, slots.index("b")]
    assert torch.equal(labels, (a + b) % 11)


def test_mixture_has_one_token_per_operation_and_is_stratified():
    t = Task("x+y,x-y,x*y", 11, 0.5, seed=3, layout="a op b =")
    assert t.op_tokens == [12, 13, 14] and t.d_vocab == 15
    for i, fn in enumerate([lambda a, b: (a + b) % 11, lambda a, b: (a - b) % 11, lambda a, b: (a * b) % 11]):
        for split in (t.train, t.test):
            rows = split.tokens[:, 1] == t.op_tokens[i]
            a, b = split.tokens[rows, 0], split.tokens[rows, 2]
            assert torch.equal(split.labels[rows], fn(a, b))
        assert int((t.train.tokens[:, 1] == t.op_tokens[i]).sum()) == int(0.5 * 121)


@pytest.mark.parametrize("kwargs,msg", [
    (dict(op="x+y", p=1), "--p"),
    (dict(op="x+y", p=0), "--p"),
    (dict(op="x/y", p=12), "prime"),
    (dict(op="x/y if y odd else x-y", p=15), "prime"),
    (dict(op="x+y", p=11, frac=0.0), "--frac"),
    (dict(op="x+y", p=11, frac=1.0), "--frac"),
    (dict(op="x+y", p=11, frac=1.5), "--frac"),
    (dict(op="nope", p=11), "operation"),
    (dict(op="s5", p=11), "120"),
    (dict(op="x+y,x-y", p=11, layout="a b ="), "operation token"),
    (dict(op="x+y", p=11, layout="a = b"), "layout"),
])
def test_bad_task_is_one_clear_error(kwargs, msg):
    with pytest.raises(ConfigError) as e:
        Task(**kwargs)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_all_pairs_is_the_full_grid_in_order():
    t = Task("x+y", 7, 0.5, layout="a b")
    s = t.all_pairs()
    assert s.tokens.tolist() == [[a, b] for a in range(7) for b in range(7)]
    assert torch.equal(s.labels, (s.tokens[:, 0] + s.tokens[:, 1]) % 7)


def test_eos_layout_puts_the_eos_token_first_with_the_id_after_the_operations():
    """openai/grok's `<|eos|> a op b =`: numbers 0..p-1, = p, the operation p + 1, <|eos|> p + 2."""
    t = Task("x/y", 7, 0.5, 0, "eos a op b =")
    assert (t.n_ctx, t.d_vocab, t.d_vocab_out, t.eos_token) == (5, 10, 7, 9)
    for split in (t.train, t.test, t.all_pairs()):
        assert (split.tokens[:, 0] == 9).all() and (split.tokens[:, 2] == 8).all() and (split.tokens[:, 4] == 7).all()
    pairs = t.all_pairs()
    assert ((pairs.labels * pairs.tokens[:, 3]) % 7 == pairs.tokens[:, 1]).all()      # x / y = c: c y = x
    assert Task("x/y", 7, 0.5, 0, "a op b =").eos_token is None
