"""``freespec bench``: datasets, method names, report arithmetic, and small end-to-end runs."""

from __future__ import annotations

import json

import pytest
import torch

from freespec.bench import report
from freespec.bench.dataset import DatasetError, Question, builtin, load, per_category
from freespec.bench.harness import first_divergence, run_bench, top2_gap
from freespec.bench.methods import BenchError, HFMethod, known_methods, parse_method, resolve_methods
from freespec.cli import main

from tiny import StubTokenizer, tiny_model


# ------------------------------------------------------------------------------ datasets
def _jsonl(tmp_path, lines, name="q.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def test_dataset_multi_turn_and_ids(tmp_path):
    p = _jsonl(tmp_path, [
        json.dumps({"question_id": 81, "category": "writing", "turns": ["a", "b"]}),
        "",  # blank lines are skipped
        json.dumps({"id": "x", "turns": ["c"]}),
        json.dumps({"turns": ["d"]}),
    ])
    qs = load(p)
    assert qs[0] == Question("81", "writing", ("a", "b"))
    assert qs[1] == Question("x", "default", ("c",))
    assert qs[2].question_id == "4"  # no id: the line number


@pytest.mark.parametrize(
    "line, words",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        (json.dumps({"question_id": 1}), "'turns'"),
        (json.dumps({"question_id": 1, "turns": []}), "'turns'"),
        (json.dumps({"question_id": 1, "turns": ["ok", ""]}), "'turns'"),
        (json.dumps({"question_id": 1, "turns": "not a list"}), "'turns'"),
    ],
)
def test_dataset_malformed_line_names_the_line(tmp_path, line, words):
    p = _jsonl(tmp_path, [json.dumps({"question_id": 0, "turns": ["fine"]}), line])
    with pytest.raises(DatasetError) as e:
        load(p)
    assert f"{p}:2:" in str(e.value)
    assert words in str(e.value)


def test_dataset_empty_and_missing(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DatasetError, match="no questions"):
        load(empty)
    with pytest.raises(DatasetError, match="does not exist"):
        load(tmp_path / "nope.jsonl")


def test_builtin_loads():
    qs = load("builtin")
    assert qs == builtin() and qs
    assert all(q.turns and q.category for q in qs)
    assert load(None) == qs


def test_per_category_first_n_in_order():
    qs = [Question(str(i), c, ("t",)) for i, c in enumerate("aabacbbca")]
    got = per_category(qs, 2)
    assert [q.question_id for q in got] == ["0", "1", "2", "4", "5", "7"]  # file order kept
    assert per_category(qs, 2) == got
    for cat in "abc":
        want = [q for q in qs if q.category == cat][:2]
        assert [q for q in got if q.category == cat] == want
    assert per_category(qs, None) == qs
    assert [q.question_id for q in per_category(qs, 1)] == ["0", "2", "4"]
    with pytest.raises(DatasetError):
        per_category(qs, 0)


# ------------------------------------------------------------------------------ method names
def test_method_names():
    assert known_methods()[0] == "plain"
    assert {"recycling", "hf-greedy", "hf-prompt-lookup", "hf-assisted"} <= set(known_methods())
    s = parse_method("recycling:tr80")
    assert (s.base, s.template, s.kind, s.needs_draft_model) == ("recycling", "tr80", "engine", False)
    assert parse_method("recycling").template is None
    assert parse_method("hf-assisted").needs_draft_model
    # plain always leads, added when not named
    assert [s.name for s in resolve_methods("recycling, hf-greedy", False)] == ["plain", "recycling", "hf-greedy"]
    assert [s.name for s in resolve_methods(["hf-greedy", "plain"], False)] == ["plain", "hf-greedy"]


@pytest.mark.parametrize(
    "methods, words",
    [
        ("plain,bogus", "unknown method 'bogus'; known: plain, recycling"),
        ("recycling:tr999x", "unknown tree template"),
        ("hf-greedy:tr8", "takes no tree template"),
        ("recycling:", "nothing after ':'"),
        ("plain,recycling,recycling", "named twice"),
        ("plain,hf-assisted", "need a draft model: pass --draft-model"),
        (" , ", "no methods"),
    ],
)
def test_method_errors(methods, words):
    with pytest.raises(BenchError) as e:
        resolve_methods(methods, have_draft_model=False)
    assert words in str(e.value)


# ------------------------------------------------------------------------------ report arithmetic
def _rec(qid, cat, method, tokens, secs, hist=None, identical=True, div=None, gap=None, turn=0):
    return {
        "question_id": qid, "category": cat, "turn": turn, "method": method, "new_tokens": tokens, "time": secs,
        "tok_s": tokens / secs, "tokens_per_step": hist, "steps": sum(hist.values()) if hist else None,
        "mat": None, "identical": identical, "first_divergence": div, "top2_gap": gap,
    }


