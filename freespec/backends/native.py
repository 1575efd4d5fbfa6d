"""Native backend: a plain-PyTorch decoder forward for Llama-family models over the HF weights.

Why: the HF forward costs a lot of Python and mask building per call, and its dynamic cache
cannot be captured in a CUDA graph. This backend runs the same math on the model's *own*
weight tensors (referenced, not copied but for the CPU's packed copy below; each layer's q/k/v
and gate/up weights are fused into one tensor that the HF parameters are re-pointed into, so one
GEMM does each) with:

* one preallocated static KV cache for all layers, ``kv[layer, k|v, kv_head, slot, head_dim]``,
  so keeping the accepted path after verification is one gather + one scatter over all layers;
* the cache length held as a 0-d device tensor as well, so a verify forward has static shapes:
  the attention mask is built on the device from that tensor and the tree's ancestor matrix;
* on CUDA, the verify / one-token decode forward captured as a CUDA graph per
  (tree-size bucket, KV-extent bucket), lazily on first use. Prefill goes through the same
  graphs: the prompt in chunks of the largest bucket, each verified as a chain;
* on CUDA, the per-layer work around attention (norms, projections, rope, residuals, SiLU)
  runs through torch.compile, which fuses its pointwise parts: about half the kernels of the
  eager layer, which is what a small model's decode step is bound by, even inside a graph;
* on a CPU in float32, a second copy of the linear weights in a packed layout (MKL's or
  oneDNN's, whichever runs faster here, timed when the backend is built) for trees of
  ``PACK_MIN_ROWS`` or more nodes and for prefill (the plain layout's GEMM repacks the weight at
  every call there), and for one-token steps too where it beats the plain layout at one row;
  skipped where that copy would take more than a quarter of the machine's memory.

Supported: ``llama`` (SmolLM2, Llama 2/3 incl. llama3 rope scaling), ``qwen2`` (q/k/v biases),
``qwen3`` (q/k head norms), ``mistral`` (within its sliding window). Anything else raises
:class:`UnsupportedModelError` (a ``NotImplementedError``); :func:`make_backend` falls back to
the HF backend for those.

Build the backend after the model's final ``.to(device / dtype)``: it keeps references to the
weights and sizes its cache and graphs for that device and dtype (a later move is detected).

GQA without copies: the ``g`` query heads that share a KV head are folded into the query-length
dimension (``[kv_heads, g * n, head_dim]``), so attention reads the cache in place and any SDPA
kernel that takes an additive mask can run it.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..tree import Draft
from ..verify import greedy_verify
from .base import Backend, DeviceStep

SUPPORTED_TYPES = ("llama", "qwen2", "qwen3", "mistral")
TREE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 96, 128, 160, 192, 256)
DEFAULT_MAX_LENGTH = 4096
_SDPA_KERNELS = {"cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "flash": "FLASH_ATTENTION",
                 "math": "MATH"}
# Whole-step graphs kept, the least recently replayed dropped first. Each is small (its logits
# live in the shared pool) but costs a capture to remake: ~0.1 s. Keys multiply (drafter plans x
# attached-tree layouts x KV extents); 64 with first-in-first-out eviction thrashed on an H100
# bench with five drafters sharing one backend.
MAX_STEP_GRAPHS = 256
_PREFILL_KERNELS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]  # eager prefill on CUDA (see prefill)
PREFILL_BUCKETS = (64, 128, 256)  # static prefill: chunk sizes (the last chunk is padded up to one)
_CHAIN = object()  # marks tree buffers that hold a prefill chain


class UnsupportedModelError(NotImplementedError):
    """The native backend cannot run this model; use ``HFBackend`` instead."""


# --------------------------------------------------------------------------- model checks
def _text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _sliding_window(cfg) -> int | None:
    """The sliding window that applies to any layer, or None."""
    sw = getattr(cfg, "sliding_window", None)
    if not sw:
        return None
    if getattr(cfg, "model_type", "") == "mistral":
        return int(sw)
    types = getattr(cfg, "layer_types", None) or []
    if any(t == "sliding_attention" for t in types):
        return int(sw)
    if getattr(cfg, "use_sliding_window", False):
        return int(sw)
    return None


def unsupported_reason(model) -> str | None:
    """Why the native backend cannot run ``model``, or None if it can."""
    cfg = _text_config(model)
    mt = getattr(cfg, "model_type", None)
    if mt not in SUPPORTED_TYPES:
        return f"model type {mt!r} is not one of {', '.join(SUPPORTED_TYPES)}"
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if inner is None or layers is None or not hasattr(inner, "embed_tokens") or not hasattr(inner, "norm"):
        return "unexpected module layout (want model.model.{embed_tokens,layers,norm})"
    if model.get_output_embeddings() is None:
        return "the model has no output embedding (lm_head)"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act!r} is not silu"
    rot = getattr(inner, "rotary_emb", None)
    if rot is None or not hasattr(rot, "inv_freq"):
        return "no rotary embedding module with inv_freq"
    rope_type = getattr(rot, "rope_type", "default")
    if not isinstance(rope_type, str) or rope_type in ("dynamic", "longrope"):
        return f"rope type {rope_type!r} changes frequencies at run time"
    quant = getattr(model, "hf_quantizer", None)
    method = str(getattr(getattr(quant, "quantization_config", None), "quant_method", "")).lower()
    if quant is not None and "gguf" not in method:  # GGUF weights are dequantized at load time
        return f"quantized weights ({method or type(quant).__name__}); load the model in a float dtype"
    need = ("q_proj", "k_proj", "v_proj", "o_proj")
    for i, layer in enumerate(layers):
        att, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if att is None or mlp is None or not all(hasattr(att, a) for a in need):
            return f"layer {i}: unexpected attention/MLP layout"
        if not all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj")):
            return f"layer {i}: unexpected MLP layout"
        if not all(hasattr(layer, a) for a in ("input_layernorm", "post_attention_layernorm")):
            return f"layer {i}: unexpected norm layout"
        for group in ((att.q_proj, att.k_proj, att.v_proj), (mlp.gate_proj, mlp.up_proj)):
            if len({getattr(m, "bias", None) is None for m in group}) > 1:  # fused into one linear
                return f"layer {i}: only some of the q/k/v or gate/up projections have a bias"
    params = list(model.parameters())
    devices = {p.device for p in params}
    dtypes = {p.dtype for p in params}
    if len(devices) != 1:
        return f"weights are spread over several devices ({sorted(map(str, devices))})"
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        return f"weights need one float dtype (found {sorted(map(str, dtypes))})"
    return None


def supports(model) -> bool:
    return unsupported_reason(model) is None


def make_backend(model, prefer: str = "auto", **kw) -> Backend:
    """``native`` (raise if unsupported), ``hf``, or ``auto``: native whenever supported, else HF.

    Measured (SmolLM2-135M, fp32, 700-token cache): on an H100 with graphs a verify forward is
    about 8-10x faster than HF eager; on a 2-core CPU it is 10-25% faster (no graphs there) and
    plain decoding about 10% faster, so ``auto`` picks native on the CPU too.
    """
    from .hf import HFBackend

    if prefer == "hf":
        return HFBackend(model)
    if prefer == "native":
        return NativeBackend(model, **kw)
    if prefer != "auto":
        raise ValueError(f"unknown backend {prefer!r}; use 'auto', 'native' or 'hf'")
    if supports(model):
        return NativeBackend(model, **kw)
    return HFBackend(model)


def tree_bucket(n: int) -> int:
    for b in TREE_BUCKETS:
        if n <= b:
            return b
    raise ValueError(f"a draft of {n} nodes is larger than the biggest bucket ({TREE_BUCKETS[-1]})")


# --------------------------------------------------------------------------- fused weights
def _span(ps: list[torch.Tensor]) -> torch.Tensor | None:
    """One tensor over ``ps`` if they lie back to back, in order, in one storage (an earlier
    backend fused them), else None."""
    first = ps[0]
    store, ptr = first.untyped_storage().data_ptr(), first.data_ptr()
    for p in ps:
        if (
            not p.is_contiguous()
            or (p.dtype, p.device) != (first.dtype, first.device)
            or p.shape[1:] != first.shape[1:]
            or p.untyped_storage().data_ptr() != store
            or p.data_ptr() != ptr
        ):
            return None
        ptr += p.numel() * p.element_size()
    size = (sum(p.shape[0] for p in ps), *first.shape[1:])
    return torch.as_strided(first.detach(), size, first.stride(), first.storage_offset())


def _fuse(mods, attr: str) -> torch.Tensor | None:
    """``attr`` (weight / bias) of the linear layers ``mods`` stacked along dim 0 as one tensor,
    so a layer runs one GEMM instead of three (q, k, v) or two (gate, up).

    The HF parameters are re-pointed at their slices of the stacked tensor: memory is not
    doubled and the HF model computes exactly as before. A second backend over the same model
    finds the parameters already back to back and reuses them. If the model is later moved or
    cast, its parameters get fresh storage and this backend's check_weights notices.
    """
    ps = [getattr(m, attr) for m in mods]
    if ps[0] is None:  # all or none (unsupported_reason)
        return None
    fused = _span(ps)
    if fused is None:
        # normal (not inference) tensors even when built under inference_mode: they become the
        # model's parameters, which must stay usable (and writable) outside it
        with torch.inference_mode(False), torch.no_grad():
            fused = torch.cat([p.detach() for p in ps])
            a = 0
            for p in ps:
                p.data = fused[a : a + p.shape[0]]
                a += p.shape[0]
    return fused


# --------------------------------------------------------------------------- the forward
class _Layer:
    __slots__ = ("ln1", "wqkv", "bqkv", "qn", "kn", "wo", "bo", "ln2", "wgu", "bgu", "wd", "bd", "packed")

    def __init__(self, layer):
        att, mlp = layer.self_attn, layer.mlp
        self.ln1 = layer.input_layernorm.weight
        self.ln2 = layer.post_attention_layernorm.weight
        qkv = (att.q_proj, att.k_proj, att.v_proj)
        self.wqkv, self.bqkv = _fuse(qkv, "weight"), _fuse(qkv, "bias")  # [(hq + 2 hkv) d, hidden]
        self.wo, self.bo = att.o_proj.weight, att.o_proj.bias
        qn, kn = getattr(att, "q_norm", None), getattr(att, "k_norm", None)
        self.qn = qn.weight if qn is not None else None
        self.kn = kn.weight if kn is not None else None
        gu = (mlp.gate_proj, mlp.up_proj)
        self.wgu, self.bgu = _fuse(gu, "weight"), _fuse(gu, "bias")  # [2 inter, hidden]
        self.wd, self.bd = mlp.down_proj.weight, mlp.down_proj.bias
        self.packed: tuple | None = None  # (wqkv, wo, wgu, wd) in the CPU's packed layout

    def weights(self, packed: bool) -> tuple:
        return self.packed if packed else (self.wqkv, self.wo, self.wgu, self.wd)


# CPU: linear layers over prepacked weights (made once). Measured on a 2-core Xeon, fp32,
# SmolLM2-135M's linear weights: with the plain layout a linear over 4-16 rows costs 1.8-2.8x one
# row (from 4 rows on, the BLAS repacks the weight at every call, which on a memory-bound CPU
# costs a second pass over it); prepacked, 1.1-1.6x. One to three rows are ~7% faster in the
# plain layout there. On a 2-core AMD EPYC (Zen 4) the ranking is another: MKL's products (the
# plain layout's and MKL's packed one) run 2-4x slower than oneDNN's packed one at 2-8 rows (the
# LM head at 4 rows: 17.7 / 13.7 / 3.6 ms), and at one row oneDNN's is the fastest too (4.6 ms
# against the plain layout's 9.9). So the layout is chosen by timing, when the backend is built
# (``_choose_layout``): the packed layout fastest at ``LAYOUT_ROWS[1]`` rows, used from one row on
# where it beats the plain layout there as well, else from PACK_MIN_ROWS. The price is a second
# copy of the weights in memory.
PACK_MIN_ROWS = 4
# Rows the layouts are timed at: a one-token step, and a tree of the size a CPU verifies.
LAYOUT_ROWS = (1, 8)
# A packed layout takes one-token steps only where it is this much faster than the plain one.
LAYOUT_MARGIN = 0.03
# MKL's packed layout is laid out for PACK_BATCH rows (cblas_sgemm_pack; a product of any row
# count computes over it). On the Xeon, whole verify steps, MKL's and oneDNN's side by side in
# one process (256-token cache): MKL's 5-16% faster at 4-64 rows (4 rows 33.2 vs 36.1 ms, 8 rows
# 39.4 vs 41.7, 32 rows 57.8 vs 65.1), and prefill 0-10% faster (a 750-token prompt 614 vs 683
# ms; laid out for 32 or 64 rows instead, MKL's prefill ran 2-8% slower than oneDNN's).
PACK_BATCH = 512


def _packing_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the linear weights cannot be prepacked for ``device`` / ``dtype``, or None."""
    if device.type != "cpu":
        return f"weight packing is a CPU path (the model is on {device.type})"
    if dtype != torch.float32:
        return f"weight packing is measured and tested for float32 only (the model is {dtype})"
    if not _packing_kinds():
        return "this torch build has neither MKL's nor oneDNN's packed linear ops"
    return None


