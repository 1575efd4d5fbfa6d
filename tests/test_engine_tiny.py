"""Engine identity on tiny random models (fast, many prompts)."""

import numpy as np
import pytest
import torch

from freespec.drafters import Drafter
from freespec.engine import Engine, EngineError
from freespec.tree import Draft, TreeShape
from freespec.verify import SamplingParams

from tiny import StubTokenizer, hf_greedy, tiny_model


def _prompts(n, vocab, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for _ in range(n)]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("template", ["tr80", "tr8", "chain4"])
def test_recycling_matches_hf_generate(kind, attn, template):
    model = tiny_model(kind, attn=attn)
    tok = StubTokenizer()
    tr = Engine(model, tok, drafter="recycling", template=template)
    plain = Engine(model, tok, drafter=None)
    for prompt in _prompts(4, 97, seed=hash((kind, attn)) % 1000):
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=40, min_new_tokens=40, do_sample=False)
        ref = ref[0, len(prompt):].tolist()
        assert plain.generate(prompt, 40).tokens == ref
        res = tr.generate(prompt, 40)
        assert res.tokens == ref
        assert res.finish_reason == "length"
        assert res.stats.new_tokens == 40


def test_stops_on_eos_inside_accepted_run():
    model = tiny_model("llama", seed=3)
    prompt = _prompts(1, 97, seed=5)[0]
    ref = hf_greedy(model, prompt, 30)
    eos = ref[17]  # pretend the 18th token is EOS
    first = ref.index(eos)
    model.generation_config.eos_token_id = eos
    tok = StubTokenizer(eos_token_id=eos)
    for drafter in (None, "recycling"):
        eng = Engine(model, tok, drafter=drafter, template="tr80")
        eng.generate(prompt, 30)  # warm the matrix so drafts run past the EOS
        res = eng.generate(prompt, 30)
        assert res.tokens == ref[: first + 1]
        assert res.finish_reason == "eos"


def test_stop_strings_and_streaming():
    model = tiny_model("llama", seed=1)
    tok = StubTokenizer()
    eng = Engine(model, tok, drafter="recycling")
    prompt = _prompts(1, 97, seed=2)[0]
    full = eng.generate(prompt, 30)
    words = full.text.split()
    stop = " " + " ".join(words[5:7])
    pieces = []
    res = eng.generate(prompt, 30, stop=[stop], on_text=pieces.append)
    assert res.finish_reason == "stop"
    assert res.text == full.text[: full.text.find(stop)]
    assert "".join(pieces) == res.text
    # streamed pieces of a full run add up to the text
    pieces = []
    res = eng.generate(prompt, 30, on_text=pieces.append)
    assert "".join(pieces) == res.text == full.text


def test_statistics_add_up():
    model = tiny_model("qwen2")
    eng = Engine(model, StubTokenizer(), drafter="recycling")
    res = eng.generate(_prompts(1, 97)[0], 50)
    st = res.stats
    assert st.steps == sum(st.tokens_per_step.values())
    # first token comes from the prefill; the rest from steps (the last step may be cut)
    assert sum(k * v for k, v in st.tokens_per_step.items()) >= st.new_tokens - 1
    assert st.mat >= 1.0
    assert st.time_total >= st.time_prefill + st.time_verify
    d = st.as_dict()
    assert d["new_tokens"] == 50 and d["steps"] == st.steps


def test_bad_inputs():
    model = tiny_model("llama", max_position_embeddings=64)
    eng = Engine(model, StubTokenizer(), drafter="recycling")
    with pytest.raises(EngineError, match="empty"):
        eng.generate("", 10)
    with pytest.raises(EngineError, match="empty"):
        eng.generate("   ", 10)
    with pytest.raises(EngineError, match="empty"):
        eng.generate([], 10)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(EngineError, match="max_new_tokens"):
            eng.generate([1, 2, 3], bad)
    with pytest.raises(EngineError, match="context"):
        eng.generate(list(range(1, 65)), 10)
    with pytest.raises(EngineError, match="out of range"):
        eng.generate([1, 2, 500], 10)
    with pytest.raises(EngineError, match="chat template"):
        eng.generate("1 2 3", 10, chat=True)
    # a prompt that nearly fills the context is cut to the room left
    res = eng.generate(list(range(1, 61)), 10)
    assert len(res.tokens) == 4 and res.finish_reason == "length"


# ---------------------------------------------------------------- sampling keeps the distribution
class FixedTree(Drafter):
    """Proposes every token at depth 1, a duplicate sibling, and chains below two of them."""

    name = "fixed"

    def __init__(self, vocab):
        self.vocab = vocab

    def propose(self, ctx):
        v = self.vocab
        # root, children 0..v-1, a duplicate of token 0, grandchildren under 0, 1 and the duplicate
        parents = [-1] + [0] * v + [0] + [1, 1, 2, v + 1]
        tokens = [ctx.tokens[-1]] + list(range(v)) + [0] + [0, 1, 2, 3]
        return Draft(torch.tensor(tokens), TreeShape.from_parents(parents))


VOCAB, TEMP, PROMPT = 4, 0.8, [1, 2, 3, 0, 1]


def _model():
    return tiny_model("llama", vocab=VOCAB, seed=4, hidden_size=32, intermediate_size=64, initializer_range=0.1)