RECORDS = [
    # category a: two questions
    _rec("q1", "a", "plain", 100, 10.0, {1: 99}),
    _rec("q1", "a", "recycling", 100, 4.0, {1: 20, 2: 10, 3: 20}),
    _rec("q1", "a", "hf-greedy", 100, 8.0),
    _rec("q2", "a", "plain", 50, 5.0, {1: 49}),
    _rec("q2", "a", "recycling", 50, 1.0, {2: 10, 4: 5}, identical=False, div=7, gap=0.0123),
    _rec("q2", "a", "hf-greedy", 50, 4.0),
    # category b: one question, two turns
    _rec("q3", "b", "plain", 30, 3.0, {1: 29}),
    _rec("q3", "b", "recycling", 30, 2.0, {"1": 5, "5": 5}),  # string keys, as read back from JSON
    _rec("q3", "b", "hf-greedy", 30, 2.0, identical=False, div=0, gap=1.5),
    _rec("q3", "b", "plain", 20, 2.0, {1: 19}, turn=1),
    _rec("q3", "b", "recycling", 20, 1.0, {2: 10}, turn=1),
    _rec("q3", "b", "hf-greedy", 20, 1.0, turn=1),
]


def test_merge_histograms():
    assert report.merge_histograms([{1: 2, 3: 1}, {"1": 1, "2": 4}, None, {}]) == {1: 3, 2: 4, 3: 1}
    assert report.hist_mat({1: 3, 2: 4, 3: 1}) == pytest.approx((3 + 8 + 3) / 8)
    assert report.hist_mat({}) is None


def test_summary_arithmetic():
    s = report.summarize(RECORDS)
    assert s["methods"] == ["plain", "recycling", "hf-greedy"]
    assert s["categories"] == ["a", "b"]
    assert s["baseline"] == "hf-greedy"
    a = s["per_category"]["a"]
    # tok/s = total tokens / total time; speedup = ratio of those (not a mean of ratios)
    assert a["plain"]["tok_s"] == pytest.approx(150 / 15)
    assert a["recycling"]["tok_s"] == pytest.approx(150 / 5)
    assert a["recycling"]["speedup"] == pytest.approx(3.0)
    assert a["recycling"]["speedup"] != pytest.approx((10 / 4 + 5 / 1) / 2)
    assert a["recycling"]["mean_record_tok_s"] == pytest.approx((25 + 50) / 2)
    assert a["hf-greedy"]["speedup"] == pytest.approx((150 / 12) / 10)
    assert a["recycling"]["speedup_vs_baseline"] == pytest.approx(30 / 12.5)
    assert a["plain"]["speedup"] == pytest.approx(1.0)
    # MAT from the merged histogram
    assert a["recycling"]["tokens_per_step"] == {1: 20, 2: 20, 3: 20, 4: 5}
    assert a["recycling"]["steps"] == 65
    assert a["recycling"]["mat"] == pytest.approx((20 + 40 + 60 + 20) / 65)
    assert a["plain"]["mat"] == pytest.approx(1.0)
    assert a["hf-greedy"]["mat"] is None and a["hf-greedy"]["tokens_per_step"] is None
    # identity counts per category and overall
    assert (a["recycling"]["identical"], a["recycling"]["compared"]) == (1, 2)
    b = s["per_category"]["b"]
    assert (b["hf-greedy"]["identical"], b["hf-greedy"]["compared"]) == (1, 2)
    assert b["recycling"]["tokens_per_step"] == {1: 5, 2: 10, 5: 5}
    o = s["overall"]
    assert o["plain"]["records"] == 4 and o["plain"]["new_tokens"] == 200
    assert o["recycling"]["speedup"] == pytest.approx((200 / 8) / (200 / 20))
    assert o["hf-greedy"]["speedup"] == pytest.approx((200 / 15) / (200 / 20))
    assert (o["recycling"]["identical"], o["recycling"]["compared"]) == (3, 4)
    assert [(d["question_id"], d["method"], d["first_divergence"]) for d in s["divergences"]] == [
        ("q2", "recycling", 7), ("q3", "hf-greedy", 0)]
    json.dumps(s)  # serialisable as is


def test_summary_without_reference_or_baseline():
    recs = [r for r in RECORDS if r["method"] == "recycling"]
    s = report.summarize(recs)
    assert s["baseline"] is None
    assert s["overall"]["recycling"]["speedup"] is None
    md = report.render_markdown(s)
    assert "n/a" in md and "Speedup over hf-greedy" not in md


