"""Benchmark methods: what ``freespec bench --methods`` can name, and how each one generates.

A method name is one of

* ``plain``: our engine without a drafter (the reference every other method is compared with);
* ``DRAFTER[:TEMPLATE]`` for any name in ``freespec.drafters.DRAFTERS`` (``recycling``,
  ``recycling:tr80``, ``recycling:auto``, ...): our engine with that drafter; the template is
  optional (``auto``: sized by the cost model, as in ``freespec generate``);
* ``hf-greedy``, ``hf-prompt-lookup``, ``hf-assisted``: ``model.generate`` greedy, with prompt
  lookup (``prompt_lookup_num_tokens=10``), or with ``assistant_model=`` the draft model.

The list of drafter methods is read from the DRAFTERS registry, so drafters added there become
benchmarkable without touching this file. A drafter class that sets ``needs_draft_model = True``
gets the draft model (``--draft-model``) as its ``draft_model`` argument.

Every method is an object with ``name``, ``kind`` (``"engine"`` or ``"hf"``),
``needs_draft_model`` and ``run(prompt_ids, max_new_tokens) -> Run``; ``run`` synchronises the
device before and after the generation and times it (prefill included) with the wall clock.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field

import torch

from ..drafters import DRAFTERS, make_drafter


class BenchError(ValueError):
    """A benchmark that cannot run as asked: the message says what to change."""


REFERENCE = "plain"
HF_BASELINE = "hf-greedy"
PROMPT_LOOKUP_TOKENS = 10

# name -> (needs a draft model, description)
HF_METHODS: dict[str, tuple[bool, str]] = {
    "hf-greedy": (False, "transformers model.generate(do_sample=False)"),
    "hf-prompt-lookup": (False, f"model.generate with prompt_lookup_num_tokens={PROMPT_LOOKUP_TOKENS}"),
    "hf-assisted": (True, "model.generate with assistant_model= the --draft-model"),
}


def _drafter_names() -> list[str]:
    return [n for n, cls in DRAFTERS.items() if cls is not None and n not in ("none", REFERENCE)]


def known_methods() -> list[str]:
    """Every method name (templates aside), reference first."""
    return [REFERENCE] + _drafter_names() + list(HF_METHODS)


def _known_text() -> str:
    return (f"known: {', '.join(known_methods())} "
            "(a drafter may take a tree template: DRAFTER:TEMPLATE, e.g. recycling:tr80)")


def _drafter_accepts(cls, param: str, strict: bool = False) -> bool:
    """Whether the drafter's constructor takes ``param`` (``strict``: by name, not via ``**kw``)."""
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):  # pragma: no cover - builtins, odd factories
        return False
    if param in sig.parameters:
        return True
    return not strict and any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())


@dataclass(frozen=True)
class MethodSpec:
    """A parsed method name."""

    name: str  # as the user wrote it (the key in every record)
    base: str  # "plain", a drafter name, or an hf-* name
    kind: str  # "engine" | "hf"
    template: str | None = None
    needs_draft_model: bool = False


def parse_method(name: str) -> MethodSpec:
    name = name.strip()
    if not name:
        raise BenchError(f"an empty method name; {_known_text()}")
    base, sep, template = name.partition(":")
    base, template = base.strip(), (template.strip() or None) if sep else None
    if sep and template is None:
        raise BenchError(f"method {name!r}: nothing after ':' (give a tree template, e.g. {base}:tr8)")
    if base in HF_METHODS:
        if template is not None:
            raise BenchError(f"method {name!r}: {base} takes no tree template")
        return MethodSpec(name, base, "hf", None, HF_METHODS[base][0])
    if base in (REFERENCE, "none"):
        if template is not None:
            raise BenchError(f"method {name!r}: plain decoding takes no tree template")
        return MethodSpec(REFERENCE, REFERENCE, "engine")
    if base not in _drafter_names():
        raise BenchError(f"unknown method {name!r}; {_known_text()}")
    cls = DRAFTERS[base]
    if template is not None:
        if not _drafter_accepts(cls, "template"):
            raise BenchError(f"method {name!r}: the {base} drafter takes no tree template")
        from ..tree import TreeError, get_template

        try:
            if template != "auto":
                get_template(template)
        except TreeError as e:
            raise BenchError(f"method {name!r}: {e}") from None
    return MethodSpec(name, base, "engine", template, bool(getattr(cls, "needs_draft_model", False)))


def resolve_methods(methods: str | list[str], have_draft_model: bool) -> list[MethodSpec]:
    """Parse and check a method list (``"a,b"`` or ``["a", "b"]``); ``plain`` always comes first.

    ``plain`` is the reference (speedups, identity and the multi-turn context come from it),
    so it is added when not named.
    """
    names = [m for m in methods.split(",")] if isinstance(methods, str) else list(methods)
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise BenchError(f"no methods given; {_known_text()}")
    specs = [parse_method(n) for n in names]
    seen: set[str] = set()
    for s in specs:
        if s.name in seen:
            raise BenchError(f"method {s.name!r} is named twice")
        seen.add(s.name)
    need = [s.name for s in specs if s.needs_draft_model]
    if need and not have_draft_model:
        raise BenchError(f"method(s) {', '.join(need)} need a draft model: pass --draft-model NAME")
    ref = [s for s in specs if s.name == REFERENCE]
    rest = [s for s in specs if s.name != REFERENCE]
    return (ref or [MethodSpec(REFERENCE, REFERENCE, "engine")]) + rest


