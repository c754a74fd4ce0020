"""``kvxfer-bench``: bandwidth and latency of kvxfer's paged KV transfers against the machine's ceiling.

Layer: tools (the console script). One host: ``kvxfer-bench`` starts the serving side as a
child process (multiprocessing spawn) and measures against it. Two hosts: ``kvxfer-bench
--listen HOST:PORT`` on one, ``kvxfer-bench --peer HOST:PORT`` on the other; the two exchange
connector metadata over a small msgpack bootstrap connection (:mod:`kvxfer.tools.wire`).

Exit codes: 0 every point measured and checked; 1 a point failed (its error is in the table
and the JSON); 2 an impossible request (unknown name, missing backend, no GPU, too little
memory), with a message saying what is available.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import multiprocessing
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from .._tensors import MemoryKind
from ..backends.base import BackendKind
from ..backends.tcp import parse_host_port
from ..errors import BackendUnavailableError, ConfigError, KvxferError
from .arrays import gpu_count, gpu_lib
from .environment import FitRequest, backend_status, check_fits, collect_environment
from .options import BenchOptions, Role, parse_options
from .report import Progress, Skipped, render_table, write_csv, write_json, write_plot
from .results import PointResult
from .runner import PeerClient, PointSpec, Runner

__all__ = ["main", "run"]

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_STAGING_GUESS = 4 * (64 << 20)  # pinned staging of the TCP backend for GPU memory, both directions, both sides


@dataclass(frozen=True, slots=True)
class _Selection:
    """The backends that will run, and those ``--backend all`` skipped."""

    backends: tuple[BackendKind, ...]
    skipped: tuple[Skipped, ...]


def _select_backends(opts: BenchOptions) -> _Selection:
    run, skipped = [], []
    for kind in opts.backends:
        reason = backend_status(kind, opts.memory)
        if reason is None:
            run.append(kind)
        elif opts.all_backends:
            skipped.append(Skipped(kind.value, reason))
        else:
            avail = [k.value for k in BackendKind if backend_status(k, opts.memory) is None]
            raise BackendUnavailableError(
                f"backend {kind.value!r} cannot run here: {reason}. Available for --memory "
                f"{opts.memory.value}: {', '.join(avail) or 'none'}"
            )
    if not run:
        raise BackendUnavailableError("no backend can run here: " + "; ".join(f"{s.backend}: {s.reason}" for s in skipped))
    return _Selection(tuple(run), tuple(skipped))


def _devices(opts: BenchOptions) -> tuple[int, int]:
    """(local, peer) GPU ordinals; (-1, -1) for host memory. Raises when the GPUs are not there."""
    if opts.memory is MemoryKind.HOST:
        return (-1, -1)
    if gpu_lib() is None:
        raise BackendUnavailableError("--memory cuda needs torch or cupy to allocate GPU memory; neither is installed. Use --memory host")
    n = gpu_count()
    if n == 0:
        raise BackendUnavailableError("--memory cuda needs a CUDA GPU, and none is visible here. Use --memory host")
    if opts.devices is not None:
        devs = opts.devices
    elif opts.role is Role.LOCAL:
        devs = (0, 1) if n >= 2 else (0, 0)
    else:
        devs = (0, 0)
    local_needed = devs if opts.role is Role.LOCAL else devs[:1]
    bad = [d for d in local_needed if d >= n]
    if bad:
        raise ConfigError(f"--devices {devs[0]},{devs[1]}: GPU {bad[0]} does not exist; {n} visible (0..{n - 1})")
    return devs


def _check_memory(opts: BenchOptions, backends: Sequence[BackendKind], devices: tuple[int, int]) -> None:
    """Estimate the bytes each memory must hold at the heaviest point and refuse what cannot fit."""
    local_only = opts.role is not Role.LOCAL
    worst: list[FitRequest] = []
    worst_total = -1
    for w in opts.workloads:
        reqs: list[FitRequest] = []
        if opts.memory is MemoryKind.HOST:
            reqs.append(FitRequest(MemoryKind.HOST, -1, w.pool_bytes, "local KV pool"))
            if not local_only:
                reqs.append(FitRequest(MemoryKind.HOST, -1, w.pool_bytes, "peer KV pool"))
        else:
            reqs.append(FitRequest(MemoryKind.CUDA, devices[0], w.pool_bytes, "local KV pool"))
            if not local_only:
                reqs.append(FitRequest(MemoryKind.CUDA, devices[1], w.pool_bytes, "peer KV pool"))
            if BackendKind.TCP in backends:
                reqs.append(FitRequest(MemoryKind.HOST, -1, _STAGING_GUESS, "TCP staging"))
        if opts.baseline:
            raw = opts.memory is MemoryKind.HOST or BackendKind.TCP in backends or local_only
            if raw:
                reqs.append(FitRequest(MemoryKind.HOST, -1, w.total_bytes * (1 if local_only else 2), "raw-socket baseline buffers"))
            if opts.memory is MemoryKind.CUDA and not local_only and any(b is not BackendKind.TCP for b in backends):
                reqs.append(FitRequest(MemoryKind.CUDA, devices[0], w.total_bytes, "copy baseline"))
                reqs.append(FitRequest(MemoryKind.CUDA, devices[1], w.total_bytes, "copy baseline"))
        total = sum(r.nbytes for r in reqs)
        if total > worst_total:
            worst, worst_total = reqs, total
    check_fits(worst)


def _start_local_peer() -> tuple[multiprocessing.process.BaseProcess, int]:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    from .peer import child_main

    proc = ctx.Process(target=child_main, args=(child, "127.0.0.1"), name="kvxfer-bench-peer", daemon=True)
    proc.start()
    child.close()
    if not parent.poll(120):
        proc.kill()
        raise KvxferError("the serving child process did not start within 120 s")
    try:
        port = parent.recv()
    except EOFError:
        proc.join(5)
        raise KvxferError(f"the serving child process exited during start-up (exit code {proc.exitcode})") from None
    return proc, int(port)


def _stop_local_peer(proc: multiprocessing.process.BaseProcess) -> None:
    proc.join(30)
    if proc.is_alive():
        proc.terminate()
        proc.join(5)


def _resolve_peer(opts: BenchOptions) -> tuple[str, int]:
    if opts.registry is not None:
        from .rendezvous import lookup

        return lookup(opts.registry, opts.name, opts.timeout)
    assert opts.peer is not None
    try:
        return parse_host_port(opts.peer)
    except ValueError as exc:
        raise ConfigError(f"--peer: {exc}") from None


def run(opts: BenchOptions, argv: Sequence[str]) -> int:
    """Run the benchmark ``opts`` describes; returns the exit code (raises for exit code 2)."""
    if opts.role is Role.SERVE:
        from .peer import serve

        assert opts.listen is not None
        logging.basicConfig(level=logging.INFO, format="kvxfer-bench: %(message)s")
        try:
            serve(opts.listen, registry=opts.registry, name=opts.name)
        except KeyboardInterrupt:
            pass
        return EXIT_OK
    if opts.plot is not None and importlib.util.find_spec("matplotlib") is None:
        raise ConfigError("--plot needs matplotlib, which is not installed (pip install kvxfer[bench])")
    selection = _select_backends(opts)
    devices = _devices(opts)
    _check_memory(opts, selection.backends, devices)
    env = collect_environment(argv)
    points = [PointSpec(w, b, op) for w in opts.workloads for b in selection.backends for op in opts.ops]
    proc = None
    if opts.role is Role.LOCAL:
        proc, port = _start_local_peer()
        host = "127.0.0.1"
    else:
        host, port = _resolve_peer(opts)
    results: list[PointResult] = []
    client = None
    try:
        client = PeerClient(host, port, timeout=opts.timeout)
        runner = Runner(opts, client, devices, same_host=opts.role is Role.LOCAL)
        try:
            with Progress(len(points), opts.progress) as progress:
                for s in selection.skipped:
                    progress.note(f"skipped {s.backend}: {s.reason}")
                for spec in points:
                    label = f"{spec.backend.value} {spec.op.value} {spec.workload.name}"
                    result = runner.run_point(spec, functools.partial(progress.stage, label))
                    results.append(result)
                    progress.point_done(result)
        finally:
            runner.close()
    finally:
        if client is not None:
            client.close()
        if proc is not None:
            _stop_local_peer(proc)
    render_table(results, selection.skipped)
    peer_env = None if client is None else client.info.environment
    if opts.json is not None:
        write_json(opts.json, opts, env, peer_env, results, selection.skipped)
    if opts.csv is not None:
        write_csv(opts.csv, env, results)
    if opts.plot is not None:
        write_plot(opts.plot, results)
    return EXIT_OK if all(r.ok for r in results) else EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the process exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        opts = parse_options(args)
        return run(opts, ["kvxfer-bench", *args])
    except (ConfigError, BackendUnavailableError) as exc:
        print(f"kvxfer-bench: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KvxferError as exc:
        print(f"kvxfer-bench: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("kvxfer-bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
