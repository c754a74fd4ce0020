"""NIXL baseline: the same blocks of the same pools, moved by NIXL over UCX (when importable).

Layer: tools. The serving side registers its pool with a NIXL agent and sends the agent's
metadata and the layer addresses; the measuring side builds one descriptor per piece (what
NIXL users do for paged KV) and times READ or WRITE. Neither side imports NIXL unless asked.
"""

from __future__ import annotations

import importlib
import importlib.util
import time
from typing import Any

import numpy as np

from .._tensors import MemoryKind
from ..errors import BackendUnavailableError, TransferTimeoutError, TransportError
from ..handle import Op
from ..layout import KVLayout
from .arrays import Pool
from .results import BaselineKind, BaselineResult, Timing

__all__ = ["nixl_module_name", "NixlTarget", "measure_nixl"]

_MODULES = ("nixl", "nixl_cu13", "nixl_cu12")


def nixl_module_name() -> str | None:
    """The importable NIXL package here, or None."""
    for name in _MODULES:
        if importlib.util.find_spec(name) is not None:
            return name
    return None


def _api() -> Any:
    name = nixl_module_name()
    if name is None:
        raise BackendUnavailableError(f"NIXL is not installed (tried {', '.join(_MODULES)})")
    return importlib.import_module(f"{name}._api")


def _mem(pool: Pool) -> tuple[str, int]:
    return ("VRAM", pool.device) if pool.memory is MemoryKind.CUDA else ("DRAM", 0)


def _piece_rows(addrs: list[int], pool: Pool, blocks: np.ndarray, dev: int) -> np.ndarray:
    """(address, length, device) of every piece of ``blocks`` in every layer, as uint64 rows."""
    geom = KVLayout.from_tensors(list(pool.tensors), block_dim=pool.workload.block_dim).geometry
    rows = []
    for addr, t in zip(addrs, geom.tensors):
        for seg in t.segments:
            starts = (addr + blocks[:, None] * t.block_stride + seg.offset
                      + np.arange(seg.count)[None, :] * seg.stride).reshape(-1)
            rows.append(np.stack([starts, np.full_like(starts, seg.run), np.full_like(starts, dev)], axis=1))
    return np.concatenate(rows).astype(np.uint64)


def _region_rows(pool: Pool, addrs: list[int], dev: int) -> np.ndarray:
    return np.array([(a, pool.workload.pool_bytes // pool.workload.layers, dev) for a in addrs], dtype=np.uint64)


def _addrs(pool: Pool) -> list[int]:
    return [int(a) for a in KVLayout.from_tensors(list(pool.tensors), block_dim=pool.workload.block_dim).addrs]


class NixlTarget:
    """Serving side: a NIXL agent with the pool registered."""

    def __init__(self, pool: Pool, name: str = "kvxfer-bench-target"):
        api = _api()
        self._agent = api.nixl_agent(name, api.nixl_agent_config(backends=["UCX"]))
        mem, dev = _mem(pool)
        self.addrs = _addrs(pool)
        self._reg = self._agent.get_reg_descs(_region_rows(pool, self.addrs, dev), mem)
        self._agent.register_memory(self._reg)
        self.metadata: bytes = bytes(self._agent.get_agent_metadata())

    def close(self) -> None:
        """Deregister the pool; idempotent."""
        if self._reg is not None:
            self._agent.deregister_memory(self._reg)
            self._reg = None


def measure_nixl(pool: Pool, remote_meta: bytes, remote_addrs: list[int], op: Op, local_blocks: np.ndarray, remote_blocks: np.ndarray, remote_device: int,
                 iters: int, warmup: int, timeout: float, name: str = "kvxfer-bench-initiator") -> BaselineResult:
    """Time NIXL READ/WRITE of the same pieces as kvxfer moved; a failure becomes the result's reason.

    The remote pool has the same workload as ``pool``, so its pieces sit at the same offsets.
    """
    try:
        api = _api()
        agent = api.nixl_agent(name, api.nixl_agent_config(backends=["UCX"]))
        mem, dev = _mem(pool)
        addrs = _addrs(pool)
        reg = agent.get_reg_descs(_region_rows(pool, addrs, dev), mem)
        agent.register_memory(reg)
        peer = agent.add_remote_agent(remote_meta)
        rdev = remote_device if pool.memory is MemoryKind.CUDA else 0
        local = agent.get_xfer_descs(_piece_rows(addrs, pool, local_blocks, dev), mem)
        remote = agent.get_xfer_descs(_piece_rows(remote_addrs, pool, remote_blocks, rdev), mem)
        handle = agent.initialize_xfer("READ" if op is Op.READ else "WRITE", local, remote, peer, b"")
        samples = []
        for it in range(warmup + iters):
            t0 = time.perf_counter()
            state = agent.transfer(handle)
            while state != "DONE":
                if state == "ERR":
                    raise TransportError("NIXL transfer reported ERR")
                if time.perf_counter() - t0 > timeout:
                    raise TransferTimeoutError(f"NIXL transfer not done after {timeout} s")
                state = agent.check_xfer_state(handle)
            if it >= warmup:
                samples.append(time.perf_counter() - t0)
        agent.release_xfer_handle(handle)
        agent.deregister_memory(reg)
    except Exception as exc:  # NIXL is a reference: its failure is recorded, not fatal
        return BaselineResult(BaselineKind.NIXL, None, f"failed: {type(exc).__name__}: {exc}")
    rows = pool.workload.pieces
    return BaselineResult(BaselineKind.NIXL, Timing.of(pool.workload.total_bytes, samples),
                          f"{nixl_module_name()} UCX {op.value.upper()}, {rows} descriptors (one per piece)")
