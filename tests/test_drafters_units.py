"""Unit tests of the retrieval structures, tree merging and the drafter registry (no models)."""

import pytest
import torch

from freespec.drafters import DRAFTERS, DraftContext, make_drafter
from freespec.drafters.draft_model import DraftModelError
from freespec.drafters.lookup import PromptLookup
from freespec.drafters.merge import HostTree, cap, merge_trees, prune, to_draft
from freespec.drafters.suffix import SuffixDrafter, SuffixIndex, build_tree
from freespec.tree import TreeShape


def _ctx(tokens, budget=1000, latency=None):
    return DraftContext(tokens=list(tokens), root=torch.tensor([tokens[-1]]), prompt_len=1, budget=budget,
                        latency=latency)


# ------------------------------------------------------------------------- merge_trees
def _check_tree(t: HostTree):
    assert t.parents[0] == -1
    for i in range(1, t.size):
        assert 0 <= t.parents[i] < i
    kids = {}
    for i in range(1, t.size):
        key = (t.parents[i], t.tokens[i])
        assert key not in kids, "duplicate siblings after a merge"
        kids[key] = i
    TreeShape.from_parents(t.parents)  # a valid shape


def test_merge_shares_common_prefixes():
    a = HostTree.chain(7, [1, 2, 3, 4])
    b = HostTree.chain(7, [1, 2, 9])
    c = HostTree([7, 1, 5, 6], [-1, 0, 0, 1])  # 7 -> {1 -> 6, 5}
    m = merge_trees([a, b, c])
    _check_tree(m)
    paths = set(m.paths())
    want = {(), (1,), (1, 2), (1, 2, 3), (1, 2, 3, 4), (1, 2, 9), (5,), (1, 6)}
    assert paths == want
    assert m.size == len(want)
    assert m.tokens[0] == 7


def test_merge_cap_keeps_best_scores_closed_under_parents():
    a = HostTree([0, 1, 2, 3], [-1, 0, 1, 2], [1.0, 0.9, 0.8, 0.7])
    b = HostTree([0, 4, 5], [-1, 0, 1], [1.0, 0.85, 0.95])  # child above its parent: capped to 0.85
    m = merge_trees([a, b], max_nodes=3)
    _check_tree(m)
    assert set(m.paths()) == {(), (1,), (4,), (4, 5)}
    # without scores: earlier trees and nodes first
    m = merge_trees([HostTree.chain(0, [1, 2, 3]), HostTree.chain(0, [4, 5])], max_nodes=2)
    assert set(m.paths()) == {(), (1,), (4,)}
    assert cap(HostTree.chain(0, [1, 2, 3]), 2).paths() == [(), (1,), (1, 2)]


def test_merge_random_trees_is_the_union():
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        trees = []
        for _ in range(3):
            n = int(torch.randint(1, 12, (1,), generator=g))
            parents = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, n)]
            tokens = [42] + torch.randint(0, 4, (n - 1,), generator=g).tolist()
            trees.append(HostTree(tokens, parents))
        m = merge_trees(trees)
        _check_tree(m)
        assert set(m.paths()) == set().union(*(set(t.paths()) for t in trees))


def test_prune_drops_whole_subtrees_and_to_draft():
    t = HostTree([9, 1, 2, 3, 4], [-1, 0, 1, 0, 3])
    p = prune(t, lambda i: t.tokens[i] != 3)
    assert p.paths() == [(), (1,), (1, 2)]
    d = to_draft(t, "cpu")
    assert d.tokens.tolist() == [9, 1, 2, 3, 4]
    assert d.shape.parents_list == (-1, 0, 1, 0, 3)
    assert to_draft(t, "cpu").shape is d.shape  # shapes are cached


