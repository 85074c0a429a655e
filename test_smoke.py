"""Tests of muzero_nce.py, in the order of its sections, then of q_learning.py. CPU only.

    python -m pytest -q test_smoke.py

- Search: the batched search against a plain one-tree-at-a-time MCTS written here, tree
  invariants, batch independence, zero simulations, noise and temperature; Gumbel MuZero's
  search against a plain recursive one (Sequential Halving, the non-root rule, completed Q),
  Gumbel-top-k, and the improved policy's guarantee; the compiled paths against the eager ones.
- Utilities and losses: h and the supports, InfoNCE against a hand computation.
- Replay: the ring, stacks rebuilt against a real env's own, n-step targets against loops over
  their definition, priorities, a mirror of the frames.
- The training step, piece by piece, against hand computations, stand-in networks and plain
  references: schedules, env flags, the unroll and its gradient, root noise, sampling
  frequencies, muzero_losses term by term, reanalyze's rows and network, where each value
  target bootstraps from, what train_step feeds the online and the target network, bf16
  against fp32, no host reads in an update, DDP without NCE or unroll, each process's seed, a
  resume that cuts episodes.
- Learning: the tiny corridor that needs lookahead (Corridor) and its contract; the runs that
  solve it (seeded MuZero, Gumbel MuZero with 4 simulations, and q_learning.py's modes) are
  most of the suite's time, so they start with the session in niced subprocesses
  (LearningRuns), fill the cores the other tests leave idle, and are read by the tests at the
  end of this file.
- Runs: the command line (logs, checkpoints, resume, the same losses twice, one-line errors,
  failing safely), every tensorboard tag, --evaluate and --capture-video (through a stand-in
  for imageio), exact resume, and the process layout (DDP on CPU, torchrun with two nodes, a
  killed or raising trainer, Ctrl-C). Every wait on a process has a deadline (Watched,
  run_to_end), and a test still running after TEST_DEADLINE seconds ends the run.
- q_learning.py: the Q search against a plain recursive reference, the double n-step
  and C51 targets against hand computations, the original's three commands, and the check
  that the code the two scripts share is the same text.
- Last, the learning tests: the corridor solved by muzero_nce.py (pUCT, Gumbel) and by
  q_learning.py in each mode at its defaults.

Each test checks behaviour against an independent computation or a property that would fail
if the code were wrong, never against numbers recorded from a previous run.
"""
import copy
import difflib
import faulthandler
import inspect
import json
import math
import os
import pickle
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import types

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import muzero_nce as M  # noqa: E402
import q_learning as Q  # noqa: E402

torch.set_num_threads(1)

VISITS, VALUE_SUM, REWARD, PRIOR = M.VISITS, M.VALUE_SUM, M.REWARD, M.PRIOR
TEST_DEADLINE = 600  # seconds: the slowest test takes a few minutes on a busy 2-core machine


@pytest.fixture(autouse=True)
def deadline():
    """No test can hang the suite: every wait on a process has its own, shorter deadline, and a
    test still running after TEST_DEADLINE seconds (a hang where no wait was expected) prints
    every thread's stack and ends the whole run with an error, rather than at CI's time limit."""
    faulthandler.dump_traceback_later(TEST_DEADLINE, exit=True, file=sys.__stderr__)  # past pytest's capture
    yield
    faulthandler.cancel_dump_traceback_later()


# ---------------------------------------------------------------------------------------------
# Lookup-table models and a plain-Python reference MCTS
# ---------------------------------------------------------------------------------------------
class TableModel:
    """S states x A actions. recurrent_fn(emb, action) with emb a LongTensor of state ids."""

    def __init__(self, num_states, num_actions, seed, kind="random"):
        g = torch.Generator().manual_seed(seed)
        S, A = num_states, num_actions
        self.S, self.A = S, A
        self.next = torch.randint(0, S, (S, A), generator=g)
        if kind == "random":
            self.reward = torch.randn(S, A, generator=g)
            self.value = torch.randn(S, generator=g)
            self.logits = torch.randn(S, A, generator=g) * 1.5
        elif kind == "flat":  # every Q equal: min == max in every tree, uniform priors (ties)
            self.reward = torch.zeros(S, A)
            self.value = torch.full((S,), 0.7)
            self.logits = torch.zeros(S, A)
        elif kind == "tiny":  # Q spans below the min-max floor (0.01): the floor decides the scale
            self.reward = torch.randn(S, A, generator=g) * 1e-3
            self.value = torch.randn(S, generator=g) * 1e-3
            self.logits = torch.randn(S, A, generator=g)
        elif kind == "zero":
            self.reward = torch.zeros(S, A)
            self.value = torch.zeros(S)
            self.logits = torch.randn(S, A, generator=g)
        elif kind == "equal":  # all rewards and values the same constant
            self.reward = torch.full((S, A), 1.0)
            self.value = torch.full((S,), 1.0)
            self.logits = torch.randn(S, A, generator=g)
        elif kind == "huge":  # |rewards| and |values| log-uniform in 1e6..1e9, random signs
            sign = lambda *shape: torch.where(torch.rand(*shape, generator=g) < 0.5, -1.0, 1.0)
            self.reward = sign(S, A) * 10 ** (6 + 3 * torch.rand(S, A, generator=g))
            self.value = sign(S) * 10 ** (6 + 3 * torch.rand(S, generator=g))
            self.logits = torch.randn(S, A, generator=g)
        else:
            raise ValueError(kind)
        self.calls = 0

    def recurrent_fn(self, emb, action):
        self.calls += 1
        assert emb.dtype == torch.long and emb.shape == action.shape
        n = self.next[emb, action]
        return self.reward[emb, action], self.value[n], self.logits[n], n

    def step(self, state, action):
        """Plain-Python version for the reference: (reward, value, prior list, next state)."""
        n = int(self.next[state, action])
        prior = [math.exp(x) for x in self.logits[n].double().tolist()]
        total = sum(prior)
        return float(self.reward[state, action]), float(self.value[n]), [p / total for p in prior], n

    def root_prior(self, state):
        prior = [math.exp(x) for x in self.logits[state].double().tolist()]
        total = sum(prior)
        return [p / total for p in prior]


class Node:
    def __init__(self, reward, prior, state):
        self.reward, self.prior, self.state = reward, prior, state
        self.children = {}
        self.visits, self.value_sum = 0, 0.0

    def mean(self):
        return self.value_sum / self.visits


def reference_search(model, state, prior, value, sims, discount, c1, c2, min_span=0.01):
    """One tree, one simulation at a time, Python floats; the conventions of section 5."""
    root = Node(0.0, prior, state)
    root.visits, root.value_sum = 1, float(value)
    lo, hi = math.inf, -math.inf

    def q(parent, a):
        child = parent.children.get(a)
        if child is None or child.visits == 0:
            return parent.mean()
        return child.reward + discount * child.mean()

    def normalised(x):
        if hi > lo:
            return min(max((x - lo) / max(hi - lo, min_span), 0.0), 1.0)
        return 0.0

    for _ in range(sims):
        node, path = root, [root]
        while True:
            n = node.visits
            best, best_a = -math.inf, None
            for a in range(len(node.prior)):
                child = node.children.get(a)
                na = child.visits if child is not None else 0
                u = (c1 + math.log((n + c2 + 1) / c2)) * node.prior[a] * math.sqrt(n) / (1 + na)
                score = normalised(q(node, a)) + u
                if score > best:  # strict: ties keep the lowest action index
                    best, best_a = score, a
            if best_a in node.children:
                node = node.children[best_a]
                path.append(node)
            else:
                break
        reward, leaf_value, leaf_prior, next_state = model.step(node.state, best_a)
        leaf = Node(reward, leaf_prior, next_state)
        node.children[best_a] = leaf
        path.append(leaf)
        g = leaf_value
        for nd in reversed(path):
            nd.visits += 1
            nd.value_sum += g
            if nd is not root:
                qn = nd.reward + discount * nd.mean()
                lo, hi = min(lo, qn), max(hi, qn)
            g = nd.reward + discount * g
    counts = [root.children[a].visits if a in root.children else 0 for a in range(len(prior))]
    return counts, root.mean()


def roots_for(model, batch, seed):
    return torch.randint(0, model.S, (batch,), generator=torch.Generator().manual_seed(seed))


def run_table_search(model, roots, sims, **kw):
    kw.setdefault("dirichlet_fraction", 0.0)
    kw.setdefault("compile", False)  # the eager path is the reference; the compiled one is checked against it
    return M.search(model.logits[roots], model.value[roots], roots, model.recurrent_fn, sims, **kw)


# ---------------------------------------------------------------------------------------------
# 1. search == the plain reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("discount", [0.9, 0.997])
@pytest.mark.parametrize("sims", [1, 5, 30, 64])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_search_matches_reference(batch, sims, discount):
    seed = batch * 100 + sims
    model = TableModel(40, 4, seed)
    roots = roots_for(model, batch, seed + 1)
    out = run_table_search(model, roots, sims, discount=discount)
    assert model.calls == sims  # one batched model call per simulation
    for b in range(batch):
        r = int(roots[b])
        counts, value = reference_search(model, r, model.root_prior(r), float(model.value[r]), sims, discount,
                                         1.25, 19652.0)
        assert out.visit_counts[b].long().tolist() == counts, f"row {b}"
        assert float(out.root_value[b]) == pytest.approx(value, abs=1e-4, rel=1e-5), f"row {b}"


@pytest.mark.parametrize("kind, discount, c1, c2", [
    ("random", 0.95, 1.0, 3.0),      # small c2: the log term of pUCT matters
    ("random", 1.0, 2.0, 19652.0),
    ("flat", 1.0, 1.25, 19652.0),    # all Q equal (min == max): prior alone, ties to lowest index
    ("zero", 0.997, 1.25, 19652.0),
    ("tiny", 0.997, 1.25, 19652.0),  # whole-tree spans below min_q_span
])
def test_search_matches_reference_other_settings(kind, discount, c1, c2):
    model = TableModel(30, 5, seed=7, kind=kind)
    roots = roots_for(model, 6, 8)
    for sims in (7, 40):
        out = run_table_search(model, roots, sims, discount=discount, c1=c1, c2=c2)
        for b in range(6):
            r = int(roots[b])
            counts, value = reference_search(model, r, model.root_prior(r), float(model.value[r]), sims,
                                             discount, c1, c2)
            assert out.visit_counts[b].long().tolist() == counts
            assert float(out.root_value[b]) == pytest.approx(value, abs=1e-4, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# 2. batch rows are independent
# ---------------------------------------------------------------------------------------------
def test_search_rows_are_independent():
    model = TableModel(40, 5, seed=3)
    roots = roots_for(model, 7, 4)
    sims = 25
    out = run_table_search(model, roots, sims, discount=0.99)

    perm = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(perm, torch.arange(7))
    out_p = run_table_search(model, roots[perm], sims, discount=0.99)
    assert torch.equal(out_p.visit_counts, out.visit_counts[perm])
    assert torch.equal(out_p.action, out.action[perm])
    torch.testing.assert_close(out_p.policy, out.policy[perm])
    torch.testing.assert_close(out_p.root_value, out.root_value[perm], rtol=1e-6, atol=1e-5)

    # change every other row (other roots, other root values, other batch size): row 0 is unchanged
    others = roots_for(model, 4, 99)
    for changed in (torch.cat([roots[:1], others]), roots[:1]):
        logits, value = model.logits[changed].clone(), model.value[changed].clone()
        value[1:] += 5.0
        logits[1:] = -logits[1:]
        out_c = M.search(logits, value, changed, model.recurrent_fn, sims, discount=0.99, dirichlet_fraction=0.0,
                         compile=False)
        assert torch.equal(out_c.visit_counts[0], out.visit_counts[0])
        assert out_c.action[0] == out.action[0]
        torch.testing.assert_close(out_c.root_value[0], out.root_value[0], rtol=1e-6, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 2b. the compiled searches grow the eager searches' trees
# ---------------------------------------------------------------------------------------------
def deep_table_model(seed):
    """A table model whose prior all but forces action 0: paths grow deeper than two of the
    compiled walk's steps (2 x DESCEND_LEVELS levels), where the compiled path ends eagerly."""
    model = TableModel(40, 4, seed)
    model.logits[:, 0] += 8.0
    return model


@pytest.mark.parametrize("kind", ["random", "deep"])
def test_compiled_search_grows_the_same_trees(kind):
    """Two shapes only: each compiles its graphs (a few seconds each)."""
    model = TableModel(40, 4, 7) if kind == "random" else deep_table_model(8)
    batch, sims, discount = (3, 24, 0.997) if kind == "random" else (2, 20, 0.9)
    roots = roots_for(model, batch, 9)
    eager = run_table_search(model, roots, sims, discount=discount)
    compiled = run_table_search(model, roots, sims, discount=discount, compile=True)
    depth = M.descend(eager.tree, torch.arange(batch) * (sims + 1), lambda rows, level: torch.zeros_like(rows))[2]
    if kind == "deep":
        assert depth.max() > 2 * M.DESCEND_LEVELS  # the eager end of a deep path is exercised
    assert torch.equal(compiled.tree.children, eager.tree.children)
    assert torch.equal(compiled.visit_counts, eager.visit_counts)
    assert torch.equal(compiled.action, eager.action)
    for field in ("nodes", "edges", "bounds", "values"):  # fused arithmetic: equal up to rounding
        torch.testing.assert_close(getattr(compiled.tree, field), getattr(eager.tree, field), rtol=1e-5, atol=1e-5)
    for b in range(batch):  # and the plain reference, visit for visit
        r = int(roots[b])
        counts, value = reference_search(model, r, model.root_prior(r), float(model.value[r]), sims, discount,
                                         1.25, 19652.0)
        assert compiled.visit_counts[b].long().tolist() == counts, f"row {b}"
        assert float(compiled.root_value[b]) == pytest.approx(value, abs=1e-4, rel=1e-5), f"row {b}"


@pytest.mark.parametrize("kind", ["random", "deep"])
def test_compiled_gumbel_search_grows_the_same_trees(kind):
    """The same for gumbel_search, with and without Gumbel noise (the same seeded draw), and the
    plain recursive reference. One shape for both models, so its graphs compile once; fewer
    considered actions than actions, so Gumbel-top-k picks a subset and the noise matters. The
    deep model's paths go past 2 x DESCEND_LEVELS levels."""
    model = TableModel(40, 4, 7) if kind == "random" else deep_table_model(8)
    batch, sims, m, discount = (3, 24, 3, 0.997) if kind == "random" else (3, 24, 2, 0.9)
    roots = roots_for(model, batch, 9)
    trees = []
    for seed in (None, 5):
        eager, gumbel = run_gumbel(model, roots, sims, seed, discount=discount, max_num_considered_actions=m)
        compiled, _ = run_gumbel(model, roots, sims, seed, discount=discount, max_num_considered_actions=m,
                                 compile=True)
        assert torch.equal(compiled.tree.children, eager.tree.children)
        assert torch.equal(compiled.visit_counts, eager.visit_counts)
        assert torch.equal(compiled.action, eager.action)
        for field in ("nodes", "edges", "values"):  # fused arithmetic: equal up to rounding
            torch.testing.assert_close(getattr(compiled.tree, field), getattr(eager.tree, field), rtol=1e-5,
                                       atol=1e-5)
        torch.testing.assert_close(compiled.policy, eager.policy, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(compiled.root_value, eager.root_value, rtol=1e-5, atol=1e-5)
        for b in range(batch):  # and the plain reference, node for node
            r = int(roots[b])
            _, _, action, _, _, visits = reference_gumbel_search(model, r, gumbel[b].tolist(), sims, discount, m)
            assert tree_visits(compiled.tree, b) == visits, f"row {b}"
            assert int(compiled.action[b]) == action, f"row {b}"
        trees.append(compiled.tree)
    if kind == "random":
        assert not torch.equal(trees[0].children, trees[1].children)  # the noise changed the search
    else:
        assert max(len(path) for b in range(batch) for path in tree_visits(trees[0], b)) > 2 * M.DESCEND_LEVELS


def test_compile_failure_falls_back_to_eager(monkeypatch, capsys):
    """Without a working compiler (here: torch.compile raising), one warning line and the eager
    trees, for both searches."""
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")
    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(M.Compiled, "failure", None)
    monkeypatch.setattr(M, "COMPILED_WALK", M.Compiled(M.walk_levels))
    monkeypatch.setattr(M, "COMPILED_END", M.Compiled(M.end_simulation))
    monkeypatch.setattr(M, "COMPILED_GUMBEL_WALK", M.Compiled(M.gumbel_walk_levels))
    monkeypatch.setattr(M, "COMPILED_GUMBEL_END", M.Compiled(M.end_simulation))
    model = TableModel(40, 4, 3)
    roots = roots_for(model, 3, 4)
    out = run_table_search(model, roots, 12, compile=True)
    assert "torch.compile failed, the search runs eagerly (RuntimeError: no C++ compiler)" in capsys.readouterr().err
    assert torch.equal(out.visit_counts, run_table_search(model, roots, 12).visit_counts)
    monkeypatch.setattr(M.Compiled, "failure", None)  # Gumbel's own steps fail alike
    out, _ = run_gumbel(model, roots, 12, seed=1, compile=True)
    assert "torch.compile failed, the search runs eagerly" in capsys.readouterr().err
    assert torch.equal(out.tree.children, run_gumbel(model, roots, 12, seed=1)[0].tree.children)


@pytest.mark.parametrize("search", ["puct", "gumbel"])
def test_run_search_takes_the_compiled_path_where_asked(monkeypatch, search):
    """--compile, --no-compile, and the default (CUDA only), through run_search: a spy records the path."""
    taken = []
    real = M.compiled_simulate
    monkeypatch.setattr(M, "compiled_simulate", lambda *a, **k: taken.append(True) or real(*a, **k))
    monkeypatch.setattr(M.Compiled, "failure", "off in this test: the spy only records the path")
    net = M.MuZeroNet((3, 8, 8), 2, 3, M.parse_args(["--channels", "4", "--support-size", "3", "--no-nce"])).eval()
    obs = torch.randint(0, 256, (2, 6, 8, 8), dtype=torch.uint8)
    for flags, expected in (([], False), (["--compile"], True), (["--no-compile"], False)):
        taken.clear()
        args = M.parse_args(["--channels", "4", "--support-size", "3", "--no-nce", "--search", search, *flags])
        with torch.no_grad():
            M.run_search(net, obs, args, 3)
            M.run_search(net, obs, args, 3, compile=False)  # evaluate's tail: never compiled
        assert taken == [True] * expected, flags


# ---------------------------------------------------------------------------------------------
# 3. tree invariants
# ---------------------------------------------------------------------------------------------
def search_loop_checked(model, roots, sims, discount, c1=1.25, c2=19652.0):
    """Search with 1, 2, ..., sims simulations (the search is deterministic without noise, so
    these are the same tree after each simulation) and check every tree. Returns the last."""
    for sim in range(1, sims + 1):
        out = M.search(model.logits[roots], model.value[roots], roots, model.recurrent_fn, sim, discount=discount,
                       c1=c1, c2=c2, dirichlet_fraction=0.0, compile=False)
        check_tree(out.tree, model, roots, model.value[roots].float(), sim, discount)
    return out.tree


def check_tree(tree, model, roots, root_value, sim, discount):
    nodes, edges = tree.nodes.double(), tree.edges.double()
    B, N, A = tree.children.shape
    # children hold flat node rows b * N + i; turn them into node indices within each tree
    children = torch.where(tree.children >= 0, tree.children - torch.arange(B)[:, None, None] * N, -1)
    assert torch.isfinite(tree.nodes).all() and torch.isfinite(tree.edges).all()
    for b in range(B):
        kids = children[b, :sim + 1][children[b, :sim + 1] >= 0].tolist()
        assert sorted(kids) == list(range(1, sim + 1))  # every node made so far has exactly one parent
        assert (children[b, sim + 1:] == -1).all() and (nodes[b, sim + 1:] == 0).all()
        assert nodes[b, 0, VISITS] == sim + 1
        assert edges[b, 0, VISITS].sum() == sim
        scale = max(1.0, float(nodes[b, :sim + 1, VALUE_SUM].abs().max()))
        for n in range(sim + 1):
            state = int(tree.embedding[b, n])
            own_prior = torch.softmax(model.logits[state].double(), -1)
            torch.testing.assert_close(edges[b, n, PRIOR], own_prior, rtol=1e-5, atol=1e-6)
            own_value = float(root_value[b]) if n == 0 else float(model.value[state])
            assert float(tree.values[b, n]) == own_value  # the model's own value, kept for Gumbel's mixed value
            expected_visits, expected_sum = 1.0, own_value
            for a in range(A):
                c = int(children[b, n, a])
                if c < 0:
                    assert edges[b, n, VISITS, a] == 0 and edges[b, n, VALUE_SUM, a] == 0
                    continue
                # the edge mirrors its child node
                assert edges[b, n, VISITS, a] == nodes[b, c, VISITS]
                assert edges[b, n, REWARD, a] == nodes[b, c, REWARD]
                assert float(edges[b, n, VALUE_SUM, a]) == pytest.approx(float(nodes[b, c, VALUE_SUM]), rel=1e-5, abs=1e-5 * scale)
                # the child's reward and state are the model's for (state, a)
                assert float(nodes[b, c, REWARD]) == float(model.reward[state, a])
                assert int(tree.embedding[b, c]) == int(model.next[state, a])
                expected_visits += float(nodes[b, c, VISITS])
                expected_sum += float(nodes[b, c, VISITS] * nodes[b, c, REWARD] + discount * nodes[b, c, VALUE_SUM])
            assert nodes[b, n, VISITS] == expected_visits  # 1 + the sum of the children's visits
            assert float(nodes[b, n, VALUE_SUM]) == pytest.approx(expected_sum, rel=1e-4, abs=1e-4 * scale)
        # the whole-tree bounds contain the current Q of every non-root node
        q = nodes[b, 1:sim + 1, REWARD] + discount * nodes[b, 1:sim + 1, VALUE_SUM] / nodes[b, 1:sim + 1, VISITS]
        lo, hi = float(tree.bounds[b, 0]), float(tree.bounds[b, 1])
        tol = 1e-5 * max(1.0, abs(lo), abs(hi))
        assert lo <= float(q.min()) + tol and float(q.max()) <= hi + tol


def test_node_prior_mirrors_edge_prior():
    """Tree's layout: nodes[b, c] holds node c's own statistics, "those of the edge into it",
    so after expand its PRIOR must equal edges[b, parent, PRIOR, a] like VISITS, VALUE_SUM and
    REWARD do (checked in check_tree)."""
    model = TableModel(25, 4, seed=2)
    roots = roots_for(model, 3, 2)
    tree = search_loop_checked(model, roots, 12, 0.99)
    for b in range(3):
        for n in range(13):
            for a in range(4):
                c = int(tree.children[b, n, a]) - b * 13
                if c >= 0:
                    assert float(tree.nodes[b, c, PRIOR]) == float(tree.edges[b, n, PRIOR, a]), (b, n, a, c)


def check_output(out, sims, batch, num_actions):
    assert out.visit_counts.shape == (batch, num_actions) and out.policy.shape == (batch, num_actions)
    assert torch.equal(out.visit_counts.sum(-1), torch.full((batch,), float(sims)))
    torch.testing.assert_close(out.policy.sum(-1), torch.ones(batch))
    assert torch.isfinite(out.root_value).all() and torch.isfinite(out.policy).all()
    # temperature 0: the most visited action, ties to the lowest index
    for b in range(batch):
        counts = out.visit_counts[b].tolist()
        assert int(out.action[b]) == counts.index(max(counts))


@pytest.mark.parametrize("kind, discount", [("random", 0.9), ("flat", 1.0), ("zero", 0.997), ("equal", 0.997),
                                            ("huge", 0.997)])
def test_tree_invariants(kind, discount):
    model = TableModel(25, 4, seed=11, kind=kind)
    roots = roots_for(model, 3, 12)
    sims = 24
    tree = search_loop_checked(model, roots, sims, discount)
    out = run_table_search(model, roots, sims, discount=discount)
    check_output(out, sims, 3, 4)
    # the loop above is search()'s own
    assert torch.equal(out.visit_counts, tree.edges[:, 0, VISITS])
    torch.testing.assert_close(out.root_value, tree.nodes[:, 0, VALUE_SUM] / tree.nodes[:, 0, VISITS])
    if kind == "flat":
        # every Q is 0.7: the bounds never open, Q normalises to 0 everywhere
        assert torch.equal(tree.bounds[:, 0], tree.bounds[:, 1])
        scale, shift = M.q_normaliser(tree.bounds, 0.01)
        assert (scale == 0).all() and (shift == 0).all()
        torch.testing.assert_close(out.root_value, torch.full((3,), 0.7))
    if kind == "zero":
        assert (out.root_value == 0).all()
    if kind == "huge":
        assert (tree.bounds[:, 1] > tree.bounds[:, 0]).all() and torch.isfinite(tree.bounds).all()


@pytest.mark.parametrize("sims", [1, 2, 13, 50])
def test_search_output_invariants(sims):
    for kind in ("random", "flat", "huge"):
        model = TableModel(30, 6, seed=sims, kind=kind)
        roots = roots_for(model, 5, sims)
        out = run_table_search(model, roots, sims, discount=0.997)
        check_output(out, sims, 5, 6)
        with_noise = run_table_search(model, roots, sims, discount=0.997, dirichlet_fraction=0.25,
                                      generator=torch.Generator().manual_seed(1))
        check_output(with_noise, sims, 5, 6)


def test_search_outputs_can_be_training_targets():
    """The search runs in inference mode; what it returns must still work inside autograd."""
    model = TableModel(30, 6, seed=0)
    out = run_table_search(model, roots_for(model, 5, 0), 8, discount=0.997)
    logits = torch.zeros(5, 6, requires_grad=True)
    value = torch.zeros(5, requires_grad=True)
    # products save their other operand for backward, which inference tensors refuse
    loss = -(out.visit_counts * torch.log_softmax(logits, -1)).sum() + (value * out.root_value).sum()
    loss.backward()
    counts = out.visit_counts
    torch.testing.assert_close(logits.grad, counts.sum(-1, keepdim=True) * torch.softmax(logits, -1).detach() - counts)
    torch.testing.assert_close(value.grad, out.root_value)


def test_q_normaliser():
    bounds = torch.tensor([[math.inf, -math.inf], [2.0, 2.0], [-1.0, 3.0], [1e9, 3e9], [1.0, 1.002]])
    scale, shift = M.q_normaliser(bounds, 0.01)
    assert torch.isfinite(scale).all() and torch.isfinite(shift).all()
    q = torch.tensor([[5.0], [2.0], [0.0], [2e9], [1.002]])
    normalised = (q * scale + shift).squeeze(1)
    # the last tree's span (0.002) is below the floor: its Q spread over 0.2, not the whole [0, 1]
    torch.testing.assert_close(normalised, torch.tensor([0.0, 0.0, 0.25, 0.5, 0.2]))
    scale, shift = M.q_normaliser(bounds, 0.0)
    torch.testing.assert_close((q * scale + shift).squeeze(1)[-1], torch.tensor(1.0))


# ---------------------------------------------------------------------------------------------
# 4. zero simulations, determinism, noise, temperature
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gumbel", [False, True])
def test_zero_simulations_returns_prior(gumbel):
    g = torch.Generator().manual_seed(0)
    logits, value = torch.randn(4, 6, generator=g), torch.randn(4, generator=g)

    def never(*_):
        raise AssertionError("recurrent_fn called with 0 simulations")

    if gumbel:
        out = M.gumbel_search(logits, value, torch.zeros(4, 3), never, 0, gumbel_scale=0.0)
    else:
        out = M.search(logits, value, torch.zeros(4, 3), never, 0, dirichlet_fraction=0.0)
    torch.testing.assert_close(out.policy, torch.softmax(logits, -1))
    assert torch.equal(out.visit_counts, torch.zeros(4, 6))
    torch.testing.assert_close(out.root_value, value)
    assert torch.equal(out.action, logits.argmax(-1))
    if gumbel:  # with Gumbel noise the action is argmax(gumbel + logits), a sample from the prior
        noisy = M.gumbel_search(logits, value, torch.zeros(4, 3), never, 0,
                                generator=torch.Generator().manual_seed(1))
        noise = M.sample_gumbel(logits, torch.Generator().manual_seed(1))
        assert torch.equal(noisy.action, (noise + torch.log_softmax(logits, -1)).argmax(-1))


def test_search_is_deterministic_without_noise():
    model = TableModel(40, 5, seed=5)
    roots = roots_for(model, 6, 5)
    a = run_table_search(model, roots, 30, temperature=0.0)
    b = run_table_search(model, roots, 30, temperature=0.0)
    for x, y in zip(a[:4], b[:4]):  # the four result tensors (not the tree)
        assert torch.equal(x, y)


def test_dirichlet_noise_with_seeded_generator():
    model = TableModel(40, 5, seed=6)
    roots = roots_for(model, 8, 6)
    fraction = 0.25
    prior = torch.softmax(model.logits[roots], -1)
    for sims in (0, 20):
        clean = run_table_search(model, roots, sims)
        noisy = [run_table_search(model, roots, sims, dirichlet_fraction=fraction, temperature=1.0,
                                  generator=torch.Generator().manual_seed(s)) for s in (42, 42, 43)]
        for x, y in zip(noisy[0][:4], noisy[1][:4]):  # equal seeds: equal results, sampled actions included
            assert torch.equal(x, y)
        assert not torch.equal(noisy[0].policy, clean.policy)
        assert not torch.equal(noisy[0].policy, noisy[2].policy)  # another seed, other noise
        if sims:
            assert torch.equal(noisy[0].visit_counts.sum(-1), torch.full((8,), float(sims)))
            torch.testing.assert_close(noisy[0].policy, noisy[0].visit_counts / sims)
    # with no simulation the policy is the noised prior: (1 - f) prior + f * (a distribution)
    out = run_table_search(model, roots, 0, dirichlet_fraction=fraction, generator=torch.Generator().manual_seed(1))
    noise = (out.policy - (1 - fraction) * prior) / fraction
    assert (noise >= -1e-6).all()
    torch.testing.assert_close(noise.sum(-1), torch.ones(8))


def test_temperature_zero_takes_argmax_lowest_index():
    weights = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 5.0], [0.0, 4.0, 1.0, 4.0]])
    assert M.select_action(weights, 0).tolist() == [1, 0, 3, 1]
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0], [3.0, 3.0, 3.0, 3.0]])
    out = M.search(logits, torch.zeros(2), torch.zeros(2, dtype=torch.long), None, 0, dirichlet_fraction=0.0)
    assert out.action.tolist() == [1, 0]
    # temperature T samples from weights^(1/T), normalised
    g = torch.Generator().manual_seed(1)
    picks = M.select_action(torch.tensor([[1.0, 2.0, 1.0]]).repeat(30000, 1), 0.5, g)
    freq = torch.bincount(picks, minlength=3).float() / 30000
    torch.testing.assert_close(freq, torch.tensor([1 / 6, 4 / 6, 1 / 6]), rtol=0, atol=0.015)
    # sampling never picks an action of weight 0
    g = torch.Generator().manual_seed(0)
    picks = M.select_action(torch.tensor([[0.0, 5.0, 0.0]]).repeat(50, 1), 1.0, g)
    assert (picks == 1).all()


