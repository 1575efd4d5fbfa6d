"""Lossless on the real default model (SmolLM2-135M-Instruct, fp32, CPU)."""

import pytest
import torch

from freespec.bench.dataset import builtin
from freespec.bench.runner import messages_for
from freespec.engine import Engine

pytestmark = pytest.mark.real_model

PROMPTS = [
    "What is the capital of France? Answer in one word.",
    "Write a short poem about the sea.",
    "Explain what a hash table is.",
    "Summarize: The meeting was moved from Monday to Wednesday because the projector was broken. "
    "Everyone should bring their laptops and the quarterly figures.",
    "List three fruits that are red.",
    "How do I reverse a list in Python?",
    "Translate 'good morning, how are you?' into Spanish.",
    "What is 12 times 7?",
]


def hf_greedy(model, ids, n):
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def engines(default_model):
    model, tok = default_model
    plain = Engine(model, tok, drafter=None)
    tr_small = Engine(model, tok, drafter="recycling", template="tr8", backend=plain.backend)
    tr_full = Engine(model, tok, drafter="recycling", template="tr80", backend=plain.backend)
    return model, tok, plain, tr_small, tr_full


def test_identical_to_hf_generate_on_real_prompts(engines):
    model, tok, plain, tr_small, tr_full = engines
    endings = set()
    accepted_more_than_one = 0
    for i, text in enumerate(PROMPTS):
        ids = plain.encode(text, chat=True)
        ref = hf_greedy(model, ids, 64)
        a = plain.generate(ids, 64)
        assert a.tokens == ref, f"plain decoding differs from HF generate on prompt {i}"
        tr = tr_full if i % 2 else tr_small
        b = tr.generate(ids, 64)
        assert b.tokens == ref, f"Token Recycling ({tr.drafter.template.name}) differs on prompt {i}"
        assert b.text == a.text
        endings.add(b.finish_reason)
        accepted_more_than_one += b.stats.mat > 1.2
    assert endings == {"eos", "length"}, f"the prompts must end both ways, got {endings}"
    assert accepted_more_than_one >= 4, "drafts were hardly ever accepted: the test proves little"


def test_two_turn_chat_identical(engines):
    model, tok, plain, tr_small, tr_full = engines
    q = next(q for q in builtin() if len(q.turns) == 2)
    answers: list[str] = []
    for turn in range(2):
        msgs = messages_for(q, answers, turn)
        ids = plain.encode(msgs)
        ref = hf_greedy(model, ids, 96)
        res = tr_full.generate(msgs, 96)
        assert res.tokens == ref
        answers.append(res.text)
    assert answers[0] and answers[1]


def test_seeded_sampling_identical_to_plain_sampling(engines):
    from freespec.verify import SamplingParams

    _, _, plain, tr_small, tr_full = engines
    for seed in (7, 8):
        sp = SamplingParams(temperature=0.8, top_p=0.95, seed=seed)
        ref = plain.generate("Tell me a fun fact.", 48, chat=True, sampling=sp)
        assert tr_small.generate("Tell me a fun fact.", 48, chat=True, sampling=sp).tokens == ref.tokens
        assert tr_full.generate("Tell me a fun fact.", 48, chat=True, sampling=sp).tokens == ref.tokens


@pytest.mark.parametrize("drafter", ["recycling", "hybrid"])
def test_device_steps_identical_on_the_real_model(default_model, drafter):
    """The whole-step path (what a CUDA graph captures, run eagerly on the CPU) on SmolLM2;
    hybrid's steps carry the retrieval tree attached beside Token Recycling's (the summary
    prompt copies its input)."""
    from freespec.backends.native import NativeBackend

    model, tok = default_model
    plain = Engine(model, tok, drafter=None)
    be = NativeBackend(model, device_steps=True)
    tr = Engine(model, tok, drafter=drafter, template="tr16", backend=be)
    mats = []
    for text in PROMPTS[:4]:
        ids = plain.encode(text, chat=True)
        ref = plain.generate(ids, 48).tokens
        got = tr.generate(ids, 48)
        assert got.tokens == ref
        mats.append(got.stats.mat)
    assert max(mats) > 1.2
    if drafter == "hybrid":
        assert tr.drafter.used["attached"] > 0


def test_automatic_hybrid_on_a_gpu_like_curve_identical_on_the_real_model(default_model):
    """The automatic hybrid's device steps as an H100 takes them (its stepped latency curve, tr80
    as the fixed tree: 95 nodes in the 96-node step, the anchor's rule cutting the plan to carry
    retrieval trees), run eagerly on the CPU: token-identical to plain decoding."""
    from freespec.backends.native import NativeBackend
    from freespec.cost import LatencyModel
    from freespec.drafters import make_drafter

    model, tok = default_model
    plain = Engine(model, tok, drafter=None)
    be = NativeBackend(model, device_steps=True)
    sizes, ms = [1, 2, 4, 8, 16, 32, 64, 96, 128, 256], [1.0] * 7 + [1.04, 1.08, 2.0]
    curve = LatencyModel(sizes, [0], [[t / 1e3 for t in ms]], bucketed=True)
    d = make_drafter("hybrid", vocab_size=be.vocab_size, device="cpu", template="auto")
    d.tr.fixed = "tr80"
    eng = Engine(model, tok, drafter=d, backend=be, latency=curve)
    for text in PROMPTS[2:6]:
        ids = plain.encode(text, chat=True)
        assert eng.generate(ids, 48).tokens == plain.generate(ids, 48).tokens
    assert d.ruled > 0 and d.used["attached"] > 0
    assert set(d.tr.chosen_sizes) <= {95, 87, 63}
