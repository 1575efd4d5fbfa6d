import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from freespec.tree import Draft, TreeShape
from freespec.verify import (
    SamplingError,
    SamplingParams,
    greedy_from_top,
    greedy_tokens,
    greedy_verify,
    top_k_ids,
    walk,
)


def _onehot_logits(targets, vocab=10):
    logits = torch.full((len(targets), vocab), -5.0)
    logits[torch.arange(len(targets)), torch.tensor(targets)] = 5.0
    return logits


def test_greedy_deepest_matching_path():
    # tree: 0(root=1) -> 1(tok 2) -> 3(tok 3) ; 0 -> 2(tok 4) -> 4(tok 5) -> 5(tok 6)
    shape = TreeShape.from_parents([-1, 0, 0, 1, 2, 4])
    draft = Draft(torch.tensor([1, 2, 4, 3, 5, 6]), shape)
    # target after each node: root->4, node1->3, node2->5, node3->9, node4->7, node5->8
    v = greedy_verify(draft, _onehot_logits([4, 3, 5, 9, 7, 8]))
    # node2 (4) accepted, node4 (5) accepted, node5 (6) rejected (target 7): bonus 7
    assert int(v.n_accepted) == 2
    assert v.path.tolist()[:3] == [0, 2, 4]
    assert v.emitted.tolist()[:3] == [4, 5, 7]


def test_greedy_nothing_accepted():
    shape = TreeShape.from_parents([-1, 0, 1])
    draft = Draft(torch.tensor([1, 2, 3]), shape)
    v = greedy_verify(draft, _onehot_logits([9, 3, 4]))
    assert int(v.n_accepted) == 0
    assert v.emitted.tolist()[0] == 9


def test_child_of_rejected_node_is_not_accepted():
    # node2 matches its parent's target but its parent (node1) was rejected
    shape = TreeShape.from_parents([-1, 0, 1])
    draft = Draft(torch.tensor([1, 2, 3]), shape)
    v = greedy_verify(draft, _onehot_logits([7, 3, 4]))
    assert int(v.n_accepted) == 0


def test_dedupe_prefers_first_sibling():
    shape = TreeShape.from_parents([-1, 0, 0, 2])
    draft = Draft(torch.tensor([1, 5, 5, 6]), shape)
    target = torch.tensor([5, 0, 6, 0])
    assert int(walk(draft, target, dedupe=False).n_accepted) == 2  # through the duplicate
    v = walk(draft, target, dedupe=True)
    assert int(v.n_accepted) == 1 and v.path.tolist()[:2] == [0, 1]


@pytest.mark.parametrize(
    "kw", [dict(temperature=-1), dict(temperature=float("nan")), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1),
           dict(min_p=1.0)]
)
def test_bad_sampling_params(kw):
    with pytest.raises(SamplingError):
        SamplingParams(**kw)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 6), st.integers(2, 300), st.integers(0, 2**31 - 1), st.integers(1, 4))
def test_greedy_tokens_is_argmax_with_ties(rows, vocab, seed, levels):
    # few distinct values: many exact ties, which must resolve to the first index as argmax does
    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(0, levels, (rows, vocab), generator=g).float()
    assert torch.equal(greedy_tokens(logits), logits.argmax(-1))
    assert torch.equal(greedy_tokens(logits.bfloat16()), logits.bfloat16().argmax(-1))


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 6), st.integers(2, 1200), st.integers(0, 2**31 - 1), st.integers(1, 6))
def test_greedy_from_the_top_k_is_argmax_with_ties(rows, vocab, seed, levels):
    """The greedy choice taken from the drafter's top-k pass is argmax's, ties (first index)
    and NaN rows included, and a whole verdict is the same as without the top-k."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(0, levels, (rows, vocab), generator=g).float()
    logits += torch.rand(rows, vocab, generator=g) * (seed % 2)  # half the cases: few ties
    if seed % 5 == 0:
        logits[0, seed % vocab] = float("nan")
    k = min(8, vocab)
    if k >= 2:
        assert torch.equal(greedy_from_top(logits, top_k_ids(logits, k)), logits.argmax(-1))
    draft = Draft(torch.randint(0, vocab, (rows,), generator=g), TreeShape.from_parents([-1] + [0] * (rows - 1), "cpu"))
    a, b = greedy_verify(draft, logits), greedy_verify(draft, logits, top_k_ids(logits, k) if k >= 2 else None)
    assert torch.equal(a.emitted, b.emitted) and torch.equal(a.path, b.path) and int(a.n_accepted) == int(b.n_accepted)
