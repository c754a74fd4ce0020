"""Prints a demo run: one line per request, the overall rate, the free lists, the verdict.

Layer: example (presentation only; the checks live in the driver).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .driver import DemoReport

__all__ = ["print_report"]


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def _size(n: int) -> str:
    return f"{n / 2**10:.0f} KiB" if n < 2**20 else f"{n / 2**20:.1f} MiB"


def print_report(report: DemoReport) -> None:
    """Print the run's figures and verdict to stdout."""
    o = report.options
    c = o.config
    print(f"kvxfer disaggregated demo: mode={o.mode.value} device={o.device} backend={','.join(report.backends) or '?'}"
          f" | model: {c.n_layers} layers, {c.n_heads} query heads / {c.n_kv_heads} KV heads x {c.head_dim},"
          f" block {c.block_size} tokens = {_size(c.block_size * c.kv_bytes_per_token)}")
    print(f"{'req':>4} {'prompt':>6} {'KV moved':>9} {'prefill ms':>10} {'handoff ms':>10} {'handoff/prefill':>15}"
          f" {'decode ms':>9} {'tokens':>6}  result")
    for r in report.results:
        ratio = "-" if r.handoff_s is None or not r.prefill_s else f"{r.handoff_s / r.prefill_s:.2f}"
        if r.warmup:
            verdict = "(warm-up, not counted) "
        else:
            verdict = ""
        if r.tokens is not None:
            verdict += "same tokens as one process" if r.tokens == r.expected else "DIFFERENT TOKENS"
        else:
            verdict += ("failed as expected: " if r.expected_to_fail else "FAILED: ") + (r.error or "?")[:100]
        print(f"{r.rid:>4} {r.prompt_len:>6} {_size(r.kv_bytes) if r.kv_bytes else '-':>9} {_ms(r.prefill_s):>10}"
              f" {_ms(r.handoff_s):>10} {ratio:>15} {_ms(r.decode_s):>9}"
              f" {len(r.tokens) if r.tokens else 0:>6}  {verdict}")
    moved = sum(r.kv_bytes for r in report.results if not r.warmup)
    rate = report.generated / report.wall_s if report.wall_s > 0 else 0.0
    print(f"overall: {report.generated} tokens generated in {report.wall_s:.2f} s = {rate:.0f} tokens/s"
          f" (first request sent to last token, prefill included); {_size(moved)} of KV moved")
    print("  handoff = from the prefill's KV being ready (published, or its last layer pushed) to decode holding it")
    for who in ("prefill", "decode"):
        rep = report.workers.get(who)
        if rep is None:
            print(f"{who} worker: no report (it is gone)")
        else:
            print(f"{who} worker: {rep['free']} of {rep['total']} KV blocks free"
                  f" ({'whole' if rep['whole'] else 'LEAKED: ' + ', '.join(rep['outstanding'])})")
    if report.ok:
        print("OK")
    else:
        for p in report.problems:
            print(f"FAILED: {p}")