# ------------------------------------------------------------------------- lookup
def test_lookup_longest_most_recent_match():
    lk = PromptLookup(max_ngram=3, num_pred=4)
    toks = [1, 2, 3, 10, 11, 12, 13, 5, 2, 3, 20, 21, 22, 9, 2, 3]
    conts, n = lk.continuations(toks)
    assert n == 2 and conts == [[20, 21, 22, 9]]  # most recent "2 3"
    toks2 = toks + [7, 1, 2, 3]  # "1 2 3" occurred once: the 3-gram wins over the recent "2 3"
    conts, n = lk.continuations(toks2)
    assert n == 3 and conts == [[10, 11, 12, 13]]


def test_lookup_branches_incremental_and_periodic():
    lk = PromptLookup(max_ngram=2, num_pred=3, branches=3)
    toks = [5, 1, 2, 5, 3, 4, 5, 6, 7, 5]
    r = lk.retrieve(_ctx(toks))
    assert set(r.tree.paths()) >= {(6, 7, 5), (3, 4, 5), (1, 2, 5)}
    assert r.tree.size - 1 == 9
    # incremental: new tokens are indexed without a rebuild
    index_before = lk._index
    toks += [6]
    conts, _ = lk.continuations(toks)
    assert lk._index is index_before and conts[0] == [7, 5, 6]
    # a loop is drafted past the context's end
    lk = PromptLookup(max_ngram=3, num_pred=7)
    conts, _ = lk.continuations([9, 8, 1, 2, 3, 1, 2, 3])
    assert conts == [[1, 2, 3, 1, 2, 3, 1]]
    assert PromptLookup().retrieve(_ctx([1, 2, 3])) is None  # nothing repeats
    assert PromptLookup().retrieve(_ctx([1, 2, 1], budget=0)) is None


# ------------------------------------------------------------------------- suffix structure
def test_suffix_index_insert_and_match():
    st = SuffixIndex(key_lengths=(1, 2, 4))
    st.add([1, 2, 3, 4, 5])
    st.add([7, 2, 3, 4, 6])
    st.add([2, 3, 9])
    assert st.n_sequences == 3 and st.n_tokens == 13
    occ = st.occurrences([0, 2, 3, 4], max_match=8, limit=10)
    nxt = sorted(st.buf[i] for m, i in occ)
    assert nxt == [5, 6] and all(m == 3 for m, _ in occ)
    occ = dict((st.buf[i], m) for m, i in st.occurrences([1, 2, 3, 4], 8, 10, levels=2))
    assert occ == {5: 4, 6: 3}
    # a match never crosses from one sequence into the next
    occ = st.occurrences([5, 7], 8, 10)
    assert [(m, st.buf[i]) for m, i in occ] == [(1, 2)]
    # a sequence's last token has no continuation: not an occurrence
    assert st.occurrences([2, 3, 9], 8, 10) == []
    assert st.occurrences([42], 8, 10) == []


def test_suffix_index_eviction_and_memory_bound():
    st = SuffixIndex(max_tokens=100, key_lengths=(1, 2, 4, 8))
    g = torch.Generator().manual_seed(1)
    first = torch.randint(1000, 2000, (30,), generator=g).tolist()
    st.add(first)
    assert st.occurrences(first[:6], 16, 10)
    peak = 0
    for k in range(200):
        st.add(torch.randint(0, 50, (int(torch.randint(5, 40, (1,), generator=g)),), generator=g).tolist())
        assert st.n_tokens <= 100
        peak = max(peak, st.memory_entries())
    assert st.occurrences(first[:6], 16, 10) == []  # the oldest request was evicted
    # buffer + index stay within a constant factor of the token bound
    assert peak <= 100 * (1 + 1) + 2 * 100 * 4 + 100 * 4 + 100
    # a request longer than the whole store keeps its tail
    st.add(list(range(500, 750)))
    assert st.n_tokens == 100 and st.n_sequences == 1 and st.buf[0] == 650


