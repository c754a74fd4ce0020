"""Command-line options of ``kvxfer-bench``: argparse in, one frozen :class:`BenchOptions` out.

Layer: tools. Parsing checks only what needs no machine (names, numbers, combinations);
whether this machine can run the request is checked in :mod:`kvxfer.tools.bench`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import Enum
from fractions import Fraction
from pathlib import Path

from .._tensors import MemoryKind
from ..backends.base import BackendKind
from ..config import TcpConfig, from_env
from ..errors import ConfigError
from ..handle import Op
from .workloads import STANDARD_WORKLOADS, Workload, format_size, get_workload, parse_size

__all__ = ["BenchOptions", "Role", "build_parser", "parse_options"]

_BACKEND_ORDER = (BackendKind.CUDA_IPC, BackendKind.UCX, BackendKind.TCP)


class Role(Enum):
    """What this process does."""

    LOCAL = "local"  # measure, with a serving child process on this host
    SERVE = "serve"  # --listen: serve a measuring side on another host
    CONNECT = "connect"  # --peer / --registry: measure against a serving side elsewhere


@dataclass(frozen=True, slots=True)
class BenchOptions:
    """Everything one invocation asked for, validated."""

    role: Role
    backends: tuple[BackendKind, ...]
    all_backends: bool  # --backend all: skip (and say so) those that cannot run here
    memory: MemoryKind
    devices: tuple[int, int] | None  # (local, peer); None: chosen from the GPUs present
    ops: tuple[Op, ...]
    workloads: tuple[Workload, ...]  # one per point of the sweep, in order
    iters: int
    warmup: int
    timeout: float
    tcp_streams: int
    baseline: bool
    nixl: bool
    verify: bool
    listen: str | None
    peer: str | None
    registry: str | None
    name: str
    json: Path | None
    csv: Path | None
    plot: Path | None
    progress: bool | None  # None: a live display when stdout is a terminal


def _parse_list(text: str, parse: type[int] | object, what: str) -> list[int]:
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        out.append(parse(item))  # type: ignore[operator]
    if not out:
        raise ConfigError(f"{what} {text!r}: expected a comma-separated list")
    return out


def _parse_scale(text: str) -> float:
    try:
        return float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"--scale {text!r}: expected a number in (0, 1] such as 0.01 or 1/64") from None


def _parse_count(text: str) -> int:
    value = parse_size(text)  # accepts 4K = 4096 blocks too
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser (exits 2 with a message on malformed arguments, as argparse does)."""
    p = argparse.ArgumentParser(
        prog="kvxfer-bench",
        description="Measure kvxfer's paged KV transfers (GB/s, latency p50/p99) against the ceiling "
        "of the same machine, measured in the same run. One host: both sides start here. "
        "Two hosts: run --listen HOST:PORT on one and --peer HOST:PORT on the other.",
        epilog="standard workloads: " + "; ".join(w.describe() for w in STANDARD_WORKLOADS.values()),
    )
    g = p.add_argument_group("what to measure")
    g.add_argument("--backend", default="tcp", help="tcp, ucx, cuda_ipc, a comma list, or all (default tcp)")
    g.add_argument("--memory", default="host", choices=[m.value for m in MemoryKind], help="where both sides' KV pools live")
    g.add_argument("--devices", default=None, help="GPU of the measuring side and of the peer, e.g. 0,1 (default 0,1 with two GPUs)")
    g.add_argument("--op", default="read", choices=["read", "write", "both"], help="read pulls the peer's blocks, write pushes ours")
    g.add_argument("--workload", default=None, help=f"standard workload: {', '.join(STANDARD_WORKLOADS)} (default llama8b, or custom when geometry flags are given)")
    g.add_argument("--piece-bytes", default=None, help="custom piece size (one K or V slice of one block in one layer), e.g. 16K")
    g.add_argument("--blocks", default=None, help="blocks moved per transfer")
    g.add_argument("--layers", type=int, default=None, help="layers (one tensor each)")
    g.add_argument("--num-blocks", default=None, help="blocks in each side's pool")
    g.add_argument("--scale", default="1", help="shrink the bytes per transfer by this factor, keeping piece size (e.g. 1/64)")
    g.add_argument("--sweep-piece", default=None, help="piece sizes to sweep, e.g. 4K,16K,64K")
    g.add_argument("--sweep-blocks", default=None, help="blocks per transfer to sweep, e.g. 1,16,256")
    g.add_argument("--seed", type=int, default=0, help="seed of the random block ids")
    t = p.add_argument_group("how")
    t.add_argument("--iters", type=int, default=10, help="timed transfers per point (default 10)")
    t.add_argument("--warmup", type=int, default=2, help="untimed transfers before them (default 2)")
    t.add_argument("--timeout", type=float, default=120.0, help="seconds one transfer may take")
    t.add_argument("--streams", type=int, default=None, help="TCP connections per peer (default: KVXFER_TCP_STREAMS or 4)")
    t.add_argument("--no-baseline", action="store_true", help="skip the baselines")
    t.add_argument("--no-nixl", action="store_true", help="skip the NIXL comparison even when NIXL is importable")
    t.add_argument("--no-verify", action="store_true", help="skip the correctness check of each point")
    w = p.add_argument_group("where")
    w.add_argument("--listen", default=None, metavar="HOST:PORT", help="serve a measuring side on another host")
    w.add_argument("--peer", default=None, metavar="HOST:PORT", help="measure against a --listen side")
    w.add_argument("--registry", default=None, metavar="URL", help="with --listen: announce this server in a kvxfer registry; "
                   "alone: find the server there (kvxfer://host:port or redis://host:port/db)")
    w.add_argument("--name", default="kvxfer-bench", help="the server's name in the registry (default kvxfer-bench)")
    o = p.add_argument_group("output")
    o.add_argument("--json", type=Path, default=None, metavar="FILE", help="write results and environment as JSON")
    o.add_argument("--csv", type=Path, default=None, metavar="FILE", help="write one row per point as CSV")
    o.add_argument("--plot", type=Path, default=None, metavar="FILE.png", help="plot GB/s against piece size per backend")
    prog = o.add_mutually_exclusive_group()
    prog.add_argument("--progress", dest="progress", action="store_true", default=None, help="force the live display")
    prog.add_argument("--no-progress", dest="progress", action="store_false", help="plain line-per-point output")
    return p


