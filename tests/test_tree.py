import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from freespec.tree import TreeError, TreeShape, TreeTemplate, build_template, get_template, template_names


def test_shape_from_parents():
    #        0
    #      1   2
    #     3 4   5
    #     6
    s = TreeShape.from_parents([-1, 0, 0, 1, 1, 2, 3])
    assert s.depth.tolist() == [0, 1, 1, 2, 2, 2, 3]
    assert s.max_depth == 3
    anc = s.ancestors
    assert anc[6].nonzero().view(-1).tolist() == [0, 1, 3, 6]
    assert anc[5].nonzero().view(-1).tolist() == [0, 2, 5]
    assert anc[0].nonzero().view(-1).tolist() == [0]
    assert s.paths[6].tolist() == [0, 1, 3, 6]
    assert s.paths[5].tolist()[:3] == [0, 2, 5]


def test_mask_and_positions():
    s = TreeShape.from_parents([-1, 0, 0, 1])
    bias = s.attention_bias(prefix_len=5, dtype=torch.float32)
    assert bias.shape == (1, 1, 4, 9)
    assert (bias[0, 0, :, :5] == 0).all()  # everyone sees the prefix
    visible = bias[0, 0, :, 5:] == 0
    assert visible.tolist() == [
        [True, False, False, False],
        [True, True, False, False],
        [True, False, True, False],
        [True, True, False, True],
    ]
    assert bias.dtype == torch.float32 and bias.min() == torch.finfo(torch.float32).min
    assert s.position_ids(5).tolist() == [[5, 6, 6, 7]]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=10**6), max_size=60))
def test_shape_from_parents_matches_a_walk_up(picks):
    # any tree in topological order: node i's parent is one of the nodes before it
    parents = [-1] + [r % i for i, r in enumerate(picks, start=1)]
    s = TreeShape.from_parents(parents)
    n = len(parents)
    for i in range(n):
        up = [i]
        while parents[up[-1]] != -1:
            up.append(parents[up[-1]])
        path = up[::-1]
        assert s.depth[i].item() == len(path) - 1
        assert s.paths[i].tolist() == path + [0] * (s.max_depth + 1 - len(path))
        assert s.ancestors[i].nonzero().view(-1).tolist() == sorted(path)
    assert s.max_depth == max(s.depth.tolist()) and s.parents.tolist() == parents
    assert s.ancestors.dtype == torch.bool and s.paths.dtype == s.depth.dtype == torch.long


@pytest.mark.parametrize("parents", [[0], [-1, 1], [-1, 0, 3, 1], []])
def test_bad_parents(parents):
    with pytest.raises(TreeError):
        TreeShape.from_parents(parents)


def test_builtin_templates():
    t80 = get_template("tr80")
    assert t80.size == 80
    assert t80.nodes_per_level() == [8, 21, 25, 15, 8, 3]
    assert t80.max_rank == 8
    for name in template_names():
        t = get_template(name)
        TreeShape.from_parents(t.parents())  # valid topological order
        assert len(set(t.paths)) == t.size
    small = get_template("tr16")
    assert small.size == 16 and set(small.paths) <= set(t80.paths)
    assert get_template(10).size == 10
    assert get_template("chain4").paths == ((0,), (0, 0), (0, 0, 0), (0, 0, 0, 0))
    with pytest.raises(TreeError, match="unknown tree template"):
        get_template("nope")


def test_template_rejects_orphans():
    with pytest.raises(TreeError):
        TreeTemplate("bad", ((0,), (1, 0, 0)))


def test_subtree_is_closed_under_parents():
    t = build_template("x", [8, 21, 25, 15, 8, 3])
    for n in range(0, 81):
        s = t.subtree(n)
        keep = set(s.paths)
        assert len(keep) == n
        assert all(p[:-1] in keep or len(p) == 1 for p in keep)


# --------------------------------------------------------------------------- attach buffers
def _combined(base_parents, parents, slots):
    """The tree an AttachBuffer should hold: base, then the extra nodes (padding repeats the last)."""
    P = len(base_parents)
    out = list(base_parents)
    for j in range(slots):
        p = parents[min(j, len(parents) - 1)]
        out.append(0 if p < 0 else P + p)
    return TreeShape.from_parents(out)


@pytest.mark.parametrize("extra", [[-1], [-1, 0, 1, 0], [-1, -1, 1, 2, 3, 3, 0]])
def test_attach_buffer_matches_a_tree_built_from_scratch(extra):
    from freespec.tree import AttachBuffer

    base = TreeShape.from_parents(get_template("tr8").parents())
    buf = AttachBuffer(base, 8, "cpu")
    # rewritten in place, deeper than the base; the last load's structure is a cached one, with
    # other tokens
    for n, tree in enumerate((extra, [-1, 0, 1, 2, 3, 4, 5, 6], extra)):
        toks = [100 + 10 * n + i for i in range(len(tree))]
        buf.load(toks, tree)
        want = _combined(base.parents_list, tree, 8)
        s = buf.shape
        assert s.size == want.size == base.size + 8
        assert torch.equal(s.parents, want.parents)
        assert torch.equal(s.depth, want.depth)
        assert torch.equal(s.ancestors, want.ancestors)
        assert torch.equal(s.paths[:, : want.max_depth + 1], want.paths)
        assert not s.paths[:, want.max_depth + 1 :].any()
        assert buf.tokens.tolist() == [toks[min(j, len(toks) - 1)] for j in range(8)]


