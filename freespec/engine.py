"""The decode loop: draft -> verify -> accept -> compact KV -> observe -> stream.

One loop serves every drafter and every backend; ``drafter=None`` is plain decoding through
the same loop (our own baseline). Per step there is one device->host transfer: the accepted
count and tokens, needed anyway to stream text and test stop conditions.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from .backends.base import Backend
from .cost import CACHE_STEP
from .drafters import Drafter, DraftContext, make_drafter
from .tree import Draft, TreeShape
from .verify import (
    PositionNoise,
    SamplingParams,
    greedy_tokens,
    greedy_verify,
    sample_tokens,
    sample_verify,
    top_k_ids,
)

# The engine rebuilds the curve it hands to drafters when its host overhead has moved by this
# fraction of a plain step (see Engine._step_curve).
OVERHEAD_DRIFT = 0.01


class EngineError(ValueError):
    """Bad input to generate(): the message says what to change."""


Message = dict  # {"role": ..., "content": ...}
Prompt = str | Sequence[int] | Sequence[Message]


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    steps: int = 0  # verification passes after prefill
    tokens_per_step: Counter = field(default_factory=Counter)  # histogram: emitted tokens -> steps
    time_total: float = 0.0
    time_prefill: float = 0.0
    time_draft: float = 0.0
    time_verify: float = 0.0
    time_other: float = 0.0
    draft_nodes: int = 0  # draft nodes scored, root excluded
    draft_sizes: Counter = field(default_factory=Counter)  # histogram: draft nodes -> steps

    @property
    def mat(self) -> float:
        """Mean accepted tokens per step, bonus included (plain decoding = 1.0)."""
        return sum(k * v for k, v in self.tokens_per_step.items()) / self.steps if self.steps else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.time_total if self.time_total > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "steps": self.steps,
            "mat": round(self.mat, 4),
            "tokens_per_second": round(self.tokens_per_second, 3),
            "tokens_per_step": dict(sorted(self.tokens_per_step.items())),
            "time_total": round(self.time_total, 5),
            "time_prefill": round(self.time_prefill, 5),
            "time_draft": round(self.time_draft, 5),
            "time_verify": round(self.time_verify, 5),
            "time_other": round(self.time_other, 5),
            "mean_draft_nodes": round(self.draft_nodes / self.steps, 2) if self.steps else 0.0,
            "draft_sizes": dict(sorted(self.draft_sizes.items())),
        }


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    tokens: list[int]  # new tokens (an EOS that ended the output included)
    text: str
    finish_reason: str  # "eos" | "length" | "stop"
    stats: GenerationStats


class Engine:
    """Speculative generation for one model (batch 1).

    ``drafter`` may be a Drafter, a name (``"recycling"``, ``"none"``) or None.
    """

    def __init__(
        self,
        model,
        tokenizer,
        drafter: Drafter | str | None = "recycling",
        backend: Backend | None = None,
        template=None,
        profile: bool | None = None,
        latency=None,
    ):
        if backend is None:
            from .backends.hf import HFBackend

            backend = HFBackend(model)
        self.model = model
        self.tokenizer = tokenizer
        self.backend = backend
        if isinstance(drafter, str) or drafter is None:
            drafter = make_drafter(drafter, vocab_size=backend.vocab_size, device=backend.device, template=template)
        self.drafter: Drafter | None = drafter
        # Timing each phase needs a device sync on CUDA; on the CPU it is free.
        self.profile = backend.device.type == "cpu" if profile is None else profile
        self.eos_ids = _eos_ids(model, tokenizer)
        self._root_shape = TreeShape.from_parents([-1], backend.device)
        # the verify-latency curve that sizes trees (cost.LatencyModel); measured (or read
        # from the on-disk cache) at the first generation that needs it
        self.latency = latency
        # Host seconds a step spends around the device's work (drafting, bookkeeping, the
        # engine's loop), moving average: the calibration times the device step alone, and
        # a step costs both. Added to the curve drafters size their trees by, it makes the
        # choice see true step-time ratios (on the GPU machine ~0.35 ms of a ~3 ms step,
        # which favours larger trees).
        self.host_overhead = 0.0
        # (latency model, cache key, overhead range, base + overhead, its plain step): see _step_curve
        self._curve_for: tuple = (None, None, 0.0, 0.0, None, 0.0)

    def ensure_latency(self, progress=None):
        """The latency curve for this model/device/backend: cached on disk, measured if missing."""
        if self.latency is None:
            from .cost import load_or_calibrate

            self.latency = load_or_calibrate(self.model, self.backend, progress=progress)
        return self.latency

    def _step_curve(self, lat, cache_len: int):
        """The latency curve at this cache length plus the host overhead (rebuilt only when the
        base curve changes, every CACHE_STEP tokens of cache, or the overhead moves by
        OVERHEAD_DRIFT of a plain step). (Python numbers in the check: it runs every step, and
        numpy scalars cost ~10 us a step on the GPU machine's host.)"""
        key = cache_len // CACHE_STEP
        lat_, key_, lo, hi, c, _ = self._curve_for
        ovh = self.host_overhead
        if lat_ is lat and key_ == key and lo <= ovh <= hi:
            return c
        base = lat.curve(cache_len)
        plain = float(base[1])
        c = base + ovh
        self._curve_for = (lat, key, ovh - OVERHEAD_DRIFT * plain, ovh + OVERHEAD_DRIFT * plain, c, float(c[1]))
        return c

    # ------------------------------------------------------------------ prompts
    def encode(self, prompt: Prompt, chat: bool = False) -> list[int]:
        tok = self.tokenizer
        if isinstance(prompt, str):
            if not prompt.strip():
                raise EngineError("the prompt is empty: give some text to continue")
            if chat:
                return self._chat_ids([{"role": "user", "content": prompt}])
            return list(tok(prompt).input_ids)
        prompt = list(prompt)
        if not prompt:
            raise EngineError("the prompt is empty: give some text, token ids or chat messages")
        if all(isinstance(m, dict) for m in prompt):
            for m in prompt:
                if "role" not in m or "content" not in m:
                    raise EngineError("each chat message needs 'role' and 'content'")
            return self._chat_ids(prompt)
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            bad = [t for t in prompt if not 0 <= t < self.backend.vocab_size]
            if bad:
                raise EngineError(f"token ids out of range for this vocabulary (size {self.backend.vocab_size}): {bad[:5]}")
            return prompt
        raise EngineError("a prompt is a string, a list of token ids, or a list of chat messages")

    def _chat_ids(self, messages: list[Message]) -> list[int]:
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):
            raise EngineError(
                "this model's tokenizer has no chat template: pass plain text without --chat / chat=False"
            )
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompt: Prompt,
        max_new_tokens: int = 256,
        *,
        chat: bool = False,
        stop: Sequence[str] | None = None,
        sampling: SamplingParams | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> GenerationResult:
        """Generate a continuation; ``on_text`` receives text pieces as they are decided."""
        # without a listener or stop strings the text is decoded once, at the end
        it = self.stream(prompt, max_new_tokens, chat=chat, stop=stop, sampling=sampling,
                         _incremental=on_text is not None or bool(stop))
        while True:
            try:
                piece = next(it)
            except StopIteration as done:
                return done.value
            if on_text is not None:
                on_text(piece)

    def stream(
        self,
        prompt: Prompt,
        max_new_tokens: int = 256,
        *,
        chat: bool = False,
        stop: Sequence[str] | None = None,
        sampling: SamplingParams | None = None,
        _incremental: bool = True,
    ) -> Iterator[str]:
        """Yield text pieces; the generator's return value is the GenerationResult."""
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens <= 0:
            raise EngineError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        sampling = sampling or SamplingParams()
        stop = [s for s in (stop or []) if s]
        prompt_ids = self.encode(prompt, chat=chat)
        room = self.backend.max_length - len(prompt_ids)
        if room <= 0:
            raise EngineError(
                f"the prompt has {len(prompt_ids)} tokens but the model's context holds "
                f"{self.backend.max_length}: shorten the prompt"
            )
        limit = min(max_new_tokens, room)
        return (yield from self._run(prompt_ids, limit, stop, sampling, _incremental))

    @torch.inference_mode()
    def _run(self, prompt_ids, limit, stop, sampling, incremental) -> Iterator[str]:
        be, drafter, dev = self.backend, self.drafter, self.backend.device
        stats = GenerationStats(prompt_tokens=len(prompt_ids))
        lat = self.ensure_latency() if drafter is not None and drafter.wants_latency else None
        noise = None
        if not sampling.greedy:
            gen = torch.Generator(device=dev)
            if sampling.seed is not None:
                gen.manual_seed(sampling.seed)
            else:
                gen.seed()
            noise = PositionNoise(be.vocab_size, dev, gen)
        sync = torch.cuda.synchronize if (self.profile and dev.type == "cuda") else (lambda: None)
        clock = time.perf_counter

        t0 = clock()
        be.reset()
        ids = torch.tensor(prompt_ids, dtype=torch.long, device=dev)
        want_all = drafter is not None and drafter.wants_prompt_logits
        last = be.prefill(ids, all_logits=want_all) if want_all else be.prefill(ids)
        if want_all:
            drafter.begin(prompt_ids, last)
            last = last[-1]
        elif drafter is not None:
            drafter.begin(prompt_ids)
        if sampling.greedy:
            root = greedy_tokens(last).view(1)
        else:
            root = sample_tokens(last.view(1, -1), sampling, noise.take(torch.zeros(1, dtype=torch.long, device=dev), 0))
        first = int(root.item())
        sync()
        t1 = clock()
        stats.time_prefill = t1 - t0

        tokens = list(prompt_ids) + [first]
        out = [first]
        detok = _Detokenizer(self.tokenizer, stop)
        finish = None
        if first in self.eos_ids:
            finish = "eos"
        elif len(out) >= limit:
            finish = "length"
        piece, hit = detok.push(out, final=finish is not None)
        if hit:
            finish = "stop"
        if piece:
            yield piece

        # Whole greedy steps on the device (drafter fill, forward, walk, KV compaction, drafter
        # update: one CUDA graph replay) where the backend and the drafter both offer it; any
        # step either one declines goes through propose / verify / commit / observe below.
        on_device = (sampling.greedy and drafter is not None and be.captures_steps
                     and hasattr(drafter, "device_step"))
        if on_device:
            be.set_root(root)
        # host work a device step left for later (``DeviceStep.done``'s return: the drafter's
        # learning), run while the next step computes on the device rather than between steps
        later = None
        while finish is None:
            ta = clock()
            budget = be.max_length - be.cache_len - 1
            draft = ds = curve = None
            if drafter is not None:
                curve = None if lat is None else self._step_curve(lat, be.cache_len)
                ctx = DraftContext(tokens=tokens, root=root, prompt_len=len(prompt_ids), budget=budget, latency=curve)
                if on_device:
                    ds = drafter.device_step(ctx)  # ctx.root may be None: the backend holds it
            if ds is None and root is None:  # a host step after a device step: the root, from the host
                root = torch.tensor([tokens[-1]], dtype=torch.long, device=dev)
            if ds is None and drafter is not None:
                if later is not None:
                    later, run = None, later
                    run()
                ctx.root = root
                draft = drafter.propose(ctx)
            if ds is not None:
                sync()
                tb = clock()
                res = be.step(ds)  # launched; the device computes while the host goes on
                if later is not None:
                    later, run = None, later
                    run()
                host = res.tolist()  # the one sync
                tc = clock()
                n_acc = host[0]
                new = host[1 : n_acc + 2]
                be.advance(n_acc + 1)
                if ds.done is not None:
                    later = ds.done(new)
                size = ds.shape.size
                root = None
            else:
                if draft is None:
                    draft = Draft(root, self._root_shape)
                sync()
                tb = clock()
                logits = be.verify(draft)
                top = None
                if sampling.greedy:
                    k = getattr(drafter, "reads_top_k", 0)
                    if k >= 2 and logits.device.type == "cpu":
                        top = top_k_ids(logits, k)  # (the drafter's update reads the same ids)
                    verdict = greedy_verify(draft, logits, top)
                else:
                    pos = draft.shape.depth.to(dev) + len(out)  # the output position each node samples
                    rows = noise.take(pos, len(out) + draft.shape.max_depth)
                    verdict = sample_verify(draft, logits, sampling, rows)
                host = torch.cat([verdict.n_accepted.view(1), verdict.emitted]).tolist()  # the one sync
                tc = clock()
                n_acc = host[0]
                new = host[1 : n_acc + 2]
                be.commit(verdict.path, n_acc + 1)
                if drafter is not None:
                    if top is None:
                        drafter.observe(draft, logits, new)
                    else:
                        drafter.observe(draft, logits, new, top=top)
                root = verdict.emitted[n_acc : n_acc + 1]
                if on_device:
                    be.set_root(root)
                size = draft.size

            stats.steps += 1
            stats.tokens_per_step[len(new)] += 1
            stats.draft_nodes += size - 1
            stats.draft_sizes[size - 1] += 1
            # stop conditions: EOS inside the accepted run, the token limit
            for i, t in enumerate(new):
                if t in self.eos_ids:
                    new = new[: i + 1]
                    finish = "eos"
                    break
            if len(out) + len(new) >= limit:
                new = new[: limit - len(out)]
                finish = finish or "length"
            out.extend(new)
            tokens.extend(new)
            piece = ""
            if incremental or finish is not None:
                piece, hit = detok.push(out, final=finish is not None)
                if hit:
                    finish = "stop"
            sync()
            td = clock()
            stats.time_draft += tb - ta
            stats.time_verify += tc - tb
            stats.time_other += td - tc
            if curve is not None:  # (a step with a long pause, e.g. a garbage collection, is capped)
                spent = min((tb - ta) + (td - tc), self._curve_for[5])
                self.host_overhead += 0.05 * (spent - self.host_overhead)
            if piece:
                yield piece

        if later is not None:
            later()
        stats.new_tokens = len(out)
        stats.time_total = clock() - t0
        if drafter is not None:
            drafter.end(tokens)
        return GenerationResult(
            prompt_ids=list(prompt_ids),
            tokens=out,
            text=detok.text,
            finish_reason=finish,
            stats=stats,
        )


class _Detokenizer:
    """Incremental text: emit only what later tokens cannot change, and cut at stop strings."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tok = tokenizer
        self.stop = stop
        self.sent = 0  # characters already yielded
        self.text = ""

    def push(self, out: list[int], final: bool) -> tuple[str, bool]:
        text = self.tok.decode(out, skip_special_tokens=True)
        hit = False
        if self.stop:
            cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                text, hit, final = text[:cut], True, True
        if not final:
            # hold back an incomplete UTF-8 sequence and any tail that may start a stop string
            end = len(text)
            while end > self.sent and text[end - 1] == "\ufffd":
                end -= 1
            hold = max((len(s) - 1 for s in self.stop), default=0)
            end = max(self.sent, min(end, len(text) - hold))
        else:
            end = len(text)
        piece = text[self.sent : end]
        self.sent = end
        self.text = text
        return piece, hit


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None) if gc is not None else None
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(e) for e in eos)
    return ids
