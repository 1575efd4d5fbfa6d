"""Offline replay of Token Recycling's node choice (freespec.bench.replay)."""

import numpy as np
import torch

from freespec.bench import replay
from freespec.engine import Engine

from tiny import StubTokenizer, tiny_model


def _recording(n_prompts=3, tokens=48):
    model = tiny_model("llama", seed=1)
    eng = Engine(model, StubTokenizer(), drafter=None)
    g = torch.Generator().manual_seed(0)
    prompts = [("cat%d" % i, torch.randint(3, model.config.vocab_size, (12,), generator=g).tolist())
               for i in range(n_prompts)]
    return replay.record(eng, prompts, tokens)


def test_replay_of_the_recorded_tree_gives_the_engine_own_steps():
    """Drafting the whole base tree, replay must find exactly the tokens each recorded step
    emitted (the next step starts that many tokens later): the acceptance it computes for
    every other choice of nodes rests on the same matching."""
    rec = _recording()
    base = replay.Base()
    D = int(base.depth.max())
    h = replay.hits(rec, base)
    per_step = 1 + (h * base.depth).max(1)
    got, emitted, i = [], [], 0
    for run in rec["runs"]:
        pos = [p for p, _ in run["steps"]]
        for j, p in enumerate(pos):
            if p + D > len(run["tokens"]):
                continue  # hits leaves it out: its outcome is not known to depth D
            if j + 1 < len(pos):  # the next step starts as many tokens later as this one emitted
                got.append(int(per_step[i]))
                emitted.append(pos[j + 1] - p)
            i += 1
    assert i == len(h) and len(emitted) > 20
    assert got == emitted
    assert max(emitted) > 1  # something was accepted: the check is not vacuous


def test_replay_policies():
    rec = _recording()
    base = replay.Base()
    h = replay.hits(rec, base)
    full = replay.tokens_per_step(h, base, np.ones(base.n, bool))
    tr80 = replay.tokens_per_step(h, base, base.mask("tr80"))
    assert 1.0 <= tr80 <= full
    # a prior that outweighs any count: the online choice is the prior's ranking, at every step
    strong = replay.learned(h, base, 80, strength=1e12)
    assert (strong == base.top(base.stats().path_probs(), 80)[None]).all()
    assert strong.sum(1).tolist() == [81] * len(h)
    # the hindsight ranking is learnt from these very steps: the best of the fixed choices
    text = replay.report(rec, sizes=(80,), strengths=(4.0,))
    assert "tr80" in text and text.count("\n80 | ") == 1