def test_markdown_tables():
    s = report.summarize(RECORDS)
    md = report.render_markdown(s, env={"device_name": "TestCPU", "dtype": "float32"},
                                config={"model": "tiny", "max_new_tokens": 100})
    assert "TestCPU" in md and "model: tiny" in md
    assert "| category | plain | recycling | hf-greedy |" in md
    assert "| a | 1.00x | 3.00x | 1.25x |" in md
    assert "## Speedup over hf-greedy" in md
    assert "| **overall** |" in md
    assert "| recycling | 4 | 200 |" in md  # overall per-method row
    assert "3/4" in md  # identity counts
    assert "| q2 | a | 0 | recycling | 7 | 0.0123 |" in md  # divergences table


def test_plot_speedup(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "speedup.png"
    assert report.plot_speedup(report.summarize(RECORDS), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2, 3], [1, 2]) == 2
    assert first_divergence([], [4]) == 0


# ------------------------------------------------------------------------------ end to end (tiny model)
class TranscriptTokenizer(StubTokenizer):
    """The stub tokenizer, plus the words of the plain transcript ('Question:', 'Answer:') as id 1."""

    def __call__(self, text):
        ids = [int(t) if t.isdigit() else 1 for t in text.split()]

        class Enc:
            input_ids = ids

        return Enc()


QUESTIONS = [
    Question("m1", "multi", ("1 2 3 4 5", "6 7 8 9")),
    Question("s1", "single", ("10 11 12 13 14 15",)),
    Question("s2", "single", ("20 21 22 20 21 22",)),
]
METHODS = ["plain", "recycling", "recycling:tr8", "hf-greedy", "hf-prompt-lookup"]


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama"), TranscriptTokenizer()


def test_end_to_end_tiny(tiny, tmp_path):
    model, tok = tiny
    out = tmp_path / "out"
    res = run_bench(model, tok, QUESTIONS, ",".join(METHODS), 20, out, progress=False, command="test")
    n_turns = sum(len(q.turns) for q in QUESTIONS)
    data = json.loads((out / "results.json").read_text())
    recs = data["records"]
    assert len(recs) == n_turns * len(METHODS) == len(res["records"])
    # interleaved per prompt: every method in turn for each (question, turn)
    assert [r["method"] for r in recs[: len(METHODS)]] == METHODS
    assert [(r["question_id"], r["turn"]) for r in recs[:: len(METHODS)]] == [("m1", 0), ("m1", 1), ("s1", 0), ("s2", 0)]
    for r in recs:
        assert r["identical"] is True, r
        assert r["new_tokens"] == 20 and r["finish_reason"] == "length"
        assert r["time"] > 0 and r["tok_s"] > 0
        for k in ("question_id", "category", "turn", "method", "mat", "steps", "tokens_per_step",
                  "first_divergence", "top2_gap", "stats", "prompt_tokens"):
            assert k in r
        if r["method"].startswith("hf-"):
            assert r["mat"] is None and r["stats"] is None
        else:
            assert r["mat"] >= 1.0 and r["steps"] == sum(r["tokens_per_step"].values())
            assert set(r["stats"]) >= {"time_total", "time_prefill", "time_draft", "time_verify", "time_other"}
    # every method saw the same prompt per turn; turn 2 carries plain's first answer
    by_turn = {}
    for r in recs:
        by_turn.setdefault((r["question_id"], r["turn"]), set()).add(r["prompt_tokens"])
    assert all(len(v) == 1 for v in by_turn.values())
    assert by_turn[("m1", 1)].pop() > by_turn[("m1", 0)].pop() + 20
    # "recycling" takes the device's default tree, "recycling:tr8" the named one
    assert {r["template"] for r in recs if r["method"] == "recycling"} == {"auto"}  # the cost model's choice
    assert {r["template"] for r in recs if r["method"] == "recycling:tr8"} == {"tr8"}
    # the latency curve the automatic trees were sized by, and each record's tree sizes
    curve = data["latency_curve"]
    assert curve["sizes"][0] == 1 and len(curve["seconds"]) == len(curve["cache_lens"])
    assert all(sum(r["stats"]["draft_sizes"].values()) == r["steps"] for r in recs if r["stats"])
    env = data["env"]
    for k in ("device_name", "torch", "transformers", "freespec", "dtype", "threads", "backend", "git_commit",
              "command", "date"):
        assert k in env
    assert env["command"] == "test" and env["dtype"] == "float32"
    lay = env["weight_layout"]  # the CPU's packed layout, with the timings that chose it (None: plain)
    assert lay is None or (lay["kind"] in ("mkl", "onednn") and lay["min_rows"] >= 1 and lay["times_ms"])
    s = data["summary"]
    assert s["methods"] == METHODS and s["categories"] == ["multi", "single"]
    for m in METHODS:
        assert s["overall"][m]["identical"] == s["overall"][m]["compared"] == n_turns
    assert s["divergences"] == []
    md = (out / "results.md").read_text()
    assert "| category | " + " | ".join(METHODS) + " |" in md
    assert "None: every output matched plain" in md
    png = (out / "speedup.png").read_bytes()
    assert len(png) > 1000 and png[:4] == b"\x89PNG"


