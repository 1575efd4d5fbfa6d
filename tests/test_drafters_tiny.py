"""Every drafter is lossless on tiny random models; retrieval drafts get used where they should."""

import copy

import pytest
import torch

from freespec.drafters import DraftContext, make_drafter
from freespec.drafters.draft_model import DraftModelDrafter
from freespec.drafters.fused import FusedDrafter
from freespec.drafters.hybrid import HybridDrafter
from freespec.drafters.suffix import SuffixDrafter
from freespec.engine import Engine
from freespec.verify import SamplingParams, greedy_verify

from tiny import StubTokenizer, hf_greedy, tiny_model

V = 97
N = 40


def _prompts(n, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (length,), generator=g).tolist() for _ in range(n)]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from more threads, and lose a lot on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def target():
    return tiny_model("llama", seed=0)


@pytest.fixture(scope="module")
def drafter_model():
    # same vocabulary, other weights: drafts are mostly wrong, so rejection paths run
    return tiny_model("llama", seed=7, num_hidden_layers=1)


@pytest.fixture(scope="module")
def looping():
    """A weakly contextual model: its greedy output falls into loops, which retrieval predicts."""
    model = tiny_model("llama", seed=0, initializer_range=0.1)
    p = _prompts(1, seed=0)[0]
    out = hf_greedy(model, p, 30)
    # copy-heavy: a segment of what the model says, repeated in the prompt
    return model, [p, p + out[:30] + out[:30]]


def _make(name, model, **kw):
    if name in ("draft-model", "fused"):
        kw.setdefault("draft_model", model)
    return make_drafter(name, vocab_size=V, device="cpu", template="tr8", **kw)


CASES = [
    ("lookup", {}),
    ("lookup", {"branches": 3, "max_ngram": 4}),
    ("suffix", {}),
    ("hybrid", {"mode": "merge"}),
    ("hybrid", {"mode": "switch"}),
    ("hybrid", {"mode": "merge", "retrieval": "lookup"}),
    ("draft-model", {"depth": 3}),
    ("fused", {"depth": 3}),
    ("fused", {"depth": 2, "retrieval": "lookup", "prune_topk": 0}),
]


@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}-{'-'.join(map(str, k.values()))}" for n, k in CASES])
def test_identical_to_hf_generate(name, kw, target, drafter_model, looping):
    tok = StubTokenizer()
    plain = Engine(target, tok, drafter=None)
    eng = Engine(target, tok, drafter=_make(name, drafter_model, **kw), backend=plain.backend)
    for prompt in _prompts(2, seed=3):
        ref = hf_greedy(target, prompt, N)
        res = eng.generate(prompt, N)
        assert res.tokens == ref
        assert res.stats.new_tokens == N
    # copy-heavy prompts on the looping model: drafts must be accepted, not just harmless
    model, prompts = looping
    drafter = _make(name, model if name in ("draft-model", "fused") else drafter_model, **kw)
    eng = Engine(model, tok, drafter=drafter)
    mats = []
    for prompt in prompts:
        ref = hf_greedy(model, prompt, 60)
        res = eng.generate(prompt, 60)
        assert res.tokens == ref
        mats.append(res.stats.mat)
    assert mats[-1] > 1.5, f"{name}: drafts were hardly accepted on a copy-heavy prompt (MAT {mats})"


@pytest.mark.parametrize("name", ["lookup", "suffix", "hybrid", "draft-model", "fused"])
def test_seeded_sampling_matches_plain_sampling(name, drafter_model, looping):
    model, prompts = looping
    plain = Engine(model, StubTokenizer(), drafter=None)
    eng = Engine(model, StubTokenizer(), drafter=_make(name, model if name != "fused" else drafter_model),
                 backend=plain.backend)
    for seed, prompt in enumerate(prompts):
        sp = SamplingParams(temperature=0.7, top_k=20, seed=seed)
        assert eng.generate(prompt, 40, sampling=sp).tokens == plain.generate(prompt, 40, sampling=sp).tokens


def test_suffix_history_pays_on_a_repeated_request():
    model = tiny_model("qwen2", seed=5)
    tok = StubTokenizer()
    sd = SuffixDrafter(max_nodes=32)
    eng = Engine(model, tok, drafter=sd)
    prompt = _prompts(1, seed=11)[0]
    ref = hf_greedy(model, prompt, 48)
    first = eng.generate(prompt, 48)
    second = eng.generate(prompt, 48)
    assert first.tokens == second.tokens == ref
    assert sd.store.n_sequences == 2
    assert second.stats.mat > first.stats.mat + 2, (first.stats.mat, second.stats.mat)
    # the hybrid keeps the store too
    hy = HybridDrafter(V, template="tr8")
    eng = Engine(model, tok, drafter=hy)
    a, b = eng.generate(prompt, 48), eng.generate(prompt, 48)
    assert a.tokens == b.tokens == ref and b.stats.mat > a.stats.mat + 2


def test_hybrid_updates_recycling_matrix_from_every_verified_node(target):
    hy = HybridDrafter(V, template="tr8", mode="merge", min_match=1, min_score=0.0)
    eng = Engine(target, StubTokenizer(), drafter=hy)
    seen = []
    orig = hy.tr.update

    def spy(tokens, logits, top=None):  # (top: the engine's top-k pass, handed over on a CPU)
        seen.append((tokens.clone(), logits.clone()))
        orig(tokens, logits, top)

    hy.tr.update = spy
    prompt = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6]
    eng.generate(prompt, 20)
    assert seen and len(seen) == hy.used["recycling"] + hy.used["merged"] + hy.used["retrieval"] + hy.used["none"]
    assert hy.used["merged"] > 0
    tokens, logits = seen[-1]
    for t, row in zip(tokens.tolist(), logits):
        if tokens.tolist().count(t) == 1:
            assert hy.tr.matrix[t].tolist() == row.topk(hy.tr.k).indices.tolist()


