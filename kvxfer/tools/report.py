"""Rendering ``kvxfer-bench`` results: live progress, the final table, JSON, CSV and the plot.

Layer: tools. Uses ``rich`` for the live display and table when stdout is a terminal and it is
installed, plain text otherwise; matplotlib (Agg, no display) only when a plot is asked for.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from ..errors import ConfigError
from .environment import Environment
from .options import BenchOptions
from .results import PointResult
from .workloads import format_size

__all__ = ["Skipped", "Progress", "render_table", "write_json", "write_csv", "write_plot", "JSON_SCHEMA"]

JSON_SCHEMA = "kvxfer-bench/1"

CSV_FIELDS = (
    "workload", "backend", "op", "memory", "devices", "piece_bytes", "blocks", "layers", "pieces", "nbytes",
    "iters", "warmup", "gbps", "latency_p50_s", "latency_p99_s", "baseline_kind", "baseline_gbps", "ratio",
    "nixl_gbps", "nixl_ratio", "verified", "error", "hostname", "gpus", "git_commit", "date",
)


@dataclass(frozen=True, slots=True)
class Skipped:
    """A backend that ``--backend all`` could not run here, and why."""

    backend: str
    reason: str


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def _row(r: PointResult) -> list[str]:
    w = r.workload
    t = r.timing
    status = "ok" if r.ok else ("FAILED" if r.error else "unchecked")
    return [
        r.backend.value,
        r.op.value,
        w.name,
        format_size(w.piece_bytes),
        str(w.blocks),
        str(w.layers),
        format_size(w.total_bytes),
        _fmt(r.gbps),
        _fmt(None if t is None else t.p50 * 1e3, ".3f"),
        _fmt(None if t is None else t.p99 * 1e3, ".3f"),
        "-" if r.baseline is None else r.baseline.kind.value,
        _fmt(None if r.baseline is None else r.baseline.gbps),
        _fmt(r.ratio, ".2f"),
        _fmt(None if r.nixl is None else r.nixl.gbps),
        status,
    ]


_HEADERS = ["backend", "op", "workload", "piece", "blocks", "layers", "bytes", "GB/s", "p50 ms", "p99 ms",
            "baseline", "base GB/s", "ratio", "NIXL GB/s", "check"]


def _use_rich(stream: TextIO | None) -> bool:
    """Whether to draw with rich: installed, and ``stream`` (when given) is a terminal."""
    if stream is not None and not stream.isatty():
        return False
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def _short(r: PointResult) -> str:
    head = f"{r.backend.value} {r.op.value} {r.workload.name}"
    if r.timing is None:
        return f"{head}: FAILED {r.error}"
    base = ""
    if r.baseline is not None:
        base = f" | {r.baseline.kind.value} {_fmt(r.baseline.gbps)} GB/s ratio {_fmt(r.ratio)}"
    check = "ok" if r.ok else (r.error or "unchecked")
    return f"{head}: {r.gbps:.2f} GB/s p50 {r.timing.p50 * 1e3:.3f} ms p99 {r.timing.p99 * 1e3:.3f} ms{base} [{check}]"


class Progress:
    """Live display of a sweep: a rich progress bar on a terminal, one line per point otherwise."""

    def __init__(self, total: int, enabled: bool | None, stream: TextIO = sys.stderr):
        self.total = total
        self.stream = stream
        live = _use_rich(sys.stdout) if enabled is None else enabled and _use_rich(None)
        self._rich: Any = None
        self._task: Any = None
        self._done = 0
        if live:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn

            self._rich = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("{task.fields[stage]}"), console=Console(file=stream), transient=False,
            )

    def __enter__(self) -> Progress:
        if self._rich is not None:
            self._rich.start()
            self._task = self._rich.add_task("kvxfer-bench", total=self.total, stage="")
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if self._rich is not None:
            self._rich.stop()

    def stage(self, label: str, text: str) -> None:
        """What the current point is doing."""
        if self._rich is not None:
            from rich.markup import escape

            self._rich.update(self._task, description=escape(label), stage=escape(text))

    def note(self, text: str) -> None:
        """A line that stays (skipped backends, warnings)."""
        if self._rich is not None:
            self._rich.console.print(text)
        else:
            print(text, file=self.stream, flush=True)

    def point_done(self, result: PointResult) -> None:
        self._done += 1
        line = f"[{self._done}/{self.total}] {_short(result)}"
        if self._rich is not None:
            self._rich.console.print(line, markup=False, highlight=False)
            self._rich.update(self._task, advance=1, stage="")
        else:
            print(line, file=self.stream, flush=True)


def render_table(results: Sequence[PointResult], skipped: Sequence[Skipped], stream: TextIO = sys.stdout,
                 rich_output: bool | None = None) -> None:
    """Print the final table (rich on a terminal, aligned plain text otherwise)."""
    rows = [_row(r) for r in results]
    use_rich = _use_rich(stream) if rich_output is None else rich_output
    if use_rich:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="kvxfer-bench", title_justify="left")
        for i, h in enumerate(_HEADERS):
            table.add_column(h, justify="right" if i >= 3 and h not in ("baseline", "check") else "left")
        for row in rows:
            table.add_row(*row)
        console = Console(file=stream)
        console.print(table)
        for s in skipped:
            console.print(f"skipped {s.backend}: {s.reason}", markup=False)
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(_HEADERS)]
    line = "  ".join(h.ljust(w) for h, w in zip(_HEADERS, widths))
    print(line, file=stream)
    print("  ".join("-" * w for w in widths), file=stream)
    for row in rows:
        print("  ".join(c.rjust(w) if i >= 3 and _HEADERS[i] not in ("baseline", "check") else c.ljust(w)
                        for i, (c, w) in enumerate(zip(row, widths))), file=stream)
    for s in skipped:
        print(f"skipped {s.backend}: {s.reason}", file=stream)
    stream.flush()


def _options_json(opts: BenchOptions) -> dict[str, Any]:
    return {
        "role": opts.role.value,
        "backends": [b.value for b in opts.backends],
        "all_backends": opts.all_backends,
        "memory": opts.memory.value,
        "devices": None if opts.devices is None else list(opts.devices),
        "ops": [o.value for o in opts.ops],
        "iters": opts.iters,
        "warmup": opts.warmup,
        "timeout": opts.timeout,
        "tcp_streams": opts.tcp_streams,
        "baseline": opts.baseline,
        "nixl": opts.nixl,
        "verify": opts.verify,
        "peer": opts.peer,
        "registry": opts.registry,
        "workloads": [w.to_wire() for w in opts.workloads],
    }


def _open_for_write(path: Path) -> TextIO:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "w", newline="")
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc}") from None


def write_json(path: Path, opts: BenchOptions, env: Environment, peer_env: dict[str, Any] | None,
               results: Sequence[PointResult], skipped: Sequence[Skipped]) -> None:
    """Write the run (environment of both sides, options, every point) as JSON."""
    doc = {
        "schema": JSON_SCHEMA,
        "environment": env.to_json(),
        "peer_environment": peer_env,
        "options": _options_json(opts),
        "skipped": [{"backend": s.backend, "reason": s.reason} for s in skipped],
        "points": [r.to_json() for r in results],
        "summary": {"points": len(results), "failed": sum(not r.ok for r in results)},
    }
    with _open_for_write(path) as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


def write_csv(path: Path, env: Environment, results: Sequence[PointResult]) -> None:
    """One row per point, with the environment's identity repeated on each row."""
    with _open_for_write(path) as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in results:
            d = r.to_json()
            row = {k: d.get(k) for k in CSV_FIELDS}
            row["devices"] = "/".join(str(x) for x in r.devices)
            row["baseline_kind"] = None if r.baseline is None else r.baseline.kind.value
            row["hostname"] = env.hostname
            row["gpus"] = "; ".join(env.gpus)
            row["git_commit"] = env.git_commit
            row["date"] = env.date
            w.writerow(row)


