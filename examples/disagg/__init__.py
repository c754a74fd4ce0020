"""Disaggregated serving demo: a tiny transformer split across prefill and decode processes.

Run from the repository root: ``python -m examples.disagg [--mode pull|push] [--device cuda]``.
Modules: model (the engine: model, paged cache, allocator), prefill_worker, decode_worker,
driver (processes, relay, checks), report, channel (JSON-line control), common (worker set-up).
"""
