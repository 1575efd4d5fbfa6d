"""``freespec bench``: several generation methods on the same prompts, same model, one process.

``run_bench`` takes an already-loaded model (the tests call it directly); ``cli_main`` loads the
model as the other commands do and wraps it. See ``PROTOCOL`` for how the runs are made.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from .dataset import Question
from .methods import REFERENCE, BenchError, build_method, resolve_methods
from .report import HF_BASELINE, plot_speedup, render_markdown, summarize
from .runner import messages_for, plain_prompt_for

PROTOCOL = (
    "Protocol: all methods run in one process on the same model instance; the engine methods share one "
    "backend and each drafter persists across prompts (hot start). Warm-up: each method generates once on "
    "the first question's first turn (not recorded). Each timed generation is wall clock with the device "
    "synchronised before and after, prefill included. Methods are interleaved per prompt (for each question "
    "and turn, every method in turn) so machine drift hits all alike. Multi-turn questions run turn by turn "
    "with the chat template (a plain 'Question:/Answer:' transcript for models without one); the answer kept "
    "in the next turn's context is the reference's (plain) answer for every method, so all methods see the "
    "same prompt ids in every turn. Garbage collection: after the warm-up the heap is collected and frozen "
    "(gc.freeze: the libraries' and the model's objects leave the collector's scans), and a collection runs, "
    "untimed, before each timed generation, so that no run pays for the garbage of another or of the harness. "
    "A record's time split (prefill/draft/verify/other) is the engine's own and, on CUDA, not synchronised "
    "per phase."
)


# ------------------------------------------------------------------------------ helpers
def prompt_ids_for(engine, question: Question, answers: list[str], turn: int) -> list[int]:
    """The prompt ids of ``turn``: chat template if the tokenizer has one, else a plain transcript."""
    if getattr(engine.tokenizer, "chat_template", None):
        return engine.encode(messages_for(question, answers, turn))
    return engine.encode(plain_prompt_for(question, answers, turn))


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first position where ``a`` and ``b`` differ (None if equal)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@torch.inference_mode()
def top2_gap(model, ids: list[int]) -> float:
    """Top-1 minus top-2 logit of the next token after ``ids``: one forward, no cache, model dtype."""
    x = torch.tensor([ids], dtype=torch.long, device=model.device)
    kw = dict(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False)
    try:
        logits = model(**kw, logits_to_keep=1).logits[0, -1]
    except TypeError:  # a model without logits_to_keep
        logits = model(**kw).logits[0, -1]
    top = logits.topk(2).values
    return float((top[0] - top[1]).item())


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _git(*cmd: str) -> str | None:
    try:
        r = subprocess.run(["git", *cmd], cwd=Path(__file__).resolve().parent, capture_output=True,
                           text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def environment(model, backend, command: str | None = None) -> dict:
    import transformers

    from .. import __version__

    dev = torch.device(backend.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name()
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain") if commit else None
    return {
        "device": str(dev),
        "device_name": name,
        "model_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "dtype": str(getattr(backend, "dtype", model.dtype)).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "backend": type(backend).__name__,
        # the CPU's packed weight layout (NativeBackend) and the timings it was chosen from
        "weight_layout": ({"kind": backend.pack_kind, "min_rows": backend.pack_min_rows,
                           "times_ms": {k: round(v * 1e3, 3) for k, v in getattr(backend, "layout_times", {}).items()}}
                          if getattr(backend, "packed", False) else None),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "freespec": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": commit,
        "git_dirty": bool(status) if status is not None else None,
        "command": command if command is not None else shlex.join(sys.argv),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _record(q: Question, turn: int, method, prompt_ids: list[int], run, ref_run) -> dict:
    if ref_run is None or method.name == REFERENCE:
        identical, div = True, None
    else:
        div = first_divergence(ref_run.tokens, run.tokens)
        identical = div is None
    stats = None
    if run.stats is not None:
        keys = ("time_total", "time_prefill", "time_draft", "time_verify", "time_other", "mean_draft_nodes",
                "draft_sizes")
        stats = {k: run.stats[k] for k in keys if k in run.stats}
    return {
        "question_id": q.question_id,
        "category": q.category,
        "turn": turn,
        "method": method.name,
        "template": method.template,
        "prompt_tokens": len(prompt_ids),
        "new_tokens": run.new_tokens,
        "time": run.time,
        "tok_s": run.new_tokens / run.time if run.time > 0 else 0.0,
        "mat": run.mat,
        "steps": run.steps,
        "tokens_per_step": run.tokens_per_step,
        "finish_reason": run.finish_reason,
        "identical": identical,
        "first_divergence": div,
        "top2_gap": None,
        "stats": stats,
    }


# ------------------------------------------------------------------------------ the run
def run_bench(
    model,
    tokenizer,
    questions: list[Question],
    methods: str | list[str],
    max_new_tokens: int,
    out_dir: str | Path,
    draft_model=None,
    *,
    draft_tokenizer=None,
    backend=None,
    warmup: bool = True,
    warmup_tokens: int | None = None,
    progress: bool = True,
    command: str | None = None,
    config: dict | None = None,
) -> dict:
    """Run every method on every (question, turn); write results.json, results.md, speedup.png.

    Returns the results dict written to results.json (env, config, summary, records, skipped).
    """
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens <= 0:
        raise BenchError(f"--max-new-tokens must be a positive integer, got {max_new_tokens!r}")
    if not questions:
        raise BenchError("no questions to run")
    specs = resolve_methods(methods, have_draft_model=draft_model is not None)
    if backend is None:
        from ..backends import make_backend

        backend = make_backend(model, prefer="auto")
    built = [build_method(s, model, tokenizer, backend, draft_model, draft_tokenizer) for s in specs]
    ref = built[0]
    assert ref.name == REFERENCE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    env = environment(model, backend, command)
    cfg = {
        "methods": [m.name for m in built],
        "templates": {m.name: m.template for m in built if m.template},
        "reference": REFERENCE,
        "max_new_tokens": max_new_tokens,
        "questions": len(questions),
        "turns": sum(len(q.turns) for q in questions),
        "warmup": warmup,
        "protocol": PROTOCOL,
        **(config or {}),
    }

    if warmup:  # on the first question whose first turn fits the context
        for q in questions:
            ids = prompt_ids_for(ref.engine, q, [], 0)
            n = min(warmup_tokens or max_new_tokens, backend.max_length - len(ids))
            if n > 0:
                for m in tqdm(built, desc="warm-up", unit="method", file=sys.stderr, disable=not progress,
                              leave=False):
                    m.run(ids, n)
                break

    # The collector: the startup heap (the libraries' and the model's objects: ~0.4M in a CPU run of
    # SmolLM2) frozen out of its scans, where a full collection took 85-150 ms on this project's CPU;
    # and a collection before each timed generation. Without them a pause fell in whichever run
    # crossed the collector's threshold, mostly on garbage that another run or the harness's records
    # had left (on the H100 a turn's host time differed between two hybrid methods by up to ~28 ms,
    # either way, where the median turn differed by ~0.5 ms).
    gc.collect()
    gc.freeze()
    records: list[dict] = []
    skipped: list[dict] = []
    interrupted = False
    bar = tqdm(total=cfg["turns"] * len(built), desc="bench", unit="gen", file=sys.stderr, disable=not progress)
    try:
        for q in questions:
            answers: list[str] = []
            for turn in range(len(q.turns)):
                ids = prompt_ids_for(ref.engine, q, answers, turn)
                limit = min(max_new_tokens, backend.max_length - len(ids))
                if limit <= 0:
                    skipped.append({"question_id": q.question_id, "turn": turn, "prompt_tokens": len(ids),
                                    "reason": f"prompt longer than the context ({backend.max_length} tokens)"})
                    bar.update(len(built) * (len(q.turns) - turn))
                    break
                ref_run, turn_recs = None, []
                for m in built:
                    bar.set_postfix_str(f"{q.question_id}#{turn + 1} {m.name}", refresh=False)
                    gc.collect()
                    run = m.run(ids, limit)
                    if m is ref:
                        ref_run = run
                    turn_recs.append(_record(q, turn, m, ids, run, ref_run))
                    bar.update(1)
                for r in turn_recs:  # outside the timed region
                    if r["identical"] is False:
                        r["top2_gap"] = top2_gap(model, ids + ref_run.tokens[: r["first_divergence"]])
                records.extend(turn_recs)
                answers.append(ref_run.text)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
        gc.unfreeze()

    cfg["interrupted"] = interrupted
    summary = summarize(records, reference=REFERENCE, baseline=HF_BASELINE)
    results = {"env": env, "config": cfg, "summary": summary, "records": records, "skipped": skipped}
    # the verify-latency curve the cost model sized trees by (one per backend: shared)
    curve = next((m.engine.latency for m in built if getattr(getattr(m, "engine", None), "latency", None)), None)
    if curve is not None:
        results["latency_curve"] = curve.to_dict()
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(render_markdown(summary, env, cfg) + "\n")
    if records and not plot_speedup(summary, out / "speedup.png"):
        print("freespec: matplotlib is not installed: no speedup.png (pip install 'freespec[bench]')",
              file=sys.stderr)
    if interrupted:
        raise KeyboardInterrupt
    return results


# ------------------------------------------------------------------------------ the CLI
def cli_main(args) -> int:
    """``freespec bench``: check the arguments, load the model(s), run, write, print a summary."""
    from .. import models
    from ..cli import load_engine
    from .dataset import load as load_dataset
    from .dataset import per_category, regroup
    from .report import overall_table

    if args.per_category is not None and args.per_category <= 0:
        raise BenchError(f"--per-category must be a positive integer, got {args.per_category}")
    if args.max_new_tokens <= 0:
        raise BenchError(f"--max-new-tokens must be a positive integer, got {args.max_new_tokens}")
    specs = resolve_methods(args.methods, have_draft_model=bool(args.draft_model))
    questions = per_category(regroup(load_dataset(args.dataset), getattr(args, "group_by", "spec-bench")),
                             args.per_category)

    print(f"loading {args.model} ...", file=sys.stderr)
    eng = load_engine(args, drafter="none")
    draft_model = draft_tok = None
    if any(s.needs_draft_model for s in specs):
        print(f"loading draft model {args.draft_model} ...", file=sys.stderr)
        draft_model, draft_tok = models.load(args.draft_model, dtype=eng.model.dtype, device=eng.backend.device)
        models.check_pair(draft_tok, eng.tokenizer)
    elif args.draft_model:
        print(f"freespec: note: no method uses a draft model; {args.draft_model} is not loaded", file=sys.stderr)
    print(
        f"{len(questions)} questions, {sum(len(q.turns) for q in questions)} turns x {len(specs)} methods "
        f"({', '.join(s.name for s in specs)}) | {args.max_new_tokens} new tokens per turn",
        file=sys.stderr,
    )
    results = run_bench(
        eng.model, eng.tokenizer, questions, [s.name for s in specs], args.max_new_tokens, args.out,
        draft_model=draft_model, draft_tokenizer=draft_tok, backend=eng.backend,
        warmup_tokens=args.warmup_tokens,
        config={"model": args.model, "draft_model": args.draft_model if draft_model is not None else None,
                "dataset": args.dataset, "per_category": args.per_category,
                "group_by": getattr(args, "group_by", "spec-bench")},
    )
    print(overall_table(results["summary"]))
    n_div = len(results["summary"]["divergences"])
    if n_div:
        print(f"\n{n_div} output(s) differ from {REFERENCE}: see the divergences table in {Path(args.out) / 'results.md'}",
              file=sys.stderr)
    print(f"\nwrote {Path(args.out) / 'results.json'}, results.md, speedup.png", file=sys.stderr)
    return 0
