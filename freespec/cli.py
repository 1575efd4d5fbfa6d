"""The ``freespec`` command line: generate, demo, models."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from .models import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="catalog name (see 'freespec models list'), a .gguf file, a HF model directory or a hub id "
                        f"(default: {DEFAULT_MODEL})")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="weights dtype (default: fp32 on cpu, bf16 on cuda)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--backend", default="auto", choices=["auto", "hf", "native"],
                   help="model implementation: HF eager, or freespec's static-cache one (CUDA graphs on GPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 avoids stalls on a busy machine)")


def _add_draft_args(p: argparse.ArgumentParser) -> None:
    from .drafters import DRAFTERS

    p.add_argument("--drafter", default="auto", choices=["auto"] + sorted(DRAFTERS),
                   help="draft method; 'auto' (default): the measured best for the device (hybrid on "
                        "CUDA and on a CPU); 'none' = plain decoding through the same engine")
    p.add_argument("--tree", default="auto",
                   help="draft tree: 'auto' (default: sized each step by the cost model from this device's "
                        "measured verify latency and learnt acceptance rates; may draft nothing where "
                        "speculation cannot pay), a template name (tr4 tr8 tr16 tr32 tr48 tr80 tr160), chainN, "
                        "or a node count")
    p.add_argument("--draft-model", default=None,
                   help="draft model for the draft-model and fused drafters (same tokenizer as --model; "
                        "the catalog pairs qwen2.5-coder-0.5b with qwen2.5-coder-1.5b)")


def load_engine(args, drafter=None):
    """Model, tokenizer and an Engine as the arguments ask."""
    from .backends import make_backend
    from .drafters import DRAFTERS, DraftModelError, default_drafter, make_drafter
    from .engine import Engine
    from .models import check_pair, load

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    model, tok = load(args.model, dtype=dtype, device=device)
    backend = make_backend(model, prefer=args.backend)
    name = getattr(args, "drafter", "auto") if drafter is None else drafter
    if name == "auto":
        name = default_drafter(backend.device)
    tree = getattr(args, "tree", None) or "auto"
    if name in DRAFTERS and getattr(DRAFTERS[name], "needs_draft_model", False):
        draft_spec = getattr(args, "draft_model", None) or _default_draft(args.model)
        if draft_spec is None:
            raise DraftModelError(f"the {name!r} drafter needs a draft model: pass --draft-model NAME")
        draft_model, draft_tok = load(draft_spec, dtype=dtype, device=device)
        check_pair(draft_tok, tok)
        name = make_drafter(name, vocab_size=backend.vocab_size, device=backend.device, template=tree,
                            draft_model=draft_model)
    engine = Engine(model, tok, drafter=name, backend=backend, template=tree)
    if engine.drafter is not None and engine.drafter.wants_latency:
        engine.ensure_latency(progress=lambda s: print(s, file=sys.stderr, flush=True))
    return engine


def _default_draft(model_spec: str) -> str | None:
    from .models import CATALOG

    spec = CATALOG.get(model_spec)
    return getattr(spec, "default_draft", None) if spec is not None else None


def _sampling(args):
    from .verify import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)


def cmd_generate(args) -> int:
    from .engine import EngineError

    sampling = _sampling(args)
    engine = load_engine(args)
    out = sys.stdout
    try:
        res = engine.generate(
            args.prompt,
            args.max_new_tokens,
            chat=args.chat,
            stop=args.stop,
            sampling=sampling,
            on_text=None if args.json else (lambda s: (out.write(s), out.flush())),
        )
    except EngineError as e:
        raise SystemExit(f"freespec: error: {e}")
    if args.json:
        print(json.dumps({"text": res.text, "finish_reason": res.finish_reason, "stats": res.stats.as_dict()}))
        return 0
    out.write("\n")
    st = res.stats
    d = engine.drafter
    tmpl = getattr(d, "template", None)
    tname = "auto" if getattr(d, "auto", False) else getattr(tmpl, "name", None)
    desc = "plain" if d is None else d.name + (f" ({tname})" if tname else "")
    print(
        f"\n[{desc}] {st.new_tokens} tokens in {st.time_total:.2f}s = {st.tokens_per_second:.1f} tok/s | "
        f"steps {st.steps} | MAT {st.mat:.2f} | prefill {st.time_prefill:.2f}s draft {st.time_draft:.2f}s "
        f"verify {st.time_verify:.2f}s other {st.time_other:.2f}s | finish: {res.finish_reason}",
        file=sys.stderr,
    )
    hist = " ".join(f"{k}:{v}" for k, v in sorted(st.tokens_per_step.items()))
    print(f"tokens per step (tokens:steps): {hist}", file=sys.stderr)
    sizes = " ".join(f"{k}:{v}" for k, v in sorted(st.draft_sizes.items()))
    print(f"draft nodes per step (nodes:steps): {sizes}", file=sys.stderr)
    return 0


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def cmd_calibrate(args) -> int:
    """Measure (or show the cached) verify-latency curve that sizes draft trees."""
    from .backends import make_backend
    from .cost import calibration_key, calibration_path, load_or_calibrate
    from .models import load

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    model, _ = load(args.model, dtype=dtype, device=device)
    backend = make_backend(model, prefer=args.backend)
    path = calibration_path(calibration_key(model, backend))
    cached = path.exists() and not args.force and args.rounds is None
    lm = load_or_calibrate(model, backend, force=args.force or args.rounds is not None, repeats=args.rounds,
                           progress=lambda s: print(s, file=sys.stderr, flush=True))
    print(f"verify step latency (ms) by draft nodes + root and cache length ({'cached' if cached else 'measured'}):")
    print(lm.table())
    print()
    print(path)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args)


def cmd_bench(args) -> int:
    from .bench.dataset import DatasetError
    from .bench.harness import cli_main
    from .bench.methods import BenchError

    try:
        return cli_main(args)
    except (BenchError, DatasetError) as e:
        raise SystemExit(f"freespec: error: {e}")


def cmd_models(args) -> int:
    from . import models

    try:
        if args.action == "list":
            rows = models.list_models()
            print(f"{'name':<22}{'size':>10}  {'installed':<10}path")
            for r in rows:
                size = f"{r['size_bytes'] / 1e6:.0f} MB"
                print(f"{r['name']:<22}{size:>10}  {'yes' if r['installed'] else 'no':<10}{r['path'] or ''}")
            print(f"\nmodels live under {models.home_dir()} (set FREESPEC_HOME to move them)")
        elif args.action == "pull":
            print(models.pull(args.name))
        elif args.action == "rm":
            print("removed" if models.remove(args.name) else f"{args.name} was not installed")
        elif args.action == "path":
            print(models.model_path(args.name))
    except models.ModelError as e:
        raise SystemExit(f"freespec: error: {e}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    ap = argparse.ArgumentParser(prog="freespec", description="Lossless speculative decoding for HF causal LMs.")
    ap.add_argument("--version", action="version", version=f"freespec {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text, streaming, and print statistics")
    g.add_argument("prompt")
    _add_model_args(g)
    _add_draft_args(g)
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="plain decoding vs speculative decoding on the built-in prompts")
    _add_model_args(d)
    d.add_argument("--drafter", default="auto", choices=["auto", "recycling", "lookup", "suffix", "hybrid"],
                   help="'auto' (default): the measured best for the device (hybrid, on CUDA and on a CPU)")
    d.add_argument("--tree", default="auto", help="draft tree: 'auto' (cost model, default), a template name, or N")
    d.add_argument("--max-new-tokens", type=int, default=128)
    d.add_argument("--prompts", default="builtin", help="'builtin' or a Spec-Bench style question.jsonl")
    d.add_argument("--limit", type=int, default=None, help="run only the first N prompts")
    d.set_defaults(func=cmd_demo)

    m = sub.add_parser("models", help="the offline model catalog")
    msub = m.add_subparsers(dest="action", required=True)
    msub.add_parser("list", help="catalog models, their size and whether they are installed")
    for name, text in (("pull", "download and verify a model"), ("rm", "delete a downloaded model"),
                       ("path", "print a downloaded model's file path")):
        x = msub.add_parser(name, help=text)
        x.add_argument("name")
    m.set_defaults(func=cmd_models)

    c = sub.add_parser("calibrate", help="measure the verify-latency curve that sizes draft trees (cached per "
                                         "model, device, dtype and backend)")
    _add_model_args(c)
    c.add_argument("--force", action="store_true", help="measure again even if a cached curve exists")
    c.add_argument("--rounds", type=_positive_int, default=None,
                   help="timed rounds per tree size (default: 40 on CUDA, 5 on a CPU; more: a steadier curve); "
                        "measures again")
    c.set_defaults(func=cmd_calibrate)

    b = sub.add_parser("bench", help="benchmark methods side by side: speedup, MAT, output identity")
    _add_model_args(b)
    b.add_argument("--draft-model", default=None, help="draft model for methods that need one (hf-assisted, ...)")
    b.add_argument("--methods", default="plain,recycling,hf-greedy",
                   help="comma-separated: plain, DRAFTER[:TEMPLATE] (e.g. recycling, recycling:tr80; no template = auto), "
                        "hf-greedy, "
                        "hf-prompt-lookup, hf-assisted (default: plain,recycling,hf-greedy)")
    b.add_argument("--dataset", default="builtin", help="'builtin' or a Spec-Bench style question.jsonl")
    b.add_argument("--per-category", type=int, default=None, help="run only the first N questions of each category")
    b.add_argument("--group-by", default="spec-bench", choices=["spec-bench", "category"],
                   help="spec-bench (default): MT-bench's eight categories count as Spec-Bench's one "
                        "multi_turn category; category: the file's categories as they are")
    b.add_argument("--max-new-tokens", type=int, default=256)
    b.add_argument("--warmup-tokens", type=int, default=None, help="tokens per warm-up run (default: --max-new-tokens)")
    b.add_argument("--out", default="bench-results", help="output directory (default: bench-results)")
    b.set_defaults(func=cmd_bench)
    return ap


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    from .models import ModelError
    from .verify import SamplingError

    try:
        return args.func(args) or 0
    except (ModelError, SamplingError, ValueError) as e:
        raise SystemExit(f"freespec: error: {e}")
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