# ---------------------------------------------------------------------------------------------
# 4b. Gumbel MuZero search == a plain recursive reference
# ---------------------------------------------------------------------------------------------
def reference_schedule(m, n):
    """Sequential Halving written as its phases: the visit count an action needs for the root's
    simulation s to consider it. Each phase runs rounds in which each of its k actions gets one
    visit; it has n // (ceil(log2 m) k) rounds (at least one); the next phase keeps k // 2 of
    them, never fewer than 2. One action alone takes every visit."""
    if m == 1:
        return list(range(n))
    needed, k, done = [], m, 0  # done: visits each action of the current phase already has
    while len(needed) < n:
        rounds = max(1, n // (math.ceil(math.log2(m)) * k))
        needed += [done + r for r in range(rounds) for _ in range(k)]
        done, k = done + rounds, max(2, k // 2)
    return needed[:n]


def argmax(scores):
    return max(range(len(scores)), key=lambda a: (scores[a], -a))  # ties: the lowest index


def reference_sigma(node, discount, c_visit, c_scale):
    """(sigma(completed Q), completed Q, visit counts) of a node's actions, from the paper's
    definitions: Q = r + discount * mean for a visited action, the mixed value otherwise."""
    A = len(node.prior)
    n = [node.children[a].visits if a in node.children else 0 for a in range(A)]
    q = {a: c.reward + discount * c.mean() for a, c in node.children.items()}
    total = sum(n)
    mixed = node.raw
    if total:
        weighted = sum(node.prior[a] * q[a] for a in q) / sum(node.prior[a] for a in q)
        mixed = (node.raw + total * weighted) / (1 + total)
    completed = [q.get(a, mixed) for a in range(A)]
    lo, hi = min(completed), max(completed)
    sigma = [(c_visit + max(n)) * c_scale * (x - lo) / max(hi - lo, 1e-8) for x in completed]
    return sigma, completed, n


def reference_gumbel_search(model, state, gumbel, sims, discount, m=16, c_visit=50.0, c_scale=0.1):
    """One tree, recursively, in Python floats. Root: the schedule's visit count picks the
    candidates, then the largest gumbel + logits + sigma; below: argmax pi' - N / (1 + sum N).
    Returns root visit counts, improved policy, action, root value, completed Q at the root and
    {action path: visits} of the whole tree."""
    prior = model.root_prior(state)
    logits = [math.log(p) for p in prior]
    A = len(prior)
    root = Node(0.0, prior, state)
    root.raw = float(model.value[state])
    root.visits, root.value_sum = 1, root.raw
    schedule = reference_schedule(min(m, A), sims)

    def choose(node, sim):
        sigma, _, n = reference_sigma(node, discount, c_visit, c_scale)
        if node is root:
            return argmax([gumbel[a] + logits[a] + sigma[a] if n[a] == schedule[sim] else -math.inf
                           for a in range(A)])
        z = [math.log(p) + x for p, x in zip(node.prior, sigma)]
        e = [math.exp(x - max(z)) for x in z]
        return argmax([x / sum(e) - n[a] / (1 + sum(n)) for a, x in enumerate(e)])

    def simulate(node, sim):
        """Visit below `node`; returns the return seen from it and adds it to its statistics."""
        a = choose(node, sim)
        child = node.children.get(a)
        if child is None:
            reward, value, child_prior, next_state = model.step(node.state, a)
            child = node.children[a] = Node(reward, child_prior, next_state)
            child.raw, child.visits, child.value_sum = value, 1, value
            g = value
        else:
            g = simulate(child, sim)
        g = child.reward + discount * g
        node.visits += 1
        node.value_sum += g
        return g

    for sim in range(sims):
        simulate(root, sim)
    sigma, completed, n = reference_sigma(root, discount, c_visit, c_scale)
    action = argmax([gumbel[a] + logits[a] + sigma[a] if n[a] == max(n) else -math.inf for a in range(A)])
    z = [x + y for x, y in zip(logits, sigma)]
    e = [math.exp(x - max(z)) for x in z]

    def visits(node, path):
        for a, c in node.children.items():
            yield path + (a,), c.visits
            yield from visits(c, path + (a,))
    return n, [x / sum(e) for x in e], action, root.mean(), completed, dict(visits(root, ()))


def tree_visits(tree, b):
    """{action path: visits} of tree b of a searched Tree."""
    N, A = tree.children.shape[1:]
    found, stack = {}, [((), 0)]
    while stack:
        path, node = stack.pop()
        for a in range(A):
            child = int(tree.children[b, node, a])
            if child >= 0:
                found[path + (a,)] = int(tree.nodes[b, child - b * N, VISITS])
                stack.append((path + (a,), child - b * N))
    return found


def run_gumbel(model, roots, sims, seed=None, **kw):
    """gumbel_search on the table model, and the Gumbel noise it drew (zeros without a seed)."""
    logits = model.logits[roots]
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    gumbel = torch.zeros_like(logits)
    if seed is not None:
        gumbel = M.sample_gumbel(logits, torch.Generator().manual_seed(seed))  # the draw the search makes first
    kw.setdefault("compile", False)  # the eager path is the reference; the compiled one is checked against it
    out = M.gumbel_search(logits, model.value[roots], roots, model.recurrent_fn, sims, generator=generator,
                          gumbel_scale=0.0 if seed is None else 1.0, **kw)
    return out, gumbel


@pytest.mark.parametrize("actions, sims, m, noise, discount", [
    (2, 1, 16, True, 0.997), (2, 4, 16, True, 0.9), (3, 7, 16, True, 0.997), (3, 10, 16, False, 0.997),
    (5, 16, 16, True, 0.9), (5, 50, 16, True, 0.997), (5, 12, 4, False, 0.95),
    (20, 8, 16, True, 0.997), (20, 40, 16, True, 0.997), (20, 30, 4, True, 0.99), (6, 9, 1, True, 0.997),
])
def test_gumbel_search_matches_reference(actions, sims, m, noise, discount):
    """Visit for visit, the whole tree: Sequential Halving at the root (fewer actions than m,
    more, m = 1), the deterministic rule below it, completed Q, the improved policy and the
    winner. The searched trees keep section 5's invariants."""
    seed = actions * 1000 + sims
    model = TableModel(40, actions, seed)
    roots = roots_for(model, 4, seed + 1)
    out, gumbel = run_gumbel(model, roots, sims, seed if noise else None, discount=discount,
                             max_num_considered_actions=m)
    assert model.calls == sims  # one batched model call per simulation
    for b in range(4):
        r = int(roots[b])
        counts, policy, action, value, _, visits = reference_gumbel_search(model, r, gumbel[b].tolist(), sims,
                                                                           discount, m)
        assert out.visit_counts[b].long().tolist() == counts, f"row {b}"
        assert tree_visits(out.tree, b) == visits, f"row {b}"
        assert int(out.action[b]) == action, f"row {b}"
        torch.testing.assert_close(out.policy[b].double(), torch.tensor(policy, dtype=torch.float64),
                                   rtol=1e-4, atol=1e-5)
        assert float(out.root_value[b]) == pytest.approx(value, abs=1e-4, rel=1e-5)
    check_tree(out.tree, model, roots, model.value[roots].float(), sims, discount)


def test_sequential_halving_schedule():
    """Hand-worked schedules. m = 4, n = 8: a phase of 4 actions x 8 // (2 x 4) = 1 visit, then
    2 actions x 8 // (2 x 2) = 2 visits. m = 3, n = 10: 3 x 1, then 2 x 2, then the remaining
    budget again 2 at a time. Fewer simulations than actions: the first phase is cut short."""
    for schedule in (M.considered_visits, reference_schedule):
        assert schedule(4, 8) == [0, 0, 0, 0, 1, 1, 2, 2]
        assert schedule(3, 10) == [0, 0, 0, 1, 1, 2, 2, 3, 3, 4]
        assert schedule(16, 4) == [0, 0, 0, 0]
        assert schedule(2, 5) == [0, 0, 1, 1, 2]
        assert schedule(1, 3) == [0, 1, 2]
    for m in range(1, 20):
        for n in range(1, 70):
            assert M.considered_visits(m, n) == reference_schedule(m, n)


def test_gumbel_top_k_considers_the_sampled_actions():
    """The first phase visits exactly the m actions with the largest gumbel + logits: m samples
    without replacement from the prior. Over many draws, the first action considered is a
    sample from the prior itself (the Gumbel-max trick)."""
    model = TableModel(40, 20, seed=4)
    roots = roots_for(model, 6, 5)
    for m in (1, 4, 16):
        out, gumbel = run_gumbel(model, roots, m, seed=m, max_num_considered_actions=m)
        top = (gumbel + torch.log_softmax(model.logits[roots], -1)).topk(m, dim=1).indices
        for b in range(6):
            assert out.visit_counts[b].nonzero().flatten().tolist() == sorted(top[b].tolist())
    g = M.sample_gumbel(torch.zeros(200_000), torch.Generator().manual_seed(0))
    assert float(g.mean()) == pytest.approx(0.5772, abs=0.01)  # Euler's constant
    assert float(g.var()) == pytest.approx(math.pi ** 2 / 6, abs=0.03)
    logits = torch.tensor([0.5, -1.0, 1.5, 0.0])
    first = (M.sample_gumbel(logits.repeat(40_000, 1), torch.Generator().manual_seed(1)) + logits).argmax(1)
    frequency = torch.bincount(first, minlength=4) / 40_000
    torch.testing.assert_close(frequency, torch.softmax(logits, 0), rtol=0, atol=0.01)


def test_gumbel_improved_policy_beats_the_prior():
    """The paper's guarantee: on every root, the improved policy's expected completed Q (the
    search's own estimates) is at least the prior's, for 1 simulation as for many."""
    model = TableModel(60, 6, seed=9)
    roots = roots_for(model, 8, 10)
    gains = []
    for sims in (1, 2, 4, 16, 40):
        out, gumbel = run_gumbel(model, roots, sims, seed=sims, discount=0.95)
        for b in range(8):
            r = int(roots[b])
            completed = reference_gumbel_search(model, r, gumbel[b].tolist(), sims, 0.95)[4]
            completed = torch.tensor(completed, dtype=torch.float64)
            prior = torch.tensor(model.root_prior(r), dtype=torch.float64)
            gain = float((out.policy[b].double() - prior) @ completed)
            assert gain >= -1e-6, (sims, b)
            gains.append(gain)
    assert max(gains) > 0.05  # and it does improve


def test_gumbel_rows_are_independent_and_deterministic():
    model = TableModel(40, 5, seed=3)
    roots = roots_for(model, 7, 4)
    out, _ = run_gumbel(model, roots, 20)
    again, _ = run_gumbel(model, roots, 20)
    for x, y in zip(out[:4], again[:4]):  # no Gumbel noise: deterministic
        assert torch.equal(x, y)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    out_p, _ = run_gumbel(model, roots[perm], 20)
    assert torch.equal(out_p.visit_counts, out.visit_counts[perm])
    assert torch.equal(out_p.action, out.action[perm])
    torch.testing.assert_close(out_p.policy, out.policy[perm])
    torch.testing.assert_close(out_p.root_value, out.root_value[perm])
    alone, _ = run_gumbel(model, roots[:1], 20)  # a batch of one: row 0 is unchanged
    assert torch.equal(alone.visit_counts[0], out.visit_counts[0]) and alone.action[0] == out.action[0]


@pytest.mark.parametrize("kind", ["zero", "flat", "huge"])
def test_gumbel_search_equal_and_huge_values(kind):
    """Every completed Q equal (min == max: rewards and values all 0) gives sigma 0, so the
    improved policy is the prior, and the search still spends every simulation. Equal values
    after discounting ("flat") and huge ones stay finite."""
    model = TableModel(30, 5, seed=2, kind=kind)
    roots = roots_for(model, 4, 3)
    for sims in (1, 6, 30):
        out, _ = run_gumbel(model, roots, sims, seed=sims)
        assert torch.equal(out.visit_counts.sum(1), torch.full((4,), float(sims)))
        assert torch.isfinite(out.policy).all() and torch.isfinite(out.root_value).all()
        torch.testing.assert_close(out.policy.sum(1), torch.ones(4))
        if kind == "zero":
            torch.testing.assert_close(out.policy, torch.softmax(model.logits[roots], -1))


def test_gumbel_policy_can_be_a_training_target():
    """The search runs in inference mode; its improved policy must still work inside autograd."""
    model = TableModel(30, 6, seed=0)
    out, _ = run_gumbel(model, roots_for(model, 5, 0), 8, seed=2)
    head = torch.zeros(5, 6, requires_grad=True)
    (-(out.policy * torch.log_softmax(head, -1)).sum()).backward()
    torch.testing.assert_close(head.grad, torch.softmax(head, -1).detach() - out.policy)


# ---------------------------------------------------------------------------------------------
# 5. value transform and supports
# ---------------------------------------------------------------------------------------------
def test_h_round_trip():
    x = torch.cat([torch.linspace(-1e5, 1e5, 2001, dtype=torch.float64),
                   torch.tensor([0.0, 1e-3, -1e-3, 0.5, -2.0, 1e5, -1e5], dtype=torch.float64)])
    torch.testing.assert_close(M.h_inverse(M.h(x)), x, rtol=1e-9, atol=1e-9)
    y = M.h(x)
    torch.testing.assert_close(M.h(M.h_inverse(y)), y, rtol=1e-9, atol=1e-9)
    # h itself, from its definition
    expected = torch.tensor([math.copysign(math.sqrt(abs(v) + 1) - 1, v) + 0.001 * v for v in x.tolist()],
                            dtype=torch.float64)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    x32 = x.float()
    torch.testing.assert_close(M.h_inverse(M.h(x32)), x32, rtol=1e-3, atol=1e-3)
    assert (torch.diff(M.h(torch.linspace(-1e5, 1e5, 1001))) > 0).all()  # strictly increasing


@pytest.mark.parametrize("n", [1, 10, 300])
def test_support_round_trip(n):
    g = torch.Generator().manual_seed(n)
    hy = (torch.rand(500, generator=g, dtype=torch.float64) * 2 - 1) * n
    hy = torch.cat([hy, torch.tensor([0.0, n, -n, n - 0.5, 1.0, -1.0], dtype=torch.float64)])
    x = M.h_inverse(hy).float()
    probs = M.scalar_to_support(x, n)
    assert probs.shape == (x.shape[0], 2 * n + 1)
    assert (probs >= 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(x.shape[0]))
    nonzero = (probs > 0).sum(-1)
    assert ((nonzero == 1) | (nonzero == 2)).all()
    # two neighbouring atoms, whose mean in h-space is h(x)
    first = (probs > 0).float().argmax(-1)
    last = 2 * n - (probs > 0).flip(-1).float().argmax(-1)
    assert ((last - first) == nonzero - 1).all()
    atoms = torch.arange(-n, n + 1, dtype=torch.float32)
    torch.testing.assert_close((probs * atoms).sum(-1), M.h(x).clamp(-n, n), rtol=1e-5, atol=1e-4)
    back = M.support_to_scalar(torch.log(probs), n)
    torch.testing.assert_close(back, x, rtol=1e-3, atol=1e-3)


def test_support_edges():
    n = 10
    edge = M.h_inverse(torch.tensor(float(n), dtype=torch.float64))
    x = torch.tensor([1e12, -1e12, float(edge) * 2, float(edge) * -2])  # beyond the support: clamped
    probs = M.scalar_to_support(x, n)
    expected = torch.zeros(4, 2 * n + 1)
    expected[0, -1] = expected[1, 0] = expected[2, -1] = expected[3, 0] = 1
    assert torch.equal(probs, expected)
    torch.testing.assert_close(M.support_to_scalar(torch.log(probs), n),
                               torch.tensor([1, -1, 1, -1]) * edge.float(), rtol=1e-4, atol=1e-3)
    # integers in h-space land on one atom
    for k in (-n, -3, 0, 4, n):
        xk = M.h_inverse(torch.tensor([float(k)], dtype=torch.float64))
        p = M.scalar_to_support(xk, n)[0]
        assert int((p > 1e-9).sum()) == 1 and p[k + n] == pytest.approx(1.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# 6. InfoNCE
# ---------------------------------------------------------------------------------------------
def hand_nce(pred, targ, temperature, valid, same_episode):
    """Plain loops over the definition: -log softmax over the allowed candidates of the diagonal."""
    B = pred.shape[0]
    unit = lambda v: [c / max(math.sqrt(sum(x * x for x in v)), 1e-12) for c in v]
    p = [unit(v) for v in pred.tolist()]
    t = [unit(v) for v in targ.tolist()]
    losses, accuracies = [], []
    for i in range(B):
        if not valid[i]:
            losses.append(0.0), accuracies.append(0.0)
            continue
        allowed = [j for j in range(B) if valid[j] and (j == i or same_episode is None or not same_episode[i][j])]
        s = {j: sum(a * b for a, b in zip(p[i], t[j])) / temperature for j in allowed}
        top = max(s.values())
        losses.append(-(s[i] - (top + math.log(sum(math.exp(v - top) for v in s.values())))))
        accuracies.append(1.0 if max(allowed, key=lambda j: (s[j], -j)) == i else 0.0)
    return losses, accuracies


@pytest.mark.parametrize("case", ["plain", "masked", "invalid", "masked+invalid"])
def test_nce_loss_matches_hand_computation(case):
    g = torch.Generator().manual_seed(len(case))
    B, D, temperature = 9, 6, 0.3
    pred = torch.randn(B, D, generator=g)
    targ = pred + 0.8 * torch.randn(B, D, generator=g)  # correlated: some rows are right, some wrong
    valid = torch.ones(B)
    same = None
    if "masked" in case:
        episode = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5])
        same = episode[:, None] == episode[None, :]
    if "invalid" in case:
        valid[[1, 4, 8]] = 0
    pred_leaf = pred.clone().requires_grad_(True)
    targ_leaf = targ.clone().requires_grad_(True)
    loss, accuracy = M.nce_loss(pred_leaf, targ_leaf, temperature, valid, same)
    hand_loss, hand_acc = hand_nce(pred, targ, temperature, valid.tolist(), None if same is None else same.tolist())
    torch.testing.assert_close(loss.detach(), torch.tensor(hand_loss), rtol=1e-5, atol=1e-5)
    assert accuracy.tolist() == hand_acc
    if "masked" in case or "invalid" in case:  # the masks do change the loss
        plain, _ = hand_nce(pred, targ, temperature, [1.0] * B, None)
        assert any(abs(a - b) > 1e-3 for a, b, v in zip(hand_loss, plain, valid.tolist()) if v)

    # gradients: none into the target branch; into the predictions those of the hand-written loss
    loss.sum().backward()
    assert targ_leaf.grad is None
    assert pred_leaf.grad is not None and torch.isfinite(pred_leaf.grad).all()
    ref_pred = pred.clone().requires_grad_(True)
    logits = F.normalize(ref_pred, dim=-1) @ F.normalize(targ, dim=-1).T / temperature
    allowed = valid.bool()[None, :].expand(B, B).clone()
    if same is not None:
        allowed &= ~same | torch.eye(B, dtype=torch.bool)
    ref = sum(-(logits[i, i] - torch.logsumexp(logits[i][allowed[i]], 0)) for i in range(B) if valid[i])
    ref.backward()
    torch.testing.assert_close(pred_leaf.grad, ref_pred.grad, rtol=1e-4, atol=1e-6)
    if "invalid" in case:
        assert (pred_leaf.grad[~valid.bool()] == 0).all()


def test_nce_invalid_columns_are_not_negatives():
    g = torch.Generator().manual_seed(1)
    pred, targ = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    valid = torch.tensor([1.0, 1, 0, 1, 0, 1])
    loss, _ = M.nce_loss(pred, targ, 0.1, valid)
    moved = targ.clone()
    moved[[2, 4]] = pred[[0, 1]] * 10  # invalid targets that would be hard negatives if counted
    loss_moved, _ = M.nce_loss(pred, moved, 0.1, valid)
    torch.testing.assert_close(loss, loss_moved)
    assert (loss[[2, 4]] == 0).all() and (loss[[0, 1, 3, 5]] > 0).all()


# ---------------------------------------------------------------------------------------------
# 7. replay
# ---------------------------------------------------------------------------------------------
def test_replay_ring_wrap_around_and_start_mask():
    T, E, S, K, n = 12, 3, 4, 2, 2
    buf = M.ReplayBuffer(T * E, E, (1, 2, 2), 3, S, K, n)
    assert buf.T == T and buf.E == E
    final = {}
    for t in range(31):
        terminal = torch.tensor([t % 7 == 3, False, t % 11 == 5])
        truncated = torch.tensor([False, t % 5 == 2, False])
        for e in range(E):
            final[t, e] = bool(terminal[e] or truncated[e])
        frame = torch.tensor([(t * E + e) % 256 for e in range(E)], dtype=torch.uint8)[:, None, None, None].expand(E, 1, 2, 2)
        buf.add(frame, torch.tensor([t + 0.01 * e for e in range(E)]), terminal, truncated,
                torch.full((E,), t), torch.full((E,), t % 3), torch.full((E, 3), 1 / 3), torch.zeros(E), torch.zeros(E))
        steps = t + 1
        assert buf.steps == steps
        times = buf.times()
        held = set(range(max(0, steps - T), steps))
        written = {int(x) for x in times if x >= 0}
        assert written == held and len(held) == min(steps, T)
        for row in range(T):
            tr = int(times[row])
            if tr < 0:
                assert buf.reward[row].eq(0).all()
                continue
            for e in range(E):
                assert float(buf.reward[row, e]) == pytest.approx(tr + 0.01 * e)
                assert int(buf.frames[row, e, 0, 0, 0]) == (tr * E + e) % 256
        mask = buf.start_mask()
        for row in range(T):
            tr = int(times[row])
            for e in range(E):
                expected = (tr >= 0 and all(x in held for x in range(tr - (S - 1), tr + K + n + 1))
                            and not final[tr, e])
                assert bool(mask[row, e]) == expected, (steps, tr, e)
        starts = mask.nonzero()
        if len(starts):
            time, env = times[starts[:, 0]], starts[:, 1]
            seq = buf.window(time, env)
            expected = (time[:, None] + torch.arange(-(S - 1), K + n + 1)) + 0.01 * env[:, None]
            torch.testing.assert_close(seq.reward, expected.float())
    assert mask.any()

    # prioritised sampling only returns valid starts; weights in (0, 1], max 1
    g = torch.Generator().manual_seed(0)
    priority = torch.rand(T, E, generator=g) * 5 + 0.1
    buf.update_priorities(buf.times()[:, None].expand(T, E).flatten(), torch.arange(E).repeat(T), priority.flatten())
    assert torch.equal(buf.priority[mask], priority[mask])
    beta = 0.4
    time, env, weights = buf.sample(400, beta, g)
    assert ((time >= buf.steps - T) & (time < buf.steps)).all()
    assert mask[time % T, env].all()
    assert (weights > 0).all() and (weights <= 1).all() and float(weights.max()) == pytest.approx(1.0)
    p = priority.pow(buf.alpha) * mask
    P = p / p.sum()
    count = int(mask.sum())
    importance = (count * P[time % T, env]).pow(-beta)
    torch.testing.assert_close(weights, importance / importance.max())
    assert len({(int(a), int(b)) for a, b in zip(time, env)}) > 1


def test_replay_sample_needs_a_complete_sequence():
    buf = M.ReplayBuffer(20, 1, (1, 1, 1), 2, 4, 2, 2)
    for t in range(8):  # a sequence spans S-1 + K + n + 1 = 8 rows: the 8th row completes the first
        with pytest.raises(RuntimeError):
            buf.sample(2, 0.4)
        buf.add(torch.zeros(1, 1, 1, 1, dtype=torch.uint8), torch.zeros(1), torch.zeros(1, dtype=torch.bool),
                torch.zeros(1, dtype=torch.bool), torch.tensor([t]), torch.zeros(1, dtype=torch.long),
                torch.full((1, 2), 0.5), torch.zeros(1), torch.zeros(1))
    time, env, _ = buf.sample(5, 0.4)
    assert (time == 3).all() and (env == 0).all()


def test_atari_envs_get_distinct_seeds():
    """reset(seed=s) seeds env i with s + i (the contract the actor relies on): env 1 under seed 5
    plays exactly like env 0 under seed 6, and no two envs of one reset play alike."""
    env_fn = M.make_atari_env_fn(M.parse_args(["--game", "ms_pacman"]))
    first, second = env_fn(4), env_fn(4)
    obs_a, _ = first.reset(seed=5)
    obs_b, _ = second.reset(seed=6)
    actions = np.random.default_rng(0).integers(0, first.single_action_space.n, (60, 4))
    for step in actions:
        obs_a = first.step(step)[0]
        obs_b = second.step(np.roll(step, -1))[0]  # env i of `second` gets the action of env i+1 of `first`
    assert all(np.array_equal(obs_a[i + 1], obs_b[i]) for i in range(3))
    assert all(not np.array_equal(obs_a[i], obs_a[j]) for i in range(4) for j in range(i))
    first.close(), second.close()


class RecordingEnvs:
    """Forwards to a vector env and records every action, reward, flag and lives count."""

    def __init__(self, envs):
        self._envs = envs
        self.actions, self.rewards, self.terminals, self.truncations, self.lives = [], [], [], [], []

    def __getattr__(self, name):
        return getattr(self._envs, name)

    def reset(self, **kw):
        obs, info = self._envs.reset(**kw)
        self.reset_lives = np.array(info["lives"])
        return obs, info

    def step(self, action):
        self.actions.append(np.array(action, copy=True))
        obs, reward, terminal, truncated, info = self._envs.step(action)
        self.rewards.append(np.array(reward, dtype=np.float32))
        self.terminals.append(np.array(terminal))
        self.truncations.append(np.array(truncated))
        self.lives.append(np.array(info["lives"]))
        return obs, reward, terminal, truncated, info


@pytest.mark.parametrize("game", ["ms_pacman", "breakout"])  # rewards of 10 to clip; lives lost early
def test_actor_rows_rebuild_the_env_stacks(game):
    """Row t holds o_t with what came with it: the clipped reward, the end flags (a lost life is
    terminal while the game goes on), the step in the game; stacks rebuilt from single frames
    are the env's own, across game ends, cut episodes and lost lives."""
    pytest.importorskip("ale_py")
    E, T, steps = 2, 48, 120
    args = M.parse_args(["--game", game, "--num-envs", str(E), "--train-episode-frames", "400", "--noop-max", "3",
                         "--channels", "8", "--reduced-channels", "4", "--head-hidden", "8",
                         "--proj-hidden", "16", "--proj-dim", "16", "--pred-hidden", "8", "--support-size", "10",
                         "--num-simulations", "2", "--jumps", "1", "--td-steps", "1", "--buffer-size", str(T * E),
                         "--learning-starts", "20", "--batch-size-per-worker", "4", "--device", "cpu"])
    assert args.clip_rewards and args.episodic_life  # the defaults
    envs = RecordingEnvs(M.make_atari_env_fn(args)(E))
    try:
        frame_shape, stack, num_actions = M.env_spec(envs)
        assert frame_shape == (3, 96, 96) and stack == 4
        torch.manual_seed(0)
        net = M.MuZeroNet(frame_shape, stack, num_actions, args).eval()
        buf = M.ReplayBuffer(T * E, E, frame_shape, num_actions, stack, args.jumps, args.td_steps)
        actor = M.Actor(envs, buf, args, torch.device("cpu"), torch.Generator().manual_seed(0), seed=args.seed)
        observations, returns = [], []
        for _ in range(steps):
            observations.append(M.observation_tensor(actor.obs))  # o_t, written at row t
            returns += actor.step(net, 1.0)
    finally:
        envs.close()
    assert buf.steps == steps

    # what the rows should hold, from the env's own outputs (row t: o_t, what came with it, a_t)
    final = [np.zeros(E, dtype=bool)] + [te | tr for te, tr in zip(envs.terminals, envs.truncations)]
    lives = [envs.reset_lives] + envs.lives
    episode_step = [np.zeros(E, dtype=np.int64)]
    for t in range(1, steps):
        episode_step.append(np.where(final[t - 1], 0, episode_step[-1] + 1))
    assert any(f.any() for f in final[:steps - 1]), "no episode ended: the test needs an episode boundary"

    checked_boundary, lost_lives, clipped = 0, 0, 0
    for t in range(steps - T, steps):
        row = t % T
        for e in range(E):
            assert int(buf.action[row, e]) == int(envs.actions[t][e])
            raw = 0.0 if t == 0 or final[t - 1][e] else float(envs.rewards[t - 1][e])  # the reset step's is 0
            assert float(buf.reward[row, e]) == float(np.sign(raw))
            clipped += raw not in (-1.0, 0.0, 1.0)
            life_lost = t > 0 and not final[t - 1][e] and lives[t][e] < lives[t - 1][e]
            lost_lives += life_lost and not final[t][e]
            assert bool(buf.terminal[row, e]) == (t > 0 and bool(envs.terminals[t - 1][e]) or life_lost), (t, e)
            assert bool(buf.truncated[row, e]) == (t > 0 and bool(envs.truncations[t - 1][e]))
            assert int(buf.episode_step[row, e]) == int(episode_step[t][e])
    assert (clipped if game == "ms_pacman" else lost_lives) > 0, "the case this game is here for did not happen"
    # the actor reports whole games (not lives) with their unclipped returns and lengths
    expected, total, length = [], np.zeros(E), np.zeros(E, dtype=np.int64)
    for i in range(steps):
        reset_step = final[i]  # the step after a game over resets the env: reward 0, step 0
        total = np.where(reset_step, 0.0, total + envs.rewards[i])
        length = np.where(reset_step, 0, length + 1)
        expected += [(total[e], length[e]) for e in range(E) if envs.terminals[i][e] or envs.truncations[i][e]]
    assert len(expected) > 0 and [(pytest.approx(r), n) for r, n in expected] == returns
    # stacks rebuilt from single frames == the env's stacks, across episode ends
    times = torch.tensor([t for t in range(steps - T + stack - 1, steps) for e in range(E)])
    env_ids = torch.tensor([e for t in range(steps - T + stack - 1, steps) for e in range(E)])
    seq = buf.window(times, env_ids, before=stack - 1, after=0)
    rebuilt = M.stack_observations(seq.frames, seq.episode_step, stack)[:, 0]
    for i, (t, e) in enumerate(zip(times.tolist(), env_ids.tolist())):
        assert torch.equal(rebuilt[i], observations[t][e]), (t, e)
        if episode_step[t][e] < stack - 1:
            checked_boundary += 1
            assert (observations[t][e][:3 * (stack - 1 - episode_step[t][e])] == 0).all()  # zeros before the start
    assert checked_boundary > 0
    # the longer windows the trainer uses agree too, position by position
    starts = buf.start_mask().nonzero()
    t0, e0 = buf.times()[starts[:, 0]], starts[:, 1]
    seq = buf.window(t0, e0)
    rebuilt = M.stack_observations(seq.frames, seq.episode_step, stack)
    for i, (t, e) in enumerate(zip(t0.tolist(), e0.tolist())):
        for k in range(rebuilt.shape[1]):
            assert torch.equal(rebuilt[i, k], observations[t + k][e])


# ---- n-step targets: hand-built sequences --------------------------------------------------------
def hand_targets(rewards, values, terminal, truncated, K, n, d):
    """Rows 0..K+n of one sequence (row 0 is the start t). Plain loops over the definitions."""
    L = K + n + 1
    end = next((j for j in range(L) if terminal[j] or truncated[j]), None)
    ends_terminal = end is not None and terminal[end]
    z, vmask, pmask = [], [], []
    for k in range(K + 1):
        if end is None or k < end or (k == end and not ends_terminal):
            h = n if end is None else min(n, end - k)
            total = sum(d ** i * rewards[k + i + 1] for i in range(h))
            if not (end is not None and k + h == end and ends_terminal):
                total += d ** h * values[k + h]
            z.append(total), vmask.append(1.0), pmask.append(1.0)
        elif ends_terminal:  # at or after a terminal observation: absorbing, value 0
            z.append(0.0), vmask.append(1.0), pmask.append(0.0)
        else:  # after a truncation: nothing known
            z.append(None), vmask.append(0.0), pmask.append(0.0)
    r, rmask, nmask = [], [], []
    for k in range(1, K + 1):
        if end is None or k <= end:
            r.append(rewards[k]), rmask.append(1.0), nmask.append(1.0)
        elif ends_terminal:
            r.append(0.0), rmask.append(1.0), nmask.append(0.0)
        else:
            r.append(None), rmask.append(0.0), nmask.append(0.0)
    return z, vmask, pmask, r, rmask, nmask


def test_n_step_targets_match_hand_computation():
    S, K, n, d, A = 4, 3, 4, 0.9, 3
    o, W = S - 1, S - 1 + K + n + 1
    g = torch.Generator().manual_seed(0)
    cases = [(None, None)] + [(kind, j) for kind in ("terminal", "truncated") for j in range(1, K + n + 1)]
    B = len(cases)
    reward = torch.randint(1, 9, (B, W), generator=g).float()  # nonzero everywhere: leaks would show
    root_value = torch.randn(B, W, generator=g) * 10
    terminal = torch.zeros(B, W, dtype=torch.bool)
    truncated = torch.zeros(B, W, dtype=torch.bool)
    terminal[1, 0] = truncated[2, 1] = True  # ends in the history rows before t: ignored
    for b, (kind, j) in enumerate(cases):
        if kind is not None:
            (terminal if kind == "terminal" else truncated)[b, o + j] = True
            if o + j + 2 < W:  # a later episode in the same window ends too
                terminal[b, o + j + 2] = True
    policy = torch.softmax(torch.randn(B, W, A, generator=g), -1)
    action = torch.randint(0, A, (B, W), generator=g)
    seq = M.Sequences(frames=torch.zeros(B, W, 1, 1, 1, dtype=torch.uint8), action=action, reward=reward,
                      terminal=terminal, truncated=truncated, episode_step=torch.arange(W).repeat(B, 1),
                      policy=policy, root_value=root_value, network_value=torch.zeros(B, W))
    values = root_value[:, o:]
    targets = M.n_step_targets(seq, values, K, n, d, S)
    assert targets.value.shape == (B, K + 1) and targets.reward.shape == (B, K)
    assert torch.equal(targets.actions, action[:, o:o + K])
    torch.testing.assert_close(targets.policy, policy[:, o:o + K + 1])
    for b, (kind, j) in enumerate(cases):
        rows = slice(o, W)
        z, vmask, pmask, r, rmask, nmask = hand_targets(reward[b, rows].tolist(), values[b].tolist(),
                                                        terminal[b, rows].tolist(), truncated[b, rows].tolist(), K, n, d)
        assert targets.value_mask[b].tolist() == vmask, (kind, j)
        assert targets.policy_mask[b].tolist() == pmask, (kind, j)
        assert targets.reward_mask[b].tolist() == rmask, (kind, j)
        assert targets.nce_mask[b].tolist() == nmask, (kind, j)
        for k in range(K + 1):
            if vmask[k]:
                assert float(targets.value[b, k]) == pytest.approx(z[k], rel=1e-5, abs=1e-4), (kind, j, k)
        for k in range(K):
            if rmask[k]:
                assert float(targets.reward[b, k]) == pytest.approx(r[k]), (kind, j, k)


def test_n_step_targets_bootstrap_row_ends():
    """The end falls exactly on the bootstrap row t+n of step 0: a truncated end bootstraps from
    that row's stored value, a terminal one does not."""
    S, K, n, d = 2, 1, 3, 0.5
    o, W = S - 1, S - 1 + K + n + 1
    reward = torch.tensor([[9.0, 0, 1, 2, 4, 8]]).repeat(3, 1)
    value = torch.tensor([[100.0, 10, 20, 30, 40, 50]]).repeat(3, 1)
    terminal = torch.zeros(3, W, dtype=torch.bool)
    truncated = torch.zeros(3, W, dtype=torch.bool)
    terminal[0, o + n] = True
    truncated[1, o + n] = True
    seq = M.Sequences(torch.zeros(3, W, 1, 1, 1, dtype=torch.uint8), torch.zeros(3, W, dtype=torch.long), reward,
                      terminal, truncated, torch.arange(W).repeat(3, 1), torch.full((3, W, 2), 0.5), value,
                      torch.zeros(3, W))
    targets = M.n_step_targets(seq, value[:, o:], K, n, d, S)
    rewards_sum = 1 + d * 2 + d * d * 4  # rewards on reaching t+1..t+3
    assert float(targets.value[0, 0]) == pytest.approx(rewards_sum)                      # terminal: no bootstrap
    assert float(targets.value[1, 0]) == pytest.approx(rewards_sum + d ** 3 * 40)        # truncated: v_{t+3}
    assert float(targets.value[2, 0]) == pytest.approx(rewards_sum + d ** 3 * 40)        # no end: the same
    # step 1: the end is 2 steps away
    assert float(targets.value[0, 1]) == pytest.approx(2 + d * 4)
    assert float(targets.value[1, 1]) == pytest.approx(2 + d * 4 + d * d * 40)
    assert float(targets.value[2, 1]) == pytest.approx(2 + d * 4 + d * d * 8 + d ** 3 * 50)
    assert targets.value_mask.eq(1).all() and targets.policy_mask.eq(1).all()


# ---------------------------------------------------------------------------------------------
# 8. priorities
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), 0.0, -1.0, float("inf"), -float("inf")])
def test_update_priorities_skips_bad_values(bad):
    """A priority that is not finite and positive would break sampling: it is not written, nor
    does it raise the highest priority; the others of the batch are."""
    buf = M.ReplayBuffer(8, 2, (1, 1, 1), 2, 1, 1, 1)
    for t in range(3):
        buf.add(torch.zeros(2, 1, 1, 1, dtype=torch.uint8), torch.zeros(2), torch.zeros(2, dtype=torch.bool),
                torch.zeros(2, dtype=torch.bool), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long),
                torch.full((2, 2), 0.5), torch.zeros(2), torch.zeros(2))
    before = buf.priority.clone()
    buf.update_priorities(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 0]), torch.tensor([1.0, bad, 0.5]))
    assert buf.priority[1, 1] == before[1, 1] and buf.priority[0, 0] == 1.0 and buf.priority[2, 0] == 0.5
    assert float(buf.max_priority) == 1.0 and buf.sample(4, 0.4)[2].isfinite().all()
    buf.update_priorities(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 0]), torch.tensor([1.5, 3.0, 2.0]))
    assert buf.priority[1, 1] == 3.0 and buf.priority[2, 0] == 2.0 and float(buf.max_priority) == 3.0


