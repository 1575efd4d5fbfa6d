"""The cost model: latency curves, acceptance statistics, the tree choice, and losslessness."""

import json
import math

import numpy as np
import pytest
import torch

from freespec.cost import (
    LatencyModel,
    NodeStats,
    ScoreCalibrator,
    accepted_nodes,
    calibrate,
    choose_size,
    load_or_calibrate,
)
from freespec.drafters import DraftContext, HybridDrafter, SuffixDrafter, TokenRecycling
from freespec.drafters.merge import HostTree
from freespec.drafters.sizing import TreeSizer, size_tree
from freespec.engine import Engine
from freespec.tree import Draft, TreeShape

from tiny import StubTokenizer, tiny_model


def flat(max_size=256, ms=10.0):
    """Verification costs the same for any tree (a GPU at batch 1)."""
    return LatencyModel([1, max_size], [0], [[ms / 1e3, ms / 1e3]])


def steep(ms=30.0, per_node=0.5):
    """Every node costs a lot (a small CPU): by default 2 nodes cost 1.5 plain steps."""
    sizes = [1, 2, 4, 8, 16, 32, 64]
    return LatencyModel(sizes, [0], [[ms * (1 + per_node * (n - 1)) / 1e3 for n in sizes]])


# --------------------------------------------------------------------------- choice
def test_choice_grows_the_tree_when_verification_is_flat():
    p = np.sort(np.random.default_rng(0).uniform(0.01, 0.9, 100))[::-1]
    assert choose_size(p, flat().curve()) == 100  # any node with p > 0 is free
    assert choose_size(p, flat().curve(), max_nodes=37) == 37


def test_choice_picks_the_empty_tree_when_verification_is_expensive_and_acceptance_low():
    low = np.array([0.3, 0.2, 0.1, 0.05])
    assert choose_size(low, steep().curve()) == 0
    # the same acceptance on flat hardware pays
    assert choose_size(low, flat().curve()) == 4
    # high acceptance pays even when nodes cost: 0.95 per node, 2 nodes at 1.5x
    high = np.array([0.95, 0.9, 0.85])
    assert choose_size(high, steep().curve()) >= 1


def test_choice_maximises_tokens_per_second():
    p = np.array([0.8, 0.6, 0.3, 0.1, 0.05])
    curve = steep().curve()
    k = choose_size(p, curve, margin=0.0)
    rates = [(1 + p[:j].sum()) / curve[j + 1] for j in range(len(p) + 1)]
    assert k == int(np.argmax(rates))


def test_latency_curve_interpolates_and_round_trips(tmp_path):
    lm = LatencyModel([1, 4, 8], [128, 1152], [[0.010, 0.016, 0.024], [0.020, 0.026, 0.034]])
    assert lm(1, 128) == pytest.approx(0.010)
    assert lm(2, 128) == pytest.approx(0.012)  # linear between sizes
    assert lm(1, 640) == pytest.approx(0.015)  # linear in the cache length
    assert lm(1, 640 + 31) == lm(1, 640)  # lengths within CACHE_STEP share a curve
    assert lm(8, 2100) > lm(8, 1152)  # extrapolated beyond
    with pytest.raises(ValueError):
        lm(9, 100)
    b = LatencyModel([1, 4, 8], [0], [[0.010, 0.016, 0.024]], bucketed=True)
    assert b(2) == b(3) == b(4) == pytest.approx(0.016)  # padded to the bucket
    p = tmp_path / "c.json"
    lm.save(p)
    assert LatencyModel.load(p).to_dict() == lm.to_dict()
    p.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError):
        LatencyModel.load(p)


def test_size_tree_cuts_by_probability():
    # root -> a (0.9) -> b (0.8); root -> c (0.1)
    t = HostTree([5, 1, 2, 3], [-1, 0, 1, 0], [1.0, 0.9, 0.8, 0.1])
    cut = size_tree(t, steep().curve(), budget=10)
    assert cut is not None and cut.tokens[1:] == [1, 2] or cut.tokens[1:] == [1]
    assert size_tree(HostTree([5, 3], [-1, 0], [1.0, 0.05]), steep().curve(), 10) is None
    assert size_tree(t, flat().curve(), budget=10).size == 4


# --------------------------------------------------------------------------- statistics
def test_node_stats_learn_conditional_rates_and_round_trip():
    parents = [-1, 0, 1, 0]
    st = NodeStats([1.0, 0.5, 0.5, 0.5], parents, "cpu", strength=1.0, decay=1.0)
    for i in range(100):
        hit1 = i % 4 != 0  # node 1 accepted 75%
        tried = torch.tensor([False, True, hit1, True])
        hit = torch.tensor([False, hit1, hit1 and i % 2 == 0, False])
        st.update(tried, hit)
    q = st.conditional()
    assert q[1] == pytest.approx(0.75, abs=0.02)
    assert q[2] == pytest.approx(1 / 3, abs=0.05)  # i % 4 == 2 of the i % 4 != 0
    assert q[3] < 0.02
    p = st.path_probs()
    assert p[2] == pytest.approx(p[1] * q[2])
    other = NodeStats([1.0, 0.5, 0.5, 0.5], parents, "cpu", strength=1.0)
    other.load_state_dict(st.state_dict())
    assert np.allclose(other.conditional(), q)


def test_score_calibrator_maps_overconfident_scores_down_and_stays_monotone():
    cal = ScoreCalibrator(bins=10, strength=2.0, decay=1.0)
    rng = np.random.default_rng(1)
    for _ in range(2000):
        s = rng.uniform(0, 1, 8)
        cal.update(s, rng.uniform(0, 1, 8) < s * 0.5)  # true rate = half the claimed probability
    m = cal(np.linspace(0, 1, 11))
    assert np.all(np.diff(m) >= 0)
    assert cal([0.95])[0] == pytest.approx(0.475, abs=0.08)


def test_score_calibrator_pools_a_sparse_bin_into_a_dense_one():
    """Made monotone by pooling (weighted), not by a running maximum: a bin holding a couple of
    nodes, still near its prior, does not lift the dense bin above it (H100: a 0.95-1.0 bin
    accepted 40% of the time was mapped to 0.84)."""
    cal = ScoreCalibrator(decay=1.0)
    rng = np.random.default_rng(3)
    for _ in range(400):
        cal.update(np.full(25, 0.99), rng.uniform(0, 1, 25) < 0.4)
    cal.update([0.91, 0.91], [True, False])
    cal.flush()
    assert cal([0.99])[0] == pytest.approx(0.4, abs=0.03)
    assert cal([0.91])[0] <= cal([0.99])[0]
    m = cal(np.linspace(0, 1, 41))
    assert np.all(np.diff(m) >= 0)


