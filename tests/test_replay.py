"""Offline replay of Token Recycling's node choice (freespec.bench.replay)."""

import numpy as np
import pytest
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


def _stepped_curve():
    """A GPU-like bucketed curve: 64 nodes cost what one does, 96 cost 2% more, 128 5% more."""
    from freespec.cost import LatencyModel

    sizes = [1, 2, 4, 8, 16, 32, 64, 96, 128, 256]
    ms = [1.0] * 7 + [1.02, 1.05, 2.0]
    return LatencyModel(sizes, [0], [[t / 1e3 for t in ms]], bucketed=True)


def test_host_replay_decodes_the_recording_again(tmp_path, capsys):
    """The host replay of device steps (freespec.bench.hostreplay) walks each drafter's trees
    against the recorded output: every method emits the whole output again, a fixed tree drafts
    its size at every step, and with the GPU's fixed tree (tr80) as the anchor the automatic
    tree fills tr80's step (95 nodes in the 96-node bucket), as on an H100, where the CPU's own
    fixed tree (no anchor) leaves it free; the CLI prints the comparison."""
    import json

    from freespec.bench import hostreplay

    rec = _recording()
    emitted = sum(len(r["tokens"]) - r["prompt_len"] - 1 for r in rec["runs"])  # (the first: prefill's)
    lat = _stepped_curve()
    tr8 = hostreplay.replay_host(rec, lat, "recycling:tr8")
    assert tr8["draft_nodes"] == {8: tr8["steps"]}
    assert tr8["steps"] * tr8["tokens_per_step"] == pytest.approx(emitted)
    gpu = hostreplay.replay_host(rec, lat, "hybrid", fixed="tr80")
    cpu = hostreplay.replay_host(rec, lat, "hybrid", fixed=None)
    for r in (gpu, cpu):
        assert r["steps"] * r["tokens_per_step"] == pytest.approx(emitted)
        assert r["draft_us"] > 0 and r["done_us"] > 0
    assert set(gpu["draft_nodes"]) == {95}
    assert set(cpu["draft_nodes"]) != {95}

    path, curve = tmp_path / "rec.pt", tmp_path / "results.json"
    torch.save(rec, path)
    curve.write_text(json.dumps({"latency_curve": lat.to_dict()}))
    assert hostreplay.main([str(path), "--curve", str(curve), "--methods", "recycling:tr8,hybrid", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert "| recycling:tr8 |" in out and "| hybrid |" in out
    assert hostreplay.main([str(path), "--curve", str(curve), "--methods", "suffix"]) == 2
    assert "device steps" in capsys.readouterr().err  # (suffix decoding drafts on the host only)
    for bad, why in (({"latency_curve": None}, "no latency curve"), ({"format": "x"}, "not a latency curve")):
        curve.write_text(json.dumps(bad))
        assert hostreplay.main([str(path), "--curve", str(curve)]) == 2
        assert why in capsys.readouterr().err
    assert hostreplay.main([str(path), "--curve", str(tmp_path / "missing.json")]) == 2
    assert hostreplay.main([str(path), "--curve", str(path)]) == 2  # (a recording, not JSON)
    assert "not a JSON" in capsys.readouterr().err