# --------------------------------------------------------------------- draft-model cache
def _fresh_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0, -1]


def _noisy_copy(model, scale, seed=1):
    """A draft model close to the target: drafts partly right."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return other


def test_draft_model_cache_follows_partial_acceptance(target):
    """Drive the drafter by hand: after each verification the draft cache holds what the
    target committed (accepted nodes it saw keep their KV), and its logits after the next
    root equal a fresh forward over the committed sequence."""
    from freespec.backends.hf import HFBackend

    drafter_model = _noisy_copy(target, 0.02)
    dm = DraftModelDrafter(V, draft_model=drafter_model, depth=4, width=3, max_nodes=10)
    be = HFBackend(target)
    be.reset()
    prompt = _prompts(1, seed=9)[0]
    last = be.prefill(torch.tensor(prompt))
    dm.begin(prompt)
    assert dm.cache_len == len(prompt)
    tokens = prompt + [int(last.argmax())]
    partial = 0
    for step in range(12):
        ctx = DraftContext(tokens=tokens, root=torch.tensor(tokens[-1:]), prompt_len=len(prompt), budget=100)
        draft = dm.propose(ctx)
        # after the root's forward the draft cache holds every committed token, root included
        assert dm.cache_len == len(tokens)
        assert torch.allclose(dm.root_logp.exp(), torch.softmax(_fresh_logits(drafter_model, tokens), -1), atol=1e-5)
        assert len(dm.last_q) == draft.size and all(0 < q <= 1 for q in dm.last_q)
        logits = be.verify(draft)
        v = greedy_verify(draft, logits)
        n = int(v.n_accepted)
        new = v.emitted[: n + 1].tolist()
        be.commit(v.path, n + 1)
        dm.observe(draft, logits, new)
        # the accepted nodes the draft model saw are committed, the rest is dropped
        assert len(tokens) <= dm.cache_len <= len(tokens) + n
        assert dm.cache.cache_len == dm.cache._len and dm.cache._pending == 0
        partial += 0 < n < draft.shape.max_depth
        tokens = tokens + new
    assert tokens[len(prompt):] == hf_greedy(target, prompt, len(tokens) - len(prompt))
    assert partial > 0, "no step accepted part of a draft: the test proves little"
    # what the draft cache holds equals a fresh forward: compare the next logits
    ids = torch.tensor(tokens[dm.cache_len:])
    got = dm.cache.prefill(ids)
    assert torch.allclose(got, _fresh_logits(drafter_model, tokens), atol=1e-4)


def test_draft_model_that_is_the_target_drafts_its_greedy_path(target):
    dm = DraftModelDrafter(V, draft_model=target, depth=4, width=1, max_nodes=4)
    eng = Engine(target, StubTokenizer(), drafter=dm)
    prompt = _prompts(1, seed=2)[0]
    res = eng.generate(prompt, 41)
    assert res.tokens == hf_greedy(target, prompt, 41)
    assert res.stats.mat == 5.0  # every chain accepted in full


def test_draft_model_vocab_mismatch_is_sliced():
    target = tiny_model("llama", vocab=101, seed=1)
    small = tiny_model("llama", vocab=97, seed=2)
    for drafter in (DraftModelDrafter(101, draft_model=small, depth=2), FusedDrafter(101, draft_model=small, depth=2)):
        eng = Engine(target, StubTokenizer(), drafter=drafter)
        prompt = [100, 99, 98, 5, 6, 100, 99, 98, 5]  # target-only ids reach the draft model, clamped
        assert eng.generate(prompt, 30).tokens == hf_greedy(target, prompt, 30)
    big = tiny_model("llama", vocab=120, seed=3)
    dm = DraftModelDrafter(101, draft_model=big, depth=2)
    eng = Engine(target, StubTokenizer(), drafter=dm)
    assert eng.generate([1, 2, 3], 20).tokens == hf_greedy(target, [1, 2, 3], 20)
    assert dm.common == 101


def test_fused_prunes_retrieval_the_draft_model_rejects(target, drafter_model):
    fz = FusedDrafter(V, draft_model=drafter_model, depth=2, prune_prob=0.5, prune_topk=0, min_match=1)
    eng = Engine(target, StubTokenizer(), drafter=fz)
    prompt = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7]
    assert eng.generate(prompt, 30).tokens == hf_greedy(target, prompt, 30)
    assert fz.pruned > 0
    fz = FusedDrafter(V, draft_model=drafter_model, depth=2, prune_prob=0.0, prune_topk=0, min_match=1)
    eng = Engine(target, StubTokenizer(), drafter=fz)
    assert eng.generate(prompt, 30).tokens == hf_greedy(target, prompt, 30)
    assert fz.kept > 0 and fz.pruned == 0


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_draft_model_tree_attention_across_architectures(kind, attn):
    """Draft and target on both attention implementations; a close draft model gets partial
    acceptances, so the kept-KV path (not only the reject-all path) is exercised."""
    tgt = tiny_model(kind, seed=4, attn=attn)
    drf = _noisy_copy(tgt, 0.02, seed=2)
    for dm in (DraftModelDrafter(V, draft_model=drf, depth=4, width=3, max_nodes=12),
               FusedDrafter(V, draft_model=drf, depth=3, width=2, max_nodes=6, min_match=1)):
        eng = Engine(tgt, StubTokenizer(), drafter=dm)
        accepted = 0
        for prompt in _prompts(3, seed=21):
            res = eng.generate(prompt, 40)
            assert res.tokens == hf_greedy(tgt, prompt, 40)
            accepted += sum(v for k, v in res.stats.tokens_per_step.items() if k > 1)
        assert accepted > 5