def _exact_three_token_probs(model):
    v = VOCAB
    with torch.no_grad():
        def probs(seqs):
            return torch.softmax(model(torch.tensor(seqs)).logits[:, -1].double() / TEMP, -1)

        p1 = probs([PROMPT])[0]
        p2 = probs([PROMPT + [a] for a in range(v)])  # [v, v]
        p3 = probs([PROMPT + [a, b] for a in range(v) for b in range(v)]).view(v, v, v)
    return (p1[:, None, None] * p2[:, :, None] * p3).reshape(-1)


def _p_value(counts, exact):
    """Chi-square goodness of fit (cells with expected < 5 pooled)."""
    expected = exact * counts.sum()
    keep = expected >= 5
    chi2 = (((counts - expected) ** 2) / expected)[keep].sum()
    df = int(keep.sum()) - 1
    if (~keep).any():
        rest_e, rest_c = expected[~keep].sum(), counts[~keep].sum()
        chi2 += (rest_c - rest_e) ** 2 / rest_e
        df += 1
    return torch.special.gammaincc(torch.tensor(df / 2.0), torch.tensor(float(chi2) / 2.0)).item()


@pytest.mark.parametrize("drafter", ["recycling", "fixed"])
def test_sampling_keeps_target_distribution(drafter):
    n = 4000
    model = _model()
    exact = _exact_three_token_probs(model)
    d = FixedTree(VOCAB) if drafter == "fixed" else "recycling"
    eng = Engine(model, StubTokenizer(), drafter=d, template="tr8")
    plain = Engine(model, StubTokenizer(), drafter=None)
    counts = torch.zeros(VOCAB**3, dtype=torch.float64)
    multi = 0
    for i in range(n):
        sp = SamplingParams(temperature=TEMP, seed=1000 + i)
        res = eng.generate(PROMPT, 3, sampling=sp)
        if i % 20 == 0:  # the noise is tied to positions: same seed, same tokens as plain sampling
            assert res.tokens == plain.generate(PROMPT, 3, sampling=sp).tokens
        a, b, c = res.tokens
        counts[(a * VOCAB + b) * VOCAB + c] += 1
        multi += res.stats.steps == 1  # tokens 2 and 3 came from one tree pass
    assert multi > n // 10, "drafts were rarely accepted: the test would not exercise the tree walk"
    p = _p_value(counts, exact)
    assert p > 1e-4, f"sampled sequences do not follow the target distribution (p={p:.2e})"


def test_seeded_sampling_matches_plain_sampling_over_long_runs():
    model = tiny_model("qwen2", seed=2, initializer_range=0.05)
    plain = Engine(model, StubTokenizer(), drafter=None)
    tr = Engine(model, StubTokenizer(), drafter="recycling", template="tr80")
    for seed in range(6):
        sp = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=seed)
        prompt = _prompts(1, 97, seed=seed)[0]
        assert tr.generate(prompt, 60, sampling=sp).tokens == plain.generate(prompt, 60, sampling=sp).tokens


def test_biased_sampler_would_be_caught():
    """The test above has power: taking the third token greedily instead of sampling fails it."""
    n = 4000
    model = _model()
    exact = _exact_three_token_probs(model)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(VOCAB**3, dtype=torch.float64)
    with torch.no_grad():
        p1 = torch.softmax(model(torch.tensor([PROMPT])).logits[0, -1] / TEMP, -1)
        p2 = torch.softmax(model(torch.tensor([PROMPT + [a] for a in range(VOCAB)])).logits[:, -1] / TEMP, -1)
        greedy3 = model(torch.tensor([PROMPT + [a, b] for a in range(VOCAB) for b in range(VOCAB)])).logits[:, -1]
        greedy3 = greedy3.argmax(-1).view(VOCAB, VOCAB)
        for a in torch.multinomial(p1, n, replacement=True, generator=g).tolist():
            b = int(torch.multinomial(p2[a], 1, generator=g))
            counts[(a * VOCAB + b) * VOCAB + int(greedy3[a, b])] += 1
    assert _p_value(counts, exact) < 1e-4


def test_trees_are_sized_by_step_time_host_work_included():
    """The curve a drafter sizes its tree by is the calibrated device step plus the host
    work each step spends around it (measured by the engine, a moving average)."""
    from freespec.cost import LatencyModel
    from freespec.drafters import TokenRecycling

    seen = []

    class Spy(TokenRecycling):
        def propose(self, ctx):
            seen.append((ctx.latency, eng.host_overhead))  # the overhead as of this proposal
            return super().propose(ctx)

    model = tiny_model("llama")
    lat = LatencyModel([1, 2, 4, 8, 16, 32, 64, 128], [0], [[1e-3 * (1 + n / 64) for n in [1, 2, 4, 8, 16, 32, 64, 128]]])
    eng = Engine(model, StubTokenizer(), drafter=Spy(vocab_size=model.config.vocab_size), latency=lat)
    eng.generate([1, 2, 3, 4, 5], 40)
    assert eng.host_overhead > 0
    base = lat.curve(0)
    last, ovh = seen[-1]
    shift = last[1:] - base[1:]
    assert np.allclose(shift, shift[0]) and shift[0] > 0  # one constant added to every size
    # the curve is rebuilt when the overhead moves by 1% of a plain step, so it lags by less
    assert abs(shift[0] - ovh) <= 0.01 * base[1] + 1e-12