def test_suffix_matches_shorter_than_asked_are_not_searched():
    """``min_len`` / ``min_match``: key lengths below the longest one within it are skipped, and
    what is found is what the full search finds at that length or more."""
    st = SuffixIndex(key_lengths=(1, 2, 4))
    st.add([1, 2, 3, 4, 5])
    st.add([8, 3, 6])
    ctx = [0, 2, 3]
    both = sorted((m, st.buf[i]) for m, i in st.occurrences(ctx, 8, 10, levels=3))
    assert both == [(1, 6), (2, 4)]
    assert sorted((m, st.buf[i]) for m, i in st.occurrences(ctx, 8, 10, levels=3, min_len=2)) == [(2, 4)]
    calls = []
    hits = st.hits
    st.hits = lambda c, n, limit: calls.append(n) or hits(c, n, limit)
    st.occurrences([0, 9, 3], 8, 10, levels=3, min_len=2)  # only a 1-token match exists
    assert calls == [2]  # (4-grams: longer than the context) the 1-gram index was not read
    sd = SuffixDrafter(store_tokens=1000)
    sd.end([1, 2, 3, 4, 5, 8, 3, 6])
    sd.begin([0])
    assert sd.retrieve(_ctx([0, 9, 3])).match_len == 1
    assert sd.retrieve(_ctx([0, 9, 3]), min_match=2) is None
    r, r2 = sd.retrieve(_ctx([0, 2, 3])), sd.retrieve(_ctx([0, 2, 3]), min_match=2)
    assert r2.match_len == 2 and r2.tree.paths() == r.tree.paths()
    assert PromptLookup().retrieve(_ctx([1, 2, 3, 1, 2, 3]), min_match=4) is None
    assert PromptLookup().retrieve(_ctx([1, 2, 3, 1, 2, 3]), min_match=3) is not None


def test_suffix_files_a_request_and_indexes_the_prompt_at_begin():
    """``end`` only holds the finished request; ``begin`` (which the engine calls with the
    prefill launched) files it into the store and indexes the prompt; ``store`` files what is
    held before it is read."""
    sd = SuffixDrafter(store_tokens=1000)
    past = list(range(100, 140))
    sd.end(past)
    assert sd._store.n_sequences == 0 and sd._finished == [past]
    prompt = [1, 2] + past[:5]
    sd.begin(prompt)
    assert sd._store.n_sequences == 1 and not sd._finished
    assert sd.current.buf == prompt and sd.current.entries > 0
    r = sd.retrieve(_ctx(prompt))
    assert r.match_len == 5 and r.tree.paths()[1] == (105,)
    sd.end(prompt + [105])
    assert sd.store.n_sequences == 2  # (filed on reading)
    sd.end([7, 8, 9])
    sd.reset()
    assert sd.store.n_sequences == 0 and not sd._finished


def test_suffix_open_sequence_sync_is_incremental():
    st = SuffixIndex(key_lengths=(1, 2))
    toks = [4, 5, 6]
    st.sync(toks)
    assert st.occurrences([4, 5, 6], 8, 10) == []  # the context's end never matches itself
    toks += [4, 5]
    st.sync(toks)
    assert [(m, st.buf[i]) for m, i in st.occurrences(toks, 8, 10)] == [(2, 6)]
    toks2 = [9, 9]
    st.sync(toks2)  # a different sequence: start over
    assert st.buf == [9, 9]


def test_build_tree_frequencies_and_adaptive_length():
    buf = [1, 2, 3, -1, 1, 2, 3, -1, 1, 2, 4, -1, 1, 5, -1]
    cursors = [(buf, 1, 0), (buf, 5, 0), (buf, 9, 0), (buf, 13, 0)]
    tree, score = build_tree(1, cursors, max_nodes=10, max_depth=5, min_prob=0.1)
    paths = dict(zip(tree.paths(), tree.scores))
    assert paths[(2,)] == pytest.approx(0.75) and paths[(5,)] == pytest.approx(0.25)
    assert paths[(2, 3)] == pytest.approx(0.5) and paths[(2, 4)] == pytest.approx(0.25)
    assert score == pytest.approx(sum(tree.scores[1:]))
    tree, _ = build_tree(1, cursors, max_nodes=10, max_depth=5, min_prob=0.3)
    assert set(tree.paths()) == {(), (2,), (2, 3)}
    tree, _ = build_tree(1, cursors, max_nodes=1, max_depth=5, min_prob=0.0)
    assert tree.paths() == [(), (2,)]