def _packing_kinds() -> list[str]:
    """The packed layouts this torch can run: 'mkl', 'onednn' (in this order; which one runs is
    timed, see ``_choose_layout``, and a tie goes to the first)."""
    kinds = []
    if torch.backends.mkldnn.is_available():
        mkl = torch.ops.mkl  # (MKL's packed weight is an mkldnn tensor)
        if (torch.backends.mkl.is_available() and hasattr(mkl, "_mkl_reorder_linear_weight")
                and hasattr(mkl, "_mkl_linear")):
            kinds.append("mkl")
        dnn = torch.ops.mkldnn
        if hasattr(dnn, "_reorder_linear_weight") and hasattr(dnn, "_linear_pointwise"):
            kinds.append("onednn")
    return kinds


PACK_MEMORY_SHARE = 0.25  # pack only weights up to this share of the machine's memory (a second copy)


def _physical_memory() -> int | None:
    """Bytes of physical memory, or None where the OS does not say."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def _pack(w: torch.Tensor, kind: str):
    """``w`` in the packed layout of ``kind``: MKL's packed weight goes with the weight itself
    (its op takes both), oneDNN's stands alone."""
    w = w.detach()
    if kind == "mkl":
        return (torch.ops.mkl._mkl_reorder_linear_weight(w, PACK_BATCH), w)
    return torch.ops.mkldnn._reorder_linear_weight(w)


