"""The new drafters are lossless on the real default model (SmolLM2-135M-Instruct, fp32, CPU)."""

import pytest

from freespec.drafters import make_drafter
from freespec.engine import Engine

pytestmark = pytest.mark.real_model

COPY = ("Repeat this text exactly: The quick brown fox jumps over the lazy dog. A journey of a thousand "
        "miles begins with a single step. All that glitters is not gold.")
PROMPTS = [COPY, "Write a short poem about the sea.", "How do I reverse a list in Python?"]
N = 64


@pytest.fixture(scope="module")
def real(default_model):
    model, tok = default_model
    plain = Engine(model, tok, drafter=None)
    refs = {}
    for text in PROMPTS:
        ids = plain.encode(text, chat=True)
        refs[text] = (ids, plain.generate(ids, N).tokens)
    return model, tok, plain, refs


def _engine(real, name, **kw):
    model, tok, plain, _ = real
    d = make_drafter(name, vocab_size=plain.backend.vocab_size, device="cpu", template="tr8", **kw)
    return Engine(model, tok, drafter=d, backend=plain.backend)


@pytest.mark.parametrize("name,kw", [
    ("lookup", {}),
    ("suffix", {}),
    ("hybrid", {"mode": "merge"}),
    ("hybrid", {"mode": "switch"}),
])
def test_retrieval_drafters_identical_to_plain(real, name, kw):
    eng = _engine(real, name, **kw)
    mats = {}
    for text in PROMPTS:
        ids, ref = real[3][text]
        res = eng.generate(ids, N)
        assert res.tokens == ref, f"{name} {kw} differs from plain decoding on {text[:30]!r}"
        mats[text] = res.stats.mat
    assert mats[COPY] > 2.0, f"{name}: the copy-heavy prompt should be drafted well (MAT {mats[COPY]:.2f})"


def test_suffix_mat_rises_on_a_repeated_request(real):
    eng = _engine(real, "suffix")
    ids, ref = real[3][PROMPTS[1]]
    first = eng.generate(ids, N)
    second = eng.generate(ids, N)
    assert first.tokens == second.tokens == ref
    assert second.stats.mat > first.stats.mat + 1.5, (first.stats.mat, second.stats.mat)


def test_draft_model_drafting_for_itself(real):
    """SmolLM2 drafts for itself: a consistency check of the draft cache on a real model."""
    model = real[0]
    for name in ("draft-model", "fused"):
        eng = _engine(real, name, draft_model=model, depth=4, width=2, max_nodes=8)
        ids, ref = real[3][PROMPTS[2]]
        res = eng.generate(ids, N)
        assert res.tokens == ref
        assert res.stats.mat > 3.5, f"{name}: a model drafting for itself should be accepted (MAT {res.stats.mat:.2f})"
