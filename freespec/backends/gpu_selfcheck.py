"""Self-check and timings of the native backend on a GPU (runs on the CPU too, without graphs).

    python -m freespec.backends.gpu_selfcheck                      # tiny random Qwen2
    python -m freespec.backends.gpu_selfcheck --random smollm2     # random weights, SmolLM2-135M shape
    python -m freespec.backends.gpu_selfcheck DIR [FILE.gguf]      # a model directory / a GGUF in it

Checks (fp32): native eager and graph logits vs HF (prefill and a tree verify), greedy
identity through the engine (HF backend vs native eager / graph, plain and Token Recycling).
Timings (``--dtype``): verify+commit forward ms for trees of 1, 17, 81, 161 nodes at a
~``--cache``-token cache (HF eager, native eager, native graph), and engine tok/s.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ..engine import Engine
from ..tree import Draft, TreeShape, get_template
from .hf import HFBackend
from .native import NativeBackend, unsupported_reason

TREES = {1: None, 17: "tr16", 81: "tr80", 161: "tr160"}
TEXT = (
    "The history of computing is a story of abstraction. Early machines were programmed by "
    "rewiring panels; later, stored programs let the same hardware run many tasks. Explain, in "
    "a few paragraphs, how compilers, operating systems and networks each added a layer."
)


class _StubTok:
    chat_template = None
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def _random_model(kind: str, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    if kind == "smollm2":
        cfg = LlamaConfig(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
            rms_norm_eps=1e-5, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        )  # fmt: skip
        model = LlamaForCausalLM(cfg)
    elif kind == "qwen2-0.5b":
        cfg = Qwen2Config(
            vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
            num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
            rms_norm_eps=1e-6, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        )  # fmt: skip
        model = Qwen2ForCausalLM(cfg)
    else:
        cfg = Qwen2Config(
            vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
            initializer_range=0.2, tie_word_embeddings=False,
        )  # fmt: skip
        model = Qwen2ForCausalLM(cfg)
    model.generation_config.eos_token_id = None
    return model.to(dtype).eval(), _StubTok()


def _load(args, dtype):
    if args.model is None:
        return _random_model(args.random, dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = Path(args.model)
    gguf = args.gguf
    if gguf is None and d.is_dir() and not (d / "config.json").exists():
        found = sorted(p.name for p in d.glob("*.gguf"))
        if len(found) != 1:
            sys.exit(f"give the GGUF file name: {d} holds {found or 'no .gguf file'}")
        gguf = found[0]
    kw = {"gguf_file": gguf} if gguf else {}
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=dtype, **kw).eval()
    tok = AutoTokenizer.from_pretrained(str(d), **kw)
    return model, tok


def _shape(n: int, device) -> TreeShape:
    t = TREES[n]
    parents = [-1] if t is None else get_template(t).parents()
    return TreeShape.from_parents(parents, device)


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _prompt_ids(model, tok, n: int) -> list[int]:
    if isinstance(tok, _StubTok):
        g = torch.Generator().manual_seed(1)
        return torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist()
    ids = list(tok(TEXT).input_ids)
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def _chat_prompt(eng: Engine, tok) -> list[int]:
    if isinstance(tok, _StubTok):
        return _prompt_ids(eng.model, tok, 40)
    return eng.encode(TEXT, chat=bool(getattr(tok, "chat_template", None)))


@torch.inference_mode()
def checks(model, tok, cache: int, new: int) -> bool:
    dev = model.device
    ok = True
    ids = torch.tensor(_prompt_ids(model, tok, cache), device=dev)
    hf = HFBackend(model)
    eager = NativeBackend(model, graphs=False)
    graph = NativeBackend(model, graphs=dev.type == "cuda")
    outs = []
    for be in (hf, eager, graph):
        be.reset()
        outs.append(be.prefill(ids, all_logits=True))
    d_pre = (outs[1] - outs[0]).abs().max().item()
    shape = _shape(81, dev)
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, model.config.vocab_size, (shape.size,), generator=g).to(dev)
    tv = [be.verify(Draft(tokens, shape)) for be in (hf, eager, graph)]
    tv.append(graph.verify(Draft(tokens, shape)) if graph.graphs else tv[2])  # a replay, not the capture
    d_tree = (tv[1] - tv[0]).abs().max().item()
    d_graph = max((tv[2] - tv[1]).abs().max().item(), (tv[3] - tv[1]).abs().max().item())
    arg = (tv[1].argmax(-1) == tv[0].argmax(-1)).float().mean().item()
    tol = 1e-3 if model.dtype == torch.float32 else 5e-2
    good = d_pre < tol and d_tree < tol and d_graph < tol and arg == 1.0
    ok &= good
    print(
        f"logits  prefill|native-hf|={d_pre:.1e}  tree81|native-hf|={d_tree:.1e}  "
        f"|graph-eager|={d_graph:.1e}  argmax agree={arg:.3f}  {'OK' if good else 'FAIL'}"
    )
    # greedy identity through the engine
    ref_eng = Engine(model, tok, drafter=None, backend=hf)
    prompt = _chat_prompt(ref_eng, tok)
    ref = ref_eng.generate(prompt, new).tokens
    rows = []
    for name, be, drafter in (
        ("hf+TR", hf, "recycling"),
        ("native-eager plain", eager, None),
        ("native-eager+TR", eager, "recycling"),
        ("native-graph plain", graph, None),
        ("native-graph+TR", graph, "recycling"),
    ):
        got = Engine(model, tok, drafter=drafter, backend=be).generate(prompt, new).tokens
        same = got == ref
        ok &= same
        rows.append(f"{name}={'same' if same else 'DIFF@' + str(next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref))))}")
    print(f"greedy  {len(ref)} tokens vs hf plain: " + "  ".join(rows))
    return ok


def _time(fn, dev, reps: int) -> float:
    for _ in range(3):
        fn()
    _sync(dev)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(dev)
    return (time.perf_counter() - t) / reps * 1e3


@torch.inference_mode()
def timings(model, tok, cache: int, new: int, reps: int) -> None:
    dev = model.device
    ids = torch.tensor(_prompt_ids(model, tok, cache), device=dev)
    backs = {"hf": HFBackend(model), "native-eager": NativeBackend(model, graphs=False)}
    if dev.type == "cuda":
        backs["native-graph"] = NativeBackend(model, graphs=True)
    for be in backs.values():
        be.reset()
        be.prefill(ids)
    print(f"verify+commit ms @cache {cache} ({model.dtype}, {dev}):")
    print("  nodes " + "".join(f"{k:>14}" for k in backs))
    g = torch.Generator().manual_seed(3)
    for n in TREES:
        shape = _shape(n, dev)
        draft = Draft(torch.randint(0, model.config.vocab_size, (n,), generator=g).to(dev), shape)
        keep0 = shape.paths[0]
        row = []
        for be in backs.values():
            row.append(_time(lambda be=be: (be.verify(draft), be.commit(keep0, 0)), dev, reps))
        print(f"  {n:5d} " + "".join(f"{x:14.2f}" for x in row))
    # engine throughput
    eng_rows = []
    prompt = _chat_prompt(Engine(model, tok, drafter=None, backend=backs["hf"]), tok)
    best = backs.get("native-graph", backs["native-eager"])
    for name, be in (("hf", backs["hf"]), ("native", best)):
        for drafter in (None, "recycling"):
            eng = Engine(model, tok, drafter=drafter, backend=be, profile=False)
            eng.generate(prompt, new)  # warm: graphs, the recycling matrix
            r = eng.generate(prompt, new)
            eng_rows.append(
                f"{name}{'+TR' if drafter else ' plain'} {r.stats.tokens_per_second:.1f} tok/s"
                + (f" (MAT {r.stats.mat:.2f})" if drafter else "")
            )
    print(f"engine  {new} new tokens, graphs={'native-graph' in backs}: " + " | ".join(eng_rows))


@torch.inference_mode()
def profile(model, tok, new: int, cache: int = 700, attention_variants: bool = False) -> None:
    """Where a step's time goes: graph replay alone vs the engine's whole step, per backend
    variant (torch.compile of the layers on / off), and the kernels of a few engine steps."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    dev = model.device
    ids = torch.tensor(_prompt_ids(model, tok, cache), device=dev)
    variants = {"default": {}}
    if dev.type == "cuda" and attention_variants:  # the attention kernels for a 1-token / tree query
        variants.update({k: {"attention": k} for k in ("efficient", "math")})
    prompt = None
    for vname, kw in variants.items():
        be = NativeBackend(model, **kw)
        if prompt is None:
            prompt = _chat_prompt(Engine(model, tok, drafter=None, backend=be), tok)
        be.reset()
        be.prefill(ids)
        row = []
        for n in (1, 81):
            shape = _shape(n, dev)
            draft = Draft(torch.randint(0, model.config.vocab_size, (n,)).to(dev), shape)
            be.verify(draft)  # capture
            g = next(iter(v for k, v in be._graphs.items() if k[0] == (1 if n == 1 else 96)), None)
            if g is not None:
                row.append(f"replay n={n}: {_time(g.graph.replay, dev, 50):.3f} ms")
            row.append(f"verify+commit n={n}: {_time(lambda: (be.verify(draft), be.commit(shape.paths[0], 0)), dev, 50):.3f} ms")
        print(f"[{vname}] compile={be.compile} ({be.compile_skip_reason}) " + " | ".join(row))
        runs = ((None, None), ("recycling", "tr80"), ("hybrid", "tr80"))
        for drafter, tmpl in runs if vname == "default" else ():
            eng = Engine(model, tok, drafter=drafter, backend=be, template=tmpl, profile=False)
            eng.generate(prompt, new)
            r = eng.generate(prompt, new)
            st = r.stats
            ms = st.time_total / max(1, st.steps) * 1e3
            print(f"[{vname}] {'plain' if drafter is None else drafter + ' ' + tmpl}: {st.tokens_per_second:.1f} tok/s, "
                  f"{st.steps} steps, {ms:.3f} ms/step (prefill {st.time_prefill * 1e3:.1f} ms), MAT {st.mat:.2f}")
            if vname == next(iter(variants)) and drafter != "hybrid":
                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
                with tprofile(activities=acts) as prof:
                    r = eng.generate(prompt, 64)
                steps = max(1, r.stats.steps)
                kern = [e for e in prof.events() if e.device_type.name == "CUDA"]
                busy = sum(e.device_time for e in kern) / 1e3
                print(f"   profiled {steps} steps: {len(kern) / steps:.0f} kernels/step, "
                      f"{busy / steps:.3f} ms GPU busy/step, wall {r.stats.time_total / steps * 1e3:.3f} ms/step")
                print(prof.key_averages().table(sort_by="self_cuda_time_total" if dev.type == "cuda"
                                                else "self_cpu_time_total", row_limit=18, max_name_column_width=60))
        del be
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m freespec.backends.gpu_selfcheck", description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", help="model directory (HF files or a .gguf)")
    ap.add_argument("gguf", nargs="?", help="GGUF file name inside the directory")
    ap.add_argument("--random", choices=["qwen2-tiny", "smollm2", "qwen2-0.5b"], default="qwen2-tiny")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="for the timings")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cache", type=int, default=700)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-timings", action="store_true")
    ap.add_argument("--no-checks", action="store_true", help="skip the fp32 checks")
    ap.add_argument("--profile", action="store_true", help="where the step time goes (in --dtype)")
    ap.add_argument("--attention-variants", action="store_true", help="--profile: also time the efficient / math kernels")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    print(f"torch {torch.__version__}  device {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}")

    model, tok = _load(args, torch.float32)
    model.to(dev)
    reason = unsupported_reason(model)
    if reason:
        print(f"native backend unsupported: {reason}")
        return 2
    cfg = model.config
    print(
        f"model {cfg.model_type} layers={cfg.num_hidden_layers} hidden={cfg.hidden_size} "
        f"heads={cfg.num_attention_heads}/{cfg.num_key_value_heads} vocab={cfg.vocab_size}"
    )
    ok = True if args.no_checks else checks(model, tok, min(args.cache, 1000), min(args.new, 128))
    if not args.no_timings or args.profile:
        model.to(getattr(torch, args.dtype))
    if not args.no_timings:
        timings(model, tok, args.cache, args.new, args.reps)
    if args.profile:
        profile(model, tok, args.new, args.cache, args.attention_variants)
    print("SELFCHECK", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