def test_isotonic_is_the_weighted_least_squares_monotone_fit():
    from freespec.cost import isotonic

    assert isotonic(np.array([0.1, 0.9, 0.4]), np.array([1.0, 1.0, 100.0])) == pytest.approx(
        [0.1, (0.9 + 40.0) / 101.0, (0.9 + 40.0) / 101.0])
    assert isotonic(np.array([0.1, 0.2, 0.3]), np.ones(3)) == pytest.approx([0.1, 0.2, 0.3])
    y = np.random.default_rng(4).uniform(0, 1, 30)
    w = np.random.default_rng(5).uniform(0.5, 3, 30)
    got = isotonic(y, w)
    assert np.all(np.diff(got) >= -1e-12)
    assert np.dot(got, w) == pytest.approx(np.dot(y, w))  # pooling keeps the weighted mean


def test_tree_sizer_waits_for_the_tokens_below_the_step():
    """A node on the path whose depth the step's tokens do not reach is learnt from the next
    steps' tokens, not as rejected: here the chain a, b, c, d is drafted beside a tree that
    won (the step emitted 'a' only); the next step shows b right and c wrong."""
    from freespec.drafters.sizing import TreeSizer

    sz = TreeSizer()
    sz.cal = ScoreCalibrator(decay=1.0, batch=1)
    chain = HostTree.chain(5, [10, 11, 12, 13], [0.9, 0.9, 0.9, 0.9])
    sz.scores(chain)
    sz.learn([10])
    assert sz.cal.n.sum() == 0  # b's outcome is not known yet
    sz.learn([11, 99])
    assert sz.cal.n.sum() == 4 and sz.cal.hits.sum() == 2  # a, b accepted; c, d not
    sz.scores(chain)
    sz.learn([10, 11])
    sz.end()  # the request ended: what was not reached was not accepted
    assert sz.cal.n.sum() == 8 and sz.cal.hits.sum() == 4


def test_score_calibrator_batches_updates_exactly():
    """Updates folded in every 8 steps give the map that updating at every step gives."""
    rng = np.random.default_rng(2)
    one, many = ScoreCalibrator(batch=1), ScoreCalibrator(batch=8)
    for step in range(61):
        s = rng.uniform(0, 1, int(rng.integers(1, 12)))
        ok = rng.uniform(0, 1, len(s)) < s
        one.update(s, ok)
        many.update(s, ok)
    assert len(many._pending) == 5  # 61 = 7 * 8 + 5
    many.flush()
    assert np.allclose(one.n, many.n) and np.allclose(one.hits, many.hits)
    assert np.allclose(one(np.linspace(0, 1, 21)), many(np.linspace(0, 1, 21)))


def test_accepted_nodes_follows_the_emitted_path():
    # root -> 7 -> 8 ; root -> 9 ; 7 -> 4
    tokens, parents = [1, 7, 8, 9, 4], [-1, 0, 1, 0, 1]
    assert accepted_nodes(tokens, parents, [7, 8, 2]).tolist() == [True, True, True, False, False]
    assert accepted_nodes(tokens, parents, [7]).tolist() == [True, True, False, False, False]


# --------------------------------------------------------------------------- drafters
def _ctx(tokens, latency, budget=200):
    return DraftContext(tokens=tokens, root=torch.tensor([tokens[-1]]), prompt_len=len(tokens),
                        budget=budget, latency=latency)


def test_recycling_auto_picks_by_cost():
    tr = TokenRecycling(vocab_size=50, template="auto")
    assert tr.wants_latency
    big = tr.propose(_ctx([1, 2, 3], flat().curve()))
    assert big is not None and big.size - 1 == tr.template.size  # free nodes: all of them
    tr2 = TokenRecycling(vocab_size=50, template="auto")
    # a node costs a whole plain step: the prior acceptance (0.55 at best) cannot pay
    assert tr2.propose(_ctx([1, 2, 3], steep(per_node=1.0).curve())) is None
    tr3 = TokenRecycling(vocab_size=50, template="auto")
    assert tr3.propose(_ctx([1, 2, 3], steep(per_node=0.4).curve())).size == 2  # the best node pays
    fixed = TokenRecycling(vocab_size=50, template="tr8")
    assert not fixed.wants_latency and fixed.propose(_ctx([1, 2, 3], None)).size == 9


def test_recycling_stats_learn_for_nodes_not_drafted_and_persist(tmp_path):
    torch.manual_seed(0)
    tr = TokenRecycling(vocab_size=20, template="auto")
    # the matrix says: after t comes (t+1) % 20 at rank 0
    for t in range(20):
        tr.matrix[t, 0] = (t + 1) % 20
    seq = list(range(20)) * 20
    for i in range(2, 200, 3):  # each step: the target emits the next 3 tokens of the cycle
        d = tr.propose(_ctx(seq[:i], steep(per_node=1.0).curve()))
        d = d or Draft(torch.tensor([seq[i - 1]]), TreeShape.from_parents([-1]))
        logits = torch.zeros(d.size, 20)
        logits[torch.arange(d.size), (d.tokens + 1) % 20] = 10.0  # the target agrees with the cycle
        tr.observe(d, logits, seq[i : i + 3])
    q = tr.stats.conditional()
    chain = [j for j, p in enumerate(tr.template.paths, start=1) if set(p) == {0}]
    tries, hits = tr.stats.tries.numpy(), tr.stats.hits.numpy()
    # learnt although the first steps drafted nothing (the cost allows no node at all): every
    # try of the chain's first nodes accepted, and their estimates pulled above the prior
    for j in chain[:2]:
        assert tries[j] >= 5 and hits[j] == pytest.approx(tries[j])
        assert q[j] > tr.stats.prior[j] + 0.5 * (1 - tr.stats.prior[j]) * tries[j] / (tries[j] + tr.stats.strength)
    others = [j for j, p in enumerate(tr.template.paths, start=1) if len(p) == 1 and p != (0,)]
    assert q[chain[0]] > q[others].max() + 0.2  # the root's other candidates: rarely right
    path = tmp_path / "tr.pt"
    tr.save(path)
    other = TokenRecycling(vocab_size=20, template="auto")
    other.load(path)
    assert np.allclose(other.stats.conditional(), q, atol=1e-6)
    assert torch.equal(other.matrix, tr.matrix)