# ----------------------------------------------------------------------------------- runs
@dataclass
class Run:
    """One timed generation."""

    tokens: list[int]  # new tokens (an EOS that ended the output included)
    finish_reason: str  # "eos" | "length"
    time: float  # seconds, wall clock, device synchronised, prefill included
    steps: int | None = None  # verification passes after prefill (engine methods)
    tokens_per_step: dict[int, int] | None = None
    stats: dict | None = None  # the engine's GenerationStats.as_dict()
    text: str | None = None  # the decoded output (engine methods)

    @property
    def new_tokens(self) -> int:
        return len(self.tokens)

    @property
    def mat(self) -> float | None:
        if not self.steps or self.tokens_per_step is None:
            return None
        return sum(k * v for k, v in self.tokens_per_step.items()) / self.steps


def _sync_fn(device: torch.device):
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@dataclass
class Method:
    spec: MethodSpec
    device: torch.device
    _sync: object = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def needs_draft_model(self) -> bool:
        return self.spec.needs_draft_model

    @property
    def template(self) -> str | None:
        return None

    def sync(self) -> None:
        if self._sync is None:
            self._sync = _sync_fn(self.device)
        self._sync()

    def run(self, prompt_ids: list[int], max_new_tokens: int) -> Run:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass
class EngineMethod(Method):
    engine: object = None  # freespec.engine.Engine

    @property
    def template(self) -> str | None:
        if getattr(self.engine.drafter, "auto", False):
            return "auto"
        t = getattr(self.engine.drafter, "template", None)
        return getattr(t, "name", None) if t is not None else None

    def run(self, prompt_ids: list[int], max_new_tokens: int) -> Run:
        self.sync()
        t0 = time.perf_counter()
        res = self.engine.generate(list(prompt_ids), max_new_tokens)
        self.sync()
        dt = time.perf_counter() - t0
        st = res.stats
        return Run(
            tokens=list(res.tokens),
            finish_reason=res.finish_reason,
            time=dt,
            steps=st.steps,
            tokens_per_step={int(k): int(v) for k, v in sorted(st.tokens_per_step.items())},
            stats=st.as_dict(),
            text=res.text,
        )


@dataclass
class HFMethod(Method):
    model: object = None
    eos_ids: tuple[int, ...] = ()
    kwargs: dict = field(default_factory=dict)

    def run(self, prompt_ids: list[int], max_new_tokens: int) -> Run:
        kw = dict(self.kwargs)
        if self.eos_ids:
            kw["eos_token_id"] = list(self.eos_ids)
            kw["pad_token_id"] = self.eos_ids[0]
        self.sync()
        t0 = time.perf_counter()
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            out = self.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                do_sample=False, num_beams=1, **kw,
            )
        new = out[0, ids.shape[1]:].tolist()
        self.sync()
        dt = time.perf_counter() - t0
        finish = "length"
        for i, t in enumerate(new):  # generate stops at the first EOS (batch 1: no padding after it)
            if t in self.eos_ids:
                new, finish = new[: i + 1], "eos"
                break
        return Run(tokens=new, finish_reason=finish, time=dt)


def build_method(spec: MethodSpec, model, tokenizer, backend, draft_model=None, draft_tokenizer=None) -> Method:
    """The runnable method for ``spec``; engine methods share ``backend`` (one per model)."""
    from ..engine import Engine, _eos_ids

    device = backend.device
    if spec.needs_draft_model and draft_model is None:
        raise BenchError(f"method {spec.name!r} needs a draft model: pass --draft-model NAME")
    if spec.kind == "hf":
        kw: dict = {}
        if spec.base == "hf-prompt-lookup":
            kw["prompt_lookup_num_tokens"] = PROMPT_LOOKUP_TOKENS
        elif spec.base == "hf-assisted":
            kw["assistant_model"] = draft_model
        eos = tuple(sorted(_eos_ids(model, tokenizer)))
        return HFMethod(spec, device, model=model, eos_ids=eos, kwargs=kw)
    if spec.base == REFERENCE:
        return EngineMethod(spec, device, engine=Engine(model, tokenizer, drafter=None, backend=backend))
    cls = DRAFTERS[spec.base]
    kw = {}
    template = spec.template
    if template is None and _drafter_accepts(cls, "template"):
        template = "auto"
    if spec.needs_draft_model or (draft_model is not None and _drafter_accepts(cls, "draft_model", strict=True)):
        kw["draft_model"] = draft_model
    if draft_tokenizer is not None and _drafter_accepts(cls, "draft_tokenizer", strict=True):
        kw["draft_tokenizer"] = draft_tokenizer
    drafter = make_drafter(spec.base, vocab_size=backend.vocab_size, device=device, template=template, **kw)
    engine = Engine(model, tokenizer, drafter=drafter, backend=backend)
    if drafter.wants_latency:
        engine.ensure_latency()  # measured (or read from the cache) now, not inside a timed run
    return EngineMethod(spec, device, engine=engine)
