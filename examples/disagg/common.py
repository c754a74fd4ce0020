"""What both workers share: command-line options, torch set-up, the model, cache and connector.

Layer: example. Each worker builds the same model (same config, same seed) on its own device,
its own paged cache and allocator, and one kvxfer Connector that knows the registry.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch

from .model import BlockAllocator, ModelConfig, PagedKVCache, TinyDecoder

__all__ = ["Mode", "Worker", "build_worker", "sync", "worker_parser"]


class Mode(Enum):
    """How the KV cache goes from prefill to decode."""

    PULL = "pull"   # prefill publishes, decode reads
    PUSH = "push"   # decode expects, prefill writes each layer as it is computed


def worker_parser(description: str) -> argparse.ArgumentParser:
    """Options every worker takes (the driver passes them)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--name", required=True, help="connector name in the registry")
    p.add_argument("--registry", required=True, help="kvxfer://host:port")
    p.add_argument("--registry-token", default=None)
    p.add_argument("--mode", choices=[m.value for m in Mode], default=Mode.PULL.value)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--backend", default="auto", help="kvxfer backend (auto: cuda_ipc between GPUs, else tcp)")
    p.add_argument("--num-blocks", type=int, default=256)
    p.add_argument("--config", default="{}", help="ModelConfig fields as JSON")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds any one transfer may take")
    p.add_argument("--log-level", default="WARNING")
    return p


@dataclass(slots=True)
class Worker:
    """One worker's engine state and its connector."""

    cfg: ModelConfig
    mode: Mode
    device: torch.device
    model: TinyDecoder
    cache: PagedKVCache
    alloc: BlockAllocator
    connector: Any   # kvxfer.Connector
    timeout: float

    @property
    def block_nbytes(self) -> int:
        return int(self.connector.layout.block_nbytes)


def build_worker(args: argparse.Namespace, allocator_seed: int) -> Worker:
    """Set torch up, build model, cache, allocator; register the cache with a new Connector."""
    import kvxfer

    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format=f"%(asctime)s {args.name} %(levelname)s %(name)s: %(message)s")
    # Same thread count everywhere: the reference run must do bit-identical arithmetic.
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    cfg = ModelConfig(**json.loads(args.config))
    model = TinyDecoder(cfg, device)
    cache = PagedKVCache(cfg, args.num_blocks, device)
    alloc = BlockAllocator(args.num_blocks, seed=allocator_seed)
    conn = kvxfer.Connector(args.name, backend=args.backend, registry=args.registry,
                            registry_token=args.registry_token, timeout=args.timeout)
    conn.register(cache.layers, block_dim=1)
    _ = conn.requests  # joins the registry's directory now, not on the first request
    return Worker(cfg, Mode(args.mode), device, model, cache, alloc, conn, args.timeout)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work: KV must be in memory before kvxfer reads it."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