# --------------------------------------------------------------------------- losslessness
@pytest.mark.parametrize("latency", ["flat", "steep"])
@pytest.mark.parametrize("drafter", ["recycling", "hybrid", "suffix"])
def test_auto_sized_trees_stay_lossless(drafter, latency):
    model = tiny_model("llama", seed=4)
    tok = StubTokenizer()
    lm = flat() if latency == "flat" else steep(ms=5)
    plain = Engine(model, tok, drafter=None)
    mk = {"recycling": lambda: TokenRecycling(97, template="auto"),
          "hybrid": lambda: HybridDrafter(97, template="auto"),
          "suffix": lambda: SuffixDrafter(97)}[drafter]
    eng = Engine(model, tok, drafter=mk(), backend=plain.backend, latency=lm)
    g = torch.Generator().manual_seed(3)
    base = torch.randint(0, 97, (12,), generator=g).tolist()
    drafted = 0
    for prompt in (base * 3, torch.randint(0, 97, (30,), generator=g).tolist()):
        ref = plain.generate(prompt, 48).tokens
        res = eng.generate(prompt, 48)
        assert res.tokens == ref
        drafted += res.stats.draft_nodes
    if latency == "flat" and drafter != "suffix":
        assert drafted > 0  # speculation really ran


def test_calibrate_measures_and_caches(tmp_path):
    from freespec.backends.native import NativeBackend

    model = tiny_model("llama", seed=1)
    be = NativeBackend(model, max_length=256)
    # stop_ratio=inf: measure every size (where the early stop falls depends on timings)
    lm = calibrate(be, sizes=[1, 2, 4, 8], cache_lens=[16, 64], repeats=2, stop_ratio=math.inf)
    assert lm.sizes == [1, 2, 4, 8] and lm.cache_lens == [16, 64]
    assert all(s > 0 for r in lm.seconds for s in r)
    assert be.cache_len == 0  # left empty
    a = load_or_calibrate(model, be, home=tmp_path)
    files = list((tmp_path / "calibration").glob("*.json"))
    assert len(files) == 1
    b = load_or_calibrate(model, be, home=tmp_path)  # read back, not measured again
    assert b.meta["when"] == a.meta["when"] and b.to_dict() == a.to_dict()
    c = load_or_calibrate(model, be, home=tmp_path, force=True)
    assert c.meta["key"] == a.meta["key"]


