import torch

from freespec.drafters import DraftContext
from freespec.drafters.recycling import TokenRecycling
from freespec.tree import get_template


def _ctx(root: int):
    return DraftContext(tokens=[root], root=torch.tensor([root]), prompt_len=1, budget=1000)


def test_update_overwrites_rows_with_topk():
    tr = TokenRecycling(vocab_size=20, template="tr8", k=4)
    logits = torch.randn(3, 20)
    tokens = torch.tensor([5, 7, 9])
    tr.update(tokens, logits)
    for i, t in enumerate(tokens.tolist()):
        assert tr.matrix[t].tolist() == logits[i].topk(4).indices.tolist()
    assert tr.matrix.dtype == torch.int32
    assert (tr.matrix[0] == 0).all()  # untouched rows stay


def test_propose_is_one_gather_per_level():
    tr = TokenRecycling(vocab_size=50, template="tr80", k=8)
    g = torch.Generator().manual_seed(0)
    tr.matrix.copy_(torch.randint(0, 50, (50, 8), generator=g, dtype=torch.int32))
    draft = tr.propose(_ctx(3))
    t = get_template("tr80")
    tokens = draft.tokens.tolist()
    assert tokens[0] == 3 and len(tokens) == 81
    index = {(): 0}
    for i, path in enumerate(t.paths, start=1):
        index[path] = i
        parent_tok = tokens[index[path[:-1]]]
        assert tokens[i] == tr.matrix[parent_tok, path[-1]].item()


def test_save_load_reset(tmp_path):
    tr = TokenRecycling(vocab_size=30, template="tr8", k=8)
    tr.update(torch.tensor([1, 2]), torch.randn(2, 30))
    f = tmp_path / "m.pt"
    tr.save(f)
    other = TokenRecycling(vocab_size=30, template="tr8", k=8)
    other.load(f)
    assert torch.equal(other.matrix, tr.matrix)
    tr.reset()
    assert int(tr.matrix.abs().sum()) == 0
    wrong = TokenRecycling(vocab_size=31, template="tr8", k=8)
    try:
        wrong.load(f)
    except ValueError as e:
        assert "shape" in str(e)
    else:
        raise AssertionError("a matrix of the wrong shape must be refused")


def test_empty_template_means_plain_step():
    tr = TokenRecycling(vocab_size=10, template=0)
    assert tr.propose(_ctx(1)) is None


def test_top_k_ids_finds_the_top_k():
    """The two-pass top-k gives the same values as torch.topk (and valid indices), for
    vocabularies that divide into slices and ones with a short last slice, ties included."""
    from freespec.verify import CHUNK, top_k_ids

    g = torch.Generator().manual_seed(0)
    for V in (CHUNK * 40, CHUNK * 40 + 37, 100):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(24, V, generator=g).to(dtype)
            x[3] = 0.0  # all tied
            x[4, -5:] = 50.0  # the winners in the short tail
            x[5, :: CHUNK] = 60.0  # one winner per slice, first position
            x[6] = (torch.arange(V) % 7).to(dtype)  # many ties at the top
            ids = top_k_ids(x, 8)
            assert ids.shape == (24, 8) and int(ids.min()) >= 0 and int(ids.max()) < V
            assert all(len(set(r)) == 8 for r in ids.tolist())  # distinct
            got = x.gather(1, ids)
            want = x.topk(8, dim=-1).values
            assert torch.equal(got, want)  # the same values, largest first


def test_plans_of_one_size_share_buffers_and_the_step_key():
    """Device steps lay a plan into buffers kept per plan size: a new plan of a known size is
    rewritten in place (the same step, same key, so no new CUDA graph), with its own structure,
    and the step's fill reads the plan's nodes afresh."""
    from freespec.tree import TreeShape

    tr = TokenRecycling(vocab_size=50, template="auto")
    tr.matrix.copy_(torch.randint(0, 50, tr.matrix.shape, generator=torch.Generator().manual_seed(0)))
    a = (TreeShape.from_parents([-1, 0, 1, 0]), torch.tensor([0, 1, 9, 2]), 101)
    b = (TreeShape.from_parents([-1, 0, 0, 0]), torch.tensor([0, 1, 2, 3]), 102)
    root = torch.tensor([7])
    da = tr._plan_step(a)
    sa_paths = da.shape.paths.clone()
    assert torch.equal(da.fill(root), tr.fill(root)[a[1]])
    db = tr._plan_step(b)
    assert db is da  # the same step object: the same buffers, the same key
    sb = db.shape
    assert torch.equal(sb.parents, b[0].parents) and torch.equal(sb.ancestors, b[0].ancestors)
    assert torch.equal(sb.paths[:, :2], b[0].paths) and not sb.paths[:, 2:].any()
    assert not torch.equal(sa_paths, sb.paths)
    assert torch.equal(db.fill(root), tr.fill(root)[b[1]])
    dc = tr._plan_step((TreeShape.from_parents([-1, 0]), torch.tensor([0, 1]), 103))
    assert dc.shape is not sb and dc.key != da.key  # another size: other buffers, another step
