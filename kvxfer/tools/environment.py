"""What the benchmark ran on, and what this machine can run: versions, GPUs, memory, backends.

Layer: tools. Version lookups read package metadata and never import torch, cupy or ucxx;
GPU questions import the GPU array library only when it is installed.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import os
import platform
import shlex
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from .._tensors import MemoryKind
from ..backends.base import BackendKind
from ..errors import ConfigError
from .arrays import gpu_count, gpu_free_bytes, gpu_lib, gpu_names
from .nixl_baseline import nixl_module_name
from .workloads import format_size

__all__ = [
    "Environment",
    "collect_environment",
    "FitRequest",
    "InsufficientMemoryError",
    "check_fits",
    "host_available_bytes",
    "backend_status",
]

# distribution names to report, by what a user would call them
_PACKAGES = {
    "numpy": ("numpy",),
    "msgpack": ("msgpack",),
    "torch": ("torch",),
    "cupy": ("cupy-cuda13x", "cupy-cuda12x", "cupy"),
    "ucxx": ("ucxx-cu13", "ucxx-cu12", "ucxx"),
    "libucx": ("libucx-cu13", "libucx-cu12", "libucx"),
    "nixl": ("nixl", "nixl-cu13", "nixl-cu12"),
    "rich": ("rich",),
    "matplotlib": ("matplotlib",),
}
_FIT_FRACTION = 0.9  # leave a tenth of what is free for everything else


def _version(dists: Sequence[str]) -> str | None:
    for d in dists:
        try:
            return importlib.metadata.version(d)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _gpu_names_cheap() -> tuple[str, ...]:
    """GPU names from nvidia-smi, else from torch/cupy if this process already imported one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return tuple(line.strip() for line in out.stdout.splitlines() if line.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    if gpu_lib() is not None and ("torch" in sys.modules or "cupy" in sys.modules):
        try:
            return tuple(gpu_names())
        except Exception:  # a broken driver must not stop a CPU benchmark
            return ()
    return ()


@dataclass(frozen=True, slots=True)
class Environment:
    """Where and when a benchmark ran."""

    hostname: str
    date: str
    command: str
    python: str
    platform: str
    cpus: int
    kvxfer: str
    git_commit: str | None
    packages: dict[str, str | None]
    gpus: tuple[str, ...]
    cuda_visible_devices: str | None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "hostname": self.hostname,
            "date": self.date,
            "command": self.command,
            "python": self.python,
            "platform": self.platform,
            "cpus": self.cpus,
            "kvxfer": self.kvxfer,
            "git_commit": self.git_commit,
            "packages": dict(self.packages),
            "gpus": list(self.gpus),
            "cuda_visible_devices": self.cuda_visible_devices,
            **self.extra,
        }


def collect_environment(argv: Sequence[str] | None = None, *, with_gpus: bool = True) -> Environment:
    """Describe this process's machine and software (GPU names only when a GPU library is installed)."""
    args = list(sys.argv if argv is None else argv)
    gpus: tuple[str, ...] = _gpu_names_cheap() if with_gpus else ()
    return Environment(
        hostname=socket.gethostname(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=shlex.join(["kvxfer-bench", *args[1:]]) if argv is None else shlex.join(args),
        python=platform.python_version(),
        platform=platform.platform(),
        cpus=os.cpu_count() or 0,
        kvxfer=__version__,
        git_commit=_git_commit(),
        packages={name: _version(d) for name, d in _PACKAGES.items()},
        gpus=gpus,
        cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
    )


# -- memory ------------------------------------------------------------------------------------
class InsufficientMemoryError(ConfigError):
    """The requested geometry does not fit the memory available here."""


@dataclass(frozen=True, slots=True)
class FitRequest:
    """Bytes one part of a run needs on one memory (``device`` -1 for host memory)."""

    memory: MemoryKind
    device: int
    nbytes: int
    what: str


def host_available_bytes() -> int:
    """MemAvailable of /proc/meminfo (or physical pages when that is unreadable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(requests: Sequence[FitRequest]) -> None:
    """Raise InsufficientMemoryError when the requests, added per memory, exceed 90% of what is free."""
    need: dict[tuple[MemoryKind, int], list[FitRequest]] = {}
    for r in requests:
        key = (r.memory, r.device if r.memory is MemoryKind.CUDA else -1)
        need.setdefault(key, []).append(r)
    for (mem, dev), rs in need.items():
        total = sum(r.nbytes for r in rs)
        free = host_available_bytes() if mem is MemoryKind.HOST else gpu_free_bytes(dev)
        if total > free * _FIT_FRACTION:
            where = "host memory" if mem is MemoryKind.HOST else f"cuda:{dev}"
            parts = ", ".join(f"{r.what} {format_size(r.nbytes)}" for r in rs)
            raise InsufficientMemoryError(
                f"the run needs {format_size(total)} of {where} ({parts}) but only {format_size(free)} is free; "
                "shrink it with --scale (e.g. --scale 0.1), fewer --blocks, or a smaller workload"
            )


# -- backends ----------------------------------------------------------------------------------
def backend_status(kind: BackendKind, memory: MemoryKind) -> str | None:
    """None when ``kind`` can run for ``memory`` here, else the reason it cannot."""
    if kind is BackendKind.TCP:
        return None
    if kind is BackendKind.UCX:
        if importlib.util.find_spec("ucxx") is None:
            return "ucxx is not installed (pip install kvxfer[cuda13] or kvxfer[cuda12])"
        if importlib.util.find_spec("kvxfer.backends.ucx") is None:
            return "this kvxfer has no UCX backend module (kvxfer.backends.ucx)"
        return None
    if kind is BackendKind.CUDA_IPC:
        if memory is not MemoryKind.CUDA:
            return "cuda_ipc moves GPU memory only (use --memory cuda)"
        if importlib.util.find_spec("kvxfer.backends.cuda_ipc") is None:
            return "this kvxfer has no CUDA IPC backend module (kvxfer.backends.cuda_ipc)"
        if gpu_lib() is None or gpu_count() == 0:
            return "no CUDA GPU is visible"
        return None
    return f"unknown backend {kind}"


def nixl_status() -> str | None:
    """None when NIXL is importable, else why not."""
    return None if nixl_module_name() is not None else "NIXL is not installed (nixl / nixl_cu13)"