def test_calibration_is_monotone_in_tree_size(monkeypatch):
    """A step measured slower than a bigger one (a disturbance) is capped by the bigger one."""
    from freespec import cost
    from freespec.backends.native import NativeBackend

    model = tiny_model("llama", seed=1)
    be = NativeBackend(model, max_length=256)
    fake = iter([5.0, 1.0, 2.0, 3.0] * 100)  # the 1-node step looks slowest
    monkeypatch.setattr(cost.np, "median", lambda ts: next(fake))
    lm = calibrate(be, sizes=[1, 2, 4, 8], cache_lens=[16], repeats=1, stop_ratio=math.inf)
    assert lm.seconds[0] == [1.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize("n", [0, 1, 5, 63, 80, 160, 161, 200, 255])
def test_calibration_trees_are_shaped_like_real_ones(n):
    from freespec.cost import calibration_template

    t = calibration_template(n)
    assert t.size == n
    assert t.max_rank <= 8  # Token Recycling's k can fill it
    assert max((len(p) for p in t.paths), default=0) <= 7  # not a chain


def test_calibrate_whole_device_steps(monkeypatch):
    """A backend that runs whole steps on the device is timed through them (a Token Recycling
    step of each size, as the engine runs it); the cache is left empty and the calibration's
    steps are dropped from the backend afterwards."""
    from freespec.backends.native import NativeBackend

    model = tiny_model("llama", seed=1)
    be = NativeBackend(model, max_length=256, device_steps=True)
    taken, dropped = [], []
    real_step = be.step
    monkeypatch.setattr(be, "step", lambda ds: taken.append(ds.shape.size) or real_step(ds))
    monkeypatch.setattr(be, "drop_steps", lambda owners: dropped.append(set(owners)) or 0)
    lm = calibrate(be, sizes=[1, 2, 4, 8], cache_lens=[16, 40], repeats=2, stop_ratio=math.inf)
    assert lm.sizes == [1, 2, 4, 8] and len(lm.seconds) == 2
    assert all(s > 0 for r in lm.seconds for s in r)
    assert sorted(set(taken)) == [2, 4, 8]  # one node: the engine's plain step (verify), not a device step
    assert be.cache_len == 0
    assert len(dropped) == 1 and len(dropped[0]) == 6  # one drafter per (cache length, size > 1)


def test_path_probs_multiply_conditionals_along_paths():
    from freespec.tree import get_template

    t = get_template("tr160")
    parents = t.parents()
    prior = np.random.default_rng(0).uniform(0.05, 0.9, len(parents))
    stats = NodeStats(prior, parents, "cpu")
    g = torch.Generator().manual_seed(1)
    tried = torch.rand(len(parents), generator=g) < 0.7
    stats.update(tried, tried & (torch.rand(len(parents), generator=g) < 0.4))
    q = stats.conditional()
    p = stats.path_probs()
    for i in range(1, len(parents)):
        want, j = 1.0, i
        while j > 0:
            want *= q[j]
            j = parents[j]
        assert p[i] == pytest.approx(want, rel=1e-12)
    assert p[0] == 1.0


def test_calibration_interleaves_sizes(monkeypatch):
    """Sizes are timed in rounds, one step of each per round (a warm-up round first), so a drift
    of the machine hits every size alike."""
    from freespec.backends.native import NativeBackend

    model = tiny_model("llama", seed=1)
    be = NativeBackend(model, max_length=256, device_steps=True)
    taken = []
    real_step = be.step
    monkeypatch.setattr(be, "step", lambda ds: taken.append(ds.shape.size) or real_step(ds))
    calibrate(be, sizes=[1, 2, 4, 8], cache_lens=[16], repeats=3, stop_ratio=math.inf)
    assert taken == [2, 4, 8] * 4


def test_recycling_sizes_by_realized_gain_by_rank():
    """The size choice follows what the best-ranked nodes actually yielded (counted with the
    ranking fixed before the outcome), once enough steps are counted; the per-node estimates
    decide before that."""
    curve = steep(per_node=0.02).curve()  # a node costs 2% of a plain step
    fresh = TokenRecycling(vocab_size=50, template="auto")
    assert fresh.choose(curve, budget=200) > 3  # the priors promise more than 2% a node for a while
    tr = TokenRecycling(vocab_size=50, template="auto")
    n = tr.shape.size
    real = np.zeros(n)
    real[1:] = 1.8
    real[1:4] = [0.9, 1.5, 1.8]  # nothing past the third-ranked node was ever accepted
    tr._realized.copy_(torch.tensor(real * 1e4, dtype=torch.float32))
    tr._realized_n.fill_(1e4)
    assert tr.choose(curve, budget=200) == 3
    assert tr.plan_gain() == pytest.approx(2.8, abs=0.01)
    order = tr._ranked[1]
    assert tr._rank_of[0] == 0 and tr._rank_of[int(order[0])] == 1  # the new ranking, for the next counts


def test_realized_gain_is_counted_by_the_engine():
    model = tiny_model("llama", seed=3)
    eng = Engine(model, StubTokenizer(), drafter="recycling", template="auto", latency=flat())
    eng.generate([1, 2, 3, 4, 5] * 4, 48)
    tr = eng.drafter
    n = float(tr._realized_n)
    assert n > 0
    real = tr._realized.numpy() / n
    assert real[0] == 0 and np.all(np.diff(real) >= -1e-6)  # a count over more nodes is never smaller
    assert real[-1] <= tr.shape.max_depth


def _stepped(levels=((64, 1.0), (96, 1.02), (128, 1.3), (256, 2.0))):
    """A bucketed curve (a GPU with CUDA graph buckets): a tree costs its bucket's time."""
    sizes = [1, 2, 4, 8, 16, 32] + [b for b, _ in levels]
    ms = [1.0] * 6 + [t for _, t in levels]
    return LatencyModel(sizes, [0], [[t / 1e3 for t in ms]], bucketed=True)


class _FixedRetrieval:
    """A retriever that always offers the same tree (the hybrid's other half, isolated)."""

    def __init__(self, tree):
        from freespec.drafters.lookup import Retrieval

        self.r = Retrieval(tree, score=float(sum(tree.scores[1:])), match_len=8)

    def retrieve(self, ctx, max_nodes=None, min_match=None):
        if self.r is None or self.r.match_len < (min_match or 0):
            return None
        return self.r

    def begin(self, prompt):
        pass

    def observe(self, draft, logits, accepted):
        pass

    def end(self, tokens):
        pass


def _hybrid_with_gain(tree) -> HybridDrafter:
    """Hybrid (auto) offering ``tree`` every step, its Token Recycling half having learnt a
    realized gain of 1.5 * (1 - exp(-k / 20)) accepted nodes among the k best-ranked; no cut
    plans (``cut_for``)."""
    h = HybridDrafter(50, template="auto", retriever=_FixedRetrieval(tree))
    h.cut_for = ()  # (plans cut to carry a retrieval tree: their own test)
    real = 1.5 * (1.0 - np.exp(-np.arange(h.tr.shape.size) / 20.0))
    h.tr._realized.copy_(torch.tensor(real * 1e4, dtype=torch.float32))
    h.tr._realized_n.fill_(1e4)
    return h


def test_recycling_holds_the_fixed_trees_step_on_a_stepped_curve(monkeypatch):
    """On a stepped curve (an H100's 64/96/128-node steps) the plan fills the step of the
    device's fixed tree (tr80: 95 nodes) unless another size is predicted ANCHOR_MARGIN faster;
    where the curve rises node by node there is no such anchor."""
    from freespec.drafters import recycling as R

    monkeypatch.setattr(R, "default_template", lambda device: "tr80")  # (a GPU's fixed tree)
    tr = _hybrid_with_gain(HostTree.chain(5, [10], [0.5])).tr  # gain 1.5 * (1 - exp(-k / 20))
    near = _stepped(((64, 1.0), (96, 1.04), (128, 1.08), (256, 2.0))).curve()  # 63 predicted 1.8% faster
    far = _stepped(((64, 1.0), (96, 1.08), (128, 1.16), (256, 2.0))).curve()  # 63 predicted 5.7% faster
    assert tr.anchor(near, 160) == 95 and tr.anchor(steep().curve(), 160) is None
    assert tr.choose(near, 200) == 95
    plan, ranked = tr._plan, tr._ranked[1]
    j = int(ranked[120])  # a node outside the plan becomes a sure one: the ranking moves
    tr.stats.tries[j] += 1e4
    tr.stats.hits[j] += 1e4
    assert tr.choose(near, 200) == 95
    assert j in tr._ranked[1][:95] and tr._plan is plan  # the plan, nodes and all, stays
    assert tr.choose(far, 200) == 63
    assert tr.choose(near, 200) == 95  # back to the anchor at once (no hysteresis toward it)
    assert tr.anchor(near, 90) == 90 and tr.choose(near, 90) == 90  # the budget cuts the step short


def test_hybrid_chooses_plan_and_attached_tree_together():
    """On a bucketed curve the retrieval tree is attached in the layout that pays: alone, Token
    Recycling takes 63 nodes (the 64-node bucket); a strong 20-node retrieval chain goes beside
    it padded to 32 (the 96-node bucket, all 20 loaded), where 95 + 32 would pay for 128."""
    curve = _stepped(((64, 1.0), (96, 1.06), (128, 1.5), (256, 2.0))).curve()
    chain = HostTree.chain(5, list(range(10, 30)), [0.5] * 20)
    h = _hybrid_with_gain(chain)
    tr = h.tr
    ctx = DraftContext(tokens=[1, 2, 3, 5], root=None, prompt_len=3, budget=200, latency=curve)
    assert tr.plan_options(ctx, 95) == [63, 95]  # its own choice, then the end of the next bucket
    h.retriever.r = None  # no match: the plan alone
    assert h.device_step(ctx).shape.size == 1 + 63
    h.retriever = _FixedRetrieval(chain)
    assert h.device_step(ctx).shape.size == 1 + 63 + 32
    buf, _ = h._steps[(tr._by_size[64][3].key, 32)]
    assert buf.loaded == 20 and buf.tokens.tolist()[:20] == list(range(10, 30))
    assert h.used["attached"] == 1 and tr.chosen_sizes == {63: 2}


def test_hybrid_lays_a_small_tree_into_the_largest_layout_of_the_same_bucket():
    """A 5-node retrieval chain beside a 63-node plan: 63 + 8 and 63 + 32 both pay for the
    96-node bucket, so it rides in the 32-slot layout (one captured step per plan and bucket,
    not one per layout); where the larger layout would pay for a bigger bucket it keeps 8."""
    chain = HostTree.chain(5, [10, 11, 12, 13, 14], [0.9] * 5)
    for levels, want in ((((64, 1.0), (96, 1.06), (128, 1.5), (256, 2.0)), 32),
                         (((64, 1.0), (72, 1.06), (96, 1.5), (128, 1.5), (256, 2.0)), 8)):
        h = _hybrid_with_gain(chain)
        tr = h.tr
        ctx = DraftContext(tokens=[1, 2, 3, 5], root=None, prompt_len=3, budget=200, latency=_stepped(levels).curve())
        assert h.device_step(ctx).shape.size == 1 + 63 + want
        buf, _ = h._steps[(tr._by_size[64][3].key, want)]
        assert buf.loaded == 5 and buf.tokens.tolist()[:5] == [10, 11, 12, 13, 14]


def test_hybrid_counts_what_an_attached_tree_adds_beyond_the_plan():
    """An attached node gains only where Token Recycling's plan stops short of its depth: a
    5-node chain is attached where the plan rarely reaches depth 1, and left out where the plan
    is sure to reach depth 7 (it could only repeat the plan's path)."""
    curve = _stepped(((64, 1.0), (96, 1.01), (128, 1.5), (256, 2.0))).curve()
    chain = HostTree.chain(5, [10, 11, 12, 13, 14], [0.9] * 5)
    ctx = DraftContext(tokens=[1, 2, 3, 5], root=None, prompt_len=3, budget=200, latency=curve)
    for reach, attached in ((0.0, True), (1.0, False)):
        h = _hybrid_with_gain(chain)
        tr = h.tr
        tr.plan_reach = lambda size, r=reach: np.full(tr.shape.max_depth, r)
        h.device_step(ctx)
        assert h.used["attached"] == int(attached)


def test_hybrid_leaves_the_anchor_step_only_for_a_clear_gain():
    """An attached tree that puts the step into a costlier step of the curve than Token
    Recycling's anchor must be predicted ANCHOR_MARGIN faster: 0.1 expected tokens for 2% more
    time is left out, 1.0 is attached."""
    curve = _stepped(((64, 1.0), (96, 1.02), (128, 1.5), (256, 2.0))).curve()
    chain = HostTree.chain(5, [10, 11, 12, 13, 14], [0.9] * 5)
    ctx = DraftContext(tokens=[1, 2, 3, 5], root=None, prompt_len=3, budget=200, latency=curve)
    for calibrated, attached in ((0.02, False), (0.2, True)):
        h = _hybrid_with_gain(chain)
        tr = h.tr
        tr.plan_reach = lambda size: np.zeros(tr.shape.max_depth)  # the plan never reaches depth 1
        h.sizer.scores = lambda tree, c=calibrated: [c] * (tree.size - 1)
        assert h.device_step(ctx).shape.size == 1 + 63 + (32 if attached else 0)  # (padded: same step)
        assert h.used["attached"] == int(attached)


def test_hybrid_cuts_the_anchor_plan_to_carry_a_retrieval_tree_in_its_step(monkeypatch):
    """Where Token Recycling's plan fills its anchor step (tr80's 96-node step: 95 nodes), a
    retrieval tree rides in that step beside the plan cut by its layout (87 + 8, 63 + 32) rather
    than paying for the 128-node step; a cut plan is never taken alone, and it stays the same
    nodes (the same laid buffer) while the plan does, whatever the ranking does meanwhile."""
    from freespec.drafters import recycling as R
    from freespec.drafters.hybrid import CUT_FOR

    monkeypatch.setattr(R, "default_template", lambda device: "tr80")  # (a GPU's fixed tree)
    assert CUT_FOR == (8, 32)
    curve = _stepped(((64, 1.0), (96, 1.04), (128, 1.08), (256, 2.0))).curve()
    ctx = DraftContext(tokens=[1, 2, 3, 5], root=None, prompt_len=3, budget=200, latency=curve)
    short = HostTree.chain(5, [10, 11, 12, 13, 14], [0.9] * 5)
    long = HostTree.chain(5, list(range(10, 30)), [0.5] * 20)
    for tree, (P, m) in ((None, (95, 0)), (short, (87, 8)), (long, (63, 32))):
        h = _hybrid_with_gain(short)
        h.cut_for = CUT_FOR
        h.retriever.r = None if tree is None else _FixedRetrieval(tree).r
        tr = h.tr
        tr.plan_reach = lambda size: np.zeros(tr.shape.max_depth)  # the plan never reaches depth 1
        assert h.device_step(ctx).shape.size == 1 + P + m == 96
        assert tr.chosen_sizes == {P: 1} and h.used["attached" if m else "recycling"] == 1
        if P == 87:
            plan = set(tr._plan_key)
            assert len(plan) == 95 and set(tr._top[87][1].tolist()[1:]) <= plan
            laid = tr._by_size[88][2]
            # a node of the plan outside the cut becomes a sure one: the ranking moves, the cut stays
            j = next(int(i) for i in tr._ranked[1][88:95])
            tr.stats.tries[j] += 1e4
            tr.stats.hits[j] += 1e4
            tr._since = R.RECHOOSE
            assert h.device_step(ctx).shape.size == 96
            assert j in tr._ranked[1][:87] and set(tr._plan_key) == plan
            assert tr._by_size[88][2] == laid and j not in tr._top[87][1].tolist()


def test_hybrid_device_steps_leave_weak_matches_out():
    """A retrieval tree below min_score (expected accepted length) is not weighed on device
    steps: not attached, and not learnt from."""
    curve = flat().curve()
    ctx = DraftContext(tokens=[1, 2, 3, 5], root=None, prompt_len=3, budget=200, latency=curve)
    for scores, attached in (([0.3, 0.3], False), ([0.6, 0.6], True)):
        h = HybridDrafter(50, template="auto", retriever=_FixedRetrieval(HostTree.chain(5, [10, 11], scores)))
        ds = h.device_step(ctx)
        assert h.used["attached"] == int(attached)
        assert (h.sizer._last is not None) is attached
        ds.done([10, 11, 7])


def test_hybrid_host_steps_score_recycling_apart_where_retrieval_finds_nothing():
    """Host steps (the CPU): where retrieval offers nothing, Token Recycling's nodes are scored
    by what they took on such steps. Its estimates, learnt over all steps, promise that a few
    nodes pay; after steps where retrieval found nothing and none of its nodes was accepted,
    such a step drafts nothing. With a retrieval tree, its nodes still ride along."""
    curve = steep(ms=10.0, per_node=0.02).curve()  # each node costs 2% of a plain step
    h = _hybrid_with_gain(HostTree.chain(5, [10, 11], [0.9, 0.9]))
    root = torch.tensor([5])
    ctx = DraftContext(tokens=[1, 2, 3, 5], root=root, prompt_len=3, budget=200, latency=curve)
    h.retriever.r = None
    first = h.propose(ctx)
    assert first is not None and first.size > 1  # Token Recycling's estimates pay for nodes
    assert h.tr.plan_gain() > 1.05
    for _ in range(200):  # its nodes are all token 0 (an empty matrix); the target says 7
        d = h.propose(ctx)
        logits = torch.zeros(d.size if d is not None else 1, 50)
        logits[:, 0] = 1.0  # (keeps the matrix pointing at 0)
        h.observe(d if d is not None else Draft(root, TreeShape.from_parents([-1])), logits, [7])
    assert h.propose(ctx) is None
    assert h.used["none"] > 150
    assert h.tr.plan_gain() > 1.05  # its own estimates were not what decided
    h.retriever = _FixedRetrieval(HostTree.chain(5, [10, 11], [0.9, 0.9]))
    d = h.propose(ctx)
    assert d is not None and 0 in d.tokens[1:].tolist()  # beside retrieval, scored apart


def _recycling_learnt_on_a_cycle() -> TokenRecycling:
    """Token Recycling (auto) after ~100 steps of text cycling through 20 tokens, which its
    rank-0 chain predicts: statistics and a choice to read."""
    tr = TokenRecycling(vocab_size=20, template="auto")
    for t in range(20):
        tr.matrix[t, 0] = (t + 1) % 20
    seq = list(range(20)) * 20
    for i in range(2, 300, 3):
        d = tr.propose(_ctx(seq[:i], flat().curve()))
        logits = torch.zeros(d.size, 20)
        logits[torch.arange(d.size), (d.tokens + 1) % 20] = 10.0
        tr.observe(d, logits, seq[i : i + 3])
    return tr


def test_recycling_plan_reach_spreads_the_plan_gain_over_depths():
    tr = _recycling_learnt_on_a_cycle()
    D = tr.shape.max_depth
    assert tr.plan_reach(0).tolist() == [0.0] * D
    for size in (1, 10, 80):
        r = tr.plan_reach(size)
        assert r.shape == (D,) and np.all((r >= 0) & (r <= 1))
        if r.max() < 1:  # (nothing clipped) the expected accepted count is the plan's gain
            assert r.sum() == pytest.approx(tr.plan_gain(size) - 1.0)
    assert tr.plan_reach(1)[1:].sum() == 0  # one node: depth 1 only


def test_recycling_counts_acceptance_below_the_bonus_token_from_later_steps():
    """A counted step's base tree is held until the target's next D tokens are known, so a
    path the step's own draft stopped short of still counts in full: here the base tree's
    rank-0 chain is the target's continuation, the step emitted one token, and the next two
    steps bring the rest; all 7 chain nodes count as accepted (counted at once: 1)."""
    V = 50
    tr = TokenRecycling(vocab_size=V, template="auto")
    t = torch.arange(V)
    tr.matrix.copy_(torch.stack([(t + 1 + 7 * r) % V for r in range(tr.k)], 1).to(torch.int32))
    D = tr.shape.max_depth
    assert D == 7
    ctx = DraftContext(tokens=[1, 2, 5], root=torch.tensor([5]), prompt_len=2, budget=200, latency=flat().curve())
    tr.propose(ctx)
    tr.learn([6])  # a counted step (the first): held
    assert float(tr._realized_n) == 0
    tr.learn([7, 8])
    assert float(tr._realized_n) == 0  # 3 of 7 tokens known
    tr.learn([9, 10, 11, 12, 13])
    assert float(tr._realized_n) == 1
    assert float(tr._realized[-1]) == 7  # every depth of the chain, none of its siblings
    hits = tr.stats.hits
    assert float(hits.sum()) == 7

    tr2 = TokenRecycling(vocab_size=V, template="auto")  # a request ends before D tokens: counts what it knows
    tr2.matrix.copy_(tr.matrix)
    tr2.propose(ctx)
    tr2.learn([6, 7])
    tr2.begin([1, 2, 3])
    assert float(tr2._realized_n) == 1 and float(tr2._realized[-1]) == 2


def test_recycling_reset_drops_a_held_count():
    """A count held for the next tokens belongs to the statistics that ``reset`` clears."""
    tr = TokenRecycling(vocab_size=50, template="auto")
    ctx = DraftContext(tokens=[1, 2, 5], root=torch.tensor([5]), prompt_len=2, budget=200, latency=flat().curve())
    tr.propose(ctx)
    tr.learn([6])  # held
    tr.reset()
    tr.learn([7, 8, 9, 10, 11, 12, 13])
    assert float(tr._realized_n) == 0 and float(tr.stats.tries.sum()) == 0


def test_recycling_candidates_score_by_rank_gain():
    """The nodes handed to a merging drafter carry the expected gain of their rank (what the
    size choice itself rests on), non-increasing down the ranking, parents first."""
    tr = _recycling_learnt_on_a_cycle()
    c = tr.candidates(limit=40)
    p, order = tr._ranked
    assert c is not None and c.size == 41
    gain = [tr.plan_gain(k) - 1.0 for k in range(41)]
    want = np.minimum.accumulate(np.maximum(np.diff(gain), 0.0))
    # the candidate tree keeps the 40 best-ranked base nodes in base order: match them by rank
    rank = {int(n): r for r, n in enumerate(order[:40])}
    kept = sorted(rank)
    got = {rank[n]: c.scores[j + 1] for j, n in enumerate(kept)}
    assert np.allclose([got[r] for r in range(40)], want)
    assert all(c.scores[c.parents[j]] >= c.scores[j] for j in range(1, c.size))
    # the chain the text follows is learnt as likely (the realized gain), others as unlikely
    assert got[0] > 0.5 and want[-1] < 0.2


def test_recycling_candidates_cached_per_choice_follow_the_tokens():
    """The candidates' structure and scores are kept from one choice to the next; each step's
    tree still carries that step's base tokens: equal to one built from scratch, step after
    step, across a re-choice."""
    tr = _recycling_learnt_on_a_cycle()
    seq = list(range(20)) * 30
    seen = []  # the choices met (held: ids of freed objects can repeat)
    for i in range(300, 300 + 3 * 40, 3):  # past a re-choice (every RECHOOSE steps)
        d = tr.propose(_ctx(seq[:i], flat().curve()))
        got = tr.candidates(limit=30)
        kept, tr._cand = tr._cand, None
        fresh = tr.candidates(limit=30)
        tr._cand = kept
        assert (got.tokens, got.parents, got.scores) == (fresh.tokens, fresh.parents, fresh.scores)
        assert got.tokens[0] == seq[i - 1]  # this step's root, not the cached step's
        seen.append(tr._ranked)
        logits = torch.zeros(d.size, 20)
        logits[torch.arange(d.size), (d.tokens + 1) % 20] = 10.0
        tr.observe(d, logits, seq[i : i + 3])
    assert any(r is not seen[0] for r in seen)  # a re-choice happened in between


def test_deferred_learning_leaves_what_learning_at_once_leaves():
    """Device steps hand their learning back as deferred work (run while the next step
    computes, after that step's draft): Token Recycling's counts and the retrieval
    calibration end where learning at once ends, steps of 1 to 4 tokens, a new request between."""
    V = 20
    seq = list(range(V)) * 30
    runs = []
    for defer in (False, True):
        tr = TokenRecycling(vocab_size=V, template="auto")
        for t in range(V):
            tr.matrix[t, 0] = (t + 1) % V
        sz = TreeSizer()
        later = None
        i, n = 2, 0
        while i < 400:
            if i > 200 and n == 0:  # a new request: what is pending runs first (as the engine does)
                if later is not None:
                    later()
                    later = None
                sz.end()
                tr.begin(seq[:i])
                n = 1
            tr.propose(_ctx(seq[:i], flat().curve()))
            sz.scores(HostTree.chain(seq[i - 1], seq[i : i + 4], [(i % 9 + 0.5) / 9, 0.8, 0.7, 0.6]))
            if later is not None:  # the last step's deferred work, after this step's draft
                later()
            step = 1 + (i * 7) % 4
            got = seq[i : i + step]
            if defer:
                a, b = tr.learn(got, defer=True), sz.learn(got, defer=True)
                later = (lambda a=a, b=b: (a and a(), b and b())) if (a or b) else None
            else:
                tr.learn(got)
                sz.learn(got)
            i += step
        if later is not None:
            later()
        sz.end()
        sz.cal.flush()
        runs.append((tr.stats.tries.clone(), tr.stats.hits.clone(), tr._realized.clone(), float(tr._realized_n),
                     sz.cal.n.copy(), sz.cal.hits.copy()))
    now, deferred = runs
    assert now[3] > 5 and now[4].sum() > 100  # both learnt
    for a, b in zip(now, deferred):
        if isinstance(a, float):
            assert a == b
        elif isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
        else:
            assert np.array_equal(a, b)


def test_device_steps_rechoose_the_plan_in_deferred_work():
    """On device steps the re-choice due every RECHOOSE steps never waits between steps: the
    statistics' read back starts in the deferred work (while the next step computes), and the
    choice runs in the deferred work of the step after, reading what was copied (host steps
    choose at once). The choice sees the counts as of the read."""
    from freespec.drafters import recycling as R

    tr = TokenRecycling(vocab_size=50, template="auto")
    calls = []
    choose = tr.choose
    tr.choose = lambda curve, budget, read=None: calls.append(None if read is None else read.copy()) or choose(curve, budget, read=read)
    ctx = DraftContext(tokens=[1, 2, 3, 5], root=None, prompt_len=3, budget=200, latency=flat().curve())
    ds = tr.device_step(ctx)  # the first step chooses at once
    assert ds is not None and calls == [None]
    for _ in range(R.RECHOOSE - 1):
        later = ds.done([7])
        if later is not None:
            later()
        ds = tr.device_step(ctx)
    read = tr._read_stats
    tr._read_stats = lambda: pytest.fail("a device step's choice read the statistics with a sync")
    later = ds.done([7])  # the RECHOOSE-th step since the choice: due
    assert later is not None and len(calls) == 1 and tr._since == 0
    ds = tr.device_step(ctx)  # the next step drafts with the plan it has
    later()  # (its window) the read starts
    tr.stats.hits += 5.0  # counted after the read
    later = ds.done([7])
    assert later is not None and len(calls) == 1
    tr.device_step(ctx)
    later()  # (the next window) the choice
    assert len(calls) == 2 and tr._since == 2  # (counted from when it fell due)
    n = len(tr.stats.prior)
    tr._read_stats = read
    assert np.allclose(calls[1][n : 2 * n], 0.0) and tr._read_stats()[n : 2 * n].min() > 4.0  # (hits: none of 7s)


def test_hybrid_reads_the_latency_curve_again_when_it_has_moved(monkeypatch):
    """The engine hands a new curve every few steps (the cache grows); the pair choice keeps
    the curve it read (its anchor, options and table) until the engine's has moved by
    CURVE_DRIFT, and reads every new curve near the end of the context."""
    from freespec.drafters import recycling as R
    from freespec.drafters.hybrid import CURVE_DRIFT

    monkeypatch.setattr(R, "default_template", lambda device: "tr80")
    h = _hybrid_with_gain(HostTree.chain(5, [10, 11, 12, 13, 14], [0.9] * 5))
    a = _stepped(((64, 1.0), (96, 1.04), (128, 1.08), (256, 2.0))).curve()
    near, far = a * (1 + CURVE_DRIFT / 2), a * (1 + 2 * CURVE_DRIFT)
    for curve, budget, read in ((a, 4000, a), (near, 4000, a), (far, 4000, far), (far * 1.0, 200, None)):
        h.device_step(DraftContext(tokens=[1, 2, 3, 5], root=None, prompt_len=3, budget=budget, latency=curve))
        assert h._curve[0] is curve
        assert h._curve[1] is (curve if read is None else read)


def test_hybrid_prepares_the_next_step_while_a_step_runs(monkeypatch):
    """A choice of Token Recycling's plan deferred to the window of the next device step is
    followed there by the next step's plan options, pair table and plans, so the step after
    finds them built (host work that would otherwise fall between two steps)."""
    from freespec.drafters import recycling as R

    monkeypatch.setattr(R, "default_template", lambda device: "tr80")
    from freespec.drafters.hybrid import CUT_FOR

    h = _hybrid_with_gain(HostTree.chain(5, list(range(10, 30)), [0.5] * 20))
    h.cut_for = CUT_FOR
    tr = h.tr
    curve = _stepped(((64, 1.0), (96, 1.04), (128, 1.08), (256, 2.0))).curve()
    ctx = DraftContext(tokens=[1, 2, 3, 5], root=None, prompt_len=3, budget=4000, latency=curve)
    h.device_step(ctx)
    tr._since = R.RECHOOSE  # the plan is due to be chosen again
    gain = tr._gain
    later = h._learn([7, 8])
    assert later is not None and tr._gain is gain  # the read back waits for the window ...
    later()
    h.device_step(ctx)
    later = h._learn([7, 8])
    assert later is not None and tr._gain is gain  # ... and the choice for the next one
    later()
    table = h._table
    assert tr._gain is not gain and table[1] is tr._gain and table[0] is h._curve[1]
    sizes = {row[0] for row in table[3]}
    assert sizes == {95, 95 - 8, 95 - 32}  # its own plan and its cuts to carry a retrieval tree
    plans = {P: tr._sized_plan(P) for P in sizes}
    assert all(plans[P] is tr._top[P] for P in sizes if P != len(tr._plan_key))
    built = []
    monkeypatch.setattr(h, "_pair_table", lambda *a: built.append(a))
    monkeypatch.setattr(tr, "_plan_for", lambda *a: built.append(a))
    ds = h.device_step(ctx)
    assert not built and h._table is table
    assert ds.shape.size - 1 in {P + m for P in sizes for m in (0, 8, 32)}


def _anchored(monkeypatch, tree, ruled: bool):
    """Hybrid (auto) on an H100-like stepped curve with tr80 as the fixed tree (anchor 95), the
    cuts 87 + 8 and 63 + 32 allowed, offering ``tree`` (None: no match); ``ruled``: with the
    anchor's rule (else the full pair choice)."""
    from freespec.drafters import recycling as R
    from freespec.drafters.hybrid import CUT_FOR

    monkeypatch.setattr(R, "default_template", lambda device: "tr80")  # (a GPU's fixed tree)
    h = _hybrid_with_gain(HostTree.chain(5, [10], [0.9]))
    h.cut_for = CUT_FOR
    h.retriever.r = None if tree is None else _FixedRetrieval(tree).r
    if not ruled:
        h._anchor_rule = lambda rows, sizes: None
    return h


def _bushy(n: int) -> HostTree:
    """A retrieval tree of ``n`` nodes: a chain with a side branch at every node, scores falling."""
    parents, scores = [-1], [1.0]
    for i in range(1, n + 1):
        parents.append(max(0, i - 2) if i % 2 == 0 else i - 1)
        scores.append(0.95**i)
    return HostTree(list(range(100, 100 + n + 1)), parents, scores)


@pytest.mark.parametrize("tree", [None, HostTree.chain(5, [10, 11, 12], [0.9] * 3),
                                  HostTree.chain(5, list(range(10, 18)), [0.8] * 8),
                                  HostTree.chain(5, list(range(10, 30)), [0.5] * 20), _bushy(40)],
                         ids=["none", "chain3", "chain8", "chain20", "bushy40"])
def test_hybrid_anchor_rule_takes_the_pair_choices_pair(monkeypatch, tree):
    """Where Token Recycling holds its anchor (95 nodes in an H100's 96-node step) and the plan
    nodes a retrieval tree would displace are worth little, the pair choice is a rule: the
    anchor plan alone, or the tree in the smallest layout that holds it beside the plan cut by
    that layout. It takes the full choice's pair, loads the same nodes, and leaves the
    calibration of retrieval scores alone (nothing to learn from: it read none)."""
    curve = _stepped(((64, 1.0), (96, 1.04), (128, 1.08), (256, 2.0))).curve()
    ctx = DraftContext(tokens=[1, 2, 3, 5], root=None, prompt_len=3, budget=4000, latency=curve)
    got = {}
    for ruled in (True, False):
        h = _anchored(monkeypatch, tree, ruled)
        h.tr.plan_reach = lambda size, tr=h.tr: np.zeros(tr.shape.max_depth)  # (attaching pays)
        ds = h.device_step(ctx)
        loaded = None
        if h.used["attached"]:
            buf = next(v[0] for k, v in h._steps.items() if k[1] and v[1] is ds)
            loaded = buf.tokens.tolist()[: buf.loaded]
        got[ruled] = (dict(h.tr.chosen_sizes), ds.shape.size, loaded)
        assert h.ruled == int(ruled)
        assert (h.sizer._last is None) is (ruled or tree is None)
    assert got[True] == got[False]
    P = next(iter(got[True][0]))
    assert got[True][1] == 96 and P == {None: 95, 3: 87, 8: 87, 20: 63, 40: 63}[None if tree is None else tree.size - 1]


def test_hybrid_anchor_rule_stays_out_where_displaced_plan_nodes_are_worth_much(monkeypatch):
    """The rule needs the plan's lowest-ranked nodes that each layout displaces to be worth
    little against what a strong retrieval tree promises (RULE_DISPLACED of min_score): with
    Token Recycling's gain still rising steeply between 63 and 95 nodes (0.02 tokens a node:
    0.48 tokens between 63 and 87), the full pair choice runs."""
    from freespec.drafters.hybrid import RULE_DISPLACED

    curve = _stepped(((64, 1.0), (96, 1.04), (128, 1.08), (256, 2.0))).curve()
    ctx = DraftContext(tokens=[1, 2, 3, 5], root=None, prompt_len=3, budget=4000, latency=curve)
    k = np.arange(161)
    for real, ruled in ((2.0 * (1.0 - np.exp(-k / 20.0)), True), (0.02 * np.minimum(k, 95), False)):
        h = _anchored(monkeypatch, HostTree.chain(5, [10, 11, 12], [0.9] * 3), True)
        h.tr._realized.copy_(torch.tensor(real * 1e4, dtype=torch.float32))
        h.device_step(ctx)
        rows = {row[0]: row[1] for row in h._table[3]}
        assert h._table[2][0] == 95  # Token Recycling's own choice: the anchor, either way
        assert (rows[87] - rows[63] <= RULE_DISPLACED) is ruled
        assert h.ruled == int(ruled)


def test_recycling_plan_step_follows_a_new_choice(monkeypatch):
    """A plan size's device step is kept between choices; a new choice that moves the plan to
    other nodes of the same size lays them into its buffer when the step is next taken."""
    from freespec.drafters import recycling as R

    monkeypatch.setattr(R, "default_template", lambda device: "tr80")
    tr = _hybrid_with_gain(HostTree.chain(5, [10], [0.5])).tr
    curve = _stepped(((64, 1.0), (96, 1.04), (128, 1.08), (256, 2.0))).curve()
    assert tr.choose(curve, 200) == 95
    ds = tr.plan_step(95)
    assert tr.plan_step(95) is ds
    j = int(tr._ranked[1][120])  # a node outside the plan becomes a sure one ...
    tr.stats.tries[j] += 1e4
    tr.stats.hits[j] += 1e4
    tr._plan_key = None  # ... and the plan is chosen afresh (no hysteresis)
    assert tr.choose(curve, 200) == 95
    assert tr.plan_step(95) is ds
    laid = tr._by_size[96][1].tolist()
    assert j in laid and laid == [0, *tr._plan_key]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned memory, an asynchronous copy)")
def test_recycling_reads_statistics_without_a_sync_on_cuda():
    """On CUDA the read back for a device step's choice is an asynchronous copy into pinned
    memory, ordered after the work enqueued before it; once the stream has synced, it holds
    what a read with a sync returns."""
    tr = TokenRecycling(vocab_size=50, template="auto", device="cuda")
    tr.stats.tries.add_(torch.arange(len(tr.stats.prior), device="cuda", dtype=torch.float32))
    tr._realized.fill_(2.5)
    tr._realized_n.fill_(3.0)
    tr._reading = [None, False]
    tr._start_read()
    assert tr._reading[1] and tr._stats_host.is_pinned()
    torch.cuda.synchronize()
    assert np.allclose(tr._stats_np.astype(np.float64), tr._read_stats())