# ---------------------------------------------------------------------------------------------
# 9. the training step, in the order of the script: schedules, env flags, the unroll, root
#    noise, replay sampling, the losses, reanalyze's write-back, what train_step feeds each
#    network, DDP, the processes' seeds, a resume that cuts episodes
# ---------------------------------------------------------------------------------------------
def tiny_args(*flags):
    """A network small enough for unit tests on corridor-sized frames (1 x 3 x 7), K = 3, n = 2."""
    return M.parse_args(["--device", "cpu", "--num-envs", "2", "--channels", "4", "--reduced-channels", "2",
                         "--head-hidden", "8", "--support-size", "5", "--proj-hidden", "8", "--proj-dim", "8",
                         "--pred-hidden", "8", "--buffer-size", "200", "--learning-starts", "40",
                         "--batch-size-per-worker", "6", "--jumps", "3", "--td-steps", "2",
                         "--no-augment", "--no-clip-rewards", *flags])


CPU = torch.device("cpu")
TINY_FRAME, TINY_STACK, TINY_ACTIONS = (1, 3, 7), 4, 3


def perturb(net, seed, scale=0.3):
    """Randomise every parameter: the zero-initialised heads would otherwise answer 0 whatever
    the input, and two copies of one network could not be told apart."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return net


def tiny_learner(args, apart=False):
    """A Learner of a tiny network; `apart`: online and target networks randomised differently,
    as after some updates, so that a value or projection shows which one made it."""
    torch.manual_seed(0)
    learner = M.Learner(M.MuZeroNet(TINY_FRAME, TINY_STACK, TINY_ACTIONS, args), args, CPU)
    if apart:
        perturb(learner.net, 1)
        perturb(learner.target, 2)
    return learner


def random_batch(args, seed, env=(0, 1, 0, 1, 0, 1), time=(50, 51, 52, 53, 54, 55), step=(9, 9, 9, 9, 9, 9)):
    """Sequences of random frames, rewards, policies and values, one episode each (no end in the
    window): env ids, start times t and episode steps at t as given."""
    g = torch.Generator().manual_seed(seed)
    B, W = len(env), TINY_STACK - 1 + args.jumps + args.td_steps + 1
    episode_step = torch.tensor(step)[:, None] + torch.arange(W) - (TINY_STACK - 1)
    assert (episode_step >= 0).all()
    no = torch.zeros(B, W, dtype=torch.bool)
    seq = M.Sequences(frames=torch.randint(0, 256, (B, W, *TINY_FRAME), generator=g, dtype=torch.uint8),
                      action=torch.randint(0, TINY_ACTIONS, (B, W), generator=g), reward=torch.randn(B, W, generator=g),
                      terminal=no, truncated=no, episode_step=episode_step,
                      policy=torch.softmax(torch.randn(B, W, TINY_ACTIONS, generator=g), -1),
                      root_value=torch.randn(B, W, generator=g) * 3, network_value=torch.randn(B, W, generator=g) * 3)
    return seq, torch.tensor(time), torch.tensor(env)


def record_calls(monkeypatch, name):
    """Wrap M.<name> so that every call's arguments (by parameter name) and result are kept."""
    real = getattr(M, name)
    calls = []

    def recording(*a, **kw):
        bound = inspect.signature(real).bind(*a, **kw)
        bound.apply_defaults()
        result = real(*a, **kw)
        calls.append({**bound.arguments, "result": result})
        return result

    monkeypatch.setattr(M, name, recording)
    return calls


def add_steps(buf, count, pixel=lambda t, e: 0):
    """Write `count` steps of one long episode to every env; frame pixels from pixel(t, e)."""
    E, A = buf.E, buf.policy.shape[-1]
    for _ in range(count):
        t = buf.steps
        frame = torch.tensor([pixel(t, e) for e in range(E)], dtype=torch.uint8).view(E, 1, 1, 1)
        frame = frame.expand((E,) + tuple(buf.frames.shape[2:])).clone()
        buf.add(frame, torch.zeros(E), torch.zeros(E, dtype=torch.bool), torch.zeros(E, dtype=torch.bool),
                torch.full((E,), t), torch.zeros(E, dtype=torch.long), torch.full((E, A), 1 / A),
                torch.full((E,), -5.0), torch.full((E,), -7.0))


# ---- utilities: the schedules ---------------------------------------------------------------
def test_learning_rate_warm_up_and_decay_at_their_boundaries():
    args = tiny_args("--lr", "0.2", "--lr-warmup-steps", "1000", "--lr-decay-steps", "100000",
                     "--lr-decay-rate", "0.1")
    by_update = {0: 0.2 / 1000, 1: 0.4 / 1000, 499: 0.1, 998: 0.2 * 999 / 1000, 999: 0.2, 1000: 0.2,
                 99_999: 0.2, 100_000: 0.02, 199_999: 0.02, 200_000: 0.002, 350_000: 0.0002}
    for update, lr in by_update.items():
        assert M.learning_rate(args, update) == pytest.approx(lr, rel=1e-9), update
    args = tiny_args("--lr", "0.2", "--lr-warmup-steps", "0", "--lr-decay-steps", "10", "--lr-decay-rate", "0.5")
    lrs = [M.learning_rate(args, u) for u in (0, 9, 10, 19, 20, 35)]
    assert lrs == pytest.approx([0.2, 0.2, 0.1, 0.1, 0.05, 0.025])
    # the acting temperature over the share of training done
    temperatures = [M.visit_temperature(p) for p in (0.0, 0.4999, 0.5, 0.7499, 0.75, 1.0)]
    assert temperatures == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]


# ---- environment: --grayscale and --sticky-actions reach ALE -------------------------------
def test_grayscale_and_sticky_actions_reach_the_env():
    """--grayscale gives one channel per frame. --sticky-actions 1 repeats the first action (a
    no-op) for ever, so two envs of one seed play alike whatever actions they are given; at 0
    the actions count."""
    pytest.importorskip("ale_py")

    def play(flags, actions):
        envs = M.make_atari_env_fn(M.parse_args(["--game", "ms_pacman", *flags]))(1)
        try:
            obs, _ = envs.reset(seed=3)
            for action in actions:
                obs = envs.step(np.array([action]))[0]
            return obs, M.env_spec(envs)[0]
        finally:
            envs.close()

    rng = np.random.default_rng(0)
    first, second = rng.integers(1, 9, 80), rng.integers(1, 9, 80)  # ms_pacman ignores actions for ~64 steps
    gray, frame_shape = play(["--grayscale", "--sticky-actions", "1"], first)
    assert gray.shape == (1, 4, 96, 96) and frame_shape == (1, 96, 96)
    assert np.array_equal(gray, play(["--grayscale", "--sticky-actions", "1"], second)[0])
    assert not np.array_equal(gray, play(["--grayscale"], first)[0])
    colour, frame_shape = play([], first)
    assert colour.shape == (1, 4, 96, 96, 3) and frame_shape == (3, 96, 96)


# ---- networks: the unroll and its gradient ------------------------------------------------
def test_forward_is_the_unroll_and_halves_the_gradient_into_each_dynamics_step():
    """forward() against a plain unroll written here (eval mode: BatchNorm per sample, so one
    call per step equals forward's batched call): the same outputs, and the gradient that a loss
    at unroll step k sends back to the root latent is 2^-k of the plain unroll's."""
    x = torch.randn(5, requires_grad=True)
    y = M.scale_gradient(x, 0.25)
    y.backward(torch.ones(5))
    torch.testing.assert_close(y, x)
    torch.testing.assert_close(x.grad, torch.full((5,), 0.25))

    args = tiny_args()
    net = perturb(M.MuZeroNet(TINY_FRAME, TINY_STACK, TINY_ACTIONS, args), 0).eval()
    B, K = 5, args.jumps
    g = torch.Generator().manual_seed(0)
    obs = torch.randint(0, 256, (B, TINY_STACK, 3, 7), generator=g, dtype=torch.uint8)
    actions = torch.randint(0, TINY_ACTIONS, (B, K), generator=g)
    roots = []
    net.representation.register_forward_hook(lambda module, inputs, output: roots.append(output))
    policies, values, rewards, predictions = net(obs, actions)
    assert policies.shape == (B, K + 1, TINY_ACTIONS) and rewards.shape == (B, K, 11) and predictions.shape == (B, K, 8)
    plain_root = latent = net.representation(obs)
    policy, value = net.prediction(latent)
    torch.testing.assert_close(policies[:, 0], policy)
    torch.testing.assert_close(values[:, 0], value)
    for k in range(1, K + 1):
        latent, reward = net.dynamics(latent, actions[:, k - 1])
        policy, value = net.prediction(latent)
        torch.testing.assert_close(rewards[:, k - 1], reward)
        torch.testing.assert_close(policies[:, k], policy)
        torch.testing.assert_close(values[:, k], value)
        torch.testing.assert_close(predictions[:, k - 1], net.project(latent))
        pairs = (rewards[:, k - 1], reward), (values[:, k], value), (predictions[:, k - 1], net.project(latent))
        for output, plain in pairs:
            weight = torch.randn(plain.shape, generator=g)
            scaled = torch.autograd.grad((output * weight).sum(), roots[0], retain_graph=True)[0]
            unscaled = torch.autograd.grad((plain * weight).sum(), plain_root, retain_graph=True)[0]
            assert unscaled.abs().max() > 1e-6
            torch.testing.assert_close(scaled, unscaled * 0.5 ** k, rtol=1e-4, atol=1e-7)


# ---- search and acting: batch rows, root noise, evaluation without it ------------------------
def test_batched_search_rows_equal_batch_of_one_searches():
    for kind in ("random", "huge"):
        model = TableModel(40, 5, seed=21, kind=kind)
        roots = roots_for(model, 8, 21)
        out = run_table_search(model, roots, 20, discount=0.95)
        for b in range(8):
            one = run_table_search(model, roots[b:b + 1], 20, discount=0.95)
            assert torch.equal(one.visit_counts[0], out.visit_counts[b]) and one.action[0] == out.action[b]
            torch.testing.assert_close(one.root_value[0], out.root_value[b], rtol=1e-6, atol=1e-5)


class PriorNet:
    """A stand-in network for run_search with 0 simulations: given prior logits, value 0."""
    support_size = 5

    def __init__(self, logits):
        self.logits = logits

    def initial_inference(self, obs):
        B = obs.shape[0]
        return torch.zeros(B, 1), self.logits[:B], torch.zeros(B, 2 * self.support_size + 1)


def test_root_noise_is_dirichlet_alpha_mixed_in_by_fraction():
    """With a one-hot prior the noised prior is (1 - f) prior + f n exactly, n on the simplex,
    and n has the moments of Dirichlet(alpha, ..., alpha): mean 1/A, variance
    (A - 1) / (A^2 (A alpha + 1)). Without noise=True, the prior itself."""
    B, A, alpha, f = 100_000, 4, 0.1, 0.4
    args = tiny_args("--dirichlet-alpha", str(alpha), "--dirichlet-fraction", str(f))
    prior = F.one_hot(torch.arange(B) % A, A).float()
    net = PriorNet(prior.log())
    obs = torch.zeros(B, 1, 1, 1, dtype=torch.uint8)
    out, _ = M.run_search(net, obs, args, 0, noise=True, generator=torch.Generator().manual_seed(0))
    noise = (out.policy - (1 - f) * prior) / f
    assert float(noise.min()) >= -1e-6
    torch.testing.assert_close(noise.sum(-1), torch.ones(B))
    torch.testing.assert_close(noise.mean(0), torch.full((A,), 1 / A), rtol=0, atol=0.005)
    torch.testing.assert_close(noise.var(0), torch.full((A,), (A - 1) / (A * A * (A * alpha + 1))), rtol=0.03, atol=0)
    clean, _ = M.run_search(net, obs, args, 0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(clean.policy, prior)


def test_noise_when_acting_never_when_evaluating(monkeypatch):
    """The actor searches with root noise, --num-simulations and its temperature; evaluation
    without noise, with --eval-simulations, playing the most visited action (reanalyze's
    search, with noise: test_reanalyze_writes_each_search_back_to_its_own_row)."""
    args = tiny_args("--num-simulations", "3", "--eval-simulations", "5", "--eval-episodes", "2")
    envs = env_fn(2)
    frame_shape, stack, num_actions = M.env_spec(envs)
    net = perturb(M.MuZeroNet(frame_shape, stack, num_actions, args), 0).eval()
    calls = record_calls(monkeypatch, "run_search")
    buffer = M.ReplayBuffer(args.buffer_size, 2, frame_shape, num_actions, stack, args.jumps, args.td_steps)
    actor = M.Actor(envs, buffer, args, CPU, torch.Generator().manual_seed(0), 1)
    actor.step(net, 0.5)
    assert [(c["noise"], c["num_simulations"], c["temperature"]) for c in calls] == [(True, 3, 0.5)]
    calls.clear()
    M.evaluate(net, env_fn, args, CPU, seed=1)
    assert calls and all((c["noise"], c["num_simulations"], c["temperature"]) == (False, 5, 0.0) for c in calls)
    envs.close()


# ---- replay: sampling and priorities ---------------------------------------------------------
def test_sampling_frequencies_follow_priority_to_the_alpha():
    """100,000 draws with a fixed seed: each valid start's frequency is p^alpha / sum within
    0.006, a tolerance that priorities taken as they are (alpha 1) or ignored (uniform) miss by
    far; starts without a complete sequence are never drawn."""
    T, E, alpha = 10, 3, 0.6
    buf = M.ReplayBuffer(T * E, E, (1, 1, 1), 2, 1, 1, 1, priority_alpha=alpha)
    add_steps(buf, T)
    priority = 0.05 * 2.5 ** ((3 * torch.arange(T)[:, None] + torch.arange(E)) % 7).float()  # 0.05 .. 12.2
    buf.priority.copy_(priority)
    mask = buf.start_mask()
    assert mask[:T - 2].all() and not mask[T - 2:].any()  # the last K + n rows have no future yet
    N = 100_000
    time, env, _ = buf.sample(N, 0.4, torch.Generator().manual_seed(0))
    freq = torch.zeros(T, E).index_put_((time % T, env), torch.ones(N), accumulate=True) / N
    expected = priority.pow(alpha) * mask / (priority.pow(alpha) * mask).sum()
    assert (freq[~mask] == 0).all()
    assert float((freq - expected).abs().max()) < 0.006
    for wrong in (priority * mask / (priority * mask).sum(), mask / mask.sum()):
        assert float((wrong - expected).abs().max()) > 0.03


def test_new_rows_get_the_highest_priority_seen():
    buf = M.ReplayBuffer(12, 2, (1, 1, 1), 2, 1, 1, 1)
    add_steps(buf, 3)
    assert (buf.priority[:3] == 1).all()  # before any update
    buf.update_priorities(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 0]), torch.tensor([0.5, 7.5, 2.0]))
    add_steps(buf, 1)
    assert buf.priority[3].tolist() == [7.5, 7.5]
    buf.update_priorities(torch.tensor([3]), torch.tensor([1]), torch.tensor([9.0]))
    add_steps(buf, 1)
    assert buf.priority[4].tolist() == [9.0, 9.0] and buf.priority[1].tolist() == [1.0, 7.5]


