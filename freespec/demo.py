"""``freespec demo``: plain decoding vs speculative decoding on the built-in prompts, side by side.

The drafter is the device's default (``--drafter auto``: hybrid, on CUDA and on a CPU) unless
``--drafter`` names one.
"""

from __future__ import annotations

import sys

import torch
from tqdm import tqdm

from .bench.dataset import load as load_dataset
from .bench.runner import run_question


def run_demo(args) -> int:
    from .cli import load_engine
    from .engine import Engine

    questions = load_dataset(args.prompts)
    if args.limit:
        questions = questions[: args.limit]
    print(f"loading {args.model} ...", file=sys.stderr)
    tr = load_engine(args)
    plain = Engine(tr.model, tr.tokenizer, drafter=None, backend=tr.backend)
    dev = tr.backend.device
    print(
        f"model {args.model} | {dev} {str(tr.backend.dtype).replace('torch.', '')} | backend "
        f"{type(tr.backend).__name__} | threads {torch.get_num_threads()} | drafter {tr.drafter.name} | "
        f"tree {_tree_desc(tr.drafter)} | {args.max_new_tokens} new tokens per turn",
        file=sys.stderr,
    )
    # warm-up: one short run of each (drafter state - the Token Recycling matrix, retrieval
    # history - stays warm afterwards, as published)
    for eng in (plain, tr):
        run_question(eng, questions[0], 16)

    rows = []
    for q in tqdm(questions, desc="demo", unit="prompt", file=sys.stderr):
        rp = run_question(plain, q, args.max_new_tokens)
        rt = run_question(tr, q, args.max_new_tokens)
        for turn, (a, b) in enumerate(zip(rp, rt)):
            rows.append(
                {
                    "id": q.question_id + (f"#{turn + 1}" if len(q.turns) > 1 else ""),
                    "category": q.category,
                    "tokens": a.stats.new_tokens,
                    "plain_s": a.stats.time_total,
                    "tr_s": b.stats.time_total,
                    "plain_tps": a.stats.tokens_per_second,
                    "tr_tps": b.stats.tokens_per_second,
                    "mat": b.stats.mat,
                    "identical": a.tokens == b.tokens,
                }
            )
    print(format_table(rows))
    bad = [r["id"] for r in rows if not r["identical"]]
    if bad:
        print(f"\nOUTPUTS DIFFER from plain decoding on: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


def _tree_desc(drafter) -> str:
    if getattr(drafter, "auto", False):
        return "auto (cost model)"
    t = getattr(drafter, "template", None)
    return f"{t.name} ({t.size} nodes)" if t is not None else "-"


def format_table(rows: list[dict]) -> str:
    head = f"| {'prompt':<10} | {'category':<13} | {'tokens':>6} | {'plain tok/s':>11} | {'spec tok/s':>10} | {'speedup':>7} | {'MAT':>5} | identical |"
    sep = "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"
    lines = [head, sep]
    for r in rows:
        lines.append(
            f"| {r['id']:<10} | {r['category']:<13} | {r['tokens']:>6} | {r['plain_tps']:>11.1f} | {r['tr_tps']:>10.1f} | "
            f"{r['tr_tps'] / r['plain_tps'] if r['plain_tps'] else 0:>6.2f}x | {r['mat']:>5.2f} | {'yes' if r['identical'] else 'NO':<9} |"
        )
    tok = sum(r["tokens"] for r in rows)
    tp = tok / sum(r["plain_s"] for r in rows)
    tt = sum(r["tokens"] for r in rows) / sum(r["tr_s"] for r in rows)
    mat = sum(r["mat"] for r in rows) / len(rows)
    same = sum(r["identical"] for r in rows)
    lines.append(
        f"| {'overall':<10} | {'':<13} | {tok:>6} | {tp:>11.1f} | {tt:>10.1f} | {tt / tp:>6.2f}x | {mat:>5.2f} | {same}/{len(rows):<7} |"
    )
    return "\n".join(lines)