def test_attach_buffer_rejects_bad_trees():
    from freespec.tree import AttachBuffer

    buf = AttachBuffer(TreeShape.from_parents([-1, 0]), 4, "cpu")
    with pytest.raises(TreeError, match="1 to 4 nodes"):
        buf.load([], [])
    with pytest.raises(TreeError, match="1 to 4 nodes"):
        buf.load([1, 2, 3, 4, 5], [-1, 0, 1, 2, 3])
    with pytest.raises(TreeError, match="must come after"):
        buf.load([1, 2], [-1, 1])


def test_attach_buffer_follows_a_base_rewritten_in_place():
    from freespec.tree import AttachBuffer

    first = TreeShape.from_parents([-1, 0, 1, 1])
    base = TreeShape.from_parents([-1, 0, 1, 1])
    buf = AttachBuffer(base, 4, "cpu")
    other = TreeShape.from_parents([-1, 0, 0, 2])  # a plan of the same size
    for t in ("parents", "depth", "ancestors", "paths"):
        getattr(base, t).copy_(getattr(other, t))
    buf.load([7, 8], [-1, 0])
    want = _combined(other.parents_list, [-1, 0], 4)
    assert torch.equal(buf.shape.parents, want.parents) and torch.equal(buf.shape.ancestors, want.ancestors)
    assert torch.equal(buf.shape.paths[:, : want.max_depth + 1], want.paths)
    assert not torch.equal(buf.shape.parents[:4], first.parents)


def test_attach_buffer_builds_base_rows_when_the_base_version_moves():
    """With ``base_parents`` the base's rows come from the host blocks, rebuilt when
    ``base_version`` moves (a plan buffer rewritten in place gets a new version); without
    it, from the base on the device at every load."""
    from freespec.tree import AttachBuffer

    base = TreeShape.from_parents([-1, 0, 1, 1])
    buf = AttachBuffer(base, 4, "cpu")
    buf.load([7, 8], [-1, 0], base_version=1, base_parents=base.parents_list)
    want = _combined(base.parents_list, [-1, 0], 4)
    assert torch.equal(buf.shape.parents, want.parents)
    other = TreeShape.from_parents([-1, 0, 0, 2])
    for t in ("parents", "depth", "ancestors", "paths"):
        getattr(base, t).copy_(getattr(other, t))
    buf.load([9], [-1], base_version=1, base_parents=(-1, 0, 1, 1))  # same version: host rows as built
    assert buf.shape.parents[:4].tolist() == [-1, 0, 1, 1]
    assert buf.shape.parents[4:].tolist() == [0, 0, 0, 0] and buf.tokens.tolist() == [9, 9, 9, 9]
    buf.load([9], [-1], base_version=2, base_parents=other.parents_list)  # a new version: rebuilt
    want = _combined(other.parents_list, [-1], 4)
    assert torch.equal(buf.shape.parents, want.parents) and torch.equal(buf.shape.ancestors, want.ancestors)
    assert torch.equal(buf.shape.paths[:, : want.max_depth + 1], want.paths)
    buf2 = AttachBuffer(TreeShape.from_parents([-1, 0, 1, 1]), 4, "cpu")
    for _ in range(2):  # without base_parents: the device base, every load
        buf2.base.parents.copy_(other.parents)
        buf2.base.depth.copy_(other.depth)
        buf2.base.ancestors.copy_(other.ancestors)
        buf2.base.paths.copy_(other.paths)
        buf2.load([9], [-1])
        assert torch.equal(buf2.shape.parents, want.parents) and torch.equal(buf2.shape.ancestors, want.ancestors)


def test_attach_buffer_keeps_a_rewritten_base_across_loads_of_one_version():
    """After the base is rewritten in place (a new plan of the same size: a new version), every
    later load of that version keeps the new base rows: the attached rows' host->device copy
    must not bring back the structure the buffer was built with."""
    from freespec.tree import AttachBuffer

    base = TreeShape.from_parents([-1, 0, 1, 1])
    buf = AttachBuffer(base, 4, "cpu")
    buf.load([7, 8], [-1, 0], base_version=1)
    other = TreeShape.from_parents([-1, 0, 0, 2])
    for t in ("parents", "depth", "ancestors", "paths"):
        getattr(base, t).copy_(getattr(other, t))
    for toks, tree in (([9], [-1]), ([5, 6, 7], [-1, 0, 0]), ([4], [-1])):  # loads of version 2
        buf.load(toks, tree, base_version=2, base_parents=other.parents_list)
        want = _combined(other.parents_list, tree, 4)
        s = buf.shape
        assert torch.equal(s.parents, want.parents) and torch.equal(s.depth, want.depth)
        assert torch.equal(s.ancestors, want.ancestors)
        assert torch.equal(s.paths[:, : want.max_depth + 1], want.paths)