def _packed_linear(x: torch.Tensor, w, b: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, b)`` for ``x`` [rows, in] over ``w = _pack(weight, kind)``."""
    if type(w) is tuple:
        # MKL: the row count passed as the packing's own, so its packed product runs for any
        # count (the op's fallback for another count is the plain layout's GEMM)
        return torch.ops.mkl._mkl_linear(x, w[0], w[1], b, x.shape[0])
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


LAYOUT_SAMPLE_BYTES = 64 << 20  # the weight timed (the LM head's first rows): memory-bound, as a step is


def _layout_times(w: torch.Tensor, kinds: list[str]) -> dict[tuple[str, int], float]:
    """Seconds for a product over ``w`` (the LM head, at most LAYOUT_SAMPLE_BYTES of its rows) in
    each layout ('plain' and ``kinds``) at each of LAYOUT_ROWS rows: the median of 5 after a
    warm-up. A few dozen products: 0.25-0.4 s for SmolLM2's head on a 2-core AMD EPYC."""
    rows_w = max(1, min(w.shape[0], LAYOUT_SAMPLE_BYTES // max(1, w.shape[1] * w.element_size())))
    w = w.detach()[:rows_w].contiguous()
    g = torch.Generator().manual_seed(0)
    xs = {n: torch.randn(n, w.shape[1], dtype=w.dtype, generator=g) for n in LAYOUT_ROWS}
    out: dict[tuple[str, int], float] = {}
    with torch.no_grad():
        for kind in ["plain", *kinds]:
            pw = None if kind == "plain" else _pack(w, kind)
            for n, x in xs.items():
                f = (lambda x=x: F.linear(x, w)) if pw is None else (lambda x=x, pw=pw: _packed_linear(x, pw, None))
                f()
                ts = []
                for _ in range(5):
                    t = time.perf_counter()
                    f()
                    ts.append(time.perf_counter() - t)
                out[(kind, n)] = sorted(ts)[2]
            del pw
    return out


def _choose_layout(times: dict[tuple[str, int], float], kinds: list[str]) -> tuple[str, int]:
    """(packed layout, fewest rows it runs) from :func:`_layout_times`: the layout fastest at a
    tree's row count, from one row on where it is LAYOUT_MARGIN faster than the plain layout
    there too, else from PACK_MIN_ROWS."""
    few, tree = LAYOUT_ROWS
    kind = min(kinds, key=lambda k: times[(k, tree)])  # (ties: the first, the order of _packing_kinds)
    one = times[(kind, few)] < (1.0 - LAYOUT_MARGIN) * times[("plain", few)]
    return kind, (1 if one else PACK_MIN_ROWS)


_FUSED_RMS = hasattr(F, "rms_norm")  # one kernel on CUDA instead of five


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # HF's LlamaRMSNorm: normalise in fp32, cast back, then scale
    xf = x.float()
    if _FUSED_RMS:
        xf = F.rms_norm(xf, (xf.shape[-1],), eps=eps)
    else:
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin_s: torch.Tensor) -> torch.Tensor:
    """HF's ``x * cos + rotate_half(x) * sin`` as ``x * cos + swap_halves(x) * sin_s``, where
    ``sin_s = [-sin, sin]`` carries rotate_half's sign: 3 kernels instead of 5."""
    *lead, d = x.shape
    swapped = x.view(*lead, 2, d // 2).flip(-2).view(*lead, d)
    return torch.addcmul(x * cos, swapped, sin_s)


# The layer minus attention, as two plain functions of (activations, weights): torch.compile
# fuses their pointwise work into a few kernels, and one compiled artifact per query count
# serves every layer (weights are arguments, not constants). Eager runs call them as they are.
def _pre_attn(h, delta, ln, wqkv, bqkv, qn, kn, cos, sin_s, eps: float, hkv: int, g: int, lin=F.linear):
    """Residual add of the previous layer's MLP output ``delta``, RMSNorm, the fused q/k/v
    projection, q/k head norms (Qwen3), rope. Returns the residual stream ``h``, the queries
    with each KV head's ``g`` query heads folded into the query axis ([1, hkv, g * n, d], rows
    (group, token)) and the new keys and values stacked as [2, hkv, n, d] (the cache's layout:
    one cache write per layer)."""
    h = h + delta
    n, d, hq = h.shape[0], cos.shape[-1], hkv * g
    qkv = lin(_rms(h, ln, eps), wqkv, bqkv).view(n, hq + 2 * hkv, d)
    qk, v = qkv[:, : hq + hkv], qkv[:, hq + hkv :]  # q and k are adjacent: one rope for both
    if qn is not None:
        qk = torch.cat((_rms(qk[:, :hq], qn, eps), _rms(qk[:, hq:], kn, eps)), dim=1)
    qk = _rope(qk, cos, sin_s)
    q = qk[:, :hq].reshape(n, hkv, g, d).permute(1, 2, 0, 3).reshape(1, hkv, g * n, d)
    return h, q, torch.stack((qk[:, hq:], v), dim=1).permute(1, 2, 0, 3)


def _post_attn(h, a, wo, bo, ln, wgu, bgu, wd, bd, eps: float, lin=F.linear):
    """Unfold the attention output, o_proj + residual add, RMSNorm, the fused gate/up
    projection, silu(gate) * up, down. Returns ``(h, mlp_out)``: the MLP's residual add is left
    to the next layer's ``_pre_attn`` (or the final norm), where it fuses into the norm's kernel."""
    n = h.shape[0]
    _, hkv, gn, d = a.shape
    a = a[0].view(hkv, gn // n, n, d).permute(2, 0, 1, 3).reshape(n, -1)
    h = h + lin(a, wo, bo)
    gate, up = lin(_rms(h, ln, eps), wgu, bgu).chunk(2, dim=-1)
    return h, lin(F.silu(gate) * up, wd, bd)


def _compile_unavailable(device: torch.device) -> str | None:
    """Why torch.compile cannot run the layer functions on ``device``, or None if it should."""
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    try:
        import torch._dynamo as dynamo  # (a plain `import torch._dynamo` would make `torch` local here)

        if not dynamo.is_dynamo_supported():
            return "torch.compile is not supported on this Python / platform"
        if device.type == "cuda":
            from torch.utils._triton import has_triton

            if not has_triton():
                return "no usable Triton for this GPU (inductor needs it)"
    except Exception as e:  # pragma: no cover - broken installs
        return f"torch.compile unavailable: {type(e).__name__}: {e}"
    return None


_COMPILED: dict = {}


def _compiled(fn):
    """``fn`` compiled once per process (shared by all backends), for static shapes.

    No ``mode``: "reduce-overhead" would capture CUDA graphs of its own, while the backend
    captures the whole forward itself. Each tree bucket is a new shape, i.e. a recompile of
    the same code object; dynamo's default limit of 8 would silently drop the rest to eager.
    """
    c = _COMPILED.get(fn)
    if c is None:
        import torch._dynamo.config as dcfg
        import torch._inductor.config as icfg

        name = "recompile_limit" if hasattr(dcfg, "recompile_limit") else "cache_size_limit"
        setattr(dcfg, name, max(getattr(dcfg, name), 4 * len(TREE_BUCKETS)))  # room for a draft model
        # Eager's numerics: keep its bf16/fp16 roundings between fused ops (inductor elides them
        # by default), and no pattern rewrites (e.g. `h + x @ w` -> one addmm: one rounding
        # less than eager). Pointwise fusion is the scheduler's work and stays on.
        want = {"emulate_precision_casts": True, "pattern_matcher": False}
        opts = {k: v for k, v in want.items() if hasattr(icfg, k)}
        c = _COMPILED[fn] = torch.compile(fn, fullgraph=True, dynamic=False, options=opts)
    return c


@dataclass
class _TreeBufs:
    tok: torch.Tensor  # [nb] int64
    depth: torch.Tensor  # [nb] int64 (0 for padding nodes)
    anc: torch.Tensor  # [nb, nb] bool (padding nodes: themselves only)
    eye: torch.Tensor  # [nb, nb] bool
    shape: object = None  # the TreeShape whose structure depth/anc hold now


@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    out: torch.Tensor  # written by every replay: [nb, V] logits, or a step's [n_accepted, emitted...]
    keep: tuple = ()  # tensors the graph reads that nothing else holds


class NativeBackend(Backend):
    """Static-cache, graph-capturable Llama-family forward over the HF model's weights.

    ``graphs``: None = on when the model is on CUDA. ``compile``: torch.compile the per-layer
    work around attention for verify / decode (static shapes: one compile per tree bucket, at its
    first use); None = on when the model is on CUDA and torch.compile can run there. With
    static shapes (graphs or compile), prefill runs in chunks of the largest bucket through the
    same forward; otherwise eagerly in chunks of ``prefill_chunk``. ``max_tree``: the largest
    draft (nodes, root included) that ``verify`` accepts (and the static prefill's chunk).
    ``kv_block``: on CUDA, attention reads the cache up to ``cache_len + tree bucket`` rounded up
    to this many slots (one graph per extent bucket).

    Building the backend fuses each layer's q/k/v and gate/up weights in place (see ``_fuse``).
    """

    def __init__(
        self,
        model,
        max_length: int | None = None,
        graphs: bool | None = None,
        max_tree: int = 256,
        kv_block: int = 512,
        prefill_chunk: int = 512,
        compile: bool | None = None,
        device_steps: bool | None = None,
        attention: str | None = None,
        pack_weights: bool | None = None,
    ):
        reason = unsupported_reason(model)
        if reason is not None:
            raise UnsupportedModelError(f"native backend: {reason}; use the HF backend")
        cfg = _text_config(model)
        inner = model.model
        self.model = model
        self.device = model.device
        self.dtype = model.dtype
        head_w = model.get_output_embeddings().weight
        self.vocab_size = int(head_w.shape[0])

        max_pos = int(getattr(cfg, "max_position_embeddings", 0) or 1 << 30)
        if max_length is None:
            max_length = min(max_pos, DEFAULT_MAX_LENGTH)
        max_length = int(max_length)
        if max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        if max_length > max_pos:
            raise ValueError(f"max_length {max_length} exceeds the model's max_position_embeddings {max_pos}")
        sw = _sliding_window(cfg)
        if sw is not None and max_length > sw:
            # A query sees its last `sw` keys only; staying inside the window keeps it exact.
            max_length = sw
        self.max_length = max_length
        self.max_tree = int(max_tree)
        self._max_bucket = tree_bucket(self.max_tree)
        self.kv_block = int(kv_block)
        self.prefill_chunk = int(prefill_chunk)
        self._device_steps = device_steps
        # attention kernel: None = PyTorch's choice; "cudnn" | "efficient" | "flash" | "math"
        if attention is not None and attention not in _SDPA_KERNELS:
            raise ValueError(f"attention must be one of {', '.join(_SDPA_KERNELS)} (or None), got {attention!r}")
        self.attention = attention
        self._sdpa_kernels = None if attention is None else [getattr(SDPBackend, _SDPA_KERNELS[attention])]

        # dimensions (checked against the weights)
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads)
        if self.n_heads % self.n_kv:
            raise UnsupportedModelError(f"{self.n_heads} query heads do not group over {self.n_kv} KV heads")
        self.groups = self.n_heads // self.n_kv
        a0 = inner.layers[0].self_attn
        if (
            a0.q_proj.weight.shape[0] != self.n_heads * self.head_dim
            or a0.k_proj.weight.shape[0] != self.n_kv * self.head_dim
        ):
            raise UnsupportedModelError("projection shapes disagree with the config's head counts / head_dim")
        self.scale = self.head_dim**-0.5  # as HF computes it
        self.eps = float(getattr(cfg, "rms_norm_eps", 1e-6))
        self._neg = torch.finfo(self.dtype).min

        # weights: references only
        self._embed = inner.embed_tokens.weight
        self._norm = inner.norm.weight
        self._head = head_w
        self._head_bias = getattr(model.get_output_embeddings(), "bias", None)
        self._layers = [_Layer(layer) for layer in inner.layers]
        self._q0 = inner.layers[0].self_attn.q_proj  # its weight must stay a view of _layers[0].wqkv

        dev = self.device
        slots = self.max_length + self._max_bucket
        self._slots = slots
        with torch.no_grad():
            rot = inner.rotary_emb
            inv = rot.inv_freq.to(device=dev, dtype=torch.float32)
            scaling = float(getattr(rot, "attention_scaling", 1.0))
            freqs = torch.arange(slots, device=dev, dtype=torch.float32)[:, None] * inv[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            self._cos = (emb.cos() * scaling).to(self.dtype)  # [slots, head_dim]
            sin = (emb.sin() * scaling).to(self.dtype)
            half = self.head_dim // 2
            self._sin_s = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)  # rotate_half's sign folded in
            self.kv = torch.zeros(
                len(self._layers), 2, self.n_kv, slots, self.head_dim, dtype=self.dtype, device=dev
            )
            self._ar = torch.arange(slots, device=dev)
            self._len_t = torch.zeros((), dtype=torch.long, device=dev)
        self._len: int | None = 0  # host copy of the cache length; None after a device-side commit
        self._len_hi = 0  # host upper bound on the cache length (exact when _len is known)

        # CUDA graphs
        self.graph_skip_reason: str | None = None
        want = dev.type == "cuda" if graphs is None else bool(graphs)
        if want and dev.type != "cuda":
            self.graph_skip_reason = f"CUDA graphs need a CUDA device; the model is on {dev.type}: running eagerly"
            if graphs:
                warnings.warn(self.graph_skip_reason, stacklevel=2)
            want = False
        elif not want:
            self.graph_skip_reason = "graphs=False" if dev.type == "cuda" else f"no CUDA device ({dev.type})"
        self.graphs = want
        # Bucketed = pad the draft to a tree bucket and read the cache up to a KV-extent bucket
        # (static shapes). Always on with graphs; may be set on the CPU to run the exact code a
        # graph captures, eagerly (the tests do).
        self.bucketed = want

        # torch.compile of the layer functions (static shapes only: the bucketed path)
        if compile is not None and not compile:
            why = "compile=False"
        elif compile is None and dev.type != "cuda":
            why = f"compile is off by default on {dev.type} (pass compile=True)"
        else:
            why = _compile_unavailable(dev)
            if why is not None and compile:
                warnings.warn(f"{why}: running the layers eagerly", stacklevel=2)
        self.compile_skip_reason: str | None = why
        self.compile = why is None
        if self.compile:
            self.bucketed = True  # compiled code wants the padded, static shapes
            self._cpre = self._with_fallback(_compiled(_pre_attn), _pre_attn)
            self._cpost = self._with_fallback(_compiled(_post_attn), _post_attn)
        self._init_packing(pack_weights)
        self._bufs: dict[int, _TreeBufs] = {}
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._steps: OrderedDict[tuple, _Graph] = OrderedDict()  # whole-step graphs by (plan, tree bucket, extent)
        self._root = torch.zeros(1, dtype=torch.long, device=dev)  # the next step's root token
        self._pool = None

    def _init_packing(self, want: bool | None) -> None:
        """Prepack the linear weights in the fastest packed layout here, for trees of
        ``pack_min_rows`` or more (CPU, float32; on by default there; see ``_choose_layout``). A
        snapshot: weights changed in place afterwards are not seen by it."""
        self.packed = False
        self.pack_kind: str | None = None  # 'mkl' or 'onednn' when packed
        self.pack_min_rows = PACK_MIN_ROWS  # fewest rows a product runs over the packed layout
        self.layout_times: dict[str, float] = {}  # what the choice was made from ('kind@rows': s)
        self._head_packed = None
        if want is not None and not want:
            why = "pack_weights=False"
        elif self.compile:
            why = "compiled layers take the plain weight layout"
        else:
            why = _packing_unavailable(self.device, self.dtype)
        if why is None:
            need = sum(t.numel() * t.element_size() for layer in self._layers
                       for t in (layer.wqkv, layer.wo, layer.wgu, layer.wd)) + self._head.numel() * self._head.element_size()
            mem = _physical_memory()
            if mem is not None and need > PACK_MEMORY_SHARE * mem and want is None:
                why = (f"a packed copy of the weights ({need / 2**30:.1f} GiB) would exceed "
                       f"{PACK_MEMORY_SHARE:.0%} of this machine's memory (pack_weights=True forces it)")
        if why is None:
            w0 = self._layers[0].wqkv
            kinds = []
            for kind in _packing_kinds():
                why = self._pack_check(kind, w0)
                if why is None:
                    kinds.append(kind)
            if kinds:
                why = None
                times = _layout_times(self._head, kinds)
                kind, self.pack_min_rows = _choose_layout(times, kinds)
                self.layout_times = {f"{k}@{n}": t for (k, n), t in times.items()}
                try:
                    with torch.no_grad():
                        for layer in self._layers:
                            layer.packed = tuple(_pack(t, kind) for t in (layer.wqkv, layer.wo, layer.wgu, layer.wd))
                        self._head_packed = _pack(self._head, kind)
                except RuntimeError as e:  # e.g. out of memory: stay on the plain layout
                    why = f"weight packing failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
                    for layer in self._layers:
                        layer.packed = None
                    self._head_packed = None
                else:
                    self.packed, self.pack_kind = True, kind
        self.pack_skip_reason: str | None = why
        if why is not None and want:
            warnings.warn(f"{why}: linear layers use the plain weight layout", stacklevel=3)

    @staticmethod
    def _pack_check(kind: str, w: torch.Tensor) -> str | None:
        """Why ``kind``'s packed product cannot stand in for F.linear here (None: it can),
        tried at row counts below, at and above the packing's own: a layout this build lacks
        or computes wrongly is never used."""
        g = torch.Generator().manual_seed(0)
        try:
            with torch.no_grad():
                pw = _pack(w, kind)
                for rows in (1, PACK_MIN_ROWS, 7, PACK_BATCH + 1):
                    x = torch.randn(rows, w.shape[1], dtype=w.dtype, generator=g)
                    ref = F.linear(x, w)
                    if not torch.allclose(_packed_linear(x, pw, None), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max())):
                        return f"the {kind} packed linear disagrees with F.linear here ({rows} rows)"
        except RuntimeError as e:  # an op this build cannot run
            return f"{kind} weight packing failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        return None

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        self._len_t.zero_()
        self._len = 0
        self._len_hi = 0

    @property
    def cache_len(self) -> int:
        if self._len is None:  # after commit(n_keep=<device tensor>): one sync, off the hot path
            self._len = int(self._len_t.item())
            self._len_hi = self._len
        return self._len

    @property
    def graph_count(self) -> int:
        return len(self._graphs)

    def _check_weights(self) -> None:
        # Host-side attribute reads only. Moving or casting the model after building the backend
        # would leave the cache (and captured graphs) on the old device / dtype, and gives its
        # parameters fresh storage, away from this backend's fused q/k/v and gate/up tensors.
        w = self._embed
        if (
            w.dtype != self.dtype
            or w.device != self.device
            or self._q0.weight.data_ptr() != self._layers[0].wqkv.data_ptr()
        ):
            raise RuntimeError(
                f"the model moved to {w.device}/{w.dtype} after this backend was built for "
                f"{self.device}/{self.dtype}: build a new NativeBackend"
            )

    # ------------------------------------------------------------------ forward
    def _with_fallback(self, compiled, eager):
        """``compiled``, or ``eager`` for good once compiling or running it has failed (warned once)."""

        def call(*args):
            if self.compile:
                try:
                    return compiled(*args)
                except Exception as e:  # the layer functions are pure: rerunning them eagerly is safe
                    self.compile = False
                    first = (str(e).strip().splitlines() or [""])[0][:300]
                    self.compile_skip_reason = f"torch.compile failed ({type(e).__name__}: {first}): running eager"
                    warnings.warn(self.compile_skip_reason, stacklevel=2)
            return eager(*args)

        return call

    def _forward(self, tokens, pos, slots, vis, ext: int, keep: int | None = None, static: bool = False):
        """Run the decoder on ``tokens`` [n] at positions ``pos``; write their KV at ``slots``;
        query i sees cache slot j < ext iff ``vis[i, j]``. Logits of the last ``keep`` rows
        (all rows if None, none if 0). ``static``: shapes come from a bucket, so the compiled
        layer functions may run (a new n would be a recompile)."""
        n = tokens.shape[0]
        hkv, g, eps = self.n_kv, self.groups, self.eps
        pre, post = (self._cpre, self._cpost) if static and self.compile else (_pre_attn, _post_attn)
        cos = self._cos.index_select(0, pos).unsqueeze(1)  # [n, 1, d]
        sin_s = self._sin_s.index_select(0, pos).unsqueeze(1)
        bias = torch.zeros(n, ext, dtype=self.dtype, device=tokens.device).masked_fill_(~vis, self._neg)
        if g > 1:
            bias = bias.repeat(g, 1)  # rows follow the folded query order (group, token)
        bias = bias.view(1, 1, g * n, ext)
        h = F.embedding(tokens, self._embed)
        delta = torch.zeros_like(h)  # the pending MLP output, added at the next norm
        kv = self.kv
        packed = self.packed and n >= self.pack_min_rows
        lin = _packed_linear if packed else F.linear
        for li, w in enumerate(self._layers):
            wqkv, wo, wgu, wd = w.weights(packed)
            h, q, new_kv = pre(h, delta, w.ln1, wqkv, w.bqkv, w.qn, w.kn, cos, sin_s, eps, hkv, g, lin)
            layer = kv[li]  # [k|v, hkv, slots, d]
            layer.index_copy_(2, slots, new_kv)
            a = self._sdpa(q, layer[0:1, :, :ext], layer[1:2, :, :ext], bias)
            h, delta = post(h, a, wo, w.bo, w.ln2, wgu, w.bgu, wd, w.bd, eps, lin)
        if keep is not None:
            if keep == 0:
                return None
            h, delta = h[n - keep :], delta[n - keep :]
        h = _rms(h + delta, self._norm, eps)
        if packed and h.shape[0] >= self.pack_min_rows:
            return _packed_linear(h, self._head_packed, self._head_bias)
        return F.linear(h, self._head, self._head_bias)

    def _sdpa(self, q, k, v, bias):
        if self._sdpa_kernels is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        with sdpa_kernel(self._sdpa_kernels):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)

    def _tree_forward(self, tokens, depth, anc, nb: int, ext: int, static: bool = False):
        """Tree attention at the device-side cache length; static shapes for a given (nb, ext)."""
        L = self._len_t
        slots = self._ar[:nb] + L
        pos = depth + L
        rel = self._ar[:ext] - L  # key slot relative to the tree's first slot
        cols = anc.index_select(1, rel.clamp(0, nb - 1))  # [nb, ext]
        vis = (rel < 0) | ((rel < nb) & cols)
        return self._forward(tokens, pos, slots, vis, ext, static=static)

    # ------------------------------------------------------------------ Backend API
    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        self._check_weights()
        ids = ids.to(self.device).view(-1)
        total = ids.shape[0]
        if total == 0:
            raise ValueError("prefill needs at least one token")
        base = self.cache_len
        if base + total > self.max_length:
            raise ValueError(f"{base + total} tokens exceed this backend's max_length {self.max_length}")
        if self.bucketed:
            return self._prefill_static(ids, base, total, all_logits)
        outs = []
        chunk = max(1, self.prefill_chunk)
        # Prompts come in every length. Measured on an H100 with the default kernel choice: the
        # first prefill of each new prompt length cost ~0.1-0.2 s more than a repeat of it (the
        # likely cause: cuDNN attention builds a plan per new shape). So eager prefill on CUDA
        # runs the memory-efficient kernel, which takes any shape and mask as it is.
        pick = self.device.type == "cuda" and self._sdpa_kernels is None
        with sdpa_kernel(_PREFILL_KERNELS) if pick else contextlib.nullcontext():
            for a in range(0, total, chunk):
                outs.extend(self._prefill_chunk(ids, base, a, min(total, a + chunk), total, all_logits))
        self._len = self._len_hi = base + total
        self._len_t.fill_(base + total)
        return torch.cat(outs) if all_logits else outs[-1][0]

    def _prefill_static(self, ids, base: int, total: int, all_logits: bool) -> torch.Tensor:
        """Prefill through the static-shape forward that verification uses (compiled layers, a
        CUDA graph per bucket): the prompt in chunks of the largest tree bucket, each verified
        as a chain, the last one padded up to ``PREFILL_BUCKETS`` (padding tokens sit after
        the prompt: nothing real attends to them, and their cache slots are overwritten
        later). Measured on an H100 (1.5B bf16, Spec-Bench prompts): eager prefill took a
        median 19 ms a prompt, mostly kernel launches."""
        outs = []
        step = self._max_bucket
        a = 0
        while a < total:
            m = min(step, total - a)
            nb = next((b for b in PREFILL_BUCKETS if m <= b <= step), None) or tree_bucket(m)
            self._len_hi = base + a
            ext = self._extent(nb)
            b = self._tree_bufs(nb)
            if b.shape is not _CHAIN:  # the chain structure (verify's drafts put theirs back)
                b.depth.copy_(self._ar[:nb])
                b.anc.copy_(torch.ones(nb, nb, dtype=torch.bool, device=self.device).tril_())
                b.shape = _CHAIN
            b.tok[:m].copy_(ids[a : a + m])
            self._len_t.fill_(base + a)
            if self.graphs:
                g = self._graphs.get((nb, ext)) or self._capture(nb, ext, b)
                g.graph.replay()
                out = g.out
            else:
                out = self._tree_forward(b.tok, b.depth, b.anc, nb, ext, static=True)
            if all_logits:
                outs.append(out[:m].clone())
            elif a + m == total:
                outs.append(out[m - 1].clone())  # the graph's output is overwritten by the next replay
            a += m
        self._len = self._len_hi = base + total
        self._len_t.fill_(base + total)
        return torch.cat(outs) if all_logits else outs[-1]

    def _prefill_chunk(self, ids, base: int, a: int, b: int, total: int, all_logits: bool) -> list:
        ext = base + b
        pos = self._ar[base + a : base + b]
        vis = self._ar[:ext][None, :] <= pos[:, None]
        keep = None if all_logits else (1 if b == total else 0)
        out = self._forward(ids[a:b], pos, pos, vis, ext, keep=keep)
        return [] if out is None else [out]

    @torch.inference_mode()
    def verify(self, draft: Draft) -> torch.Tensor:
        self._check_weights()
        shape = draft.shape
        n = shape.size
        if n > self.max_tree:
            raise ValueError(f"a draft of {n} nodes exceeds max_tree={self.max_tree}")
        if self._len is not None and self._len + n > self.max_length:
            raise ValueError(f"cache {self._len} + draft {n} exceeds max_length {self.max_length}")
        if self.bucketed or self.graphs:
            return self._verify_static(draft, n)
        if shape.parents.device != self.device:
            shape = shape.to(self.device)
        ext = min(self._slots, self._len_hi + n)
        return self._tree_forward(draft.tokens.to(self.device), shape.depth, shape.ancestors, n, ext)

    @torch.inference_mode()
    def commit(self, path: torch.Tensor, n_keep) -> None:
        """Move the KV of ``path[:n_keep]`` to the slots after the cache; ``n_keep``: int or 0-d tensor.

        The whole path is copied (fixed size); entries past ``n_keep`` land beyond the new
        length and are overwritten later. One gather + one scatter over all layers.
        """
        path = path.to(self.device).view(-1)
        p = path.shape[0]
        if isinstance(n_keep, torch.Tensor):
            self._commit_device(path, n_keep.to(device=self.device, dtype=torch.long).view(()))
            self._len = None
            self._len_hi += p
        else:
            n_keep = int(n_keep)
            if not 0 <= n_keep <= p:
                raise ValueError(f"n_keep={n_keep} is outside [0, {p}]")
            self._commit_device(path, n_keep)
            self._advance_host(n_keep)

    def _commit_device(self, path: torch.Tensor, n_keep) -> None:
        """The device half of ``commit`` (graph-capturable): move the path's KV, grow the length."""
        L = self._len_t
        src = path + L
        dst = self._ar[: path.shape[0]] + L
        self.kv.index_copy_(3, dst, self.kv.index_select(3, src))
        self._len_t.add_(n_keep)

    def _advance_host(self, n_keep: int) -> None:
        """The host half of ``commit``: the host copies of the cache length."""
        if self._len is not None:
            self._len += n_keep
            self._len_hi = self._len
        else:
            self._len_hi += n_keep

    # ------------------------------------------------------------------ CUDA graphs
    def _extent(self, nb: int) -> int:
        need = self._len_hi + nb
        blk = self.kv_block
        return min(self._slots, -(-need // blk) * blk)

    def _tree_bufs(self, nb: int) -> _TreeBufs:
        b = self._bufs.get(nb)
        if b is None:
            dev = self.device
            eye = torch.eye(nb, dtype=torch.bool, device=dev)
            b = _TreeBufs(
                tok=torch.zeros(nb, dtype=torch.long, device=dev),
                depth=torch.zeros(nb, dtype=torch.long, device=dev),
                anc=eye.clone(),
                eye=eye,
            )
            self._bufs[nb] = b
        return b

    def _verify_static(self, draft: Draft, n: int) -> torch.Tensor:
        nb = tree_bucket(n)
        ext = self._extent(nb)
        b = self._tree_bufs(nb)
        shape = draft.shape
        if b.shape is not shape:  # a new tree structure: refill depth / ancestors (padding = self only)
            b.depth.zero_()
            b.depth[:n].copy_(shape.depth)
            b.anc.copy_(b.eye)
            b.anc[:n, :n].copy_(shape.ancestors)
            b.shape = shape
        b.tok[:n].copy_(draft.tokens)
        if not self.graphs:
            return self._tree_forward(b.tok, b.depth, b.anc, nb, ext, static=True)[:n]
        g = self._graphs.get((nb, ext))
        if g is None:
            g = self._capture(nb, ext, b)
        g.graph.replay()
        return g.out[:n].clone()  # the static output is overwritten by the next replay

    def _capture(self, nb: int, ext: int, b: _TreeBufs) -> _Graph:
        def fn():
            return self._tree_forward(b.tok, b.depth, b.anc, nb, ext, static=True)

        # The provisional KV writes are idempotent: warm-up and replay write the same slots.
        _, graph, out = self._record(fn, runs=2)
        g = _Graph(graph, out)
        self._graphs[(nb, ext)] = g
        return g

    def _record(self, fn, runs: int):
        """Run ``fn`` ``runs`` times eagerly on a side stream (warm-up: cuBLAS handles, kernel
        choice, compiled code), then capture it. Returns (the last eager output, the graph,
        the graph's output tensor). Capturing records kernels without running them."""
        with torch.cuda.device(self.device):
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            cur = torch.cuda.current_stream()
            side = torch.cuda.Stream()
            side.wait_stream(cur)
            with torch.cuda.stream(side):
                for _ in range(runs):
                    out = fn()
            cur.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: CUDA work on other threads (a server's) does not break the capture
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                gout = fn()
        return out, graph, gout

    def clear_graphs(self) -> None:
        """Drop captured graphs (e.g. to free their memory)."""
        self._graphs.clear()
        self._steps.clear()
        self._pool = None

    def drop_steps(self, owners) -> int:
        """Drop the captured steps whose plan key (``DeviceStep.key``, a tuple) starts with one
        of ``owners`` (e.g. a drafter that is gone); returns how many."""
        owners = set(owners)
        gone = [k for k in self._steps if isinstance(k[0], tuple) and k[0][:1] and k[0][0] in owners]
        for k in gone:
            del self._steps[k]
        return len(gone)

    # ------------------------------------------------------------------ whole steps on the device
    @property
    def captures_steps(self) -> bool:
        """Whether the engine should take greedy steps through :meth:`step` (on by default with
        CUDA graphs, where it saves the per-step host work; ``device_steps=True`` runs the same
        code eagerly, e.g. on the CPU for tests)."""
        return self.graphs if self._device_steps is None else self._device_steps

    def set_root(self, root: torch.Tensor) -> None:
        """The token the next :meth:`step` drafts from (after prefill, or after a step taken
        through ``verify``/``commit``)."""
        self._root.copy_(root.view(1))

    @torch.inference_mode()
    def step(self, ds: DeviceStep) -> torch.Tensor:
        """One greedy speculative step, all on the device: the drafter fills its tree from the
        root buffer, the target scores it, the greedy walk picks the accepted path, its KV is
        kept, the drafter observes the logits, and the bonus token becomes the next root.

        Returns a device tensor ``[n_accepted, emitted...]`` (read it once: the one sync), then
        call :meth:`advance` with ``n_accepted + 1``. On CUDA the step is captured per (drafter
        plan, tree bucket, KV extent) the first time it runs (that run is eager and real) and
        replayed afterwards; the same code runs eagerly without graphs.
        """
        self._check_weights()
        shape = ds.shape
        n = shape.size
        if n > self.max_tree:
            raise ValueError(f"a draft of {n} nodes exceeds max_tree={self.max_tree}")
        if self._len_hi + n > self.max_length:
            raise ValueError(f"cache {self._len_hi} + draft {n} exceeds max_length {self.max_length}")
        nb = tree_bucket(n)
        ext = self._extent(nb)
        key = (ds.key, nb, ext)
        g = self._steps.get(key)
        if g is not None:
            self._steps.move_to_end(key)  # recently used: dropped last
            g.graph.replay()
            return g.out
        # the tree's depth / ancestors padded to the bucket (padding nodes: self only); the
        # copy into them is part of the step, so a shape rewritten in place is read afresh
        depth = torch.zeros(nb, dtype=torch.long, device=self.device)
        anc = torch.eye(nb, dtype=torch.bool, device=self.device)

        def body():
            return self._step_body(ds, nb, ext, depth, anc)

        if not self.graphs:
            return body()
        # this step runs eagerly once (real work, and the warm-up), then is captured
        out, graph, gout = self._record(body, runs=1)
        if len(self._steps) >= MAX_STEP_GRAPHS:  # plans come and go (the cost model's choice)
            self._steps.popitem(last=False)
        # the graph reads the plan's tensors (shape, node indices, held by ``ds``) at every
        # replay: keep them alive as long as the graph, whatever the drafter's caches drop
        self._steps[key] = _Graph(graph, gout, keep=(depth, anc, ds))
        return out

    def advance(self, n_keep: int) -> None:
        """After :meth:`step`: the host's copy of the cache length grows by ``n_keep``."""
        self._advance_host(int(n_keep))

    def _step_body(self, ds: DeviceStep, nb: int, ext: int, depth, anc) -> torch.Tensor:
        n = ds.shape.size
        depth[:n].copy_(ds.shape.depth)
        anc[:n, :n].copy_(ds.shape.ancestors)
        tokens = ds.fill(self._root)
        tok = torch.zeros(nb, dtype=torch.long, device=self.device)
        tok[:n].copy_(tokens)
        logits = self._tree_forward(tok, depth, anc, nb, ext, static=True)[:n]
        v = greedy_verify(Draft(tokens, ds.shape), logits)
        self._commit_device(v.path, v.n_accepted + 1)
        ds.observe(tokens, logits, v)
        self._root.copy_(v.emitted.gather(0, v.n_accepted.view(1)))
        return torch.cat([v.n_accepted.view(1), v.emitted])