def test_a_mirror_of_the_frames_gives_the_same_windows():
    """A process's copy of the frames (mirror_frames, on a GPU in the layout; on the CPU here)
    takes the rows written since its last window: started late, used after the ring wrapped
    and again after a few more steps, it gives the windows the buffer gives."""
    E, T = 3, 16
    plain, mirrored = (M.ReplayBuffer(E * T, E, (1, 2, 2), 2, 4, 2, 3) for _ in range(2))
    for steps in (5, 2 * T + 3, 2):  # written before the mirror starts, then past a wrap, then a few more
        for buf in (plain, mirrored):
            add_steps(buf, steps, pixel=lambda t, e: (7 * t + e) % 251 + 1)
        if mirrored.mirror is None:
            mirrored.mirror_frames("cpu")
        t = torch.tensor([mirrored.steps - 7, mirrored.steps - 8, mirrored.steps - 10])
        env = torch.tensor([0, 2, 1])
        a, b = plain.window(t, env), mirrored.window(t, env)
        assert all(torch.equal(x, y) for x, y in zip(a, b)) and mirrored.mirrored == mirrored.steps
        assert torch.equal(mirrored.mirror, plain.frames)


def test_write_back_skips_rows_the_actor_overwrote_or_is_about_to():
    """T = 5 rows, 8 steps written: rows 0..4 hold times 5, 6, 7, 3, 4. Times 2 (its row now
    holds 7) and 3 (its row is the actor's next) are skipped, times 4 and 6 written; the same for
    priorities. A row the actor overwrites starts again as never reanalyzed."""
    buf = M.ReplayBuffer(5, 1, (1, 1, 1), 2, 1, 1, 1)
    add_steps(buf, 8)
    time, env = torch.tensor([2, 3, 4, 6]), torch.zeros(4, dtype=torch.long)
    policy = torch.tensor([[0.0, 1.0]]).repeat(4, 1)
    buf.write_targets(time, env, policy=policy, root_value=torch.tensor([10.0, 11.0, 12.0, 13.0]),
                      network_value=torch.tensor([20.0, 21.0, 22.0, 23.0]))
    assert buf.root_value[:, 0].tolist() == [-5.0, 13.0, -5.0, -5.0, 12.0]
    assert buf.network_value[:, 0].tolist() == [-7.0, 23.0, -7.0, -7.0, 22.0]
    assert buf.policy[:, 0].tolist() == [[0.5, 0.5], [0.0, 1.0], [0.5, 0.5], [0.5, 0.5], [0.0, 1.0]]
    assert buf.reanalyzed[:, 0].tolist() == [0, 1, 0, 0, 1]
    buf.update_priorities(time, env, torch.tensor([5.0, 6.0, 7.0, 8.0]))
    assert buf.priority[:, 0].tolist() == [1.0, 8.0, 1.0, 1.0, 7.0]
    add_steps(buf, 2)  # times 8 and 9 overwrite rows 3 and 4
    assert buf.reanalyzed[:, 0].tolist() == [0, 1, 0, 0, 0]


# ---- losses: muzero_losses term by term -----------------------------------------------------
def plain_h(x):
    return math.copysign(math.sqrt(abs(x) + 1) - 1, x) + 0.001 * x


def plain_two_hot(x, n):
    y = min(max(plain_h(x), -n), n)
    low = math.floor(y)
    probs = [0.0] * (2 * n + 1)
    probs[low + n] += 1 - (y - low)
    if y > low:
        probs[low + n + 1] += y - low
    return probs


def plain_log_softmax(logits):
    top = max(logits)
    total = top + math.log(sum(math.exp(v - top) for v in logits))
    return [v - total for v in logits]


def plain_cross_entropy(logits, target):
    return -sum(t * v for t, v in zip(target, plain_log_softmax(logits)))


def plain_decode(logits, n):
    """The expected atom in h-space, then h^-1 by bisection on plain_h."""
    y = sum(math.exp(v) * (i - n) for i, v in enumerate(plain_log_softmax(logits)))
    low, high = -1e6, 1e6
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if plain_h(middle) < y else (low, middle)
    return (low + high) / 2


def hand_muzero_losses(outputs, targets, projections, same_episode, temperature, n):
    """Plain loops: step 0 weighs 1, each unrolled step 1/K; each term masked; the priority is
    |decoded value at step 0 - value target at step 0| + 1e-6."""
    policy_logits, value_logits, reward_logits, predictions = outputs
    B, K = reward_logits.shape[:2]
    weight = [1.0] + [1.0 / max(K, 1)] * K
    nce = [] if predictions is None else [
        hand_nce(predictions[:, k], projections[:, k], temperature, targets.nce_mask[:, k].tolist(),
                 same_episode.tolist()) for k in range(K)]
    terms = {"value": [], "policy": [], "reward": []}
    for b in range(B):
        terms["value"].append(sum(
            weight[k] * float(targets.value_mask[b, k])
            * plain_cross_entropy(value_logits[b, k].tolist(), plain_two_hot(float(targets.value[b, k]), n))
            for k in range(K + 1)))
        terms["policy"].append(sum(
            weight[k] * float(targets.policy_mask[b, k])
            * plain_cross_entropy(policy_logits[b, k].tolist(), targets.policy[b, k].tolist()) for k in range(K + 1)))
        terms["reward"].append(sum(
            weight[k + 1] * float(targets.reward_mask[b, k])
            * plain_cross_entropy(reward_logits[b, k].tolist(), plain_two_hot(float(targets.reward[b, k]), n))
            for k in range(K)))
    if nce:
        terms["nce"] = [sum(weight[k + 1] * nce[k][0][b] for k in range(K)) for b in range(B)]
    priorities = [abs(plain_decode(value_logits[b, 0].tolist(), n) - float(targets.value[b, 0])) + 1e-6
                  for b in range(B)]
    accuracies = [sum(nce[k][1]) / max(1.0, float(targets.nce_mask[:, k].sum())) for k in range(len(nce))]
    return terms, priorities, accuracies


