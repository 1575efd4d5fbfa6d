"""Native backend: logits equal to HF's, KV compaction, engine identity, graph capture (CUDA only)."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from freespec.backends.hf import HFBackend
from freespec.backends.native import (
    NativeBackend,
    UnsupportedModelError,
    make_backend,
    supports,
    tree_bucket,
    unsupported_reason,
)
from freespec.engine import Engine
from freespec.tree import Draft, TreeShape, get_template

ATOL = 1e-4


class Tok:
    """Stub tokenizer: enough for the engine with token-id prompts."""

    chat_template = None
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


COMMON = dict(
    vocab_size=101,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.2,  # logits far apart: fp32 noise never decides a greedy tie
)

CONFIGS = {
    "llama-gqa-tied": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=True)),
    "llama-mha-untied-bias": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(num_key_value_heads=4, tie_word_embeddings=False, attention_bias=True, mlp_bias=True),
    ),
    "llama-headdim-rope3": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(
            head_dim=32,
            num_key_value_heads=1,
            rms_norm_eps=1e-5,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=50000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
    ),
    "qwen2-gqa-bias-untied": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=False)),
    "qwen2-tied": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=True, num_key_value_heads=1)),
    "qwen3-qknorm": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=16, tie_word_embeddings=False)),
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=None)),
}


def make(name: str, seed: int = 0):
    cfg_cls, model_cls, extra = CONFIGS[name]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**{**COMMON, **extra}))
    model.set_attn_implementation("sdpa")
    model.generation_config.eos_token_id = None
    return model.eval()


def shape_of(template) -> TreeShape:
    return TreeShape.from_parents(get_template(template).parents())


def rand_ids(n, vocab=101, seed=0):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def hf_logits(model, ids) -> torch.Tensor:
    """Plain causal HF forward: logits [L, V]."""
    return model(input_ids=torch.as_tensor(ids).view(1, -1)).logits[0]


# --------------------------------------------------------------------------- logits vs HF
@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_logits_match_hf(name):
    model = make(name)
    be = NativeBackend(model)
    ids = rand_ids(45, seed=1)
    ref = hf_logits(model, ids)
    be.reset()
    out = be.prefill(ids, all_logits=True)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-4)
    assert be.cache_len == 45
    # chunked prefill + a second prefill on top of the cache give the same logits
    be2 = NativeBackend(model, prefill_chunk=7)
    be2.reset()
    a = be2.prefill(ids[:30], all_logits=True)
    b = be2.prefill(ids[30:], all_logits=True)
    torch.testing.assert_close(torch.cat([a, b]), ref, atol=ATOL, rtol=1e-4)
    last = NativeBackend(model, prefill_chunk=16)
    last.reset()
    torch.testing.assert_close(last.prefill(ids), ref[-1], atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("max_tree,length", [(16, 5), (16, 16), (16, 37), (256, 70)])
def test_static_prefill_matches_hf(max_tree, length):
    """Prefill through the static-shape path (chunks of the largest bucket verified as chains,
    the last one padded): HF's logits, for the last token and for all, and a tree verify on
    top of it sees the prompt."""
    model = make("qwen2-gqa-bias-untied")
    be = NativeBackend(model, max_tree=max_tree)
    be.bucketed = True  # the code CUDA graphs capture, run eagerly
    ids = rand_ids(length, seed=5)
    ref = hf_logits(model, ids)
    be.reset()
    torch.testing.assert_close(be.prefill(ids), ref[-1], atol=ATOL, rtol=1e-4)
    assert be.cache_len == length
    be.reset()
    torch.testing.assert_close(be.prefill(ids, all_logits=True), ref, atol=ATOL, rtol=1e-4)
    shape = shape_of("tr8")
    tokens = rand_ids(shape.size, seed=6)
    out = be.verify(Draft(tokens, shape))
    for i in (0, shape.size - 1):
        path = tokens[shape.paths[i, : int(shape.depth[i]) + 1]]
        torch.testing.assert_close(out[i], hf_logits(model, torch.cat([ids, path]))[-1], atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("bucketed", [False, True])
def test_tree_verify_matches_linear_hf(name, bucketed):
    """Every tree node's logits == HF run linearly over prefix + the node's root-to-node path."""
    model = make(name)
    be = NativeBackend(model)
    be.bucketed = bucketed  # True: the padded, static-shape code a CUDA graph captures, run eagerly
    prefix = rand_ids(33, seed=2)
    shape = shape_of("tr16")
    tokens = rand_ids(shape.size, seed=3)
    be.reset()
    be.prefill(prefix)
    out = be.verify(Draft(tokens, shape))
    assert out.shape == (shape.size, model.config.vocab_size)
    for i in range(shape.size):
        d = int(shape.depth[i])
        path = tokens[shape.paths[i, : d + 1]]
        ref = hf_logits(model, torch.cat([prefix, path]))[-1]
        torch.testing.assert_close(out[i], ref, atol=ATOL, rtol=1e-4, msg=f"node {i}")
    # and equal to the HF backend's own tree verify
    hb = HFBackend(model)
    hb.reset()
    hb.prefill(prefix)
    torch.testing.assert_close(out, hb.verify(Draft(tokens, shape)), atol=ATOL, rtol=1e-4)


def _inside(t: torch.Tensor, fused: torch.Tensor) -> bool:
    start = fused.data_ptr()
    end = start + fused.numel() * fused.element_size()
    return start <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= end


def _param_bytes(model) -> int:
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    return sum(storages.values())


def test_weights_are_referenced_not_copied():
    model = make("qwen2-gqa-bias-untied")
    n_bytes = _param_bytes(model)
    be = NativeBackend(model)
    att, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    w = be._layers[1]
    assert w.wo.data_ptr() == att.o_proj.weight.data_ptr()
    assert be._head.data_ptr() == model.lm_head.weight.data_ptr()
    # q/k/v and gate/up: the HF parameters are now views into one fused tensor each, in order
    for fused, parts in (
        (w.wqkv, (att.q_proj.weight, att.k_proj.weight, att.v_proj.weight)),
        (w.bqkv, (att.q_proj.bias, att.k_proj.bias, att.v_proj.bias)),
        (w.wgu, (mlp.gate_proj.weight, mlp.up_proj.weight)),
    ):
        assert fused.shape[0] == sum(p.shape[0] for p in parts)
        assert all(p.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr() for p in parts)
        assert all(_inside(p, fused) for p in parts)
        assert parts[0].data_ptr() == fused.data_ptr()
        assert torch.equal(torch.cat([p.detach() for p in parts]), fused)
    assert w.bgu is None  # no MLP bias in Qwen2
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())
    # no extra memory: the parameters' storages add up to what they did before
    assert _param_bytes(model) == n_bytes
    tied = NativeBackend(make("llama-gqa-tied"))
    assert tied._head.data_ptr() == tied._embed.data_ptr()


@pytest.mark.parametrize(
    "name", ["qwen2-gqa-bias-untied", "llama-mha-untied-bias", "qwen3-qknorm", "llama-gqa-tied"]
)
def test_fusing_keeps_hf_model_and_second_backend(name):
    model = make(name)
    ids = rand_ids(30, seed=21)
    ref = hf_logits(model, ids)
    hb = HFBackend(model)
    hb.reset()
    ref_pre = hb.prefill(ids, all_logits=True)
    first = NativeBackend(model)
    # the HF model computes exactly as before on its re-pointed parameters
    assert torch.equal(hf_logits(model, ids), ref)
    hb.reset()
    assert torch.equal(hb.prefill(ids, all_logits=True), ref_pre)
    # a second backend over the same model reuses the fused tensors (no second fusion)
    ptrs = [p.data_ptr() for p in model.parameters()]
    second = NativeBackend(model)
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    for a, b in zip(first._layers, second._layers):
        assert a.wqkv.data_ptr() == b.wqkv.data_ptr() and a.wgu.data_ptr() == b.wgu.data_ptr()
        assert a.wqkv.shape == b.wqkv.shape and a.wgu.shape == b.wgu.shape
    outs = []
    for be in (first, second):
        be.reset()
        outs.append(be.prefill(ids, all_logits=True))
    assert torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[0], ref, atol=ATOL, rtol=1e-4)


def _times(fast: str, one: float):
    """Layout timings (``_layout_times``' form) where ``fast`` is the fastest packed layout at a
    tree's rows, and ``one`` its one-row time against the plain layout's 1.0."""
    import freespec.backends.native as native

    few, tree = native.LAYOUT_ROWS
    return lambda w, kinds: {**{(k, n): 2.0 for k in kinds for n in (few, tree)}, ("plain", few): 1.0,
                             ("plain", tree): 3.0, (fast, few): one, (fast, tree): 1.5}


def test_layout_choice_on_timings():
    """The packed layout is the fastest at a tree's rows; it runs one-token steps too only where
    it beats the plain layout there by LAYOUT_MARGIN."""
    import freespec.backends.native as native

    kinds = ["mkl", "onednn"]
    for fast in kinds:
        assert native._choose_layout(_times(fast, 0.5)(None, kinds), kinds) == (fast, 1)
        assert native._choose_layout(_times(fast, 0.99)(None, kinds), kinds) == (fast, native.PACK_MIN_ROWS)
        assert native._choose_layout(_times(fast, 1.2)(None, kinds), kinds) == (fast, native.PACK_MIN_ROWS)
    # measured for real: every layout at every row count, positive times
    w = torch.randn(64, 32)
    got = native._layout_times(w, native._packing_kinds())
    assert set(got) == {(k, n) for k in ["plain", *native._packing_kinds()] for n in native.LAYOUT_ROWS}
    assert all(t > 0 for t in got.values())


def test_cpu_weight_packing(monkeypatch):
    """On a CPU in fp32 trees of ``pack_min_rows`` nodes or more run over prepacked weights (the
    same logits as the plain layout), in the packed layout the timings pick, each layout this
    torch has; one-token steps too where the packed layout is the faster there; shorter trees
    keep the plain layout, exactly as before."""
    import freespec.backends.native as native

    model = make("qwen2-gqa-bias-untied")
    packed = NativeBackend(model)
    if not packed.packed:
        pytest.skip(f"no weight packing here: {packed.pack_skip_reason}")
    kinds = native._packing_kinds()
    assert packed.pack_kind in kinds and packed.pack_min_rows in (1, native.PACK_MIN_ROWS)
    assert set(packed.layout_times) == {f"{k}@{n}" for k in ["plain", *kinds] for n in native.LAYOUT_ROWS}
    plain = NativeBackend(model, pack_weights=False)
    assert not plain.packed and plain.pack_skip_reason == "pack_weights=False"
    calls = []
    real = native._packed_linear
    monkeypatch.setattr(native, "_packed_linear", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    prefix = rand_ids(40, seed=8)
    for kind in kinds:
        for one, least in ((0.5, 1), (1.2, native.PACK_MIN_ROWS)):
            monkeypatch.setattr(native, "_layout_times", _times(kind, one))
            be_k = NativeBackend(model)
            assert be_k.packed and be_k.pack_kind == kind and be_k.pack_min_rows == least
            for tmpl in ("tr4", "tr16", "chain2", "chain0"):
                shape = shape_of(tmpl)
                tokens = rand_ids(shape.size, seed=9)
                outs = []
                for be in (be_k, plain):
                    be.reset()
                    be.prefill(prefix)
                    calls.clear()
                    outs.append(be.verify(Draft(tokens, shape)))
                    used = bool(calls)
                    assert used == (be is be_k and shape.size >= least), (kind, tmpl, calls)
                if shape.size >= least:
                    torch.testing.assert_close(outs[0], outs[1], atol=ATOL, rtol=1e-4)
                else:
                    assert torch.equal(outs[0], outs[1])
    # a layout whose product disagrees with F.linear is passed over for the next one
    monkeypatch.setattr(native, "_packing_kinds", lambda: kinds)
    monkeypatch.setattr(native, "_layout_times", _times(kinds[0], 1.2))
    wrong, packed_kind = kinds[0], [None]  # (the layout _pack made last)
    real_pack = native._pack
    monkeypatch.setattr(native, "_pack", lambda w, kind: packed_kind.__setitem__(0, kind) or real_pack(w, kind))
    monkeypatch.setattr(native, "_packed_linear",
                        lambda x, w, b: real(x, w, b) * (1.01 if packed_kind[0] == wrong else 1.0))
    fallback = NativeBackend(model)
    if len(kinds) > 1:
        assert fallback.packed and fallback.pack_kind == kinds[1]
    else:
        assert not fallback.packed and "disagrees" in fallback.pack_skip_reason
    monkeypatch.setattr(native, "_packed_linear", real)
    monkeypatch.setattr(native, "_pack", real_pack)
    half = NativeBackend(make("llama-gqa-tied").to(torch.bfloat16))
    assert not half.packed and "float32" in half.pack_skip_reason
    # a second copy of the weights must fit comfortably in memory (unless asked for)
    monkeypatch.setattr(native, "_physical_memory", lambda: 1000)
    small = NativeBackend(model)
    assert not small.packed and "memory" in small.pack_skip_reason
    assert NativeBackend(model, pack_weights=True).packed


def test_fusing_under_inference_mode_keeps_normal_parameters():
    model = make("llama-gqa-tied")
    with torch.inference_mode():
        NativeBackend(model)
    assert not any(p.is_inference() for p in model.parameters())
    with torch.no_grad():  # still writable in place outside inference mode (e.g. load_state_dict)
        model.model.layers[0].self_attn.k_proj.weight.mul_(1.0)
    model.load_state_dict(model.state_dict())


# --------------------------------------------------------------------------- KV compaction
def _plain_continue(be, root: int, steps: int) -> list[int]:
    """Greedy one-token steps through verify/commit, starting from the root token."""
    root_shape = TreeShape.from_parents([-1])
    out, tok = [], root
    for _ in range(steps):
        logits = be.verify(Draft(torch.tensor([tok]), root_shape))
        be.commit(torch.zeros(1, dtype=torch.long), 1)
        tok = int(logits[0].argmax())
        out.append(tok)
    return out


@pytest.mark.parametrize("name", ["llama-gqa-tied", "qwen2-gqa-bias-untied"])
@pytest.mark.parametrize("tensor_keep", [False, True])
@pytest.mark.parametrize("bucketed", [False, True])
def test_commit_non_contiguous_path_then_decode(name, tensor_keep, bucketed):
    model = make(name, seed=4)
    shape = shape_of("tr16")
    # a node whose path is not 0, 1, 2, ... (KV must really move)
    cand = [i for i in range(shape.size) if int(shape.depth[i]) >= 2 and int(shape.paths[i, 1]) != 1]
    node = cand[-1]
    d = int(shape.depth[node])
    path = shape.paths[node]
    prefix = rand_ids(21, seed=5)
    tokens = rand_ids(shape.size, seed=6)
    be = NativeBackend(model)
    be.bucketed = bucketed
    be.reset()
    be.prefill(prefix)
    be.verify(Draft(tokens, shape))
    # keep the path up to the node's parent (the node itself becomes the next root, as in
    # the engine, where the bonus token is the root)
    keep = torch.tensor(d) if tensor_keep else d
    be.commit(path, keep)
    assert be.cache_len == 21 + d
    kept = tokens[path[: d + 1]]
    # reference: plain decoding of prefix + kept path, HF backend
    ref_be = HFBackend(model)
    ref_be.reset()
    ref_be.prefill(torch.cat([prefix, kept[:-1]]))
    root = int(kept[-1])
    ref = _plain_continue(ref_be, root, 12)
    got = _plain_continue(be, root, 12)
    assert got == ref
    # and equal to a fresh native prefill of the same sequence
    fresh = NativeBackend(model)
    fresh.reset()
    fresh.prefill(torch.cat([prefix, kept[:-1]]))
    assert _plain_continue(fresh, root, 12) == ref


def test_commit_zero_keeps_cache():
    model = make("llama-gqa-tied")
    be = NativeBackend(model)
    be.reset()
    prefix = rand_ids(10)
    be.prefill(prefix)
    shape = shape_of("tr8")
    be.verify(Draft(rand_ids(shape.size, seed=9), shape))
    be.commit(shape.paths[0], 0)
    assert be.cache_len == 10
    root = TreeShape.from_parents([-1])
    x = be.verify(Draft(prefix[-1:], root))
    be.commit(torch.zeros(1, dtype=torch.long), 1)
    ref = hf_logits(model, torch.cat([prefix, prefix[-1:]]))[-1]
    torch.testing.assert_close(x[0], ref, atol=ATOL, rtol=1e-4)


# --------------------------------------------------------------------------- engine identity
def _prompts(n, length=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 101, (length,), generator=g).tolist() for _ in range(n)]


@pytest.mark.parametrize("name", ["llama-gqa-tied", "qwen2-gqa-bias-untied", "qwen3-qknorm"])
@pytest.mark.parametrize("template", ["tr80", "tr8"])
def test_engine_greedy_identical(name, template):
    model = make(name, seed=7)
    tok = Tok()
    native = NativeBackend(model)
    hf_eng = Engine(model, tok, drafter="recycling", template=template)
    tr = Engine(model, tok, drafter="recycling", template=template, backend=native)
    plain = Engine(model, tok, drafter=None, backend=native)
    steps_saved = 0
    for prompt in _prompts(3, seed=len(name)):
        ref = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=40, min_new_tokens=40, do_sample=False,
        )[0, len(prompt):].tolist()
        assert plain.generate(prompt, 40).tokens == ref
        res = tr.generate(prompt, 40)
        assert res.tokens == ref
        assert hf_eng.generate(prompt, 40).tokens == ref
        steps_saved += 40 - res.stats.steps - 1
    assert steps_saved > 0, "the drafter never got a token accepted: the test exercised no tree"


def test_engine_bucketed_path_identical():
    model = make("qwen2-gqa-bias-untied", seed=8)
    be = NativeBackend(model, max_length=256, kv_block=64)
    be.bucketed = True
    eng = Engine(model, Tok(), drafter="recycling", template="tr48", backend=be)
    for prompt in _prompts(2, seed=3):
        ref = Engine(model, Tok(), drafter=None).generate(prompt, 60).tokens
        assert eng.generate(prompt, 60).tokens == ref


def test_context_limit():
    model = make("llama-gqa-tied")
    be = NativeBackend(model, max_length=64)
    assert be.max_length == 64
    eng = Engine(model, Tok(), drafter="recycling", backend=be)
    res = eng.generate(_prompts(1, length=30)[0], 100)
    assert res.finish_reason == "length" and len(res.tokens) == 64 - 30
    ref = Engine(model, Tok(), drafter=None).generate(_prompts(1, length=30)[0], 34).tokens
    assert res.tokens == ref
    with pytest.raises(ValueError):
        be.reset()
        be.prefill(rand_ids(65))
    with pytest.raises(ValueError):
        NativeBackend(model, max_length=10_000)  # beyond max_position_embeddings


# --------------------------------------------------------------------------- support / selection
def test_unsupported_model_raises_and_auto_falls_back():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2, n_positions=64)).eval()
    assert not supports(model)
    assert "gpt2" in unsupported_reason(model)
    with pytest.raises(NotImplementedError):
        NativeBackend(model)
    with pytest.raises(UnsupportedModelError):
        make_backend(model, prefer="native")
    assert isinstance(make_backend(model, prefer="auto"), HFBackend)
    assert isinstance(make_backend(model, prefer="hf"), HFBackend)


def test_make_backend_choices():
    model = make("llama-gqa-tied")
    assert supports(model)
    assert isinstance(make_backend(model, prefer="native"), NativeBackend)
    assert isinstance(make_backend(model, prefer="auto"), NativeBackend)
    assert isinstance(make_backend(model, prefer="hf"), HFBackend)
    with pytest.raises(ValueError):
        make_backend(model, prefer="fast")


def test_sliding_window_caps_length():
    cfg_cls, model_cls, extra = CONFIGS["mistral"]
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**{**COMMON, **extra, "sliding_window": 48})).eval()
    assert NativeBackend(model).max_length == 48


def test_tree_buckets():
    assert tree_bucket(1) == 1 and tree_bucket(81) == 96 and tree_bucket(161) == 192
    with pytest.raises(ValueError):
        tree_bucket(257)
    be = NativeBackend(make("llama-gqa-tied"), max_tree=100)
    be.reset()
    be.prefill(rand_ids(5))
    shape = shape_of("tr160")
    with pytest.raises(ValueError):
        be.verify(Draft(rand_ids(shape.size), shape))


# --------------------------------------------------------------------------- CUDA graphs
def test_graph_capture_skipped_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: covered by the graph test")
    model = make("llama-gqa-tied")
    be = NativeBackend(model)
    assert not be.graphs and be.graph_skip_reason
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        forced = NativeBackend(model, graphs=True)
    assert not forced.graphs
    assert "CUDA" in forced.graph_skip_reason
    assert any("CUDA" in str(x.message) for x in w)
    forced.reset()
    forced.prefill(rand_ids(5))
    forced.verify(Draft(rand_ids(1), TreeShape.from_parents([-1])))
    assert forced.graph_count == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("name", ["llama-gqa-tied", "qwen2-gqa-bias-untied"])
def test_cuda_graph_replay_matches_eager(name):
    model = make(name, seed=11).cuda()
    graph = NativeBackend(model, graphs=True, kv_block=128)
    eager = NativeBackend(model, graphs=False)
    assert graph.graphs
    prefix = rand_ids(150, seed=12).cuda()
    for be in (graph, eager):
        be.reset()
        be.prefill(prefix)
    for tmpl in ("tr16", "tr80", "chain4"):
        shape = shape_of(tmpl).to("cuda")
        tokens = rand_ids(shape.size, seed=13).cuda()
        for _ in range(2):  # capture, then replay
            a = graph.verify(Draft(tokens, shape))
            b = eager.verify(Draft(tokens, shape))
            torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-4)
            graph.commit(shape.paths[-1], 0)
            eager.commit(shape.paths[-1], 0)
    assert graph.graph_count >= 3
    # a device-side n_keep (no host sync), then more graph verifies on top of it
    shape = shape_of("tr16").to("cuda")
    tokens = rand_ids(shape.size, seed=16).cuda()
    node = shape.size - 1
    for be in (graph, eager):
        be.verify(Draft(tokens, shape))
        be.commit(shape.paths[node], shape.depth[node] + 1)
    for tmpl in ("tr80", "chain4"):
        shape = shape_of(tmpl).to("cuda")
        tokens = rand_ids(shape.size, seed=17).cuda()
        a = graph.verify(Draft(tokens, shape))
        b = eager.verify(Draft(tokens, shape))
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-4)
        graph.commit(shape.paths[-1], 1)
        eager.commit(shape.paths[-1], 1)
    assert graph.cache_len == eager.cache_len
    # identical greedy output through the engine
    tok = Tok()
    for prompt in _prompts(2, seed=14):
        ref = Engine(model, tok, drafter=None, backend=eager).generate(prompt, 80).tokens
        assert Engine(model, tok, drafter=None, backend=graph).generate(prompt, 80).tokens == ref
        assert Engine(model, tok, drafter="recycling", backend=graph).generate(prompt, 80).tokens == ref


# --------------------------------------------------------------------------- torch.compile
def test_compile_defaults_off_the_gpu():
    model = make("llama-gqa-tied")
    if not torch.cuda.is_available():
        be = NativeBackend(model)
        assert not be.compile and "off by default" in be.compile_skip_reason and not be.bucketed
    off = NativeBackend(model, compile=False)
    assert not off.compile and off.compile_skip_reason == "compile=False"


def test_compile_failure_falls_back_to_eager(monkeypatch):
    from freespec.backends import native

    def broken(fn):
        def run(*args):
            raise RuntimeError("inductor exploded\nlong trace")

        return run

    monkeypatch.setattr(native, "_compiled", broken)
    monkeypatch.setattr(native, "_compile_unavailable", lambda dev: None)
    model = make("qwen2-gqa-bias-untied")
    be = NativeBackend(model, compile=True)
    ref = NativeBackend(model)
    ref.bucketed = True
    shape = shape_of("tr16")
    tokens = rand_ids(shape.size, seed=3)
    outs = []
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for b in (be, ref):
            b.reset()
            b.prefill(rand_ids(20))
            outs.append(b.verify(Draft(tokens, shape)))
    assert not be.compile and "inductor exploded" in be.compile_skip_reason
    assert sum("inductor exploded" in str(x.message) for x in w) == 1  # warned once
    assert torch.equal(outs[0], outs[1])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2-gqa-bias-untied", "qwen3-qknorm"])
def test_compiled_layers_match_eager(name):
    """compile=True on the CPU (inductor's C++ backend): the same logits as the eager path."""
    import shutil

    from freespec.backends.native import _compile_unavailable

    why = _compile_unavailable(torch.device("cpu"))
    if why or shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip(why or "no C++ compiler for inductor's CPU backend")
    from torch._dynamo.utils import counters

    model = make(name, seed=18)
    graphs_before = counters["stats"]["unique_graphs"]
    be = NativeBackend(model, compile=True)
    assert be.compile and be.bucketed
    eager = NativeBackend(model)
    eager.bucketed = True
    prefix = rand_ids(25, seed=19)
    outs = {}
    for key, b in (("compiled", be), ("eager", eager)):
        b.reset()
        b.prefill(prefix)
        shape = shape_of("tr16")
        got = [b.verify(Draft(rand_ids(shape.size, seed=20), shape))]
        b.commit(shape.paths[-1], int(shape.depth[-1]))
        got.append(_plain_continue(b, int(prefix[-1]), 6))
        outs[key] = got
    if not be.compile:
        pytest.skip(f"torch.compile failed here: {be.compile_skip_reason}")
    torch.testing.assert_close(outs["compiled"][0], outs["eager"][0], atol=ATOL, rtol=1e-4)
    assert outs["compiled"][1] == outs["eager"][1]
    # one artifact per (function, query count) serves both layers: 2 functions x 3 query counts
    # (prefill's 64-token chunk, the tree's bucket, one-token decoding), not x 2 layers
    assert counters["stats"]["unique_graphs"] - graphs_before <= 6


# --------------------------------------------------------------------------- real model
@pytest.mark.real_model
def test_real_model_native_matches_hf(default_model):
    model, tok = default_model
    assert supports(model), unsupported_reason(model)
    native = NativeBackend(model, max_length=1024)
    text = "The quick brown fox jumps over the lazy dog. In computer science, a hash table is"
    ids = torch.tensor(list(tok(text).input_ids))
    ref = hf_logits(model, ids)
    native.reset()
    torch.testing.assert_close(native.prefill(ids, all_logits=True), ref, atol=1e-3, rtol=1e-3)
    shape = shape_of("tr80")
    tokens = rand_ids(shape.size, vocab=model.config.vocab_size, seed=15)
    out = native.verify(Draft(tokens, shape))
    hb = HFBackend(model)
    hb.reset()
    hb.prefill(ids)
    ref_tree = hb.verify(Draft(tokens, shape))
    torch.testing.assert_close(out, ref_tree, atol=1e-3, rtol=1e-3)
    assert torch.equal(out.argmax(-1), ref_tree.argmax(-1))
    for chat in ("Write a short poem about the sea.", "Explain what a hash table is."):
        prompt = Engine(model, tok, drafter=None).encode(chat, chat=True)
        ref = Engine(model, tok, drafter=None).generate(prompt, 48).tokens
        assert Engine(model, tok, drafter=None, backend=native).generate(prompt, 48).tokens == ref
        assert Engine(model, tok, drafter="recycling", backend=native).generate(prompt, 48).tokens == ref


def test_model_moved_after_build_is_detected():
    model = make("llama-gqa-tied")
    be = NativeBackend(model)
    model.to(torch.float64)
    with pytest.raises(RuntimeError, match="build a new NativeBackend"):
        be.reset()
        be.prefill(rand_ids(4))
    # the move gave the parameters fresh storage: a new backend fuses them again, and is right
    again = NativeBackend(model)
    assert again._layers[0].wqkv.dtype == torch.float64
    again.reset()
    ids = rand_ids(12)
    torch.testing.assert_close(again.prefill(ids, all_logits=True), hf_logits(model, ids), atol=ATOL, rtol=1e-4)


def test_partial_qkv_bias_falls_back_to_hf():
    model = make("qwen2-gqa-bias-untied")
    model.model.layers[1].self_attn.k_proj.bias = None  # q/k/v are fused into one linear
    assert "bias" in unsupported_reason(model)
    assert isinstance(make_backend(model, prefer="auto"), HFBackend)


# --------------------------------------------------------------------------- whole steps on the device
def _flat_latency():
    from freespec.backends.native import TREE_BUCKETS
    from freespec.cost import LatencyModel

    sizes = list(TREE_BUCKETS)
    return LatencyModel(sizes, [0], [[1e-3] * len(sizes)], bucketed=True)  # verification costs nothing extra


@pytest.mark.parametrize("template", ["tr8", "tr80", "auto"])
def test_device_steps_match_the_generic_path(template):
    """Backend.step (the code a CUDA graph captures, run eagerly here) takes exactly the steps
    that propose / verify / commit / observe take: same tokens, same acceptance histogram,
    same matrix and statistics afterwards, and both identical to plain decoding."""
    model = make("llama-gqa-tied")
    prompts = _prompts(3, length=30)
    ref = [Engine(model, Tok(), drafter=None).generate(p, 48).tokens for p in prompts]
    runs, drafters = {}, {}
    for on_device in (False, True):
        be = NativeBackend(model, device_steps=on_device)
        assert be.captures_steps is on_device
        eng = Engine(model, Tok(), drafter="recycling", backend=be, template=template, latency=_flat_latency())
        runs[on_device] = [eng.generate(p, 48) for p in prompts]
        drafters[on_device] = eng.drafter
    for a, b, r in zip(runs[False], runs[True], ref):
        assert a.tokens == b.tokens == r
        assert a.stats.tokens_per_step == b.stats.tokens_per_step
        assert a.stats.draft_sizes == b.stats.draft_sizes
    assert sum(r.stats.mat for r in runs[True]) > 3.0  # drafts were accepted, not only plain steps
    assert torch.equal(drafters[False].matrix, drafters[True].matrix)
    if template == "auto":
        assert torch.allclose(drafters[False].stats.tries, drafters[True].stats.tries)
        assert torch.allclose(drafters[False].stats.hits, drafters[True].stats.hits)


def test_device_steps_when_the_automatic_tree_is_empty():
    """Where the cost model picks plain decoding, a device-step engine takes host plain steps:
    the choice is made once per step (not again by propose) and the statistics still learn,
    exactly as on the host path."""
    from freespec.backends.native import TREE_BUCKETS
    from freespec.cost import LatencyModel

    model = make("llama-gqa-tied")
    sizes = list(TREE_BUCKETS)
    dear = LatencyModel(sizes, [0], [[1e-3 * n for n in sizes]], bucketed=True)  # a node costs a step
    p = _prompts(1, length=30)[0]
    got = {}
    for on_device in (False, True):
        be = NativeBackend(model, device_steps=on_device)
        eng = Engine(model, Tok(), drafter="recycling", backend=be, template="auto", latency=dear)
        res = eng.generate(p, 40)
        got[on_device] = (res.tokens, dict(eng.drafter.chosen_sizes), eng.drafter.stats.tries.clone())
    assert got[False][0] == got[True][0]
    assert got[False][1] == got[True][1] == {0: 39}
    assert torch.equal(got[False][2], got[True][2]) and float(got[True][2].sum()) > 0


def test_device_steps_mixed_with_plain_steps_and_the_context_end():
    """Steps the drafter declines (budget at the end of the context) go through verify/commit;
    the root handed between the two paths stays right."""
    model = make("llama-gqa-tied")
    be = NativeBackend(model, max_length=96, device_steps=True)
    eng = Engine(model, Tok(), drafter="recycling", backend=be, template="tr16")
    p = _prompts(1, length=30)[0]
    res = eng.generate(p, 200)
    assert res.finish_reason == "length" and len(res.tokens) == 96 - 30
    assert res.tokens == Engine(model, Tok(), drafter=None).generate(p, 66).tokens
    assert res.stats.draft_sizes[0] > 0 and res.stats.draft_sizes[16] > 0  # both kinds of step ran


def _repetitive(n, seed=0):
    """Prompts that repeat a segment: retrieval finds matches in them."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 101, (10,), generator=g).tolist() * 3 for _ in range(n)]


def _stepped_latency():
    """Bucketed and rising (an H100's shape): plans of several sizes pair with attached trees."""
    from freespec.backends.native import TREE_BUCKETS
    from freespec.cost import LatencyModel

    sizes = list(TREE_BUCKETS)
    return LatencyModel(sizes, [0], [[1e-3 * (1 + 0.002 * b) for b in sizes]], bucketed=True)


@pytest.mark.parametrize("template,latency", [("tr8", _flat_latency), ("auto", _flat_latency),
                                              ("auto", _stepped_latency)])
def test_hybrid_device_steps_identical_to_plain(template, latency):
    """Hybrid's device step (Token Recycling filled on the device, the retrieval tree attached
    under the root through an AttachBuffer) is lossless, and the retrieval part is used."""
    model = make("llama-gqa-tied")
    prompts = _repetitive(3) + _prompts(1, length=30)
    ref = [Engine(model, Tok(), drafter=None).generate(p, 48).tokens for p in prompts]
    be = NativeBackend(model, device_steps=True)
    eng = Engine(model, Tok(), drafter="hybrid", backend=be, template=template, latency=latency())
    for p, r in zip(prompts, ref):
        assert eng.generate(p, 48).tokens == r
    again = eng.generate(prompts[0], 48)  # earlier requests are in the suffix store now
    assert again.tokens == ref[0]
    used = eng.drafter.used
    assert used["attached"] > 0 and used["merged"] == 0  # device steps only
    assert again.stats.mat > 4.0


def test_hybrid_attached_steps_carry_the_current_plan():
    """Token Recycling's plans are laid into one buffer per size and rewritten in place as the
    choice moves; a step with an attached tree must carry the plan the buffer holds now (its
    structure), not the one its attach buffer was built with: plans A, B, A of one size, two
    loads each."""
    from freespec.drafters import HybridDrafter
    from freespec.drafters.merge import HostTree

    hy = HybridDrafter(vocab_size=64, template="auto")
    tr = hy.tr
    n_base = tr.template.size
    parents = [int(p) for p in tr.stats.parents]
    a = tuple(range(1, 31))  # two plans of one size (parents first), other shapes
    j = next(j for j in range(31, n_base) if parents[j] < 30 and parents[j] != parents[30])
    b = tuple(range(1, 30)) + (j,)
    plans = [tr._plan_for(k) for k in (a, b, a)]
    tree = HostTree.chain(5, [7, 8, 9], [0.9, 0.8, 0.7])
    for plan in plans:
        for _ in range(2):
            ds = hy._assemble(tr._plan_step(plan), 8, tree)
            P = plan[0].size
            got, want = ds.shape, plan[0]  # want: the plan's own shape
            assert torch.equal(got.parents[:P], want.parents) and torch.equal(got.depth[:P], want.depth)
            assert torch.equal(got.ancestors[:P, :P], want.ancestors) and not got.ancestors[:P, P:].any()
            assert torch.equal(got.paths[:P, : want.max_depth + 1], want.paths)
            assert got.parents[P:].tolist() == [0, P, P + 1] + [P + 1] * 5


def test_device_step_learning_runs_while_the_next_step_computes():
    """What a device step's ``done`` hands back runs after the next step is launched and
    before its result is read (the device computes meanwhile), once, in order; the last one
    before the request ends. Output stays identical to plain decoding."""
    model = make("llama-gqa-tied")
    prompts = _repetitive(2)
    ref = [Engine(model, Tok(), drafter=None).generate(p, 40).tokens for p in prompts]
    be = NativeBackend(model, device_steps=True)
    eng = Engine(model, Tok(), drafter="hybrid", backend=be, template="auto", latency=_flat_latency())
    dr = eng.drafter
    log = []
    learn, step = dr._learn, be.step

    def spy_learn(emitted):
        k = sum(1 for e in log if e[0] == "done")
        log.append(("done", k))
        got = learn(emitted)

        def later():
            log.append(("later", k))
            if got is not None:
                got()

        return later

    class Result:  # the step's result, logging when the engine reads it
        def __init__(self, t):
            self.t = t

        def tolist(self):
            log.append(("read",))
            return self.t.tolist()

    def spy_step(ds):
        log.append(("launch",))
        return Result(step(ds))

    dr._learn, be.step = spy_learn, spy_step
    for p, r in zip(prompts, ref):
        log.clear()
        assert eng.generate(p, 40).tokens == r
        kinds = [e[0] for e in log]
        n = kinds.count("done")
        assert n > 3 and kinds.count("later") == n and kinds.count("launch") == n
        assert [e[1] for e in log if e[0] == "later"] == list(range(n))
        for k in range(n - 1):  # step k's learning: after step k + 1's launch, before its read
            i = log.index(("later", k))
            assert kinds[i - 1] == "launch" and kinds[i + 1] == "read"
            assert log.index(("done", k)) < i
        assert log[-1] == ("later", n - 1)  # the last step's, once the loop ends
    assert dr.sizer.cal.n.sum() + len(dr.sizer.cal._pending) > 0  # it learnt


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture of whole steps needs a CUDA device")
@pytest.mark.parametrize("drafter,template", [("recycling", "tr16"), ("hybrid", "tr16"), ("recycling", "auto"),
                                              ("hybrid", "auto")])
def test_device_steps_captured_on_cuda(drafter, template):
    model = make("llama-gqa-tied").cuda()
    be = NativeBackend(model)
    assert be.graphs and be.captures_steps
    eng = Engine(model, Tok(), drafter=drafter, backend=be, template=template, latency=_flat_latency())
    plain = Engine(model, Tok(), drafter=None, backend=NativeBackend(model, graphs=False))
    for p in _prompts(1, length=30) + _repetitive(2):
        a = eng.generate(p, 48)
        b = eng.generate(p, 48)  # replays (hybrid: the retrieval trees change under the same graphs)
        assert a.tokens == b.tokens == plain.generate(p, 48).tokens
    assert be._steps
    if drafter == "hybrid":
        assert eng.drafter.used["attached"] > 0
    if template == "auto":  # the acceptance count ran as a captured replay, and counted
        tr = eng.drafter.tr if drafter == "hybrid" else eng.drafter
        assert tr._counter.graph is not None and float(tr.stats.tries.sum()) > 0


class _NoHostReads:
    """A dispatch mode that fails on every op that reads device data back to the host (what
    breaks CUDA graph capture and costs a sync): .item(), nonzero, boolean masks, ..."""

    SYNCING = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2",
               "repeat_interleave", "equal", "is_nonzero",
               "lift_fresh")  # t[i] = <Python scalar>: a host tensor copied to the device

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        syncing = self.SYNCING

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func.overloadpacket.__name__ in syncing:
                    raise AssertionError(f"host read in a device step: aten.{func.overloadpacket.__name__}")
                return func(*args, **(kwargs or {}))

        self._mode = Mode()
        return self._mode.__enter__()

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


@pytest.mark.parametrize("drafter,template", [("recycling", "tr16"), ("recycling", "auto"), ("hybrid", "tr16"),
                                              ("hybrid", "auto")])
def test_device_step_reads_nothing_back(drafter, template):
    """Everything ``Backend.step`` runs (drafter fill and update, forward, walk, KV compaction)
    must be capturable: no op in it may read device data back to the host."""
    from freespec.drafters import make_drafter
    from freespec.drafters.base import DraftContext

    model = make("llama-gqa-tied")
    be = NativeBackend(model, device_steps=True, graphs=False)
    be.bucketed = True
    dr = make_drafter(drafter, vocab_size=be.vocab_size, device=be.device, template=template)
    be.reset()
    ids = torch.tensor(_repetitive(1)[0][:20])
    root = be.prefill(ids).argmax(-1).view(1)
    be.set_root(root)
    for _ in range(3):
        ds = dr.device_step(DraftContext(tokens=ids.tolist(), root=root, prompt_len=20, budget=200,
                                         latency=_flat_latency().curve(be.cache_len)))
        assert ds is not None
        # undecorated, under no_grad: inference-mode tensors bypass Python dispatch modes
        with torch.no_grad(), _NoHostReads():
            out = NativeBackend.step.__wrapped__(be, ds)
        n_acc = int(out[0])
        be.advance(n_acc + 1)
    if drafter == "hybrid":
        assert dr.used["attached"] > 0  # the retrieval tree rode along
    with pytest.raises(AssertionError, match="host read"), _NoHostReads():
        torch.tensor([1, 2]).nonzero()  # the guard itself works


def test_drop_steps_by_owner():
    be = NativeBackend(make("llama-gqa-tied"))
    be._steps[((5, "full", "tr8"), 16, 512)] = object()
    be._steps[((5, "auto", 9, 3), 16, 1024)] = object()
    be._steps[(("hybrid", 5, 2), 32, 512)] = object()
    assert be.drop_steps({5}) == 2
    assert list(be._steps) == [(("hybrid", 5, 2), 32, 512)]