def test_end_to_end_divergence_reported(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    orig = HFMethod.run

    def corrupted(self, prompt_ids, max_new_tokens):
        run = orig(self, prompt_ids, max_new_tokens)
        run.tokens[3] = (run.tokens[3] + 1) % 97
        return run

    monkeypatch.setattr(HFMethod, "run", corrupted)
    out = tmp_path / "out"
    res = run_bench(model, tok, QUESTIONS[1:2], ["plain", "hf-greedy"], 8, out, progress=False)
    hf = [r for r in res["records"] if r["method"] == "hf-greedy"][0]
    plain = [r for r in res["records"] if r["method"] == "plain"][0]
    assert plain["identical"] is True
    assert hf["identical"] is False and hf["first_divergence"] == 3
    assert hf["top2_gap"] is not None and hf["top2_gap"] >= 0
    assert len(res["summary"]["divergences"]) == 1
    md = (out / "results.md").read_text()
    assert "| s1 | single | 0 | hf-greedy | 3 |" in md


def test_top2_gap_matches_logits(tiny):
    model, _ = tiny
    ids = [5, 6, 7, 8]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    a, b = logits.topk(2).values.tolist()
    assert top2_gap(model, ids) == pytest.approx(a - b, abs=1e-5)


def test_run_bench_errors(tiny, tmp_path):
    model, tok = tiny
    with pytest.raises(BenchError, match="unknown method"):
        run_bench(model, tok, QUESTIONS, "plain,nope", 8, tmp_path, progress=False)
    with pytest.raises(BenchError, match="draft model"):
        run_bench(model, tok, QUESTIONS, "plain,hf-assisted", 8, tmp_path, progress=False)
    with pytest.raises(BenchError, match="max-new-tokens"):
        run_bench(model, tok, QUESTIONS, "plain", 0, tmp_path, progress=False)


def test_hf_assisted_with_a_draft_model(tiny, tmp_path):
    model, tok = tiny
    draft = tiny_model("llama", seed=7, num_hidden_layers=1)
    res = run_bench(model, tok, QUESTIONS[1:2], "plain,hf-assisted", 12, tmp_path, draft_model=draft,
                    progress=False, warmup=False)
    assert all(r["identical"] for r in res["records"])


def test_every_registered_method_runs_and_is_lossless(tiny, tmp_path):
    """Built from the DRAFTERS registry: drafters added later are covered here too."""
    model, tok = tiny
    draft = tiny_model("llama", seed=7, num_hidden_layers=1)
    methods = known_methods()
    res = run_bench(model, tok, QUESTIONS[:2], methods, 10, tmp_path, draft_model=draft, progress=False,
                    warmup_tokens=4)
    assert res["summary"]["methods"] == methods
    bad = [(r["method"], r["question_id"], r["turn"]) for r in res["records"] if not r["identical"]]
    assert not bad


# ------------------------------------------------------------------------------ CLI errors (no model loaded)
@pytest.mark.parametrize(
    "extra, words",
    [
        (["--methods", "plain,bogus"], "unknown method 'bogus'; known: plain"),
        (["--methods", "plain,hf-assisted"], "--draft-model"),
        (["--per-category", "0"], "--per-category must be a positive integer"),
        (["--per-category", "-3"], "--per-category must be a positive integer"),
        (["--dataset", "/nonexistent/q.jsonl"], "does not exist"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
    ],
)
def test_cli_errors(extra, words, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--out", str(tmp_path / "o"), *extra])
    msg = str(e.value.code)
    assert msg.startswith("freespec: error: ") and words in msg


def test_cli_bad_dataset_line(tmp_path):
    p = _jsonl(tmp_path, [json.dumps({"turns": ["a"]}), "{oops"])
    with pytest.raises(SystemExit) as e:
        main(["bench", "--dataset", str(p), "--out", str(tmp_path / "o")])
    assert f"{p}:2:" in str(e.value.code)


# ------------------------------------------------------------------------------ CLI on the real model
def _bench_real(dataset, out):
    return main(["bench", "--methods", "plain,recycling:tr8,hf-greedy", "--dataset", str(dataset),
                 "--per-category", "1", "--max-new-tokens", "8", "--warmup-tokens", "2", "--device", "cpu",
                 "--dtype", "fp32", "--threads", "1", "--out", str(out)])


@pytest.mark.real_model
@pytest.mark.slow
def test_cli_bench_real_model(default_model_home, tmp_path, capsys):
    p = _jsonl(tmp_path, [
        json.dumps({"question_id": "t", "category": "chat", "turns": ["Name a colour.", "And another one?"]}),
        json.dumps({"question_id": "u", "category": "chat", "turns": ["Say hi."]}),
    ])
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    try:
        rc = _bench_real(p, out)
    finally:
        torch.set_num_threads(threads)  # --threads sets it for the whole process
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    assert len(data["records"]) == 2 * 3  # one question (two turns) x three methods
    assert all(r["identical"] for r in data["records"])
    assert isinstance(data["env"]["command"], str) and "git_commit" in data["env"]
    assert (out / "results.md").exists() and (out / "speedup.png").stat().st_size > 0
    assert "| plain |" in capsys.readouterr().out


def test_regroup_spec_bench_folds_mt_bench_categories():
    from freespec.bench.dataset import MULTI_TURN, regroup

    qs = [Question("81", "writing", ("a", "b")), Question("90", "coding", ("c", "d")),
          Question("161", "translation", ("e",))]
    got = regroup(qs)
    assert [q.category for q in got] == [MULTI_TURN, MULTI_TURN, "translation"]
    assert [q.turns for q in got] == [q.turns for q in qs]
    assert per_category(got, 1) == [got[0], got[2]]
    assert regroup(qs, "category") == qs
    with pytest.raises(DatasetError, match="grouping"):
        regroup(qs, "bogus")


def test_decode_only_speedup_leaves_prefill_out():
    """A one-time prefill cost that falls on one method (the first to meet a prompt) moves the
    wall-clock speedup but not the decode-only one."""
    def rec(method, secs, prefill):
        r = _rec("q", "a", method, 100, secs, {1: 100} if method == "plain" else {2: 50})
        r["stats"] = {"time_prefill": prefill}
        return r

    recs = [rec("plain", 12.0, 2.0), rec("recycling", 5.5, 0.5), _rec("q", "a", "hf-greedy", 100, 8.0)]
    o = report.summarize(recs)["overall"]
    assert o["recycling"]["speedup"] == pytest.approx(12.0 / 5.5)
    assert o["plain"]["decode_tok_s"] == pytest.approx(100 / 10.0)
    assert o["recycling"]["decode_tok_s"] == pytest.approx(100 / 5.0)
    assert o["recycling"]["decode_speedup"] == pytest.approx(2.0)
    assert o["hf-greedy"]["decode_tok_s"] is None and o["hf-greedy"]["decode_speedup"] is None
    md = report.render_markdown(report.summarize(recs))
    assert "Decode-only speedup over plain" in md and "2.00x" in md


def test_timed_runs_start_collected_with_the_startup_heap_frozen(tiny, tmp_path, monkeypatch):
    """Garbage collection stays out of the comparison: each timed generation starts right after a
    collection (no garbage of another run or of the harness's records to trip the collector), with
    the heap as it stood after the warm-up frozen; the freeze is undone when the bench returns."""
    import gc

    model, tok = tiny
    orig = HFMethod.run
    seen = []

    def run(self, prompt_ids, max_new_tokens):
        seen.append((gc.get_count()[0], gc.get_freeze_count()))
        # garbage left for the next run to trip over, were nothing collected in between
        junk = [[i] for i in range(5000)]
        junk.append(junk)
        return orig(self, prompt_ids, max_new_tokens)

    monkeypatch.setattr(HFMethod, "run", run)
    frozen_before = gc.get_freeze_count()
    run_bench(model, tok, QUESTIONS[1:3], ["plain", "hf-greedy"], 6, tmp_path, progress=False)
    timed = seen[1:]  # (the first: hf-greedy's warm-up run)
    assert len(timed) == sum(len(q.turns) for q in QUESTIONS[1:3])
    assert all(count < 100 for count, _ in timed), timed  # collected just before
    assert all(frozen > frozen_before for _, frozen in timed)  # the startup heap frozen
    assert gc.get_freeze_count() == frozen_before