def test_suffix_drafter_draft_grows_with_match_and_uses_history():
    sd = SuffixDrafter(store_tokens=1000, min_prob=0.1, alpha=1.0)
    past = list(range(100, 140))
    sd.begin(past[:10])
    sd.end(past)  # an earlier request
    sd.begin([1, 2])
    r = sd.retrieve(_ctx([1, 2] + past[:3]))
    assert r.match_len == 3 and r.tree.paths()[-1] == tuple(past[3:6])  # alpha * 3 nodes
    r = sd.retrieve(_ctx([1, 2] + past[:20]))
    assert r.match_len == 20 and r.tree.size - 1 == 20 and r.score == pytest.approx(20)
    assert r.tree.paths()[-1] == tuple(past[20:40])
    r = sd.retrieve(_ctx([1, 2] + past[:20], budget=5))
    assert r.tree.size - 1 == 5
    # the store off: nothing to find
    sd = SuffixDrafter(store_tokens=0)
    sd.end(past)
    assert sd.retrieve(_ctx([1, 2] + past[:20])) is None


# ------------------------------------------------------------------------- registry
def test_registry_names_and_errors():
    for name in ("lookup", "suffix", "hybrid", "draft-model", "fused", "recycling"):
        assert name in DRAFTERS
    # a template is passed only to the drafters that take one
    d = make_drafter("lookup", vocab_size=10, device="cpu", template="tr8")
    assert isinstance(d, PromptLookup)
    h = make_drafter("hybrid", vocab_size=10, device="cpu", template="tr8", mode="switch")
    assert h.template.name == "tr8" and h.mode == "switch"
    for name in ("draft-model", "fused"):
        with pytest.raises(DraftModelError, match="--draft-model"):
            make_drafter(name, vocab_size=10, device="cpu", template="tr8")
    with pytest.raises(ValueError, match="mode"):
        make_drafter("hybrid", vocab_size=10, device="cpu", mode="both")
    assert make_drafter("none", vocab_size=10, device="cpu") is None


def test_lookup_is_sized_by_the_cost_model():
    """With a latency curve, prompt lookup drafts only what pays: nothing where verification
    is expensive, the whole chain where it costs nothing extra; auto_size=False always drafts."""
    import numpy as np

    toks = [5, 6, 7, 8, 9, 10, 11, 12, 5, 6, 7]
    steep = np.concatenate(([np.inf], 1.0 + 10.0 * np.arange(64)))  # each node costs 10x a plain step
    flat = np.concatenate(([np.inf], np.ones(64)))
    lk = PromptLookup(max_ngram=3, num_pred=4)
    assert lk.wants_latency
    assert lk.propose(_ctx(toks, latency=steep)) is None
    d = lk.propose(_ctx(toks, latency=flat))
    assert d is not None and d.tokens.tolist() == [7, 8, 9, 10, 11]
    off = PromptLookup(max_ngram=3, num_pred=4, auto_size=False)
    assert not off.wants_latency
    assert off.propose(_ctx(toks, latency=steep)).tokens.tolist() == [7, 8, 9, 10, 11]


def test_default_drafter_by_device_and_cli_default():
    from freespec.cli import build_parser
    from freespec.drafters import DRAFTERS, default_drafter

    assert default_drafter("cuda") == "hybrid"  # measured: docs/benchmarks.md
    assert default_drafter("cpu") == "hybrid"
    assert all(default_drafter(d) in DRAFTERS for d in ("cpu", "cuda"))
    args = build_parser().parse_args(["generate", "hi"])
    assert args.drafter == "auto" and args.tree == "auto"