def _backends(text: str) -> tuple[tuple[BackendKind, ...], bool]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return _BACKEND_ORDER, True
    valid = [b.value for b in BackendKind]
    out = []
    for n in names:
        if n not in valid:
            raise ConfigError(f"--backend {n!r} is unknown; choose from {', '.join(valid)} or all")
        kind = BackendKind(n)
        if kind not in out:
            out.append(kind)
    if not out:
        raise ConfigError("--backend: name at least one backend")
    return tuple(out), False


def _base_workload(ns: argparse.Namespace) -> Workload:
    custom = any(v is not None for v in (ns.piece_bytes, ns.blocks, ns.layers, ns.num_blocks))
    if ns.workload is not None:
        w = get_workload(ns.workload)
    elif custom:
        w = Workload("custom", layers=32, num_blocks=256, blocks=64, piece_shape=(8 * 1024,))
    else:
        w = get_workload("llama8b")
    if ns.piece_bytes is not None:
        w = w.with_piece_bytes(parse_size(ns.piece_bytes))
    if ns.layers is not None:
        if ns.layers < 1:
            raise ConfigError(f"--layers {ns.layers}: expected at least 1")
        w = replace(w, layers=ns.layers)
    if ns.blocks is not None:
        blocks = _parse_count(ns.blocks)
        w = w.with_blocks(blocks)
        if ns.num_blocks is None and w.name == "custom":
            w = replace(w, num_blocks=max(2, 2 * blocks))
    if ns.num_blocks is not None:
        w = replace(w, num_blocks=_parse_count(ns.num_blocks))
    if custom and ns.workload is not None:
        w = replace(w, name=f"{ns.workload}*")  # a standard workload with a changed geometry
    return replace(w, seed=ns.seed)


def _sweep(base: Workload, ns: argparse.Namespace, scale: float) -> tuple[Workload, ...]:
    pieces = _parse_list(ns.sweep_piece, parse_size, "--sweep-piece") if ns.sweep_piece else [None]
    blocks = _parse_list(ns.sweep_blocks, _parse_count, "--sweep-blocks") if ns.sweep_blocks else [None]
    out = []
    for b in blocks:
        for pc in pieces:
            w = base
            tags = []
            if pc is not None:
                w = w.with_piece_bytes(pc)
                tags.append(f"piece={format_size(pc)}")
            if b is not None:
                w = w.with_blocks(b)
                tags.append(f"blocks={b}")
            if tags:
                w = replace(w, name=f"{base.name}[{','.join(tags)}]")
            out.append(w.scaled(scale))
    return tuple(out)


def parse_options(argv: Sequence[str] | None = None) -> BenchOptions:
    """Parse ``argv`` (without the program name).

    Raises:
        ConfigError: names or numbers that cannot be right anywhere (unknown workload or
            backend, non-positive counts, contradictory flags). argparse itself exits 2 on
            malformed syntax.
    """
    ns = build_parser().parse_args(argv)
    backends, all_backends = _backends(ns.backend)
    if ns.iters < 1 or ns.warmup < 0:
        raise ConfigError(f"--iters {ns.iters} / --warmup {ns.warmup}: need iters >= 1 and warmup >= 0")
    if not ns.timeout > 0:
        raise ConfigError("--timeout must be a positive number of seconds")
    if ns.peer is not None and (ns.listen is not None or ns.registry is not None):
        raise ConfigError("--peer excludes --listen and --registry (--listen with --registry announces a server)")
    role = Role.SERVE if ns.listen else Role.CONNECT if (ns.peer or ns.registry) else Role.LOCAL
    devices = None
    if ns.devices is not None:
        devs = _parse_list(ns.devices, int, "--devices")
        if len(devs) == 1:
            devs = devs * 2
        if len(devs) != 2 or min(devs) < 0:
            raise ConfigError(f"--devices {ns.devices!r}: expected LOCAL,PEER GPU ordinals such as 0,1")
        devices = (devs[0], devs[1])
    streams = ns.streams if ns.streams is not None else from_env(TcpConfig, "KVXFER_TCP_").streams
    TcpConfig(streams=streams)  # validates the range
    scale = _parse_scale(ns.scale)
    workloads = _sweep(_base_workload(ns), ns, scale)
    if ns.plot is not None and ns.plot.suffix.lower() != ".png":
        raise ConfigError(f"--plot {ns.plot}: the plot is written as PNG; name it FILE.png")
    return BenchOptions(
        role=role,
        backends=backends,
        all_backends=all_backends,
        memory=MemoryKind(ns.memory),
        devices=devices,
        ops=(Op.READ, Op.WRITE) if ns.op == "both" else (Op(ns.op),),
        workloads=workloads,
        iters=ns.iters,
        warmup=ns.warmup,
        timeout=ns.timeout,
        tcp_streams=streams,
        baseline=not ns.no_baseline,
        nixl=not ns.no_nixl,
        verify=not ns.no_verify,
        listen=ns.listen,
        peer=ns.peer,
        registry=ns.registry,
        name=ns.name,
        json=ns.json,
        csv=ns.csv,
        plot=ns.plot,
        progress=ns.progress,
    )