def write_plot(path: Path, results: Sequence[PointResult]) -> None:
    """GB/s against piece size (or blocks per transfer when only those vary), one line per
    backend and direction, each baseline dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.gbps is not None]
    pieces = {r.workload.piece_bytes for r in ok}
    by_blocks = len(pieces) <= 1 and len({r.workload.blocks for r in ok}) > 1
    xkey = (lambda r: r.workload.blocks) if by_blocks else (lambda r: r.workload.piece_bytes)
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    series: dict[str, list[tuple[int, float]]] = {}
    bases: dict[str, list[tuple[int, float]]] = {}
    for r in ok:
        series.setdefault(f"kvxfer {r.backend.value} {r.op.value}", []).append((xkey(r), r.gbps or 0.0))
        for ref in (r.baseline, r.nixl):
            if ref is not None and ref.gbps is not None:
                bases.setdefault(f"{ref.kind.value} {r.op.value}", []).append((xkey(r), ref.gbps))
    for name, pts in sorted(series.items()):
        pts = sorted(set(pts))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    for name, pts in sorted(bases.items()):
        pts = sorted(dict(pts).items())
        ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle="--", marker="x", label=f"baseline: {name}")
    ax.set_xscale("log", base=2)
    if by_blocks:
        ax.set_xlabel("blocks per transfer")
    else:
        ax.set_xlabel("piece size (bytes)")
        ticks = sorted(pieces)
        ax.set_xticks(ticks, [format_size(t) for t in ticks])
    ax.set_ylabel("GB/s (payload)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.set_title("kvxfer-bench: GB/s per backend, baselines dashed")
    if series or bases:
        ax.legend(fontsize="small")
    fig.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc}") from None
    finally:
        plt.close(fig)
