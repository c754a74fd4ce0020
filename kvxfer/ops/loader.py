"""Run-time build of the CUDA sources shipped in ``kvxfer/csrc/``: NVRTC compile, on-disk cubin cache.

Layer: ops, the bottom (with :mod:`kvxfer.ops.runtime`, which keeps the loaded kernels per
device). Nothing happens at import; :func:`load_kernel` for a (spec, device) compiles (or finds
the cached cubin) and loads it. The sources are package data, found through
:mod:`importlib.resources` (:func:`source_path`), so a wheel install compiles them at first use
as an editable one does. The cache key is the source text, the GPU architecture, the NVRTC
version and the options, so an edited kernel or another GPU never picks up a stale binary.
Concurrent builders (processes or threads) are serialised by a file lock per cubin, with a
second look after taking the lock.

The cache directory is ``KernelCacheConfig.cache_dir``: argument, then ``KVXFER_CACHE_DIR``
(read in :mod:`kvxfer.config`), then ``~/.cache/kvxfer``.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import tempfile
from importlib import resources
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import from_env
from ..errors import BackendUnavailableError, KernelCompileError

__all__ = ["KernelSpec", "KernelCacheConfig", "cupy", "source_dir", "source_path", "read_source", "sources",
           "load_kernel", "compile_cubin", "arch_of"]

log = logging.getLogger(__name__)


def source_dir() -> Path:
    """The directory of the CUDA sources: ``csrc/`` inside the installed ``kvxfer`` package."""
    return Path(str(resources.files("kvxfer") / "csrc"))


def source_path(name: str) -> Path:
    """Where the CUDA source ``name`` (a file name such as ``kv_copy.cu``) is installed."""
    return source_dir() / name


def sources() -> list[Path]:
    """Every CUDA source the package ships (``*.cu``), sorted."""
    return sorted(source_dir().glob("*.cu"))


@dataclass(frozen=True, slots=True)
class KernelCacheConfig:
    """Where compiled cubins are kept (``KVXFER_CACHE_DIR``); empty means ``~/.cache/kvxfer``."""

    cache_dir: str = ""

    def path(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else Path.home() / ".cache" / "kvxfer"


@dataclass(frozen=True, slots=True)
class KernelSpec:
    """One build of one source file: which file, which kernel, which preprocessor defines."""

    source: str  # file name under kvxfer/csrc/
    kernel: str  # extern "C" function name
    defines: tuple[tuple[str, int], ...] = ()

    @property
    def threads(self) -> int:
        """Threads per CTA of this build (its ``KVX_THREADS``, 256 by default)."""
        return dict(self.defines).get("KVX_THREADS", 256)

    def options(self, arch: str) -> tuple[str, ...]:
        return (
            "--std=c++17",
            f"--gpu-architecture={arch}",
            *(f"-D{k}={v}" for k, v in self.defines),
        )


def cupy() -> Any:
    """The ``cupy`` module, imported on first use.

    Raises:
        BackendUnavailableError: CuPy is not installed.
    """
    try:
        import cupy as cp
    except ImportError as exc:
        raise BackendUnavailableError(
            f"CUDA kernels need CuPy (pip install 'kvxfer[cuda12]' or 'kvxfer[cuda13]'): {exc}") from None
    return cp


def read_source(name: str) -> str:
    """The text of the CUDA source ``name`` as installed (see :func:`source_path`).

    Raises:
        KernelCompileError: the file is missing or unreadable.
    """
    path = source_path(name)
    try:
        return path.read_text()
    except OSError as exc:
        raise KernelCompileError(f"cannot read CUDA source {path}: {exc}") from None


def compile_cubin(source: str, name: str, options: tuple[str, ...]) -> bytes:
    """Compile CUDA C++ ``source`` with NVRTC: a cubin for an sm_XX arch, PTX for compute_XX.

    Raises:
        KernelCompileError: NVRTC rejected the source or options; the message holds its log.
        BackendUnavailableError: CuPy (and with it NVRTC) is not installed.
    """
    cupy()
    from cupy_backends.cuda.libs import nvrtc

    prog = nvrtc.createProgram(source, name, [], [])
    try:
        try:
            nvrtc.compileProgram(prog, list(options))
        except Exception as exc:  # NVRTCError; its log says why
            try:
                log_text = nvrtc.getProgramLog(prog)
            except Exception:
                log_text = ""
            raise KernelCompileError(
                f"NVRTC failed to compile {name} with {' '.join(options)}: {exc}\n{log_text}".rstrip()
            ) from None
        if any(o.startswith("--gpu-architecture=compute_") for o in options):
            return nvrtc.getPTX(prog)
        return nvrtc.getCUBIN(prog)
    finally:
        nvrtc.destroyProgram(prog)


def _nvrtc_version() -> str:
    from cupy_backends.cuda.libs import nvrtc

    return ".".join(map(str, nvrtc.getVersion()))


def arch_of(device: int) -> str:
    """``sm_XX`` for the device, or PTX for the newest arch NVRTC knows when it is older than the GPU.

    Raises:
        BackendUnavailableError: CuPy is not installed.
    """
    from cupy_backends.cuda.libs import nvrtc

    cc = int(cupy().cuda.Device(device).compute_capability)  # e.g. 90
    supported = [int(a) for a in nvrtc.getSupportedArchs()]
    if not supported or cc in supported:
        return f"sm_{cc}"
    return f"compute_{max(a for a in supported if a <= cc)}"


def _cached_cubin(spec: KernelSpec, arch: str, cache: Path) -> Path:
    source = read_source(spec.source)
    options = spec.options(arch)
    digest = hashlib.sha256(
        "\0".join([source, arch, _nvrtc_version(), *options]).encode()
    ).hexdigest()[:16]
    stem = Path(spec.source).stem
    suffix = ".ptx" if arch.startswith("compute_") else ".cubin"
    target = cache / f"{stem}-{spec.kernel}-{arch}-{digest}{suffix}"
    if target.exists():
        return target
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KernelCompileError(f"cannot create kernel cache directory {cache}: {exc}") from None
    with open(target.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if target.exists():  # another process built it while we waited
                return target
            log.info("compiling %s (%s) for %s", spec.source, spec.kernel, arch)
            cubin = compile_cubin(source, spec.source, options)
            fd, tmp = tempfile.mkstemp(dir=cache, prefix=target.name, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(cubin)
            os.replace(tmp, target)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target


def load_kernel(spec: KernelSpec, device: int, config: KernelCacheConfig | None = None) -> Any:
    """``spec``'s kernel loaded on CUDA ``device`` (a ``cupy.RawKernel``), built or found in the
    disk cache; not memoized here (:meth:`kvxfer.ops.runtime.DeviceRuntime.kernel` is).

    Raises:
        KernelCompileError: the source is missing, does not compile, or the cubin does not load.
        BackendUnavailableError: CuPy is not installed.
    """
    cp = cupy()
    cfg = config or from_env(KernelCacheConfig, "KVXFER_")
    with cp.cuda.Device(device):
        path = _cached_cubin(spec, arch_of(device), cfg.path())
        try:
            fn = cp.RawModule(path=str(path)).get_function(spec.kernel)
            fn.attributes  # forces the load on this device, so a bad cubin fails here
        except Exception as exc:
            raise KernelCompileError(f"cannot load kernel {spec.kernel} from {path}: {exc}") from None
    return fn