@pytest.mark.parametrize("K", [3, 0])
def test_muzero_losses_term_by_term(K):
    B, A, n, D, temperature = 6, 4, 5, 6, 0.3
    g = torch.Generator().manual_seed(K)
    mask = lambda *shape: (torch.rand(*shape, generator=g) > 0.35).float()
    outputs = (torch.randn(B, K + 1, A, generator=g), torch.randn(B, K + 1, 2 * n + 1, generator=g),
               torch.randn(B, K, 2 * n + 1, generator=g), torch.randn(B, K, D, generator=g) if K else None)
    # every target is a real value, masked or not, so that a dropped mask shows
    targets = M.Targets(value=torch.randn(B, K + 1, generator=g) * 4, value_mask=mask(B, K + 1),
                        reward=torch.randn(B, K, generator=g) * 2, reward_mask=mask(B, K),
                        policy=torch.softmax(torch.randn(B, K + 1, A, generator=g) * 2, -1),
                        policy_mask=mask(B, K + 1), nce_mask=mask(B, K), actions=torch.zeros(B, K, dtype=torch.long))
    projections = outputs[3] + torch.randn(B, K, D, generator=g) if K else None
    episode = torch.tensor([0, 0, 1, 2, 2, 3])
    same_episode = episode[:, None] == episode
    args = tiny_args("--nce-temperature", str(temperature), "--jumps", str(K))
    terms, priorities, metrics = M.muzero_losses(outputs, targets, projections, same_episode, args, n)
    hand, hand_priorities, hand_accuracies = hand_muzero_losses(outputs, targets, projections, same_episode,
                                                                temperature, n)
    assert sorted(terms) == sorted(hand)
    for name in hand:
        torch.testing.assert_close(terms[name].double(), torch.tensor(hand[name], dtype=torch.float64),
                                   rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(priorities.double(), torch.tensor(hand_priorities, dtype=torch.float64),
                               rtol=1e-4, atol=1e-4)
    assert [float(metrics[f"nce/accuracy_step_{k + 1}"]) for k in range(K)] == pytest.approx(hand_accuracies)


# ---- reanalyze ---------------------------------------------------------------------------------
class RowNet:
    """A stand-in network whose outputs name the row they come from: the latent is the newest
    frame's pixel x, the value x, the prior all on action x % 3; each dynamics step gives
    reward 0 and value x + 1. One simulation then yields the policy one_hot(x % 3) and the root
    value (x + discount (x + 1)) / 2."""
    support_size, num_actions = 20, 3

    def value_logits(self, x):
        return torch.log(M.scalar_to_support(x, self.support_size))

    def prior_logits(self, x):
        return torch.log(F.one_hot(x.long() % self.num_actions, self.num_actions).float())

    def initial_inference(self, obs):
        x = obs[:, -1, 0, 0].float()
        return x, self.prior_logits(x), self.value_logits(x)

    def recurrent_inference(self, latent, action):
        reward = self.value_logits(torch.zeros_like(latent))
        return latent, reward, self.prior_logits(latent), self.value_logits(latent + 1)


@pytest.mark.parametrize("flags", [[], ["--search-value-targets"]])
def test_reanalyze_writes_each_search_back_to_its_own_row(monkeypatch, flags):
    """By default (EfficientZero's cost) reanalyze searches the K+1 policy rows t..t+K of each
    sequence and writes the network's value at all K+n+1 rows t..t+K+n, the n after t+K from one
    plain pass; with --search-value-targets it searches every row. Each write lands on its own
    row (RowNet's outputs name their row); rows it does not reach keep what the actor stored."""
    T, E, S, K, n, discount = 20, 2, 2, 2, 2, 0.9
    args = tiny_args("--num-simulations", "1", "--dirichlet-fraction", "0", "--discount", str(discount), *flags)
    buf = M.ReplayBuffer(T * E, E, (1, 1, 1), 3, S, K, n)
    add_steps(buf, 30, pixel=lambda t, e: t * E + e + 1)  # rows hold times 10..29
    time, env = torch.tensor([11, 18, 25, 12]), torch.tensor([1, 0, 1, 0])  # windows that do not overlap
    assert buf.start_mask()[time % T, env].all()
    calls = record_calls(monkeypatch, "run_search")
    searched = K + n + 1 if flags else K + 1
    sims = M.reanalyze(RowNet(), buf, time, env, args, CPU)
    assert sims == 4 * searched and all(c["noise"] for c in calls)  # the actor's search, noise and all
    assert sum(len(c["obs"]) for c in calls) == 4 * searched          # the roots searched for 4 sequences
    count, is_root = torch.zeros(T, E, dtype=torch.int32), torch.zeros(T, E, dtype=torch.bool)
    for t0, e in zip(time.tolist(), env.tolist()):
        for t in range(t0, t0 + K + n + 1):
            count[t % T, e] += 1
            is_root[t % T, e] = t < t0 + searched
    assert torch.equal(buf.reanalyzed, count)
    for row in range(T):
        t = int(buf.times()[row])
        for e in range(E):
            x = t * E + e + 1
            if count[row, e]:  # the value at every row t..t+K+n, the bootstrap rows
                assert float(buf.network_value[row, e]) == pytest.approx(x, rel=1e-4, abs=1e-3), (t, e)
            else:
                assert float(buf.network_value[row, e]) == -7.0
            if is_root[row, e]:
                assert float(buf.root_value[row, e]) == pytest.approx((x + discount * (x + 1)) / 2, rel=1e-4, abs=1e-3)
                assert buf.policy[row, e].tolist() == F.one_hot(torch.tensor(x % 3), 3).float().tolist()
            else:
                assert float(buf.root_value[row, e]) == -5.0, (t, e)
                assert buf.policy[row, e].tolist() == pytest.approx([1 / 3] * 3)


def test_non_finite_watch_names_the_first_bad_update():
    """The watch keeps the first update whose loss or gradient was not finite, with its terms,
    and says nothing while every update is finite."""
    watch = M.NonFiniteWatch()
    ok, nan, inf = torch.tensor(1.0), torch.tensor(math.nan), torch.tensor(math.inf)
    watch.note(1, {"total": ok, "value": ok}, ok)
    watch.check()
    watch.note(2, {"total": nan, "value": nan}, ok)
    watch.note(3, {"total": ok, "value": ok}, inf)  # a later bad update does not replace the first
    watch.note(4, {"total": ok, "value": ok}, ok)
    with pytest.raises(M.NonFiniteError, match=r"^non-finite loss at update 2 \(total=nan, value=nan\)$"):
        watch.check()
    gradient = M.NonFiniteWatch()
    gradient.note(5, {"total": ok, "value": ok}, inf)
    with pytest.raises(M.NonFiniteError, match=r"^non-finite gradient at update 5 \(losses: total=1, value=1\)$"):
        gradient.check()


def test_trainers_sample_ahead_enough_batches_for_every_reanalyze_worker():
    """Each trainer holds the batch it trains on and ceil(R / T) more sampled ahead, so that R
    reanalyze workers always have a batch to refresh."""
    args = tiny_args()
    net = M.MuZeroNet(TINY_FRAME, TINY_STACK, TINY_ACTIONS, args)
    ctx = torch.multiprocessing.get_context("spawn")
    for workers, trainers, lookahead in ((1, 1, 2), (2, 2, 2), (4, 1, 5), (3, 2, 3), (0, 1, 2)):
        layout = M.Layout("cpu", ["cpu"] * workers, ["cpu"] * trainers, "gloo")
        shared = M.Shared(ctx, args, TINY_FRAME, TINY_STACK, TINY_ACTIONS, net, copy.deepcopy(net), layout)
        assert shared.lookahead == lookahead and shared.batch_state.shape == (trainers, lookahead), (workers, trainers)


def test_the_layout_publishes_the_online_and_the_target_network_apart():
    """The layout shares two sets of weights: the online network's, which the actor fetches, and
    the target network's, which reanalyze workers fetch and the leading trainer publishes at each
    refresh; each keeps its own version, and fetching one never gives the other."""
    args = tiny_args()
    net = M.MuZeroNet(TINY_FRAME, TINY_STACK, TINY_ACTIONS, args)
    shared = M.Shared(torch.multiprocessing.get_context("spawn"), args, TINY_FRAME, TINY_STACK, TINY_ACTIONS,
                      copy.deepcopy(net), copy.deepcopy(net), M.Layout("cpu", ["cpu"], ["cpu"], "gloo"))
    online, target = perturb(copy.deepcopy(net), 1), perturb(copy.deepcopy(net), 2)
    shared.publish(online, 10)
    shared.publish(target, 7, target=True)
    acting, reanalysing = copy.deepcopy(net), copy.deepcopy(net)
    assert shared.fetch(acting, -1) == 10 and shared.fetch(reanalysing, -1, target=True) == 7
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert same(acting, online) and same(reanalysing, target) and not same(acting, reanalysing)


def test_an_update_reads_nothing_back_from_the_device(monkeypatch, tmp_path):
    """The hot path of an update in the single process (sampling, reanalyze, the window, the
    training step, the priorities) calls none of .item(), .cpu() and .tolist(): on a GPU each
    would make the host wait for the device. The host reads what it needs at the logging
    interval and every --publish-interval updates (NonFiniteWatch.check), outside these parts.
    Counted where muzero_nce.py calls them (torch's Adam reads its step counts, host tensors)."""
    calls, inside = [], []
    for name in ("item", "cpu", "tolist"):
        real = getattr(torch.Tensor, name)

        def counting(self, *a, real=real, name=name, **kw):
            caller = sys._getframe(1).f_code
            if inside and caller.co_filename == M.__file__:
                calls.append((name, inside[-1], caller.co_name))
            return real(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, counting)
    parts = [(M, "sample_batch"), (M, "reanalyze"), (M.ReplayBuffer, "window"), (M.Learner, "train_step"),
             (M.ReplayBuffer, "update_priorities")]
    for owner, name in parts:
        real = getattr(owner, name)

        def marked(*a, real=real, name=name, **kw):
            inside.append(name)
            try:
                return real(*a, **kw)
            finally:
                inside.pop()
        monkeypatch.setattr(owner, name, marked)
    result = M.train(corridor_args(tmp_path, 1, **{"--total-env-steps": 768, "--learning-starts": 704}), env_fn)
    assert result["updates"] == (768 - 704 + 32) // 4 and calls == []


FAULTS_OF_BATCH_TENSORS = """
import resource, sys, torch
if sys.argv[1] == "script":
    import muzero_nce
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(30):  # tensors made and freed in turn, as each update's batch tensors are
    if i == 10:
        before = faults()
    torch.ones((5 + i % 3) << 21).sum()  # 40, 48, 56 MB: over glibc's largest mmap threshold (32 MB)
print(faults() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="keep_freed_memory sets glibc's malloc")
def test_importing_the_script_keeps_freed_memory_for_reuse():
    """After `import muzero_nce` (keep_freed_memory), batch-sized tensors made and freed in turn
    reuse the pages of those before them; without, glibc gives each block back to the OS and the
    next one faults in all its pages again (~250k faults over these 20 tensors). Counted as
    minor page faults, not timed."""
    faults = {how: int(subprocess.run([PYTHON, "-c", FAULTS_OF_BATCH_TENSORS, how], cwd=REPO, env=ENV, text=True,
                                      capture_output=True, timeout=120, check=True).stdout)
              for how in ("torch alone", "script")}
    if faults["torch alone"] < 20 * 4096:
        pytest.skip(f"this kernel backs big blocks otherwise (huge pages?): {faults}")
    assert faults["script"] < faults["torch alone"] / 10, faults


def test_networks_run_channels_last_with_the_same_outputs():
    """The networks' convolutions run channels-last (pixels(), the weights): the layout oneDNN
    and cuDNN's bf16 kernels are fastest in. It changes no value: an NCHW copy of the network
    gives the same outputs, and the observations are left as they were."""
    torch.manual_seed(0)
    for S, Net, frame in ((M, M.MuZeroNet, (3, 96, 96)), (Q, Q.QNet, (1, 84, 84))):
        args = S.parse_args(["--device", "cpu", "--channels", "16", "--reduced-channels", "8"])
        net = Net(frame, 4, 9, args).eval()
        convs = [m.weight for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
        assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
        nchw = copy.deepcopy(net).to(memory_format=torch.contiguous_format)
        assert not convs[0].is_contiguous() and all(p.is_contiguous() for p in nchw.parameters())
        obs = torch.randint(0, 256, (5, 4 * frame[0], *frame[1:]), dtype=torch.uint8)
        seen = obs.clone()
        x = S.pixels(obs)
        assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        torch.testing.assert_close(x, obs / 255)
        actions = torch.randint(0, 9, (5, 3))
        with torch.no_grad():
            for a, b in zip(net(obs, actions, nce=False), nchw(obs, actions, nce=False)):
                if a is not None:
                    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        assert torch.equal(obs, seen)


def test_reanalyze_searches_with_the_target_network(monkeypatch, tmp_path):
    """The single process reanalyses with the learner's target network (EfficientZero), which
    lags the online network by up to --target-update-interval updates, not with the acting copy."""
    seen = []
    real = M.reanalyze
    monkeypatch.setattr(M, "reanalyze", lambda net, *a, **kw: seen.append(net) or real(net, *a, **kw))
    learners = record_calls(monkeypatch, "Learner")
    M.train(corridor_args(tmp_path, 1, **{"--total-env-steps": 768, "--learning-starts": 704}), env_fn)
    assert seen and all(net is learners[0]["result"].target for net in seen)


# ---- the training step ------------------------------------------------------------------------
def test_train_step_nce_targets_come_from_the_target_network_at_t_plus_k(monkeypatch):
    """The online network unrolls from the observation at t; the target network (not the online
    one) encodes the real observations at t+1..t+K for the NCE targets; negatives are masked
    for pairs of one episode: same env and same episode start (time - episode step)."""
    args = tiny_args("--target-update-interval", "1000")
    learner = tiny_learner(args, apart=True)
    env, time, step = (0, 0, 0, 1, 1, 0), (20, 22, 30, 20, 25, 20), (5, 7, 3, 5, 10, 5)  # starts 15, 15, 27, 15, 15, 15
    seq, time, env = random_batch(args, 0, env, time, step)
    B, S, K = 6, TINY_STACK, args.jumps
    obs = M.stack_observations(seq.frames, seq.episode_step, S)                          # [B, K+n+1, S*C, H, W]
    real = obs[:, 1:K + 1].flatten(0, 1)
    with torch.no_grad():  # one observation at a time: each target depends on its own observation alone
        expected = torch.cat([learner.target.project(learner.target.representation(x[None]), online=False)
                              for x in real]).view(B, K, -1)
    online_inputs, target_inputs = [], []
    learner.net.representation.register_forward_hook(lambda m, inputs, out: online_inputs.append(inputs[0]))
    learner.target.representation.register_forward_hook(lambda m, inputs, out: target_inputs.append(inputs[0]))
    calls = record_calls(monkeypatch, "muzero_losses")
    learner.train_step(seq, time, env, torch.ones(B), torch.full((B,), args.td_steps))
    assert len(online_inputs) == 1 and torch.equal(online_inputs[0], obs[:, 0])
    assert len(target_inputs) == 1 and torch.equal(target_inputs[0], real)
    torch.testing.assert_close(calls[0]["target_projections"], expected)
    same = [[env[i] == env[j] and time[i] - step[i] == time[j] - step[j] for j in range(B)] for i in range(B)]
    assert calls[0]["same_episode"].tolist() == same
    assert same[0] == [True, True, False, False, False, True]  # the case list above does cover each kind


def test_train_step_augments_the_online_input_and_the_nce_targets_alike(monkeypatch):
    """With --augment, one augment() call per update shifts the sample's whole window: the
    online network unrolls from its step 0 and the target network encodes its steps 1..K, so a
    prediction and its target see the same shift. The bootstrap values (--local-target-net) come
    from the observations as stored, at the K+1 bootstrap rows."""
    args = tiny_args("--augment", "--local-target-net")
    learner = tiny_learner(args, apart=True)
    seq, time, env = random_batch(args, 5)
    B, S, K = 6, TINY_STACK, args.jumps
    obs = M.stack_observations(seq.frames, seq.episode_step, S)                          # [B, K+n+1, S*C, H, W]
    augmented = []
    real_augment = M.augment
    monkeypatch.setattr(M, "augment", lambda x, g=None: augmented.append((x, real_augment(x, g))) or augmented[-1][1])
    online_inputs, target_inputs = [], []
    learner.net.representation.register_forward_hook(lambda m, inputs, out: online_inputs.append(inputs[0]))
    learner.target.representation.register_forward_hook(lambda m, inputs, out: target_inputs.append(inputs[0]))
    learner.train_step(seq, time, env, torch.ones(B), torch.full((B,), args.td_steps))
    (given, seen), = augmented
    assert torch.equal(given, obs[:, :K + 1]) and not torch.equal(seen, given.float())
    assert len(online_inputs) == 1 and torch.equal(online_inputs[0], seen[:, 0])
    # the target network's calls: the bootstrap values from the stored observations, then the NCE targets
    rows = torch.arange(K + 1) + args.td_steps                                          # no episode ends here
    assert len(target_inputs) == 2 and torch.equal(target_inputs[0], obs[:, rows].flatten(0, 1))
    assert torch.equal(target_inputs[1], seen[:, 1:].flatten(0, 1))


@pytest.mark.parametrize("flags, source", [
    (["--search-value-targets"], "root_value"),
    ([], "network_value"),  # what reanalyze stores from the target network, EfficientZero's default
    (["--local-target-net"], "target network"),
])
def test_train_step_bootstraps_from_the_values_its_flags_name(monkeypatch, flags, source):
    """Each z_k bootstraps from one row, t+k+h (h: the sample's own n here, 1 or 2): the value
    there comes from the source its flags name, and the target network, where it is the source,
    sees only those K+1 rows of the K+n+1."""
    args = tiny_args(*flags)
    learner = tiny_learner(args, apart=True)
    seq, time, env = random_batch(args, 3)
    S, K, td = TINY_STACK, args.jumps, torch.tensor([1, 2, 2, 1, 2, 1])
    rows = torch.arange(K + 1) + td[:, None]                                            # [6, K+1], no ends here
    if source == "target network":
        obs = M.stack_observations(seq.frames, seq.episode_step, S)[torch.arange(6)[:, None], rows].flatten(0, 1)
        with torch.no_grad():
            expected = M.support_to_scalar(learner.target.initial_inference(obs)[2], args.support_size).view(6, -1)
    else:
        expected = getattr(seq, source)[:, S - 1:].gather(1, rows)                       # the rows t+k+h
    target_rows = []
    learner.target.representation.register_forward_hook(lambda m, inputs, out: target_rows.append(len(inputs[0])))
    calls = record_calls(monkeypatch, "add_bootstrap")
    learner.train_step(seq, time, env, torch.ones(6), td)
    assert torch.equal(calls[0]["targets"].bootstrap_row, rows)
    torch.testing.assert_close(calls[0]["values"], expected)
    # the NCE targets' pass sees 6 x K rows; a bootstrap pass, 6 x (K+1)
    assert target_rows == ([6 * (K + 1)] if source == "target network" else []) + [6 * K]


@pytest.mark.parametrize("world, refreshed, expected_lrs", [
    (1, [3, 6], [0.05, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05]),
    # two DDP trainers: a step trains two batches and counts two updates (0, 2, 4, ...)
    (2, [2, 3, 5, 6], [0.05, 0.1, 0.05, 0.05, 0.025, 0.025, 0.0125]),
])
def test_train_step_refreshes_the_target_and_follows_the_schedule(monkeypatch, world, refreshed, expected_lrs):
    """Target refresh every --target-update-interval updates (here 3), the learning rate of each
    update from the schedule, the loss (each term's importance-weighted mean times its weight),
    and the gradient clipped to --max-grad-norm. With `world` trainers each step counts `world`
    updates (batches), and the schedules count those."""
    weights = {"value": 0.3, "policy": 0.7, "reward": 1.3, "nce": 0.4}
    args = tiny_args("--target-update-interval", "3", "--lr", "0.1", "--lr-warmup-steps", "2", "--lr-decay-steps", "4",
                     "--lr-decay-rate", "0.5", "--value-loss-weight", "0.3", "--policy-loss-weight", "0.7",
                     "--reward-loss-weight", "1.3", "--nce-weight", "0.4", "--max-grad-norm", "0.05")
    learner = tiny_learner(args)
    learner.world = world
    seq, time, env = random_batch(args, 4)
    importance = torch.tensor([0.2, 1.0, 0.5, 0.9, 0.3, 0.7])
    calls = record_calls(monkeypatch, "muzero_losses")
    snapshot = lambda net: {k: v.clone() for k, v in net.state_dict().items()}
    target, lrs = snapshot(learner.target), []
    for step in range(1, 8):
        metrics, _ = learner.train_step(seq, time, env, importance, torch.full((6,), args.td_steps))
        assert learner.updates == step * world
        lrs.append(learner.optimizer.param_groups[0]["lr"])
        if step in refreshed:  # the target takes the online weights (a copy the other way would undo the step)
            assert not all(torch.equal(v, target[k]) for k, v in learner.net.state_dict().items()), step
            target = snapshot(learner.net)
        now, net = learner.target.state_dict(), learner.net.state_dict()
        assert all(torch.equal(now[k], target[k]) for k in now), step
        assert (step in refreshed) == all(torch.equal(now[k], net[k]) for k in now), step
        terms = calls[-1]["result"][0]
        losses = {name: (terms[name] * importance).mean() for name in weights}
        for name in weights:
            torch.testing.assert_close(metrics[f"losses/{name}"], losses[name])
        torch.testing.assert_close(metrics["losses/total"], sum(weights[name] * losses[name] for name in weights))
        clipped = torch.stack([p.grad.norm() for p in learner.net.parameters() if p.grad is not None]).norm()
        assert float(metrics["losses/grad_norm"]) > 0.05 and float(clipped) == pytest.approx(0.05, rel=1e-4)
    assert lrs == pytest.approx(expected_lrs)


# ---- processes and resume -----------------------------------------------------------------------
def bf16_and_fp32(*flags):
    """One search (8 simulations, no noise) and two training steps of the same randomised tiny
    network on the same batch, in each precision."""
    runs = {}
    for precision in ("fp32", "bf16"):
        args = tiny_args("--precision", precision, "--num-simulations", "8", "--dirichlet-fraction", "0", *flags)
        learner = tiny_learner(args, apart=True)
        seq, time, env = random_batch(args, 3)
        obs = M.stack_observations(seq.frames, seq.episode_step, TINY_STACK)[:, 0]
        with torch.no_grad():
            out, value = M.run_search(learner.net.eval(), obs, args, 8)
        steps = [learner.train_step(seq, time, env, torch.ones(6), torch.full((6,), args.td_steps)) for _ in range(2)]
        runs[precision] = out, value, steps
    return runs["fp32"], runs["bf16"]


def test_bf16_runs_the_networks_and_keeps_the_rest_in_fp32():
    """--precision bf16 (bf16 autocast, which a CPU runs too) against fp32, from the same weights
    and batch. Measured here, bf16 moves root values (up to 9.4) by 0.14, network values by
    0.006, losses by 0.1% and priorities by 0.09; the tolerances below are a few times those. A
    planted bf16 decoding (the softmax over the support's atoms and its expectation in bf16)
    moves root values by 7.8 and priorities by 4.1. The trees' statistics are fp32, and the
    cross-entropies and decoding read bf16 logits exactly as they read them cast to fp32."""
    (out32, value32, steps32), (out16, value16, steps16) = bf16_and_fp32()
    assert out16.tree.embedding.dtype == torch.bfloat16  # the network did run in bf16
    assert all(x.dtype == torch.float32 for x in (out16.tree.nodes, out16.tree.edges, out16.tree.bounds,
                                                    out16.tree.values, out16.root_value, value16))
    torch.testing.assert_close(out16.root_value, out32.root_value, atol=0.5, rtol=0)
    torch.testing.assert_close(value16, value32, atol=0.05, rtol=0)
    assert (out16.policy - out32.policy).abs().sum(-1).max() <= 0.5
    for (metrics16, priorities16), (metrics32, priorities32) in zip(steps16, steps32):
        for name in ("value", "policy", "reward", "nce", "total"):
            assert metrics16[f"losses/{name}"].dtype == torch.float32
            torch.testing.assert_close(metrics16[f"losses/{name}"], metrics32[f"losses/{name}"], rtol=0.01, atol=0)
        torch.testing.assert_close(priorities16, priorities32, atol=0.5, rtol=0)
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(5, 11, generator=g) * 3).bfloat16()
    target = torch.softmax(torch.randn(5, 11, generator=g), -1)
    assert torch.equal(M.cross_entropy(logits, target), M.cross_entropy(logits.float(), target))
    assert torch.equal(M.support_to_scalar(logits, 5), M.support_to_scalar(logits.float(), 5))


def test_bf16_trains_the_online_network_in_bf16():
    """--precision bf16 reaches the learner's own unroll too, not only the search and the target
    network's passes: every convolution and linear layer of the online network gives bf16."""
    args = tiny_args("--precision", "bf16")
    learner = tiny_learner(args, apart=True)
    seq, time, env = random_batch(args, 3)
    dtypes = []
    for module in learner.net.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            module.register_forward_hook(lambda m, inputs, out: dtypes.append(out.dtype))
    learner.train_step(seq, time, env, torch.ones(6), torch.full((6,), args.td_steps))
    assert dtypes and set(dtypes) == {torch.bfloat16}


def test_bf16_where_the_gpu_lacks_it_is_a_one_line_error(monkeypatch):
    """bf16 needs compute capability 8.0 (Ampere) or later; before, --precision bf16 (the CUDA
    default) is refused in one line, and --precision fp32 runs."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    for flags in ([], ["--precision", "bf16"]):
        with pytest.raises(SystemExit, match=r"^muzero_nce.py: error: --precision bf16 but cuda:1 \(Tesla V100\) has "
                                             r"no bf16 arithmetic; use --precision fp32$"):
            M.check_precision(M.parse_args(flags), ["cpu", "cuda:1"])
    M.check_precision(M.parse_args(["--precision", "fp32"]), ["cpu", "cuda:1"])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    M.check_precision(M.parse_args([]), ["cuda:0"])


@pytest.mark.parametrize("flags", [["--no-nce"], ["--jumps", "0"]])
def test_ddp_trains_without_nce_and_without_unroll(flags):
    """DDP (here a one-process gloo group) stops at the second update if a parameter got no
    gradient in the first: --no-nce must build no NCE heads, and --jumps 0 (no dynamics) must
    tell DDP."""
    import torch.distributed as dist
    args = tiny_args(*flags)
    seq, time, env = random_batch(args, 5)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{M.free_port()}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        net = M.MuZeroNet(TINY_FRAME, TINY_STACK, TINY_ACTIONS, args)
        learner = M.Learner(net, args, CPU, model=M.ddp_model(net, args, CPU))
        for _ in range(3):
            learner.train_step(seq, time, env, torch.ones(6), torch.full((6,), args.td_steps))
    finally:
        dist.destroy_process_group()
    assert learner.updates == 3
    unused = {name for name, p in net.named_parameters() if p.grad is None}
    if args.jumps:
        assert not unused
    else:
        assert {name for name, _ in net.named_parameters() if name.startswith("dynamics.")} <= unused


def test_every_process_draws_its_own_batches():
    """Every actor, reanalyze worker and trainer of every node has its own seed (each process
    uses seed, seed + 1 and seed + 2), so their samplers draw different batches."""
    args = tiny_args("--seed", "5")
    seeds = {(role, index, node): M.process_seed(args, role, index, node)
             for node in range(3) for role, count in (("actor", 1), ("reanalyze", 4), ("trainer", 4))
             for index in range(count)}
    used = [seed + offset for seed in seeds.values() for offset in range(3)]
    assert len(set(used)) == len(used)
    buf = M.ReplayBuffer(30, 3, (1, 1, 1), 2, 1, 1, 1)
    add_steps(buf, 10)
    batches = []
    for (role, index, node), seed in seeds.items():
        if role != "actor":
            time, env, _ = buf.sample(8, 0.4, M.make_generator("cpu", seed))
            batches.append(tuple((time * 3 + env).tolist()))
    assert len(set(batches)) == len(batches)


def test_resume_without_env_state_cuts_the_running_episodes(tmp_path):
    """A checkpoint whose envs could not be pickled (ALE's): the resumed buffer ends each env's
    last stored step as truncated (it still bootstraps), and fresh episodes start."""
    args = tiny_args("--save-buffer", "--num-simulations", "2")

    def fresh():
        envs = env_fn(2)
        frame_shape, stack, num_actions = M.env_spec(envs)
        torch.manual_seed(0)
        net = M.MuZeroNet(frame_shape, stack, num_actions, args)
        buffer = M.ReplayBuffer(args.buffer_size, 2, frame_shape, num_actions, stack, args.jumps, args.td_steps)
        generators = [torch.Generator().manual_seed(i) for i in range(3)]
        actor = M.Actor(envs, buffer, args, CPU, generators[1], 1)
        return envs, M.Learner(net, args, CPU), copy.deepcopy(net).eval(), buffer, actor, generators

    envs, learner, acting, buffer, actor, generators = fresh()
    for _ in range(7):
        actor.step(acting, 1.0)
    counters = {**M.fresh_counters(args), "env_steps": 14}
    path = str(tmp_path / "checkpoint.pt")
    M.save_run(path, args, learner, acting, counters, buffer,
               {"actor": actor.state_dict(), "rng": M.rng_state(generators), "envs": None})
    envs.close()
    envs, learner, acting, resumed, actor, generators = fresh()
    M.resume(path, learner, acting, M.fresh_counters(args), resumed, actor, generators, envs)
    envs.close()
    last = (buffer.steps - 1) % buffer.T
    truncated = buffer.truncated.clone()
    truncated[last] = True
    assert torch.equal(resumed.truncated, truncated) and not buffer.truncated[last].any()
    assert torch.equal(resumed.frames, buffer.frames) and torch.equal(resumed.terminal, buffer.terminal)
    assert actor.episode_step.tolist() == [0, 0]


# ---------------------------------------------------------------------------------------------
# Learning: a corridor that needs lookahead
# ---------------------------------------------------------------------------------------------
# Learning test: MuZero + InfoNCE must solve a tiny image env that needs lookahead.
#
# The env (Corridor) is a corridor of LENGTH cells drawn in a small uint8 image. The agent starts
# next to a decoy exit: one step onto it ends the episode with reward DECOY (0.3); walking the
# other way for LENGTH - 2 = 5 steps ends it with reward GOAL (1.0). A one-step-greedy agent takes
# the decoy, and so does any agent whose value estimates have not yet seen the goal; the optimal
# undiscounted return is exactly GOAL. Which side the goal lies on alternates from episode to
# episode, so no constant action solves it either (a constant action scores (GOAL + DECOY) / 2).
#
# test_learns_corridor_needing_lookahead: a seeded run on CPU reaches at least 90% of the optimal
# return in the final greedy, noise-free evaluation (checked with these flags: seeds 1-8 and 10
# reach 1.0; seed 9 ends at 0.5, one layout lost late in training).
# test_gumbel_learns_corridor_with_few_simulations: the same bar with --search gumbel, 4
# simulations per move (2 actions: Sequential Halving visits both twice) and 4,800 env steps
# (checked: seeds 1-10 reach 1.0, and so do seeds 1-10 with 6,400 steps).
# test_zero_simulations_runs: the same env runs end to end with no search at all.
LENGTH = 7           # cells 0..6: an exit at each end
DECOY, GOAL = 0.3, 1.0
MAX_STEPS = 20       # truncation cap (return 0 when reached)
HEIGHT, WIDTH = 3, LENGTH


class Corridor(gym.Env):
    """Frame uint8 [1, HEIGHT, WIDTH]. With the goal on the right, the agent (a 255 pixel) walks
    row 0 and starts in cell 1, the decoy being cell 0; with the goal on the left it walks row 2
    and starts in cell LENGTH - 2. The goal cell is marked with 128 in row 1. Actions: 0 left,
    1 right. The layout alternates every episode; a seeded reset picks it from the seed's
    parity, so the --eval-episodes envs (seeded s, s+1, ...) play both layouts equally often.
    No randomness at all: deterministic and picklable."""

    metadata = {"render_modes": []}

    def __init__(self):
        self.observation_space = gym.spaces.Box(0, 255, (1, HEIGHT, WIDTH), np.uint8)
        self.action_space = gym.spaces.Discrete(2)
        self.goal_right, self.position, self.steps = True, 1, 0

    def _obs(self):
        frame = np.zeros((1, HEIGHT, WIDTH), np.uint8)
        frame[0, 1, LENGTH - 1 if self.goal_right else 0] = 128
        frame[0, 0 if self.goal_right else 2, self.position] = 255
        return frame

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.goal_right = bool(seed % 2) if seed is not None else not self.goal_right
        self.position, self.steps = (1 if self.goal_right else LENGTH - 2), 0
        return self._obs(), {}

    def step(self, action):
        self.position += 1 if int(action) == 1 else -1
        self.steps += 1
        at_goal = self.position == (LENGTH - 1 if self.goal_right else 0)
        at_decoy = self.position == (0 if self.goal_right else LENGTH - 1)
        reward = GOAL if at_goal else DECOY if at_decoy else 0.0
        terminal = at_goal or at_decoy
        truncated = not terminal and self.steps >= MAX_STEPS
        return self._obs(), reward, terminal, truncated, {}


def env_fn(num_envs):
    """Section 3's env contract: a vector env with NEXT_STEP autoreset; train() seeds it."""
    return gym.vector.SyncVectorEnv([Corridor for _ in range(num_envs)],
                                    autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)


def corridor_args(tmp_path, seed, *flags, **overrides):
    """A small network and 6,400 env steps (200 per env, ~1,450 updates). --td-steps 5 spans the
    whole walk to the goal; reanalyze refreshes a quarter of each batch (with root noise)."""
    values = {
        "--device": "cpu", "--seed": seed, "--num-envs": 32,
        "--channels": 16, "--blocks": 1, "--reduced-channels": 4, "--head-hidden": 32, "--support-size": 10,
        "--proj-hidden": 64, "--proj-dim": 64, "--pred-hidden": 32,
        "--num-simulations": 8, "--eval-simulations": 8, "--eval-episodes": 8,
        "--jumps": 3, "--td-steps": 5, "--batch-size-per-worker": 64,
        "--optimizer": "adam", "--lr": 3e-3, "--lr-warmup-steps": 0, "--discount": 0.97,
        "--buffer-size": 6400, "--learning-starts": 640, "--total-env-steps": 6400,
        "--train-steps-per-env-step": 0.25, "--reanalyze-fraction": 0.25,
        "--publish-interval": 10, "--target-update-interval": 50,
        "--eval-interval": 0, "--log-interval": 10**9, "--checkpoint-interval": 10**9,
        "--run-dir": str(tmp_path / "run"),
    }
    # Atari's recipe does not fit a 3x7 image with a 0.3 decoy: no pixel shifts, no reward clipping
    values = {**values, **overrides}
    return M.parse_args([str(x) for kv in values.items() for x in kv] + ["--no-augment", "--no-clip-rewards", *flags])


def test_corridor_env_contract():
    """The env itself: the decoy is one step away, the goal LENGTH - 2 steps the other way, the
    layout alternates, the cap truncates, and the vector env pickles (--save-buffer needs it)."""
    env = Corridor()
    obs, _ = env.reset(seed=1)
    assert obs.dtype == np.uint8 and obs.shape == (1, HEIGHT, WIDTH) and env.goal_right
    assert env.step(0)[1:3] == (DECOY, True)
    env.reset()
    assert not env.goal_right
    rewards = [env.step(0)[1] for _ in range(LENGTH - 2)]
    assert rewards == [0.0] * (LENGTH - 3) + [GOAL]
    env.reset(seed=0)
    for i in range(MAX_STEPS):
        _, _, terminal, truncated, _ = env.step(i % 2)
    assert not terminal and truncated
    envs = env_fn(2)
    obs, _ = envs.reset(seed=4)
    clone = pickle.loads(pickle.dumps(envs))
    assert obs.shape == (2, 1, HEIGHT, WIDTH)
    assert np.array_equal(clone.step(np.array([1, 0]))[0], envs.step(np.array([1, 0]))[0])


# The learning runs are most of the suite's time. Each is one process of one intra-op thread,
# and most other tests run one thread too, leaving a core idle: so the runs start with the
# session, as subprocesses at most two at a time and niced (the other tests keep the CPU they
# want), and each learning test waits only for its own run. One thread also means a seeded run
# follows the same trajectory on any CPU machine (a CPU kernel's numerics can depend on its
# thread count). The q_learning.py runs are defined with that script's tests, below.
LEARNING_RUNS = {  # name: (script, flags over corridor_args or q_corridor_args); longest first
    "q_search": ("q", "search"), "muzero": ("muzero", {}),
    "muzero_gumbel": ("muzero", {"--search": "gumbel", "--num-simulations": 4, "--eval-simulations": 4,
                                 "--total-env-steps": 4800}),
    "q_pure": ("q", "pure"), "q_c51": ("q", "c51"),
}
RUN_DEADLINE = 1500  # seconds a learning run may take, niced behind the other tests on a busy machine
WAIT_DEADLINE = TEST_DEADLINE - 60  # seconds a test waits for its run (inside its own deadline)


def learning_run(name, run_dir):
    """The body of one learning run's subprocess: train, then print the summary as JSON."""
    script, flags = LEARNING_RUNS[name]
    start = time.time()
    if script == "muzero":
        result = M.train(corridor_args(run_dir, 1, **flags), env_fn)
    else:
        args = q_corridor_args(run_dir, 1, flags)
        result = Q.train(args, big_env_fn)
    print("summary " + json.dumps({key: result[key] for key in ("eval_return", "env_steps", "updates")}
                                  | {"seconds": round(time.time() - start, 1)}), flush=True)


class LearningRuns:
    """Every LEARNING_RUNS run in its own niced subprocess, as many at a time as the machine has
    cores (two on CI), started and reaped by a thread. runs[name] waits for one run's summary
    ({"error": output} if it failed), with a deadline; stop() kills whatever still runs."""

    def __init__(self, base):
        self.base, self.pending, self.running, self.results = base, list(LEARNING_RUNS), {}, {}
        self.parallel, self.stopped = max(1, min(2, os.cpu_count() or 1)), False
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _start(self, name):
        run_dir = self.base / name
        run_dir.mkdir()
        log = open(run_dir / "output.txt", "w+")
        code = (f"import os, pathlib, test_smoke as t; os.nice(10); "
                f"t.learning_run({name!r}, pathlib.Path({str(run_dir)!r}))")
        process = subprocess.Popen([PYTHON, "-c", code], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=ENV,
                                   start_new_session=True)
        self.running[name] = process, log, time.monotonic()

    def _reap(self, name):
        process, log, started = self.running[name]
        late = time.monotonic() - started > RUN_DEADLINE
        if process.poll() is None and not late:
            return
        if late:
            kill_group(process)
        log.seek(0)
        output = log.read()
        log.close()
        found = re.search(r"^summary (\{.*\})$", output, re.M)
        self.results[name] = (json.loads(found.group(1)) if found else
                              {"error": f"did not end within {RUN_DEADLINE} s: {output[-3000:]}"} if late else
                              {"error": output[-3000:] or f"exit code {process.returncode}, no output"})
        del self.running[name]

    def _loop(self):
        while True:
            with self.lock:
                if self.stopped or not (self.pending or self.running):
                    return
                for name in list(self.running):
                    self._reap(name)
                while self.pending and len(self.running) < self.parallel:
                    self._start(self.pending.pop(0))
            time.sleep(0.2)

    def __getitem__(self, name):
        end = time.monotonic() + WAIT_DEADLINE
        while name not in self.results:
            assert self.thread.is_alive() or name in self.results, f"learning run {name} was never reaped"
            if time.monotonic() > end:
                pytest.fail(f"learning run {name} gave no result within {WAIT_DEADLINE} s")
            time.sleep(0.2)
        print(f"{name}: {self.results[name]}")
        return self.results[name]

    def stop(self):
        with self.lock:
            self.stopped = True
            for process, log, _ in self.running.values():
                kill_group(process)
                log.close()


@pytest.fixture(scope="session", autouse=True)
def learning_runs(request, tmp_path_factory):
    """Starts the learning runs with the session, if any selected test reads them."""
    if not any("learned" in item.fixturenames for item in request.session.items):
        yield None
        return
    runs = LearningRuns(tmp_path_factory.mktemp("learning"))
    yield runs
    runs.stop()


@pytest.fixture
def learned(learning_runs):
    """{name: summary} of the LEARNING_RUNS runs, each read when its test asks (see LearningRuns)."""
    return learning_runs


def test_zero_simulations_runs(tmp_path):
    """--num-simulations 0 and --eval-simulations 0 (act and evaluate from the policy head; no
    reanalyze) still run end to end on this env: every requested env step is taken, training
    starts once --learning-starts is reached, and the evaluation scores whole episodes."""
    args = corridor_args(tmp_path, seed=3, **{"--num-simulations": 0, "--eval-simulations": 0,
                                              "--total-env-steps": 960, "--train-steps-per-env-step": 0.05})
    result = M.train(args, env_fn)
    assert result["env_steps"] == 960
    # updates are credited from the step that reaches --learning-starts (640) to the end
    assert 0 < result["updates"] <= (960 - 640 + 32) * 0.05
    # each of the 8 evaluation episodes ends with return 0 (truncated), DECOY or GOAL
    episodes = args.eval_episodes
    possible = {round((g * GOAL + d * DECOY) / episodes, 6)
                for g in range(episodes + 1) for d in range(episodes + 1 - g)}
    assert round(result["eval_return"], 6) in possible

def test_local_target_net_runs(tmp_path, monkeypatch):
    """--no-search-value-targets --local-target-net end to end (which values it bootstraps from:
    test_train_step_bootstraps_from_the_values_its_flags_name). On the way: the importance
    exponent anneals from --priority-beta (0.4) toward 1 with the share of env steps done."""
    betas, real_sample = [], M.ReplayBuffer.sample

    def sample(self, batch_size, beta, generator=None):
        betas.append(beta)
        return real_sample(self, batch_size, beta, generator)

    monkeypatch.setattr(M.ReplayBuffer, "sample", sample)
    args = corridor_args(tmp_path, 3, "--no-search-value-targets", "--local-target-net",
                         **{"--total-env-steps": 960, "--train-steps-per-env-step": 0.05})
    result = M.train(args, env_fn)
    assert result["env_steps"] == 960 and result["updates"] == len(betas) > 0
    # updates start once 640 env steps are in and end at 960: beta goes from 0.4 + 0.6 * 640 / 960 to 1
    assert betas == sorted(betas)
    assert betas[0] == pytest.approx(0.4 + 0.6 * 640 / 960) and betas[-1] == pytest.approx(1.0)


def test_slow_runs_still_print_progress(tmp_path, monkeypatch, capsys):
    """With --log-interval out of reach, a line still comes once the last is `overdue` (a
    minute; here 0 s, so after every actor step and every update): the CPU at the default
    settings would otherwise stay silent for hours."""
    args = corridor_args(tmp_path, seed=3, **{"--total-env-steps": 800, "--train-steps-per-env-step": 0.05})
    monkeypatch.setattr(M.Progress.overdue, "__defaults__", (0.0,))
    result = M.train(args, env_fn)
    lines = [line for line in capsys.readouterr().out.splitlines() if re.match(r"env \d", line)]
    assert result["updates"] > 0 and len(lines) >= 800 // 32 + result["updates"]
    assert all(re.match(r"env [\d,]+ \| [\d,]+ env/s \| [\d.,]+k sims/s \| [\d.,]+ upd/s", line) for line in lines)


# ---------------------------------------------------------------------------------------------
# Runs: the command line, exact resume, failing safely, the process layout
# ---------------------------------------------------------------------------------------------
REPO = os.path.dirname(os.path.abspath(__file__))
PYTHON = sys.executable
# One torch thread per process: spinning OpenMP threads of several processes on 2 cores slow
# each other down tens of times.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# A network and search small enough for 2 CPU cores; everything else at its default.
TINY = ["--device", "cpu", "--num-envs", "2", "--channels", "8", "--reduced-channels", "4", "--head-hidden", "8",
        "--support-size", "10", "--proj-hidden", "16", "--proj-dim", "16", "--pred-hidden", "8",
        "--num-simulations", "2", "--eval-simulations", "2", "--eval-episodes", "1", "--batch-size-per-worker", "4",
        "--buffer-size", "200", "--learning-starts", "32", "--max-episode-frames", "400",
        "--train-episode-frames", "400", "--eval-interval", "0",
        "--log-interval", "40", "--reanalyze-fraction", "0.25"]


def run_to_end(argv, timeout=240):
    """subprocess.run(PYTHON + argv) with a deadline: past it the whole process group (a launcher
    and the workers it spawned) is killed and the test fails with what the process printed."""
    process = subprocess.Popen([PYTHON, *argv], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=ENV, start_new_session=True)  # its own group, killed whole at the deadline
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(process)
        stdout, stderr = process.communicate()
        pytest.fail(f"{shlex.join(argv[:3])} ... did not end within {timeout} s; it printed:\n{stdout[-3000:]}\n"
                    f"{stderr[-3000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def kill_group(process):
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_script(*flags, timeout=240):
    return run_to_end(["muzero_nce.py", *flags], timeout)


class Watched:
    """A script started in its own process group (as under a terminal), its output read line by
    line by a thread, so that every wait on it has a deadline. Past a deadline the whole group is
    killed and the test fails with what the process printed, however the timing fell."""

    def __init__(self, *argv):
        self.process = subprocess.Popen([PYTHON, *argv], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, env=ENV, start_new_session=True, preexec_fn=default_sigint)
        self.lines, self.queue, self.ended = [], queue.Queue(), False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            self.queue.put(line)
        self.queue.put(None)  # the output ended: every holder of the pipe is gone

    def wait_for(self, condition, deadline, what):
        """Read on until a line meets condition(line) (returned) or the output ends (None)."""
        end = time.monotonic() + deadline
        while not self.ended:
            try:
                line = self.queue.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                self.fail(f"no {what} within {deadline} s")
            if line is None:
                self.ended = True
                return None
            self.lines.append(line)
            if condition(line):
                return line
        return None

    def wait_for_progress(self, env_steps, deadline):
        """The first progress line that counts at least `env_steps` env steps and one update (the
        launcher prints the count it happens to read, which need not be a multiple of anything)."""
        return self.wait_for(lambda line: progress_counts(line) >= (env_steps, 1), deadline,
                             f"progress line with env >= {env_steps} and upd >= 1")

    def finish(self, deadline):
        """Wait for the exit and the end of the output; returns (exit code, the whole output)."""
        try:
            self.process.wait(timeout=deadline)
        except subprocess.TimeoutExpired:
            self.fail(f"the process did not exit within {deadline} s")
        self.wait_for(lambda line: False, 30, "end of output")  # workers that outlive it hold the pipe
        return self.process.returncode, "".join(self.lines)

    def fail(self, message):
        kill_group(self.process)
        pytest.fail(f"{message}; it printed:\n{''.join(self.lines)[-3000:]}")


def progress_counts(line):
    """(env steps, updates) of a progress line `env 48,000 | ... | upd 1,234 | ...`, else (-1, -1)."""
    found = re.match(r"env ([\d,]+) \|.* \| upd ([\d,]+) \|", line)
    return tuple(int(x.replace(",", "")) for x in found.groups()) if found else (-1, -1)


def scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    values = []
    for name in sorted(os.listdir(run_dir)):
        if name.startswith("events.out"):
            events = EventAccumulator(os.path.join(run_dir, name), size_guidance={"scalars": 0})
            events.Reload()
            if tag in events.Tags()["scalars"]:
                values += [(e.step, e.value) for e in events.Scalars(tag)]
    return sorted(values)


def test_cli_trains_logs_checkpoints_and_resumes(tmp_path):
    run = tmp_path / "run"
    done = run_script("--game", "ms_pacman", *TINY, "--total-env-steps", "80", "--run-dir", str(run))
    assert done.returncode == 0, done.stderr
    assert re.search(r"env 80 \| .* env/s \| .* sims/s \| .* upd/s", done.stdout)
    assert scalars(run, "losses/total") and scalars(run, "charts/eval_return")
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["counters"]["env_steps"] == 80 and state["updates"] == 80 - 32 + 2
    resumed = run_script("--resume", str(run / "checkpoint.pt"), "--total-env-steps", "120", "--run-dir", str(run))
    assert resumed.returncode == 0, resumed.stderr
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["counters"]["env_steps"] == 120
    assert state["args"]["channels"] == 8  # the saved flags came back
    # without --save-buffer the buffer warms up again (32 steps) before training resumes
    assert state["updates"] == 80 - 32 + 2 + (120 - (80 + 32) + 2)


def test_cli_grayscale_sticky_actions_and_no_unroll(tmp_path):
    """Flags no other run takes, in one single-process run: one-channel frames, sticky actions,
    and --jumps 0 (no dynamics and no NCE step to train)."""
    run = tmp_path / "run"
    done = run_script("--game", "ms_pacman", *TINY, "--grayscale", "--sticky-actions", "0.25", "--jumps", "0",
                      "--total-env-steps", "48", "--run-dir", str(run))
    assert done.returncode == 0, done.stderr
    assert "sticky 0.25" in done.stdout and "frames (1, 96, 96) x 4" in done.stdout
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["updates"] == 48 - 32 + 2
    assert state["net"]["representation.net.0.weight"].shape[1] == 4  # 4 stacked one-channel frames
    assert scalars(run, "losses/value") and not scalars(run, "nce/accuracy_step_1")


def test_same_seed_same_losses(tmp_path):
    losses = []
    for name in ("a", "b"):
        done = run_script(*TINY, "--total-env-steps", "80", "--log-interval", "2", "--run-dir", str(tmp_path / name))
        assert done.returncode == 0, done.stderr
        losses.append(scalars(tmp_path / name, "losses/total"))
    assert len(losses[0]) > 10 and losses[0] == losses[1]


@pytest.mark.parametrize("flags, message", [
    (["--game", "ms_pacmann"], r"unknown game 'ms_pacmann'; closest: ms_pacman"),
    (["--game", "MsPacman"], r"unknown game 'MsPacman'; closest: .*ms_pacman"),
    (["--num-envs", "0"], r"--num-envs: must be a positive integer, got 0"),
    (["--num-simulations", "-1"], r"--num-simulations: must be zero or a positive integer, got -1"),
    (["--search", "mcts"], r"--search: invalid choice: 'mcts'"),
    (["--nce-temperature", "0"], r"--nce-temperature: must be > 0, got 0"),
    (["--discount", "1.5"], r"--discount: must lie in \[0, 1\], got 1.5"),
    (["--precision", "fp16"], r"--precision: invalid choice: 'fp16' \(choose from 'fp32', 'bf16'\)"),
    (["--batch-size-per-worker", "500"], r"--batch-size-per-worker 500 is larger than --buffer-size 200"),
    (["--num-gpus", "4"], r"--num-gpus 4 but this machine has 0 GPU\(s\)"),
    (["--devices", "cpu,cuda:3,cpu"], r"--devices entry 'cuda:3' but this machine has 0 GPU\(s\)"),
    (["--devices", "cpu"], r"--devices lists 1 devices; it needs 1 actor \+ 1 reanalyze"),
    (["--resume", "no/such/checkpoint.pt"], r"--resume no/such/checkpoint.pt: no such checkpoint file"),
])
def test_bad_input_is_one_line_error(tmp_path, flags, message, capsys, monkeypatch):
    """Each bad value ends the run with one line, before anything starts. Two of them, an
    argparse error and one found at run time, run as a user's command (one line on stderr, a
    non-zero exit); the others call main() in this process, the same code without the seconds
    a fresh interpreter takes to import torch."""
    argv = [*TINY, "--total-env-steps", "80", "--run-dir", str(tmp_path / "run"), *flags]
    if flags[-1] in ("ms_pacmann", "fp16"):
        done = run_script(*argv, timeout=60)
        assert done.returncode != 0
        text = done.stderr
    else:
        monkeypatch.setattr(signal, "signal", lambda *_: None)  # main's SIGTERM handler is a run's, not pytest's
        precision = torch.get_float32_matmul_precision()
        try:
            with pytest.raises(SystemExit) as error:
                M.main(argv)
        finally:
            torch.set_float32_matmul_precision(precision)
        text = str(error.value) if error.value.code != 2 else capsys.readouterr().err
    lines = text.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), text
    assert not (tmp_path / "run").exists()  # nothing started


def test_more_trainers_than_gpus_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    args = M.parse_args(["--num-trainers", "3"])
    with pytest.raises(SystemExit, match=r"--num-trainers 3 needs one GPU each but GPUs 1..1 give 1"):
        M.plan_layout(args)
    layout = M.plan_layout(M.parse_args([]))  # 2 GPUs: search on 0, one trainer on 1
    assert (layout.actor, layout.trainers, layout.backend) == ("cuda:0", ["cuda:1"], "nccl")
    layout = M.plan_layout(M.parse_args(["--gpu-0-train"]))
    assert layout.trainers == ["cuda:0", "cuda:1"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    layout = M.plan_layout(M.parse_args([]))  # one GPU: everything shares it
    assert (layout.actor, layout.reanalyze, layout.trainers) == ("cuda:0", ["cuda:0"], ["cuda:0"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert M.plan_layout(M.parse_args([])) is None  # no GPU: the single process


def test_reanalyze_grows_with_the_gpus(monkeypatch):
    """By default every GPU of the run gets a reanalyze worker, GPU 0 (beside the actor) too, so
    reanalyze, most of an update's work, grows with the GPUs; --reanalyze-workers spreads a
    number of them over the GPUs by hand, and --devices places each one."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    layout = M.plan_layout(M.parse_args([]))
    assert (layout.actor, layout.trainers) == ("cuda:0", ["cuda:1", "cuda:2", "cuda:3"])
    assert layout.reanalyze == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert M.plan_layout(M.parse_args(["--reanalyze-workers", "6"])).reanalyze == [
        "cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0", "cuda:1"]
    layout = M.plan_layout(M.parse_args(["--num-gpus", "2", "--gpu-0-train"]))
    assert layout.trainers == ["cuda:0", "cuda:1"] and layout.reanalyze == ["cuda:0", "cuda:1"]
    layout = M.plan_layout(M.parse_args(["--devices", "cuda:0,cuda:1,cuda:2,cuda:1,cuda:2",
                                         "--reanalyze-workers", "2"]))
    assert (layout.actor, layout.reanalyze, layout.trainers) == ("cuda:0", ["cuda:1", "cuda:2"], ["cuda:1", "cuda:2"])


def test_import_does_not_initialise_cuda():
    code = "import torch, muzero_nce, q_learning; print(torch.cuda.is_initialized())"
    done = run_to_end(["-c", code], timeout=60)
    assert done.stdout.strip() == "False", done.stderr


# --- what tensorboard shows; evaluating and watching a checkpoint ---------------------------
# What a run's tensorboard must show: returns, throughput, every loss term, InfoNCE accuracy per
# unroll step, search statistics, the actor's weights staleness, the learning rate and the
# replay ratio actually held (TINY trains with --jumps 5).
STORY = ["charts/episode_return", "charts/eval_return", "charts/env_steps_per_s", "charts/sims_per_s",
         "charts/updates_per_s", "losses/value", "losses/policy", "losses/reward", "losses/nce", "losses/total",
         *[f"nce/accuracy_step_{k}" for k in range(1, 6)], "search/root_value", "search/visit_entropy",
         "charts/weights_staleness", "charts/learning_rate", "charts/replay_ratio"]


def events(run_dir):
    """Each event file of a run's own folder, loaded whole."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    for name in sorted(os.listdir(run_dir)):
        if name.startswith("events.out"):
            loaded = EventAccumulator(os.path.join(run_dir, name), size_guidance={"scalars": 0, "tensors": 0,
                                                                                   "images": 0})
            yield loaded.Reload()


def texts(run_dir, tag):
    from tensorboard.util.tensor_util import make_ndarray
    return [make_ndarray(e.tensor_proto).item().decode() for loaded in events(run_dir)
            if f"{tag}/text_summary" in loaded.Tags()["tensors"] for e in loaded.Tensors(f"{tag}/text_summary")]


def check_story(run, flags):
    """Every STORY tag is written, and the command and the flags are there as text."""
    written = {tag for loaded in events(run) for tag in loaded.Tags()["scalars"]}
    assert not [tag for tag in STORY if tag not in written], sorted(written)
    assert texts(run, "command") == ["python muzero_nce.py " + " ".join(flags)]
    table = texts(run, "args")[0]
    assert "|--channels|8|" in table and f"|--run-dir|{run}|" in table


# A single-process run whose training episodes end (a 40-frame cap) and whose replay ratio does
# not divide the credited env steps, so that the ratio held differs from the one asked for.
TINY_RUN = ["--game", "ms_pacman", *TINY, "--total-env-steps", "80", "--train-episode-frames", "40",
            "--train-steps-per-env-step", "0.25"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("tiny") / "run"
    done = run_script(*TINY_RUN, "--run-dir", str(run))
    assert done.returncode == 0, done.stderr
    return run


def test_tensorboard_tells_the_story(tiny_run):
    check_story(tiny_run, [*TINY_RUN, "--run-dir", str(tiny_run)])
    # training starts at env step 32 (--learning-starts) and earns 0.25 updates per env step from
    # the step that reached it: at env step 40 that is int(10 x 0.25) = 2 updates for 10 steps,
    # at 80 int(50 x 0.25) = 12 for 50
    assert scalars(tiny_run, "charts/replay_ratio") == [(40, pytest.approx(2 / 10)), (80, pytest.approx(12 / 50))]
    # nothing published yet (--publish-interval 100): the actor lags by every update
    assert scalars(tiny_run, "charts/weights_staleness") == [(40, 2), (80, 12)]


def test_evaluate_repeats_the_runs_last_evaluation(tiny_run):
    """--evaluate plays with the checkpoint's own protocol and seed, so the run's last
    evaluation comes back exactly; the protocol line, the statistics and the JSON beside it."""
    checkpoint = tiny_run / "checkpoint.pt"
    done = run_script("--evaluate", str(checkpoint))
    assert done.returncode == 0, done.stderr
    assert re.search(rf"evaluating {re.escape(str(checkpoint))} \(env step 80\) on cpu \| .*evaluation: 1 episodes, "
                     r"cap 400 frames, no life loss, 2 simulations", done.stdout), done.stdout
    result = json.loads((tiny_run / "checkpoint_eval.json").read_text())
    [(step, last_eval)] = scalars(tiny_run, "charts/eval_return")
    assert step == result["env_steps"] == 80 and result["returns"] == [pytest.approx(last_eval)]
    assert (result["mean"], result["std"], result["min"], result["max"]) == (last_eval, 0.0, last_eval, last_eval)
    assert f"return over 1 episodes: mean {last_eval:,.1f} | std 0.0 | min {last_eval:,.1f}" in done.stdout
    assert scalars(tiny_run / "evaluate", "charts/eval_return") == [(80, pytest.approx(last_eval))]


def test_evaluate_bad_checkpoints_are_one_line_errors(tmp_path, capsys):
    missing = str(tmp_path / "none.pt")
    assert one_line_exit(["--evaluate", missing]).endswith(f"--evaluate {missing}: no such checkpoint file")
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    assert "cannot read the checkpoint" in one_line_exit(["--evaluate", str(tmp_path / "text.pt")])
    good = str(fake_checkpoint(tmp_path / "good.pt"))  # the keys of a checkpoint, but no weights
    assert "--channels=8, which cannot change to evaluate it" in one_line_exit(["--evaluate", good, "--channels", "16"])
    with pytest.raises(SystemExit) as error:
        M.main(["--evaluate", good])
    message = str(error.value.code)
    assert "\n" not in message and re.match(rf"muzero_nce.py: error: --evaluate {re.escape(good)}: the saved weights "
                                            r"do not fit the network its flags describe \(.*Missing key", message)
    # a checkpoint of a resumed run keeps that run's --resume, which is not this command's
    resumed = str(fake_checkpoint(tmp_path / "resumed.pt", resume="earlier.pt"))
    assert M.parse_args(["--evaluate", resumed]).resume is None
    with pytest.raises(SystemExit):
        M.parse_args(["--evaluate", good, "--resume", good])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "argument --resume: not allowed with argument --evaluate" in lines[0]


def test_capture_video_needs_imageio(monkeypatch):
    """CI has no video library: the flag is refused at once, naming what to install (here
    imageio is hidden, so the test holds where it is installed too)."""
    monkeypatch.setitem(sys.modules, "imageio", None)
    message = one_line_exit([*TINY, "--capture-video"])
    assert message.endswith("--capture-video needs imageio and imageio-ffmpeg, which are not installed: "
                            "pip install imageio imageio-ffmpeg")


def stub_imageio(monkeypatch):
    """A stand-in for imageio (CI has none) that records what it is asked to write, so the
    recording path runs without the library. Returns the list of (uri, frames, options)."""
    written = []

    def imwrite(uri, image, **options):
        written.append((uri, np.array(image), options))
        if uri == "<bytes>":
            return b"GIF89a stub"
        with open(uri, "wb") as f:
            f.write(b"stub mp4")

    v3 = types.ModuleType("imageio.v3")
    v3.imwrite = imwrite
    package = types.ModuleType("imageio")
    package.v3 = v3
    for name, module in [("imageio", package), ("imageio.v3", v3), ("imageio_ffmpeg", types.ModuleType("x"))]:
        monkeypatch.setitem(sys.modules, name, module)
    return written


def spying(env_fn, seen):
    """env_fn whose envs also hand every observation of env 0 they return to the list `seen`."""
    def make(num_envs):
        envs = env_fn(num_envs)
        reset, step = envs.reset, envs.step

        def spy_reset(**options):
            obs, info = reset(**options)
            seen.append(np.array(obs[0]))
            return obs, info

        def spy_step(action):
            out = step(action)
            seen.append(np.array(out[0][0]))
            return out

        envs.reset, envs.step = spy_reset, spy_step
        return envs
    return make


def test_video_shows_what_the_agent_sees(tiny_run, tmp_path, monkeypatch):
    """The video of an Atari evaluation (one episode here) is the newest frame of each of the
    agent's observations, [96, 96, 3], from the reset to the episode's last. (And the weights
    scored are the learner's final ones, not the acting copy, which may lag: here it is gone.)"""
    written = stub_imageio(monkeypatch)
    state = torch.load(tiny_run / "checkpoint.pt", weights_only=False)
    torch.save({**state, "acting": {}}, tmp_path / "checkpoint.pt")
    args = M.parse_args(["--evaluate", str(tmp_path / "checkpoint.pt"), "--capture-video"])
    seen = []
    M.evaluate_checkpoint(args, spying(M.make_atari_env_fn(args, evaluation=True), seen))
    (mp4, frames, _), _ = written
    assert mp4 == str(tmp_path / "evaluate" / "videos" / "eval_80.mp4")
    assert frames.shape == (len(seen), 96, 96, 3) and np.array_equal(frames, np.stack([obs[-1] for obs in seen]))


def corridor_walk(frames):
    """Replay a Corridor episode from its frames [T, HEIGHT, WIDTH]: the return it earned, after
    checking that it starts at the start cell and moves one cell per step."""
    goal_right = frames[0][1, LENGTH - 1] == 128
    cells = [int(np.flatnonzero(frame[0 if goal_right else 2] == 255)[0]) for frame in frames]
    assert cells[0] == (1 if goal_right else LENGTH - 2)
    assert all(abs(b - a) == 1 for a, b in zip(cells, cells[1:]))
    goal, decoy = (LENGTH - 1, 0) if goal_right else (0, LENGTH - 1)
    if len(cells) == MAX_STEPS + 1 and cells[-1] not in (goal, decoy):
        return 0.0  # truncated
    assert cells[-1] in (goal, decoy) and all(c not in (goal, decoy) for c in cells[:-1])
    return GOAL if cells[-1] == goal else DECOY


def test_capture_video_records_the_first_evaluation_episode(tmp_path, monkeypatch):
    """Training with --capture-video writes the first evaluation episode as an MP4 under the run
    directory and as a GIF into tensorboard; --evaluate on the checkpoint records the same
    episode again (same weights and seed), and its JSON holds the statistics of the returns."""
    written = stub_imageio(monkeypatch)
    args = corridor_args(tmp_path, seed=3, **{"--total-env-steps": 64, "--num-simulations": 2})
    args.capture_video = True
    result = M.train(args, env_fn)
    run = tmp_path / "run"
    (mp4, frames, options), (gif_uri, gif_frames, _) = written
    assert mp4 == str(run / "videos" / "eval_64.mp4") and options["fps"] == M.VIDEO_FPS and gif_uri == "<bytes>"
    assert frames.dtype == np.uint8 and frames.shape[1:] == (HEIGHT, WIDTH, 3) and np.array_equal(frames, gif_frames)
    assert (frames == frames[..., :1]).all()  # grey frames shown as RGB
    [image] = [image for loaded in events(run) if "eval/video" in loaded.Tags()["images"]
               for image in loaded.Images("eval/video")]
    assert (image.step, image.width, image.height, image.encoded_image_string) == (64, WIDTH, HEIGHT, b"GIF89a stub")

    evaluated = M.evaluate_checkpoint(M.parse_args(["--evaluate", str(run / "checkpoint.pt")]), env_fn)
    assert evaluated == json.loads((run / "checkpoint_eval.json").read_text())
    returns = np.array(evaluated["returns"])
    assert len(returns) == 8 and returns.mean() == pytest.approx(result["eval_return"])
    assert [evaluated[k] for k in ("mean", "std", "min", "max")] == pytest.approx(
        [returns.mean(), returns.std(), returns.min(), returns.max()])
    again, again_frames, _ = written[2]
    assert again == str(run / "evaluate" / "videos" / "eval_64.mp4") and np.array_equal(again_frames, frames)
    assert corridor_walk(frames[..., 0]) == returns[0]  # the video is the first episode, whole
    # flags given with --evaluate override the checkpoint's
    fewer = M.evaluate_checkpoint(M.parse_args(["--evaluate", str(run / "checkpoint.pt"), "--eval-episodes", "3",
                                                "--no-capture-video"]), env_fn)
    assert len(fewer["returns"]) == 3 and len(written) == 4


# --- the process layout ---------------------------------------------------------------------
LAYOUT = [*TINY, "--devices", "cpu,cpu,cpu,cpu"]  # actor, one reanalyze worker, two gloo trainers


def adam_steps(state):
    """Optimiser steps the checkpoint's Adam state counts (the same for every parameter)."""
    steps = {float(p["step"]) for p in state["optimizer"]["state"].values()}
    assert len(steps) == 1
    return int(steps.pop())


def test_layout_runs_and_resumes(tmp_path):
    """Two gloo trainers and two reanalyze workers: both trainers end with the same weights; the
    replay ratio holds across processes and counts batches, so one optimiser step of the two
    trainers counts two updates (the same sequences per env step as one trainer); the workers
    refreshed the trainers' batches, each worker's count adding up to the total; a resume with
    the buffer picks up every counter, the reanalysed sequences included, and trains on at once."""
    run = tmp_path / "run"
    flags = [*TINY, "--devices", "cpu,cpu,cpu,cpu,cpu", "--reanalyze-workers", "2", "--total-env-steps", "80",
             "--save-buffer", "--optimizer", "adam", "--run-dir", str(run),
             "--train-episode-frames", "40"]  # training episodes end, so their returns are logged
    done = run_script(*flags)
    assert done.returncode == 0, done.stderr
    check_story(run, flags)
    ratios = scalars(run, "charts/replay_ratio")  # trainers may lag the actor, never lead it
    assert all(0 <= ratio <= 1 + 1e-6 for _, ratio in ratios) and ratios[-1] == (80, 1.0)
    assert "reanalyze ['cpu', 'cpu'], trainers ['cpu', 'cpu'] (gloo)" in done.stdout
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    checksums = state["counters"]["replica_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]  # both trainers ended with the same weights
    own = sum(float(p.double().sum()) for name, p in state["net"].items() if "running" not in name
              and "num_batches" not in name)
    assert abs(own - checksums[0]) < 1e-6 * max(1.0, abs(own))
    assert state["counters"]["env_steps"] == 80 and int(state["buffer"]["counters"][0]) * 2 == 80
    assert state["updates"] == 80 - 32 + 2 == 2 * adam_steps(state)  # 50 batches in 25 steps of 2 trainers
    reanalyzed = state["counters"]["reanalyzed_sequences"]
    # each trained batch of 4 had its first 1 (--reanalyze-fraction 0.25) reanalysed; a few more were sampled
    # ahead: each trainer holds 1 + 2 workers / 2 trainers = 2 batches
    assert 50 <= reanalyzed <= 50 + 2 * 2 and int(state["buffer"]["reanalyzed"].sum()) > 0
    per_worker = re.search(r"reanalysed sequences per worker: ([\d,]+) \(cpu\), ([\d,]+) \(cpu\)$", done.stdout, re.M)
    assert per_worker and sum(int(n.replace(",", "")) for n in per_worker.groups()) == reanalyzed, done.stdout
    last_row = 80 // 2 - 1  # of each env's 100 rows; ALE's envs cannot be saved, so the resume cuts their episodes
    running = ~(state["buffer"]["terminal"][last_row] | state["buffer"]["truncated"][last_row])

    resumed = run_script("--resume", str(run / "checkpoint.pt"), "--total-env-steps", "120", "--run-dir", str(run),
                         timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["counters"]["env_steps"] == 120 and state["args"]["devices"] == "cpu,cpu,cpu,cpu,cpu"
    assert state["updates"] == 120 - 32 + 2 == 2 * adam_steps(state)  # the saved buffer: no warm-up again
    assert state["counters"]["reanalyzed_sequences"] >= reanalyzed + 40
    assert state["buffer"]["truncated"][last_row][running].all() and running.any()


def test_torchrun_two_nodes(tmp_path):
    """Two nodes of one trainer each, joined by torchrun, without NCE: DDP must not wait for
    gradients of NCE heads that no longer exist (it would stop at the second update)."""
    port = str(29500 + os.getpid() % 1000)
    flags = [*TINY, "--devices", "cpu,cpu,cpu", "--no-nce", "--total-env-steps", "80",
             "--run-dir", str(tmp_path / "run")]
    nodes = [Watched("-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank),
                     "--master-addr", "127.0.0.1", "--master-port", port, "muzero_nce.py", *flags) for rank in (0, 1)]
    try:
        codes, outputs = zip(*[node.finish(240 if rank == 0 else 60) for rank, node in enumerate(nodes)])
    finally:  # a node that failed its deadline took only its own group down
        for node in nodes:
            kill_group(node.process)
    assert codes == (0, 0), outputs
    assert "node 1/2" in outputs[0] and "node 2/2" in outputs[1]
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    checksums = state["counters"]["replica_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    assert state["updates"] > 2 and not [name for name in state["net"] if name.startswith("projection")]


def default_sigint():
    """In the child before exec: SIGINT back to its default. A shell that starts the tests in the
    background (`pytest ... &`) ignores SIGINT, the child would inherit that, and Python then
    installs no KeyboardInterrupt handler: the Ctrl-C tests would test the shell, not the script."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_layout(tmp_path, *flags):
    """The layout on its way to 100,000 env steps, once training is under way."""
    run = Watched("muzero_nce.py", *LAYOUT, "--total-env-steps", "100000", "--run-dir", str(tmp_path / "run"), *flags)
    started = run.wait_for(lambda line: line.startswith("started"), 120, "'started' line")
    pids = {name: int(pid) for name, pid in re.findall(r"(\w+ \d) \(pid (\d+)\)", started or "")}
    assert len(pids) == 4, "".join(run.lines)
    run.wait_for_progress(80, 240)  # None if the run ended first: the test's own checks say why
    return run, pids


def alive(pid):
    try:
        with open(f"/proc/{pid}/status") as status:
            return "zombie" not in status.read()
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("how", ["kill", "raise"])
def test_failed_trainer_brings_the_run_down(tmp_path, how):
    flags = ["--fault-after", "60"] if how == "raise" else []
    run, pids = start_layout(tmp_path, *flags)
    start = time.time()
    if how == "kill":
        os.kill(pids["trainer 1"], signal.SIGKILL)
    code, output = run.finish(60)
    assert code != 0 and time.time() - start < 30, output
    if how == "kill":
        assert "trainer 1 died (killed by signal 9)" in output
    else:
        assert "error in trainer 1:" in output and "RuntimeError: fault injected" in output
    time.sleep(0.5)
    assert not [name for name, pid in pids.items() if alive(pid)]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigint_stops_everything_and_checkpoints(tmp_path, sig):
    run, pids = start_layout(tmp_path)
    start = time.time()
    os.killpg(run.process.pid, sig)  # to the whole group, as a terminal's Ctrl-C or a scheduler does
    code, output = run.finish(90)
    assert code == 130 and time.time() - start < 30, output
    assert "interrupted: stopping all processes and saving a checkpoint" in output
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert state["updates"] > 0
    time.sleep(0.5)
    assert not [name for name, pid in pids.items() if alive(pid)]


# --- exact resume ---------------------------------------------------------------------------
def test_resume_repeats_an_uninterrupted_run(tmp_path):
    """2N updates straight vs N, a checkpoint with --save-buffer, a new process, N more: the
    same parameters, bit for bit (CPU, picklable envs)."""
    flags = ["--device", "cpu", "--seed", "3", "--num-envs", "4", "--channels", "8", "--reduced-channels", "4",
             "--head-hidden", "8", "--support-size", "5", "--proj-hidden", "16", "--proj-dim", "16",
             "--pred-hidden", "8", "--num-simulations", "4", "--eval-simulations", "2", "--eval-episodes", "2",
             "--batch-size-per-worker", "8", "--buffer-size", "200", "--learning-starts", "64", "--jumps", "3", "--td-steps", "2",
             "--total-env-steps", "160", "--checkpoint-interval", "96", "--eval-interval", "0",
             "--reanalyze-fraction", "0.5", "--publish-interval", "7", "--target-update-interval", "5",
             "--save-buffer", "--keep-checkpoints"]
    code = "import sys, test_smoke as t; t.M.train(t.M.parse_args(sys.argv[1:]), t.env_fn)"
    run = lambda *extra: run_to_end(["-c", code, *flags, *extra], timeout=240)
    straight = run("--run-dir", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr
    middle = tmp_path / "straight" / "checkpoint_96.pt"
    resumed = run("--resume", str(middle), "--run-dir", str(tmp_path / "resumed"))
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert 0 < torch.load(middle, weights_only=False)["updates"] < a["updates"] == b["updates"]
    for name in a["net"]:
        assert torch.equal(a["net"][name], b["net"][name]), name
    assert torch.equal(a["buffer"]["priority"], b["buffer"]["priority"])


# --- failing safely -------------------------------------------------------------------------
def test_non_finite_loss_names_the_update_and_term(tmp_path, monkeypatch):
    """NaN rewards make the value and reward losses NaN: the update raises with the step and the
    term before touching the weights; main turns it into a one-line exit; the checkpoint
    written before is untouched and loadable."""
    args = M.parse_args(["--device", "cpu", "--num-envs", "4", "--channels", "8", "--support-size", "5",
                                  "--proj-hidden", "16", "--proj-dim", "16", "--pred-hidden", "8", "--num-simulations",
                                  "2", "--batch-size-per-worker", "8", "--buffer-size", "400", "--learning-starts", "64",
                                  "--jumps", "3", "--td-steps", "2", "--total-env-steps", "96", "--checkpoint-interval",
                                  "64", "--eval-interval", "0", "--eval-episodes", "1", "--run-dir", str(tmp_path)])
    real_add = M.ReplayBuffer.add

    def add(self, frame, reward, *rest):  # from env step 80 on, rewards are NaN
        return real_add(self, frame, reward * math.nan if self.steps * 4 >= 80 else reward, *rest)

    monkeypatch.setattr(M.ReplayBuffer, "add", add)
    before = None
    with pytest.raises(M.NonFiniteError, match=r"non-finite loss at update \d+ \(total=nan, .*(value|reward)=nan"):
        try:
            M.train(args, env_fn)
        finally:
            before = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert before["counters"]["env_steps"] == 64 and before["updates"] > 0
    monkeypatch.setattr(M, "train", lambda args: (_ for _ in ()).throw(M.NonFiniteError("boom at update 3")))
    with pytest.raises(SystemExit, match=r"^muzero_nce.py: error: boom at update 3; the last checkpoint is untouched$"):
        M.main(["--device", "cpu"])


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    M.save_checkpoint(str(path), {"updates": 1})
    real_save = torch.save

    def crash(obj, f):  # dies half-way through writing
        real_save({"partial": True}, f)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        M.save_checkpoint(str(path), {"updates": 2})
    assert torch.load(path, weights_only=False) == {"updates": 1}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigint_in_the_single_process_checkpoints(tmp_path, sig):
    run = Watched("muzero_nce.py", *TINY, "--total-env-steps", "100000", "--run-dir", str(tmp_path / "run"))
    assert run.wait_for_progress(80, 240), "".join(run.lines)
    run.process.send_signal(sig)
    code, output = run.finish(60)
    assert code == 130 and "interrupted: checkpoint saved" in output, output
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["counters"]["env_steps"] >= 80


# ---------------------------------------------------------------------------------------------
# EfficientZero's Atari-100k recipe, checkpoints that fail in one line
# ---------------------------------------------------------------------------------------------
def test_defaults_are_efficientzeros_recipe():
    args = M.parse_args([])
    assert args.discount == pytest.approx(0.997 ** 4)  # 0.997 per frame, 4 frames per agent step
    assert (args.train_episode_frames, args.max_episode_frames) == (12_000, 108_000)
    assert args.episodic_life and args.clip_rewards and args.augment
    assert (args.min_q_span, args.auto_td_steps_ratio, args.td_steps) == (0.01, 0.3, 5)
    assert (args.optimizer, args.lr) == ("sgd", 0.2)
    assert M.parse_args(["--optimizer", "adam"]).lr == 3e-4  # SGD's 0.2 would wreck Adam
    assert M.parse_args(["--optimizer", "adam", "--lr", "1e-3"]).lr == 1e-3


def test_training_and_evaluation_envs_cap_episodes_differently():
    args = M.parse_args(["--game", "breakout", "--train-episode-frames", "40", "--noop-max", "0"])
    train_envs, eval_envs = M.make_atari_env_fn(args)(1), M.make_atari_env_fn(args, evaluation=True)(1)
    try:
        for envs in (train_envs, eval_envs):
            envs.reset(seed=0)
        cut = [bool(train_envs.step(np.zeros(1, np.int64))[3][0]) for _ in range(10)]
        assert cut == [False] * 9 + [True]  # 40 frames = 10 agent steps
        assert not any(eval_envs.step(np.zeros(1, np.int64))[3][0] for _ in range(12))
    finally:
        train_envs.close(), eval_envs.close()


def test_network_starts_with_uniform_policy_and_zero_values():
    args = M.parse_args(["--channels", "8", "--support-size", "10", "--proj-hidden", "16", "--proj-dim", "16",
                         "--pred-hidden", "8"])
    net = M.MuZeroNet((1, 5, 5), 2, 4, args).eval()
    obs = torch.randint(0, 256, (3, 2, 5, 5), dtype=torch.uint8)
    latent, policy, value = net.initial_inference(obs)
    assert torch.equal(policy, torch.zeros(3, 4))  # EfficientZero's init_zero: a uniform prior
    assert torch.equal(M.support_to_scalar(value, 10), torch.zeros(3))
    _, reward, policy, value = net.recurrent_inference(latent, torch.tensor([0, 1, 3]))
    assert torch.equal(policy, torch.zeros(3, 4)) and torch.equal(M.support_to_scalar(reward, 10), torch.zeros(3))


def test_support_to_scalar_keeps_the_sign_near_zero():
    """In float32 the 601-atom expectation and h^-1's cancellation err by ~1e-5: small values
    came back with the wrong sign. Decoding in float64 keeps them."""
    x = torch.tensor([1e-5, -1e-5, 4e-5, -4e-5, 3e-4, -3e-4, 1e-3, -1e-3, 0.0])
    back = M.support_to_scalar(torch.log(M.scalar_to_support(x, 300)), 300)
    assert torch.equal(torch.sign(back), torch.sign(x))
    torch.testing.assert_close(back, x, rtol=1e-3, atol=1e-7)


def shifted_reference(image, dy, dx):
    """image [..., H, W] shifted by (dy, dx) with edge replication: out[i, j] = in[clip(i+dy), clip(j+dx)]."""
    H, W = image.shape[-2:]
    out = np.empty_like(image)
    for i in range(H):
        for j in range(W):
            out[..., i, j] = image[..., min(max(i + dy, 0), H - 1), min(max(j + dx, 0), W - 1)]
    return out


def test_augment_shifts_and_scales_each_sample_as_one():
    """Each sample: one shift in [-4, 4]^2 with replicated edges and one brightness factor in
    1 +- 0.1, the same for all its positions and channels (the NCE targets stay aligned with the
    unrolled steps); samples differ; the input is untouched."""
    g = torch.Generator().manual_seed(0)
    B, P, C, H, W = 64, 3, 2, 7, 9
    obs = torch.randint(1, 256, (B, P, C, H, W), dtype=torch.uint8, generator=g)
    before = obs.clone()
    out = M.augment(obs, torch.Generator().manual_seed(1))
    assert torch.equal(obs, before) and out.dtype == torch.float32 and out.shape == obs.shape
    offsets, factors = set(), []
    for b in range(B):
        matches = []
        for dy in range(-4, 5):
            for dx in range(-4, 5):
                ref = torch.from_numpy(shifted_reference(obs[b].numpy(), dy, dx)).float()
                factor = float(out[b].sum() / ref.sum())
                if torch.allclose(out[b], ref * factor, rtol=1e-5, atol=1e-3):
                    matches.append((dy, dx, factor))
        assert len(matches) >= 1, f"sample {b} is no single shift and scale of its input"
        dy, dx, factor = matches[0]
        offsets.add((dy, dx))
        factors.append(factor)
    assert all(0.9 - 1e-6 <= f <= 1.1 + 1e-6 for f in factors) and len(set(round(f, 6) for f in factors)) > B // 2
    assert len(offsets) > 20 and {dy for dy, _ in offsets} == set(range(-4, 5))
    assert torch.equal(M.augment(obs, torch.Generator().manual_seed(1)), out)  # seeded: reproducible


def test_td_steps_shrink_with_age():
    """EfficientZero's n = clip(5 - age // (0.3 x total env steps), 1, 5), age in env steps over all envs."""
    args = M.parse_args(["--num-envs", "4", "--total-env-steps", "1000", "--learning-starts", "400"])
    steps = 1000  # the buffer has written rows 0..999 of each env
    ages = torch.tensor([0, 296, 300, 596, 600, 1196, 1200, 5000])  # env steps (4 per row); 300 per step of n
    time = steps - 1 - ages // 4
    assert M.td_steps_by_age(args, time, steps).tolist() == [5, 5, 4, 4, 3, 2, 1, 1]
    args.auto_td_steps_ratio = 0.0
    assert M.td_steps_by_age(args, time, steps).tolist() == [5] * 8


def test_n_step_targets_with_a_horizon_per_sample():
    """Sample b's own n_b <= the window's n: the same targets as a window of n_b (hand computed)."""
    S, K, n, d, A = 2, 2, 4, 0.8, 2
    o, W = S - 1, S - 1 + K + n + 1
    g = torch.Generator().manual_seed(3)
    B = 24
    reward = torch.randint(1, 9, (B, W), generator=g).float()
    root_value = torch.randn(B, W, generator=g) * 10
    terminal = torch.rand(B, W, generator=g) < 0.1
    truncated = (torch.rand(B, W, generator=g) < 0.1) & ~terminal
    td = torch.randint(1, n + 1, (B,), generator=g)
    seq = M.Sequences(frames=torch.zeros(B, W, 1, 1, 1, dtype=torch.uint8), action=torch.zeros(B, W, dtype=torch.long),
                      reward=reward, terminal=terminal, truncated=truncated, episode_step=torch.arange(W).repeat(B, 1),
                      policy=torch.full((B, W, A), 0.5), root_value=root_value, network_value=torch.zeros(B, W))
    targets = M.n_step_targets(seq, root_value[:, o:], K, td, d, S)
    assert len(set(td.tolist())) == n
    for b in range(B):
        rows = slice(o, o + K + int(td[b]) + 1)  # the window sample b would have with its own n
        z, vmask, pmask, r, rmask, nmask = hand_targets(reward[b, rows].tolist(), root_value[b, rows].tolist(),
                                                        terminal[b, rows].tolist(), truncated[b, rows].tolist(),
                                                        K, int(td[b]), d)
        assert targets.value_mask[b].tolist() == vmask and targets.policy_mask[b].tolist() == pmask
        for k in range(K + 1):
            if vmask[k]:
                assert float(targets.value[b, k]) == pytest.approx(z[k], rel=1e-5, abs=1e-4), (b, k)


def fake_checkpoint(path, **changes):
    """A checkpoint dict with the keys a real one has and the TINY run's flags."""
    args = vars(M.parse_args(TINY))
    args.update(changes)
    state = {"args": args, "net": {}, "target": {}, "optimizer": {}, "updates": 0, "acting": {}, "counters": {}}
    torch.save(state, path)
    return path


def one_line_exit(argv):
    with pytest.raises(SystemExit) as error:
        M.parse_args(argv)
    message = str(error.value.code)
    assert "\n" not in message and message.startswith("muzero_nce.py: error: ")
    return message


def test_bad_checkpoints_are_one_line_errors(tmp_path):
    good = fake_checkpoint(tmp_path / "good.pt")
    data = good.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[:len(data) // 2])
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    torch.save({"net": {}, "updates": 3}, tmp_path / "partial.pt")
    for name, pattern in [("truncated.pt", r"cannot read the checkpoint \(truncated or not a checkpoint"),
                          ("text.pt", r"cannot read the checkpoint"),
                          ("list.pt", r"not a checkpoint of this script \(no args, net"),
                          ("partial.pt", r"not a checkpoint of this script \(no args, target, optimizer, acting")]:
        path = str(tmp_path / name)
        assert re.search(rf"--resume {re.escape(path)}: {pattern}", one_line_exit(["--resume", path])), name
    # flags that shape the checkpoint cannot change; others can
    message = one_line_exit(["--resume", str(good), "--channels", "16"])
    assert re.search(r"saved with --channels=8, which cannot change on resume \(given --channels=16\)", message)
    assert "--game" in message and "--support-size" in message
    assert "--game=ms_pacman" in one_line_exit(["--resume", str(good), "--game", "breakout"])
    assert M.parse_args(["--resume", str(good), "--total-env-steps", "500"]).total_env_steps == 500
    with_buffer = fake_checkpoint(tmp_path / "buffer.pt")
    state = torch.load(with_buffer, weights_only=False)
    torch.save({**state, "buffer": {}}, with_buffer)
    assert "saved with --buffer-size=200" in one_line_exit(["--resume", str(with_buffer), "--buffer-size", "400"])
    assert M.parse_args(["--resume", str(good), "--buffer-size", "400"]).buffer_size == 400  # no buffer saved: free
    # flags that did not exist when the checkpoint was written take their defaults
    old = fake_checkpoint(tmp_path / "old.pt")
    state = torch.load(old, weights_only=False)
    del state["args"]["augment"], state["args"]["min_q_span"]
    torch.save(state, old)
    args = M.parse_args(["--resume", str(old)])
    assert args.augment and args.min_q_span == 0.01 and args.channels == 8


# =============================================================================================
# q_learning.py: Q-learning, pure, with a search over a learned model, and C51
# =============================================================================================
# The same order: the Q search against a plain recursive reference, then the targets (double
# n-step, C51 projection) against hand computations, learning on the corridor in each mode,
# the original's three commands, and the shared-source check between the two scripts.

# ---- the Q search: a plain recursive reference ------------------------------------------------
class QRefNode:
    """One node of the reference: for each action the sum and count of the samples of Q(s, a)
    (the network's Q is the first), the reward once expanded, and the child."""

    def __init__(self, state, q):
        self.state, self.q_sum, self.count = state, list(q), [1] * len(q)
        self.reward, self.children = [0.0] * len(q), {}


def reference_q_search(model, state, sims, discount, c1, min_span):
    """One tree, Python floats, recursion: UCB1 over Q-vector nodes, a leaf valued by max Q, each
    edge on the path gets r + discount * G as a further sample. The model's `logits` table is
    its Q. Min-max normalisation is q_normaliser's (a black box here) over every Q of the tree."""
    root = QRefNode(state, model.logits[state].double().tolist())
    bounds = [min(root.q_sum), max(root.q_sum)]

    def widen(*values):
        bounds[0], bounds[1] = min(bounds[0], *values), max(bounds[1], *values)

    def normalised(x):
        scale, shift = Q.q_normaliser(torch.tensor([bounds], dtype=torch.float64), min_span)
        return x * float(scale) + float(shift)

    def simulate(node):
        """Descend from `node`, expand, and return the return G seen from it."""
        total = sum(node.count)
        scores = [normalised(node.q_sum[a] / node.count[a]) + c1 * math.sqrt(math.log(total) / node.count[a])
                  for a in range(len(node.count))]
        a = scores.index(max(scores))  # ties: the lowest action index
        if a in node.children:
            g = node.reward[a] + discount * simulate(node.children[a])
        else:
            reward, nxt = float(model.reward[node.state, a]), int(model.next[node.state, a])
            child = node.children[a] = QRefNode(nxt, model.logits[nxt].double().tolist())
            node.reward[a] = reward
            widen(*child.q_sum)
            g = reward + discount * max(child.q_sum)
        node.q_sum[a] += g
        node.count[a] += 1
        widen(node.q_sum[a] / node.count[a])
        return g

    for _ in range(sims):
        simulate(root)
    return [c - 1 for c in root.count], [s / c for s, c in zip(root.q_sum, root.count)]


def q_table_fn(model):
    """A TableModel as the Q search's model: (reward, Q vector of the next state, next state)."""
    def recurrent_fn(emb, action):
        model.calls += 1
        n = model.next[emb, action]
        return model.reward[emb, action], model.logits[n], n
    return recurrent_fn


def run_table_q_search(model, roots, sims, **kw):
    return Q.q_search(model.logits[roots], roots, q_table_fn(model), sims, **kw)


@pytest.mark.parametrize("kind", ["random", "flat", "zero", "equal", "tiny"])
@pytest.mark.parametrize("sims", [1, 6, 40])
def test_q_search_matches_reference(kind, sims):
    for batch, discount, c1, min_span in ((1, 0.9, 0.25, 0.01), (5, 0.997, 1.0, 0.0), (8, 1.0, 0.0, 0.5)):
        model = TableModel(40, 4, seed=batch * 100 + sims, kind=kind)
        roots = roots_for(model, batch, sims)
        out = run_table_q_search(model, roots, sims, discount=discount, c1=c1, min_q_span=min_span)
        assert model.calls == sims  # one batched model call per simulation
        for b in range(batch):
            counts, q = reference_q_search(model, int(roots[b]), sims, discount, c1, min_span)
            assert out.visit_counts[b].long().tolist() == counts, (kind, batch, b)
            torch.testing.assert_close(out.q_values[b].double(), torch.tensor(q, dtype=torch.float64),
                                       rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.root_value, out.q_values.amax(-1))
        assert torch.equal(out.action, out.q_values.argmax(-1))  # epsilon 0: argmax of the root's Q
        torch.testing.assert_close(out.policy, out.visit_counts / sims)


def test_q_search_by_hand():
    """Two simulations on a two-action tree, c1 = 0 (greedy), worked out by hand. The root's
    edge backs up the reward of its own transition (the original read it from the wrong row)."""
    d = 0.9
    root_q = torch.tensor([[0.0, 1.0]])
    children = {(0, 1): (0.5, [2.0, 3.0], 1), (1, 1): (-1.0, [4.0, 0.0], 2)}  # (state, action): reward, Q, next

    def recurrent_fn(emb, action):
        reward, q, nxt = children[int(emb[0]), int(action[0])]
        return torch.tensor([reward]), torch.tensor([q]), torch.tensor([nxt])

    out = Q.q_search(root_q, torch.tensor([0]), recurrent_fn, 1, discount=d, c1=0.0)
    g1 = 0.5 + d * 3.0                                                         # the leaf's value: max Q
    torch.testing.assert_close(out.q_values, torch.tensor([[0.0, (1.0 + g1) / 2]]))
    out = Q.q_search(root_q, torch.tensor([0]), recurrent_fn, 2, discount=d, c1=0.0)
    g2 = -1.0 + d * 4.0                                                        # through the child's action 1
    torch.testing.assert_close(out.q_values, torch.tensor([[0.0, (1.0 + g1 + (0.5 + d * g2)) / 3]]))
    assert out.visit_counts.tolist() == [[0.0, 2.0]]
    child = int(out.tree.children[0, 0, 1])
    torch.testing.assert_close(out.tree.edges[0, child, Q.Q_SUM] / out.tree.edges[0, child, Q.COUNT],
                               torch.tensor([2.0, (3.0 + g2) / 2]))
    assert out.tree.bounds.tolist() == [[0.0, 4.0]]  # every Q the tree holds, the leaves' included


def test_q_search_rows_are_independent():
    model = TableModel(40, 5, seed=3)
    roots = roots_for(model, 7, 4)
    out = run_table_q_search(model, roots, 25, discount=0.99)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    out_p = run_table_q_search(model, roots[perm], 25, discount=0.99)
    assert torch.equal(out_p.visit_counts, out.visit_counts[perm]) and torch.equal(out_p.action, out.action[perm])
    torch.testing.assert_close(out_p.q_values, out.q_values[perm])
    # other rows with other values (and another batch size) leave row 0 alone
    for changed in (torch.cat([roots[:1], roots_for(model, 4, 99)]), roots[:1]):
        root_q = model.logits[changed].clone()
        root_q[1:] = -10 * root_q[1:]
        out_c = Q.q_search(root_q, changed, q_table_fn(model), 25, discount=0.99)
        assert torch.equal(out_c.visit_counts[0], out.visit_counts[0])
        torch.testing.assert_close(out_c.q_values[0], out.q_values[0])


@pytest.mark.parametrize("kind", ["flat", "huge"])
def test_q_search_equal_and_huge_values(kind):
    """All Q equal (min == max in every tree): nothing divides by zero, Q normalises to 0, and
    UCB1's exploration term alone spreads the root's visits evenly. Huge values stay finite."""
    model = TableModel(30, 4, seed=5, kind=kind)
    roots = roots_for(model, 6, 5)
    out = run_table_q_search(model, roots, 22, discount=1.0)
    assert torch.isfinite(out.q_values).all() and torch.isfinite(out.tree.edges).all()
    assert torch.equal(out.visit_counts.sum(-1), torch.full((6,), 22.0))
    if kind == "flat":
        assert (out.q_values == 0).all() and (out.tree.bounds == 0).all()
        assert (out.visit_counts.amax(-1) - out.visit_counts.amin(-1) <= 1).all()


def test_q_search_zero_simulations_is_epsilon_greedy():
    g = torch.Generator().manual_seed(0)
    root_q = torch.randn(4000, 5, generator=g)
    root_q[0] = torch.tensor([1.0, 3.0, 3.0, 0.0, 3.0])  # ties: the lowest index

    def never(*_):
        raise AssertionError("recurrent_fn called with 0 simulations")

    out = Q.q_search(root_q, torch.zeros(4000, 2), never, 0)
    assert torch.equal(out.action, root_q.argmax(-1)) and int(out.action[0]) == 1
    assert torch.equal(out.q_values, root_q) and torch.equal(out.root_value, root_q.amax(-1))
    assert (out.visit_counts == 0).all() and torch.equal(out.policy, F.one_hot(root_q.argmax(-1), 5).float())
    for epsilon in (0.3, 1.0):
        picks = [Q.q_search(root_q, None, never, 0, epsilon=epsilon, generator=torch.Generator().manual_seed(s)).action
                 for s in (1, 1, 2)]
        assert torch.equal(picks[0], picks[1]) and not torch.equal(picks[0], picks[2])  # seeded
        greedy = (picks[0] == root_q.argmax(-1)).float().mean()
        assert float(greedy) == pytest.approx(1 - epsilon + epsilon / 5, abs=0.03)
        assert torch.bincount(picks[0], minlength=5).min() > 0.2 * epsilon * 4000 / 5


def randomise_q_head(net, obs, generator):
    """A fresh Q head says 0 everywhere (zero last layer) and, with BatchNorm's initial
    statistics, nearly the same for every observation: give it random last weights and the
    BatchNorm statistics of `obs`, so that its greedy actions differ from one row to the next."""
    with torch.no_grad():
        for p in net.prediction.q.mlp[-1].parameters():
            p.normal_(generator=generator)
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = 1.0  # the running statistics become those of the next batch
        net.train()
        net.initial_inference(obs)
    return net.eval()


def test_q_network_acting_with_zero_simulations():
    """run_search with 0 simulations plays argmax of the Q head (epsilon 0): mode 1's acting. Q
    decodes from h-space, or with C51 is the mean over the atoms; a fresh Q head gives Q = 0."""
    obs = torch.randint(0, 256, (12, 4, 3, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for distributional in ([], ["--distributional"]):
        args = Q.parse_args(["--encoder", "resnet", "--channels", "8", "--support-size", "5", "--no-nce",
                             *distributional])
        torch.manual_seed(0)
        net = Q.QNet((1, 3, 7), 4, 3, args).eval()
        with torch.no_grad():
            torch.testing.assert_close(net.q_values(net.initial_inference(obs)[1]), torch.zeros(12, 3),
                                       atol=1e-4, rtol=0)
            randomise_q_head(net, obs, torch.Generator().manual_seed(1))
            q_logits = net.initial_inference(obs)[1]
            out, value = Q.run_search(net, obs, args, 0)
        assert q_logits.shape == (12, 3, 51 if distributional else 11)
        q = ((torch.softmax(q_logits, -1) * torch.linspace(-10, 10, 51)).sum(-1) if distributional
             else M.support_to_scalar(q_logits, 5))
        torch.testing.assert_close(net.q_values(q_logits), q)
        assert torch.equal(out.action, q.argmax(-1)) and len(set(out.action.tolist())) > 1
        torch.testing.assert_close(value, q.amax(-1))


def test_epsilon_schedule():
    """1 while the buffer warms up, then linear to --epsilon (Dopamine's, as DrQ(eps)); the
    defaults anneal it (1 until 1,600 steps, 0.01 from 6,600); 0 decay steps give the
    original's constant epsilon."""
    args = Q.parse_args(["--epsilon", "0.05", "--epsilon-decay-steps", "1000", "--learning-starts", "400"])
    assert [Q.epsilon_schedule(args, s) for s in (0, 400, 900, 1400, 5000)] == pytest.approx([1, 1, 0.525, 0.05, 0.05])
    defaults = Q.parse_args([])
    assert [Q.epsilon_schedule(defaults, s) for s in (0, 1600, 4100, 6600, 10**5)] == pytest.approx(
        [1, 1, 0.505, 0.01, 0.01])
    assert Q.epsilon_schedule(Q.parse_args(["--epsilon-decay-steps", "0"]), 0) == 0.01


# ---- targets: double n-step Q and C51 -----------------------------------------------------------
def test_greedy_values_double_and_plain():
    q_target = torch.tensor([[1.0, 5.0, 3.0], [2.0, 0.0, 7.0]])
    q_online = torch.tensor([[9.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    values, actions = Q.greedy_values(q_target, q_online)
    assert values.tolist() == [1.0, 7.0] and actions.tolist() == [0, 2]      # online picks, target values
    values, actions = Q.greedy_values(q_target)
    assert values.tolist() == [5.0, 7.0] and actions.tolist() == [1, 2]      # the plain max


def test_learner_bootstrap_uses_the_right_networks():
    """Learner.bootstrap against the nets themselves: the target net's Q of the online net's
    greedy action (--double-q), its own max (--no-double-q, and with a target refreshed every
    update, the default, which is then the online net: one pass), and with C51 that action's
    distribution from the target net."""
    apart = ["--target-update-interval", "100"]
    for flags in (apart, ["--no-double-q"], ["--distributional", *apart], []):
        args = Q.parse_args(["--device", "cpu", "--encoder", "resnet", "--channels", "8", "--support-size", "5",
                             "--no-nce", *flags])
        torch.manual_seed(1)
        net = Q.QNet((1, 3, 7), 4, 3, args)
        learner = Q.Learner(net, args, torch.device("cpu"))
        obs = torch.randint(0, 256, (4, 5, 4, 3, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        g = torch.Generator().manual_seed(2)
        for module in (net, learner.target):  # two different Q heads
            randomise_q_head(module, obs.flatten(0, 1), g)
        online_calls = []
        hook = net.representation.register_forward_hook(lambda *_: online_calls.append(1))
        with torch.no_grad():
            values, probs = learner.bootstrap(obs)
        hook.remove()
        assert len(online_calls) == (1 if "--target-update-interval" in flags else 0), flags
        with torch.no_grad():
            net.eval()
            logits_t = learner.target.initial_inference(obs.flatten(0, 1))[1]
            q_t, q_o = learner.target.q_values(logits_t), net.q_values(net.initial_inference(obs.flatten(0, 1))[1])
        greedy = q_o.argmax(-1) if "--target-update-interval" in flags else q_t.argmax(-1)
        assert (q_t.argmax(-1) != q_o.argmax(-1)).any()  # the two choices differ somewhere
        torch.testing.assert_close(values, q_t.gather(1, greedy[:, None]).view(4, 5))
        if "--distributional" in flags:
            torch.testing.assert_close(probs, torch.softmax(logits_t[torch.arange(20), greedy], -1).view(4, 5, -1))
        else:
            assert probs is None


def q_sequences(B, W, A, g):
    reward = torch.randint(-2, 3, (B, W), generator=g).float()
    return M.Sequences(frames=torch.zeros(B, W, 1, 1, 1, dtype=torch.uint8),
                       action=torch.randint(0, A, (B, W), generator=g), reward=reward,
                       terminal=torch.zeros(B, W, dtype=torch.bool), truncated=torch.zeros(B, W, dtype=torch.bool),
                       episode_step=torch.arange(W).repeat(B, 1), policy=torch.full((B, W, A), 1 / A),
                       root_value=torch.zeros(B, W), network_value=torch.zeros(B, W))


def end_cases(K, n):
    return [(None, None)] + [(kind, j) for kind in ("terminal", "truncated") for j in range(1, K + n + 1)]


def hand_bootstrap(kind, j, K, n, d):
    """For k = 0..K: the row the n-step target bootstraps from and discount^h (0: no bootstrap)."""
    rows, discounts = [], []
    for k in range(K + 1):
        h = n if kind is None else max(0, min(n, j - k))
        rows.append(k + h)
        # no bootstrap after any end, nor onto a terminal row; a truncated row bootstraps itself
        discounts.append(0.0 if kind is not None and (k > j or (kind == "terminal" and k + h == j)) else d ** h)
    return rows, discounts


@pytest.mark.parametrize("per_sample", [False, True])
def test_q_targets_match_hand_computation(per_sample):
    """Scalar (double-Q) targets: z_k = R_k + discount^h v(t+k+h), two-hot in h-space, for the
    action a_{t+k}; no target after a truncation nor at the truncated observation itself. n is
    --td-steps, or each sample's own n (the off-policy correction's shorter horizons)."""
    S, K, n, d, A = 2, 3, 4, 0.9, 3
    o, W = S - 1, S - 1 + K + n + 1
    args = Q.parse_args(["--jumps", str(K), "--td-steps", str(n), "--discount", str(d), "--support-size", "20"])
    cases = end_cases(K, n)
    seq = q_sequences(len(cases), W, A, torch.Generator().manual_seed(0))
    for b, (kind, j) in enumerate(cases):
        if kind is not None:
            (seq.terminal if kind == "terminal" else seq.truncated)[b, o + j] = True
    values = torch.randn(len(cases), K + n + 1, generator=torch.Generator().manual_seed(1)) * 3
    td = (torch.randint(1, n + 1, (len(cases),), generator=torch.Generator().manual_seed(2)) if per_sample
          else torch.full((len(cases),), n))
    targets = M.n_step_targets(seq, None, K, td if per_sample else n, d, S)
    targets, q_targets = Q.q_learning_targets(seq, targets, values.gather(1, targets.bootstrap_row), None, args, S)
    assert torch.equal(q_targets.actions, seq.action[:, o:o + K + 1])
    torch.testing.assert_close(q_targets.probs, M.scalar_to_support(targets.value, 20))
    for b, (kind, j) in enumerate(cases):
        rows, discounts = hand_bootstrap(kind, j, K, int(td[b]), d)
        assert targets.bootstrap_row[b].tolist() == rows, (kind, j)
        torch.testing.assert_close(targets.bootstrap_discount[b], torch.tensor(discounts), msg=str((kind, j)))
        for k in range(K + 1):
            h = rows[k] - k
            expected = (sum(d ** i * float(seq.reward[b, o + k + i + 1]) for i in range(h))
                        + discounts[k] * float(values[b, rows[k]]))
            valid = kind != "truncated" or k < j
            assert float(q_targets.mask[b, k]) == float(valid), (kind, j, k)
            if valid:
                assert float(targets.value[b, k]) == pytest.approx(expected, abs=1e-5), (kind, j, k)


def test_c51_projection_by_hand():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0])                    # on the atoms -2, -1, 0, 1, 2

    def project(r, scale, p=probs):
        return Q.project_onto_atoms(p[None], torch.tensor([r]), torch.tensor([scale]), -2.0, 2.0)[0]

    # shifted by 0.5: every atom splits in half between its two neighbours; 2.5 clips to v_max
    torch.testing.assert_close(project(0.5, 1.0), torch.tensor([0.05, 0.15, 0.25, 0.35, 0.2]))
    # shifted by a whole atom: b lands on atoms (l == u), the mass stays whole
    torch.testing.assert_close(project(1.0, 1.0), torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4]))
    torch.testing.assert_close(project(0.0, 1.0), probs)
    # halved around 0.5: -0.5, 0, 0.5, 1, 1.5
    torch.testing.assert_close(project(0.5, 0.5), torch.tensor([0.0, 0.05, 0.05 + 0.2 + 0.15, 0.15 + 0.4, 0.0]))
    # no bootstrap (scale 0, a terminal end): all the mass on the return, split between its atoms
    torch.testing.assert_close(project(0.25, 0.0), torch.tensor([0.0, 0.0, 0.75, 0.25, 0.0]))
    torch.testing.assert_close(project(-1.0, 0.0), torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0]))
    # beyond the support: clipped onto the end atoms
    torch.testing.assert_close(project(100.0, 1.0), torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0]))
    torch.testing.assert_close(project(-100.0, 0.99), torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0]))
    # many random ones: mass conserved, and inside the support the mean is returns + scale * mean
    g = torch.Generator().manual_seed(0)
    # a support whose float rounding puts the top atom a hair past the end: still a projection
    p = torch.softmax(torch.randn(3, 55, generator=g), -1)
    torch.testing.assert_close(Q.project_onto_atoms(p, torch.zeros(3), torch.ones(3), -3.11, 15.18), p)
    p = torch.softmax(torch.randn(500, 51, generator=g) * 2, -1)
    returns, scale = torch.randn(500, generator=g), torch.rand(500, generator=g)
    target = Q.project_onto_atoms(p, returns, scale, -10.0, 10.0)
    atoms = torch.linspace(-10, 10, 51)
    assert (target >= 0).all()
    torch.testing.assert_close(target.sum(-1), torch.ones(500))
    inside = returns.abs() + scale * 10 <= 10  # no atom shifted past an end
    assert inside.sum() > 100
    torch.testing.assert_close((target * atoms).sum(-1)[inside], (returns + scale * (p * atoms).sum(-1))[inside],
                               rtol=1e-5, atol=1e-4)


def test_c51_targets_at_episode_ends():
    """C51 targets through q_learning_targets: R_k + discount^h Z of the bootstrap row, projected;
    a terminal end puts all the mass on R_k; a truncated one bootstraps from its own row."""
    S, K, n, d, A, Mn = 1, 2, 3, 0.9, 2, 11
    W = K + n + 1
    args = Q.parse_args(["--jumps", str(K), "--td-steps", str(n), "--discount", str(d), "--distributional",
                         "--num-atoms", str(Mn), "--v-min", "-5", "--v-max", "5"])
    cases = end_cases(K, n)
    g = torch.Generator().manual_seed(2)
    seq = q_sequences(len(cases), W, A, g)
    for b, (kind, j) in enumerate(cases):
        if kind is not None:
            (seq.terminal if kind == "terminal" else seq.truncated)[b, j] = True
    probs = torch.softmax(torch.randn(len(cases), W, Mn, generator=g), -1)
    targets = M.n_step_targets(seq, None, K, n, d, S)
    at_rows = probs.gather(1, targets.bootstrap_row[..., None].expand(-1, -1, Mn))
    targets, q_targets = Q.q_learning_targets(seq, targets, torch.zeros(len(cases), K + 1), at_rows, args, S)
    atoms = torch.linspace(-5, 5, Mn)
    for b, (kind, j) in enumerate(cases):
        rows, discounts = hand_bootstrap(kind, j, K, n, d)
        for k in range(K + 1):
            if kind == "truncated" and k >= j:
                assert q_targets.mask[b, k] == 0
                continue
            h = rows[k] - k
            R = sum(d ** i * float(seq.reward[b, k + i + 1]) for i in range(h))
            # by hand: each atom's mass moved to R + discount^h z, split between the two atoms around it
            expected = torch.zeros(Mn)
            for z, p in zip(atoms.tolist(), probs[b, rows[k]].tolist()):
                x = min(max(R + discounts[k] * z, -5.0), 5.0)
                pos = (x + 5.0) / 1.0
                low = math.floor(pos + 1e-9)
                if abs(pos - round(pos)) < 1e-6:
                    expected[round(pos)] += p
                else:
                    expected[low] += p * (low + 1 - pos)
                    expected[low + 1] += p * (pos - low)
            torch.testing.assert_close(q_targets.probs[b, k], expected, rtol=1e-4, atol=1e-5, msg=str((kind, j, k)))


def test_q_losses_and_priorities():
    """The Q of the action taken at each step against its target; priorities |Q - z| at step 0,
    or with C51 the KL divergence of the step-0 distribution."""
    g = torch.Generator().manual_seed(3)
    B, K, A = 5, 2, 3
    for distributional in (False, True):
        Mn = 11
        args = Q.parse_args(["--jumps", str(K), "--support-size", "5", "--no-nce"]
                            + (["--distributional", "--num-atoms", "11"] if distributional else []))
        q_logits = torch.randn(B, K + 1, A, Mn, generator=g)
        reward_logits = torch.randn(B, K, 11, generator=g)
        actions = torch.randint(0, A, (B, K + 1), generator=g)
        probs = torch.softmax(torch.randn(B, K + 1, Mn, generator=g), -1)
        mask = torch.ones(B, K + 1)
        mask[0, 2] = 0
        value = torch.randn(B, K + 1, generator=g)
        targets = M.Targets(value, torch.ones(B, K + 1), torch.zeros(B, K), torch.ones(B, K), None, None,
                            torch.zeros(B, K), actions[:, :K], None, None)
        terms, priorities, _ = Q.q_losses((q_logits, reward_logits, None), targets, Q.QTargets(actions, probs, mask),
                                          None, None, args)
        taken = torch.stack([torch.stack([q_logits[b, k, actions[b, k]] for k in range(K + 1)]) for b in range(B)])
        ce = -(probs * torch.log_softmax(taken, -1)).sum(-1) * mask
        torch.testing.assert_close(terms["q"], ce[:, 0] + (ce[:, 1] + ce[:, 2]) / K)
        if distributional:
            kl = F.kl_div(torch.log_softmax(taken[:, 0], -1), probs[:, 0], reduction="none").sum(-1)
            torch.testing.assert_close(priorities, kl + 1e-6)
        else:
            torch.testing.assert_close(priorities, (M.support_to_scalar(taken[:, 0], 5) - value[:, 0]).abs() + 1e-6)


@pytest.mark.parametrize("flags, message", [
    (["--policy-loss-weight", "1"], r"--policy-loss-weight 1.0: the Q network has no policy head"),
    (["--distributional", "--no-local-target-net"], r"--distributional bootstraps from the target network"),
    (["--distributional", "--search-value-targets"], r"--distributional bootstraps from the target network"),
    (["--search-value-targets", "--local-target-net"], r"--local-target-net computes bootstrap values on the trainer"),
    (["--distributional", "--v-min", "3", "--v-max", "3"], r"C51 needs at least 2 atoms and --v-min < --v-max"),
    (["--epsilon", "2"], r"--epsilon: must lie in \[0, 1\], got 2"),
    (["--encoder", "vit"], r"--encoder: invalid choice: 'vit' \(choose from 'nature', 'resnet'\)"),
    (["--frame-size", "32"], r"--encoder nature needs frames of at least 36x36 pixels, got 32x32 \(use --encoder "
                             r"resnet, which takes any size, or a larger --frame-size\)$"),
])
def test_q_bad_flags_are_one_line_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as error:
        Q.parse_args(flags)
    text = str(error.value) if error.value.code != 2 else capsys.readouterr().err
    assert len(text.strip().splitlines()) == 1 and re.search(message, text) and text.startswith("q_learning.py: error:")


def test_q_encoder_that_does_not_fit_the_env_is_a_one_line_error(tmp_path):
    """The Nature CNN on the corridor's 3x7 frames (an env_fn's shape is known only once it is
    made): one line, before any training; --encoder resnet takes them."""
    with pytest.raises(SystemExit, match=r"^q_learning.py: error: --encoder nature needs frames of at least 36x36 "
                                         r"pixels, got 3x7 "):
        Q.train(Q.parse_args(["--device", "cpu", "--num-envs", "2", "--run-dir", str(tmp_path)]), env_fn)
    args = Q.parse_args(["--encoder", "resnet"])
    assert (args.frame_size, args.grayscale, args.head_hidden) == (96, False, 32)  # EfficientZero's, as muzero_nce.py
    assert Q.QNet((1, 3, 7), 4, 2, args).representation.__class__ is Q.Representation



def test_q_nature_network_is_the_same_in_training_and_in_the_search():
    """With the Nature CNN no BatchNorm is left in the Q network's representation, dynamics and
    heads (DQN's have none; the NCE projection, used only in training, keeps its own): the
    search's eval-mode dynamics gives what the unroll trained, however many steps it ran."""
    args = Q.parse_args(["--proj-hidden", "16", "--proj-dim", "8", "--pred-hidden", "8"])
    net = Q.QNet((1, 84, 84), 4, 9, args)
    for part in (net.representation, net.dynamics, net.prediction):
        assert not [m for m in part.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    torch.manual_seed(0)
    obs, action = torch.randint(0, 256, (6, 4, 84, 84), dtype=torch.uint8), torch.arange(6) % 9
    outputs = {}
    for mode in ("train", "eval"):
        getattr(net, mode)()
        with torch.no_grad():
            latent, q = net.initial_inference(obs)
            outputs[mode] = (q, *net.recurrent_inference(latent, action))
    for trained, searched in zip(outputs["train"], outputs["eval"]):
        torch.testing.assert_close(searched, trained)


@pytest.mark.parametrize("latent_hw", [(1, 1), (7, 7)])
def test_q_dynamics_sees_the_action_from_initialisation(latent_hw):
    """Q's dynamics adds a learned bias per action: at initialisation, two actions from one
    latent lead as far apart as one action from two latents (ratio 0.67-1.09 here, 9 actions).
    Through the one-hot planes alone the ratio is 0.07-0.09 on a 1x1 latent and about 0.3 on
    Atari's 7x7, and with Adam at 1e-4 the planes' weights stayed near their initial size (on
    the corridor, the model's reward then ignored the action)."""
    ratios = []
    for seed in range(3):
        torch.manual_seed(seed)
        dynamics = Q.without_batch_norm(Q.Dynamics(64, 9, 1, 16, 512, 10, latent_hw))
        latent = Q.scale_hidden(torch.relu(torch.randn(64, 64, *latent_hw)))  # as the encoder's: in [0, 1]
        with torch.no_grad():
            first, second = (dynamics(latent, torch.full((64,), a))[0] for a in (0, 1))
        by_action = (first - second).flatten(1).norm(dim=1).mean()
        by_latent = (first - first.roll(1, 0)).flatten(1).norm(dim=1).mean()
        ratios.append(float(by_action / by_latent))
    assert min(ratios) > 0.5, ratios



def test_q_resume_of_weights_from_another_network_is_a_one_line_error(tmp_path):
    """A checkpoint whose weights do not fit (here: saved before the dynamics had its action bias)
    stops --resume with one line naming the file, not torch's traceback."""
    args = Q.parse_args(["--proj-hidden", "16", "--proj-dim", "8", "--pred-hidden", "8"])
    learner = Q.Learner(Q.QNet((1, 84, 84), 4, 9, args), args, torch.device("cpu"))
    state = learner.state_dict() | {"args": vars(args), "acting": {}, "counters": {}}
    state["net"] = {k: v for k, v in state["net"].items() if not k.startswith("dynamics.action_bias")}
    torch.save(state, tmp_path / "old.pt")
    with pytest.raises(SystemExit, match=rf"^q_learning.py: error: --resume {re.escape(str(tmp_path))}/old.pt: the "
                                         r"saved weights do not fit the network its flags describe \(.*action_bias"):
        Q.resume(str(tmp_path / "old.pt"), learner, None, None, None, None, None, None)


# ---- learning: the corridor, in each mode -------------------------------------------------------
class BigCorridor(Corridor):
    """The corridor drawn large enough for the Nature CNN, q_learning.py's default encoder: each
    cell a 12 x 6 block of pixels, a 36 x 42 frame (its smallest size is 36)."""

    def __init__(self):
        super().__init__()
        self.observation_space = gym.spaces.Box(0, 255, (1, 3 * 12, LENGTH * 6), np.uint8)

    def _obs(self):
        return np.kron(super()._obs(), np.ones((1, 12, 6), np.uint8))


def big_env_fn(num_envs):
    return gym.vector.SyncVectorEnv([BigCorridor for _ in range(num_envs)],
                                    autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)


def q_corridor_args(tmp_path, seed, mode):
    """q_learning.py at its defaults, the value-based recipe (Adam at 1e-4, n = 10, discount
    0.99, a target refreshed every update, batch 32, one update per env step, epsilon 1 until
    learning starts and annealed over the next 5,000 steps, the Nature CNN of 64 channels and a
    512-unit head), changed in size only: 16 envs and 3,200 env steps (200 each; 4,800 with
    search, whose model must learn too), a buffer that holds them, 320 of them before learning
    starts, 8 evaluation episodes, small NCE heads (with search). The mode flags choose the
    mode. --no-clip-rewards because the decoy pays 0.3: clipped, it would pay as much as the
    goal. Smaller networks learn this slower at 1e-4: with 16 channels, pure Q-learning needed
    twice the steps."""
    flags = {
        "--device": "cpu", "--seed": seed, "--num-envs": 16, "--total-env-steps": 3200, "--buffer-size": 3200,
        "--learning-starts": 320, "--eval-episodes": 8, "--proj-hidden": 64, "--proj-dim": 64, "--pred-hidden": 32,
        "--eval-interval": 0, "--log-interval": 10**9, "--checkpoint-interval": 10**9,
        "--run-dir": str(tmp_path / "run"),
    }
    modes = {"pure": ["--num-simulations", "0", "--eval-simulations", "0", "--jumps", "0"],
             "search": ["--total-env-steps", "4800", "--buffer-size", "4800"],
             "c51": ["--num-simulations", "0", "--eval-simulations", "0", "--jumps", "0", "--distributional"]}
    return Q.parse_args([str(x) for kv in flags.items() for x in kv] + modes[mode] + ["--no-clip-rewards"])


def test_q_defaults_anneal_epsilon_on_the_corridor(tmp_path, monkeypatch):
    """What the actor is given at the defaults: epsilon 1 until learning starts, then falling,
    never at the final 0.01 from the start (the original's schedule, which with a Q head at 0 for
    every action and ties to the lowest index repeats one action)."""
    seen = []
    real = Q.epsilon_schedule
    monkeypatch.setattr(Q, "epsilon_schedule",
                        lambda args, steps: seen.append((steps, real(args, steps))) or seen[-1][1])
    args = q_corridor_args(tmp_path, 1, "pure")
    args.total_env_steps = 352  # two actor steps past learning starts
    Q.train(args, big_env_fn)
    assert [eps for steps, eps in seen if steps <= 320] == [1.0] * 21
    assert [steps for steps, _ in seen[-1:]] == [336] and seen[-1][1] == pytest.approx(1 - 0.99 * 16 / 5000)


# ---- reanalyze, the original's three commands, the layout --------------------------------------
def test_q_reanalyze_writes_a_fresh_search():
    """reanalyze searches rows t..t+K+n of each sequence again and writes back exactly what a
    fresh search there gives: max root Q, the network's max Q, the visit distribution."""
    args = Q.parse_args(["--device", "cpu", "--encoder", "resnet", "--channels", "8", "--support-size", "5", "--no-nce",
                         "--num-envs", "2", "--num-simulations", "3", "--jumps", "1", "--td-steps", "2",
                         "--buffer-size", "40", "--learning-starts", "16", "--batch-size-per-worker", "2"])
    g = torch.Generator().manual_seed(0)
    buffer = Q.ReplayBuffer(40, 2, (1, 3, 7), 2, 1, 1, 2)
    for t in range(12):
        buffer.add(torch.randint(0, 256, (2, 1, 3, 7), dtype=torch.uint8, generator=g), torch.zeros(2),
                   torch.zeros(2, dtype=torch.bool), torch.zeros(2, dtype=torch.bool), torch.full((2,), t),
                   torch.zeros(2, dtype=torch.long), torch.full((2, 2), 0.5), torch.zeros(2), torch.zeros(2))
    net = randomise_q_head(Q.QNet((1, 3, 7), 1, 2, args), buffer.frames.flatten(0, 1), g)
    time_, env = torch.tensor([3, 7]), torch.tensor([0, 1])
    assert Q.reanalyze(net, buffer, time_, env, args, torch.device("cpu")) == 2 * 4 * 3
    rows = time_[:, None] + torch.arange(4)                                      # t .. t+K+n
    with torch.no_grad():
        out, value = Q.run_search(net, buffer.frames[rows, env[:, None]].flatten(0, 1), args, 3)
    envs = env[:, None].expand_as(rows)
    torch.testing.assert_close(buffer.root_value[rows, envs].flatten(), out.root_value)
    torch.testing.assert_close(buffer.network_value[rows, envs].flatten(), value)
    torch.testing.assert_close(buffer.policy[rows, envs].flatten(0, 1), out.visit_counts / 3)
    assert buffer.reanalyzed.sum() == 8 and (buffer.reanalyzed[rows, envs] == 1).all()


# The commands of the original's README, `python -m scripts.run_pizero --q-learning` replaced by
# `python q_learning.py`. Q_TINY, added after them, shrinks the job; the commands that leave the
# simulations at their defaults also get 2 of them. Both Q-learning commands keep their three
# trainers: on a CPU, the process layout with three gloo trainers (and no reanalyze process,
# Q-learning's default).
ORIGINAL_COMMANDS = {
    "pure": "--grayscale --game ms_pacman --num-envs 64 --no-nce --policy-loss-weight 0. --reward-loss-weight 0. "
            "--no-search-value-targets --local-target-net --num-simulations 0 --eval-simulations 0 --jumps 0 "
            "--num-trainers 3 --no-gpu-0-train",
    "search": "--grayscale --game ms_pacman --num-envs 64 --no-nce --policy-loss-weight 0. --reward-loss-weight 0. "
              "--no-search-value-targets --local-target-net --c1 0.25 --num-trainers 3 --no-gpu-0-train",
    "c51": "--game ms_pacman --distributional",
}
Q_TINY = ["--device", "cpu", "--num-envs", "2", "--channels", "8", "--reduced-channels", "4", "--head-hidden", "8",
          "--support-size", "10", "--proj-hidden", "16", "--proj-dim", "16", "--pred-hidden", "8",
          "--eval-episodes", "1", "--batch-size-per-worker", "4", "--buffer-size", "200", "--learning-starts", "48",
          "--max-episode-frames", "400", "--eval-interval", "0", "--log-interval", "40", "--total-env-steps", "80",
          "--train-steps-per-env-step", "0.25"]


@pytest.mark.parametrize("name", ["pure", "search", "c51"])
def test_q_original_commands_run(tmp_path, name):
    run = tmp_path / "run"
    sims = [] if name == "pure" else ["--num-simulations", "2", "--eval-simulations", "2"]
    done = run_to_end(["q_learning.py", *ORIGINAL_COMMANDS[name].split(), *Q_TINY, *sims, "--run-dir", str(run)])
    assert done.returncode == 0, done.stderr
    assert re.search(r"env 80 \| .* env/s \| .* sims/s \| .* upd/s", done.stdout)
    assert "epsilon 0.001 on the root's Q" in done.stdout  # the evaluation protocol line
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["counters"]["env_steps"] == 80 and state["updates"] > 0
    assert scalars(run, "losses/q") and scalars(run, "charts/eval_return")
    if name == "c51":  # no GPU: the single process, C51 with search
        assert "single process on cpu" in done.stdout and state["updates"] == int((80 - 48 + 2) * 0.25)
        assert state["args"]["distributional"] and state["args"]["num_simulations"] == 2
        assert scalars(run, "losses/nce") and scalars(run, "losses/reward")
        # --evaluate rebuilds the C51 network from the checkpoint's flags and repeats the last evaluation
        result = Q.main(["--evaluate", str(run / "checkpoint.pt")])
        assert result["returns"] == [value for _, value in scalars(run, "charts/eval_return")][-1:]
    else:  # the layout: actor and three gloo trainers, which end with the same weights
        assert "reanalyze [], trainers ['cpu', 'cpu', 'cpu'] (gloo)" in done.stdout
        checksums = state["counters"]["replica_checksums"]
        assert len(checksums) == 3 and checksums[0] == checksums[1] == checksums[2]


def test_q_layout_with_two_gloo_trainers_and_reanalyze(tmp_path):
    """Q-learning with search in the process layout: two gloo trainers, which end with the same
    weights, and a reanalyze process refreshing the max root Q that --search-value-targets
    bootstraps from."""
    run = tmp_path / "run"
    done = run_to_end(["q_learning.py", "--game", "ms_pacman", *Q_TINY, "--num-simulations", "2", "--eval-simulations",
                       "2", "--num-trainers", "2", "--reanalyze-workers", "1", "--reanalyze-fraction", "0.5",
                       "--search-value-targets", "--run-dir", str(run)])
    assert done.returncode == 0, done.stderr
    assert "reanalyze ['cpu'], trainers ['cpu', 'cpu'] (gloo)" in done.stdout
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    checksums = state["counters"]["replica_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    assert state["counters"]["env_steps"] == 80 and state["updates"] > 0
    assert state["counters"]["reanalyzed_sequences"] > 0 and scalars(run, "losses/q")


# ---- the two scripts share their text -----------------------------------------------------------
# Functions and classes defined in both scripts whose source differs by design. None: another
# algorithm; a list of (muzero_nce.py text, q_learning.py text): the only differences allowed.
Q_DIFFERS = {
    "build_parser": None,       # Q's flags: epsilon, double Q, C51; no --search, pUCT c2, root noise, Gumbel
                                # or policy loss
    "check_args": None,         # Q's flag rules: C51 needs the target network, no policy head
    "make_recurrent_fn": None,  # the Q search's model interface: (reward, Q of every action, next latent)
    "run_search": None,         # the Q search, epsilon-greedy, instead of MCTS with noise and a temperature
    "evaluate": None,           # --eval-epsilon on the root's Q instead of the most visited action
    "reanalyze": None,          # refreshes the stored values at every bootstrap row (no policy rows, no root noise)
    "Learner": None,            # the double-Q / C51 bootstrap and the Q losses
    "log_protocol": None,       # states Q's evaluation protocol
    "Actor": [("temperature", "epsilon"), ("noise=True, ", "")],  # acts epsilon-greedily
    "actor_process": [("visit_temperature(steps / args.total_env_steps)", "epsilon_schedule(args, steps)")],
    "train": [("MuZeroNet", "QNet"), ('            done = counters["env_steps"] / args.total_env_steps\n', ""),
              ("visit_temperature(done)", 'epsilon_schedule(args, counters["env_steps"])')],
    "launch": [("MuZeroNet", "QNet")],
    "Dynamics": [  # the action also enters as a learned bias per channel (see q_learning.py's docstring)
        ('one-hot planes."""', 'one-hot planes,\n    and as a learned bias per channel. (The bias is '
         'Q\'s: at Adam\'s lr of 1e-4, the planes\'\n    weights, which the 3x3 convolution initialises '
         'at 1/sqrt(9 (C + A)), stayed at their\n'
         '    initial size, and on the test corridor\'s 1x1 latent the model\'s reward ignored the action.)"""'),
        ("(channels)\n", "(channels)\n        self.action_bias = nn.Linear(num_actions, channels)\n"),
        ("planes = F.one_hot(action, self.num_actions).to(latent.dtype)[:, :, None, None]",
         "one_hot = F.one_hot(action, self.num_actions).to(latent.dtype)                   # [B, A]\n"
         "        planes = one_hot[:, :, None, None]"),
        ("x = F.relu(self.bn(self.conv(torch.cat([latent, planes], 1))) + latent)",
         "x = self.conv(torch.cat([latent, planes], 1)) + self.action_bias(one_hot)[:, :, None, None]\n"
         "        x = F.relu(self.bn(x) + latent)")],
    "evaluate_checkpoint": [("MuZeroNet", "QNet")],
}


def defined_here(module):
    return {name for name, value in vars(module).items()
            if (inspect.isfunction(value) or inspect.isclass(value)) and value.__module__ == module.__name__}


def test_shared_code_is_the_same_text():
    """inspect.getsource of every function and class the two scripts both define is the same,
    except the names above; a change to one script's copy fails here, naming it."""
    shared = sorted(defined_here(M) & defined_here(Q))
    assert len(shared) > 60 and set(Q_DIFFERS) <= set(shared)
    drifted = []
    for name in shared:
        rule = Q_DIFFERS.get(name, [])
        if rule is None:
            continue
        expected = inspect.getsource(getattr(M, name))
        for old, new in rule:
            assert old in expected, f"Q_DIFFERS[{name!r}]: {old!r} is no longer in muzero_nce.py"
            expected = expected.replace(old, new)
        actual = inspect.getsource(getattr(Q, name))
        if actual != expected:
            diff = "".join(list(difflib.unified_diff(expected.splitlines(True), actual.splitlines(True),
                                                     "muzero_nce.py", "q_learning.py", n=1))[:12])
            drifted.append(f"{name}:\n{diff}")
    assert not drifted, "q_learning.py's copy drifted from muzero_nce.py in " + "\n".join(drifted)


# ---------------------------------------------------------------------------------------------
# Learning, last: the runs these tests read started with the session (LearningRuns) and have run
# on the cores the tests above left idle; here the suite waits for whatever is still running.
# ---------------------------------------------------------------------------------------------
def test_learns_corridor_needing_lookahead(learned):
    result = learned["muzero"]
    assert "error" not in result, result.get("error")
    assert result["env_steps"] == 6400
    assert result["eval_return"] > (GOAL + DECOY) / 2  # beats the decoy and any constant action
    assert result["eval_return"] >= 0.9 * GOAL


def test_gumbel_learns_corridor_with_few_simulations(learned):
    """Gumbel MuZero acts, reanalyses and evaluates with 4 simulations per move."""
    result = learned["muzero_gumbel"]
    assert "error" not in result, result.get("error")
    assert result["env_steps"] == 4800
    assert result["eval_return"] >= 0.9 * GOAL


@pytest.mark.parametrize("mode", ["pure", "search", "c51"])
def test_q_learning_solves_the_corridor(learned, mode):
    """Each mode, at its defaults, learns the corridor (run by the `learned` fixture) and reaches
    the optimal return in the final evaluation, the search mode with its own search (25
    simulations). Checked: pure and C51 seeds 1-3 before the channels-last convolutions, seed 1
    after; the search mode seeds 1-4 at 4,800 steps (seed 3's Q head alone scores 0.5: the
    search does better than the head it searches with). At 3,200 the search mode's seeds 1-2
    scored 0.5 and 1.0 (seeds 1-4 of a variant that differed only in its initialisation: 1.0):
    by then its model's reward does not yet tell the two actions apart; at 4,800 it does
    (seed 1: 0.39 against 0.09 for the step onto the goal)."""
    result = learned[f"q_{mode}"]
    assert "error" not in result, result.get("error")
    assert result["env_steps"] == (4800 if mode == "search" else 3200)
    assert result["eval_return"] >= 0.9 * GOAL
