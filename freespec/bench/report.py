"""Benchmark arithmetic and reports: records -> summary dict -> markdown / chart.

Pure functions over plain dicts (one dict per (question, turn, method) record, as written to
``results.json``), so the numbers can be checked, and recomputed from a saved file, without a
model.

Throughput is Spec-Bench style: a method's tok/s over a group of records is its total new
tokens divided by its total time, and a speedup is the ratio of two such tok/s over the same
records (not a mean of per-prompt ratios). MAT is the mean emitted tokens per verification
step over the merged tokens-per-step histogram (engine methods only; n/a for ``model.generate``).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterable, Mapping

REFERENCE = "plain"
HF_BASELINE = "hf-greedy"


def merge_histograms(hists: Iterable[Mapping | None]) -> dict[int, int]:
    """Sum tokens-per-step histograms (keys may be ints or, from JSON, strings)."""
    total: Counter = Counter()
    for h in hists:
        for k, v in (h or {}).items():
            total[int(k)] += int(v)
    return dict(sorted(total.items()))


def hist_mat(hist: Mapping) -> float | None:
    steps = sum(int(v) for v in hist.values())
    if not steps:
        return None
    return sum(int(k) * int(v) for k, v in hist.items()) / steps


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or not b:
        return None
    return a / b


def aggregate(records: list[dict]) -> dict:
    """Totals of one method over a group of records."""
    tokens = sum(int(r["new_tokens"]) for r in records)
    secs = sum(float(r["time"]) for r in records)
    per = [int(r["new_tokens"]) / float(r["time"]) for r in records if float(r["time"]) > 0]
    engine = [r for r in records if r.get("tokens_per_step") is not None]
    hist = merge_histograms(r["tokens_per_step"] for r in engine) if engine else None
    compared = [r for r in records if r.get("identical") is not None]
    # decode only: the time after prefill (engine methods, whose records carry the split)
    timed = [r for r in records if (r.get("stats") or {}).get("time_prefill") is not None]
    dec_secs = sum(float(r["time"]) - float(r["stats"]["time_prefill"]) for r in timed)
    dec_tokens = sum(int(r["new_tokens"]) for r in timed)
    return {
        "records": len(records),
        "new_tokens": tokens,
        "time": secs,
        "tok_s": tokens / secs if secs > 0 else 0.0,
        "mean_record_tok_s": sum(per) / len(per) if per else 0.0,
        "steps": sum(int(r.get("steps") or 0) for r in engine) if engine else None,
        "tokens_per_step": hist,
        "mat": hist_mat(hist) if hist else None,
        "identical": sum(1 for r in compared if r["identical"]),
        "compared": len(compared),
        "decode_tok_s": dec_tokens / dec_secs if timed and dec_secs > 0 else None,
    }


def _ordered(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _group(records: list[dict], methods: list[str], reference: str, baseline: str | None) -> dict:
    out = {m: aggregate([r for r in records if r["method"] == m]) for m in methods}
    ref = out.get(reference)
    base = out.get(baseline) if baseline else None
    for m, a in out.items():
        a["speedup"] = _ratio(a["tok_s"], ref["tok_s"]) if ref and ref["records"] else None
        a["speedup_vs_baseline"] = _ratio(a["tok_s"], base["tok_s"]) if base and base["records"] else None
        a["decode_speedup"] = _ratio(a["decode_tok_s"], ref["decode_tok_s"]) if ref and ref["records"] else None
    return out


def summarize(records: list[dict], reference: str = REFERENCE, baseline: str | None = HF_BASELINE) -> dict:
    """Per-category and overall numbers per method, identity counts and the divergences."""
    methods = _ordered(r["method"] for r in records)
    if reference in methods:  # the reference leads every table
        methods = [reference] + [m for m in methods if m != reference]
    categories = _ordered(r["category"] for r in records)
    if baseline not in methods:
        baseline = None
    per_cat = {c: _group([r for r in records if r["category"] == c], methods, reference, baseline) for c in categories}
    divergences = [
        {k: r.get(k) for k in ("question_id", "category", "turn", "method", "new_tokens", "first_divergence", "top2_gap")}
        for r in records
        if r.get("identical") is False
    ]
    return {
        "reference": reference,
        "baseline": baseline,
        "methods": methods,
        "categories": categories,
        "per_category": per_cat,
        "overall": _group(records, methods, reference, baseline),
        "divergences": divergences,
    }


# --------------------------------------------------------------------------------- markdown
def _x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def _f(v: float | None, nd: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"


def _hist_text(h: Mapping | None) -> str:
    return "n/a" if not h else " ".join(f"{k}:{v}" for k, v in sorted((int(k), v) for k, v in h.items()))


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _matrix(summary: dict, key: str, fmt) -> list[str]:
    methods = summary["methods"]
    rows = [[c] + [fmt(summary["per_category"][c][m][key]) for m in methods] for c in summary["categories"]]
    rows.append(["**overall**"] + [fmt(summary["overall"][m][key]) for m in methods])
    return _table(["category"] + methods, rows)


def overall_table(summary: dict) -> str:
    """One row per method over every record: totals, tok/s, speedups, MAT, identity, histogram."""
    ref, base = summary["reference"], summary["baseline"]
    head = ["method", "records", "new tokens", "time (s)", "tok/s", f"vs {ref}"] + ([f"vs {base}"] if base else [])
    head += ["decode tok/s", f"decode vs {ref}", "MAT", f"identical to {ref}", "tokens per step (tokens:steps)"]
    rows = []
    for m in summary["methods"]:
        a = summary["overall"][m]
        row = [m, str(a["records"]), str(a["new_tokens"]), _f(a["time"], 3), _f(a["tok_s"], 1), _x(a["speedup"])]
        if base:
            row.append(_x(a["speedup_vs_baseline"]))
        row += [_f(a.get("decode_tok_s"), 1), _x(a.get("decode_speedup"))]
        row += [_f(a["mat"]), f"{a['identical']}/{a['compared']}", _hist_text(a["tokens_per_step"])]
        rows.append(row)
    return "\n".join(_table(head, rows))


def render_markdown(summary: dict, env: Mapping | None = None, config: Mapping | None = None) -> str:
    ref, base = summary["reference"], summary["baseline"]
    out = ["# freespec bench", ""]
    if env or config:
        env, config = dict(env or {}), dict(config or {})
        facts = [
            ("model", config.get("model")), ("draft model", config.get("draft_model")),
            ("device", env.get("device_name")), ("dtype", env.get("dtype")), ("backend", env.get("backend")),
            ("threads", env.get("threads")), ("max new tokens", config.get("max_new_tokens")),
            ("dataset", config.get("dataset")), ("per category", config.get("per_category")),
            ("torch", env.get("torch")), ("transformers", env.get("transformers")), ("freespec", env.get("freespec")),
            ("commit", env.get("git_commit")), ("date", env.get("date")),
        ]
        out.append(" | ".join(f"{k}: {v}" for k, v in facts if v is not None))
        out.append("")
        if config.get("protocol"):
            out += [str(config["protocol"]), ""]
        if config.get("interrupted"):
            out += ["**Interrupted: partial results.**", ""]
    out += [f"## Speedup over {ref}", "", f"tok/s of the method / tok/s of {ref} (total new tokens / total time).", ""]
    out += _matrix(summary, "speedup", _x) + [""]
    if base:
        out += [f"## Speedup over {base}", ""] + _matrix(summary, "speedup_vs_baseline", _x) + [""]
    out += ["## Throughput (tok/s)", ""] + _matrix(summary, "tok_s", lambda v: _f(v, 1)) + [""]
    out += [f"## Decode-only speedup over {ref}", "",
            "As above with each record's prefill time left out (engine methods; n/a for `model.generate`): "
            "the speculative part alone, and robust to one-time costs that fall on whichever method meets "
            "a prompt first.", ""]
    out += _matrix(summary, "decode_speedup", _x) + [""]
    out += ["## MAT (mean tokens per verification step)", "", "n/a: `model.generate` methods.", ""]
    out += _matrix(summary, "mat", _f) + [""]

    out += ["## Overall per method", "", overall_table(summary), ""]

    out += [f"## Output identity with {ref}", "", "identical outputs / records compared.", ""]
    methods = summary["methods"]
    rows = [[c] + [f"{summary['per_category'][c][m]['identical']}/{summary['per_category'][c][m]['compared']}"
                   for m in methods] for c in summary["categories"]]
    rows.append(["**overall**"] + [f"{summary['overall'][m]['identical']}/{summary['overall'][m]['compared']}"
                                   for m in methods])
    out += _table(["category"] + methods, rows) + [""]

    out += ["## Divergences", ""]
    div = summary["divergences"]
    if not div:
        out += [f"None: every output matched {ref} token for token.", ""]
    else:
        out += [
            f"First differing token index, and the top-2 logit gap of {ref} at that position (one forward "
            "of the model on its output prefix, in the run dtype): a gap near 0 is a near-tie that "
            "numerical noise can flip.",
            "",
        ]
        rows = [[str(d["question_id"]), str(d["category"]), str(d["turn"]), str(d["method"]),
                 str(d["first_divergence"]), _f(d["top2_gap"], 4)] for d in div]
        out += _table(["question", "category", "turn", "method", "first differing token", "top-2 gap"], rows) + [""]
    return "\n".join(out)


# ------------------------------------------------------------------------------------ chart
def plot_speedup(summary: dict, path: str | Path, title: str | None = None) -> bool:
    """Grouped bars: speedup over the reference per category (and overall) per method.

    Returns False (and writes nothing) when matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    ref = summary["reference"]
    methods = [m for m in summary["methods"] if m != ref] or list(summary["methods"])
    groups = list(summary["categories"]) + ["overall"]
    table = dict(summary["per_category"], overall=summary["overall"])
    width = 0.8 / max(1, len(methods))
    fig = Figure(figsize=(max(6.0, 1.2 + len(groups) * (0.5 + 0.35 * len(methods))), 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for i, m in enumerate(methods):
        xs = [g + (i - (len(methods) - 1) / 2) * width for g in range(len(groups))]
        ys = [table[c][m]["speedup"] or 0.0 for c in groups]
        bars = ax.bar(xs, ys, width=width, label=m)
        for b, y in zip(bars, ys):
            if y:
                ax.annotate(f"{y:.2f}", (b.get_x() + b.get_width() / 2, y), ha="center", va="bottom", fontsize=7)
    top = max([1.0] + [table[c][m]["speedup"] or 0.0 for c in groups for m in methods])
    ax.set_ylim(0, top * 1.18)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=20, ha="right")
    ax.set_ylabel(f"speedup over {ref} (tok/s ratio)")
    ax.set_title(title or f"speedup over {ref}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path), format="png", dpi=120)
    return True
